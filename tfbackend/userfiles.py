"""Reading files a user (or a model repo) supplies: regular files only, with a size bound.

A FIFO would block the read forever and a link to /dev/zero would fill memory, so a file is
opened without blocking (O_NONBLOCK), checked with fstat on that very descriptor (no race with a
swapped path), and read up to its bound only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tfbackend.errors import UserError
from tfbackend.limits import MAX_TEXT_BYTES

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def not_regular(path: str | Path, what: str, error: type[UserError] = UserError) -> UserError:
    """The error for a path that exists but is not a regular file."""
    try:
        kind = _kind(os.stat(path).st_mode)
    except OSError:
        kind = "unreadable"
    return error(f"{what} {path} is not a regular file ({kind}): point at a real file")


def check_regular(path: str | Path, what: str, error: type[UserError] = UserError) -> int:
    """The size of `path`, a regular file (symlinks followed); else the error, one line."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, what, error)
    return st.st_size


def read_bytes(
    path: str | Path,
    what: str,
    *,
    limit: int = MAX_TEXT_BYTES,
    error: type[UserError] = UserError,
) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(
                f"{what} {path} is not a regular file ({_kind(st.st_mode)}): point at a real file"
            )
        if st.st_size > limit:
            raise error(
                f"{what} {path} is {st.st_size / 2**20:,.1f} MiB, more than the "
                f"{limit / 2**20:,.0f} MiB tfbackend reads: is it the right file?"
            )
        data = fh.read(limit + 1)  # the file may grow after fstat
    if len(data) > limit:
        raise error(f"{what} {path} grew past {limit / 2**20:,.0f} MiB while being read")
    return data


def read_text(
    path: str | Path,
    what: str,
    *,
    limit: int = MAX_TEXT_BYTES,
    error: type[UserError] = UserError,
) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes."""
    data = read_bytes(path, what, limit=limit, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}, line {line}): fix or re-save the file as UTF-8"
        ) from None
