"""Write report files for CI (`--junit`, `--markdown`, `--json FILE`): the renderers give the text.

A report never replaces an input of the same command (the model's folder, a manifest, a
baseline, a prompts file), and it is written atomically: into a temporary file in the same
folder, then `os.replace`d over the target, so a reader never sees half a report.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tfbackend.errors import UserError


def check_outputs(
    outputs: dict[str, str | None],
    *,
    files: Iterable[tuple[str, str | Path]] = (),
    folders: Iterable[tuple[str, str | Path]] = (),
) -> None:
    """Refuse, before any work, report paths that name an input or another report.

    `outputs` maps a flag to its path (None: not given); `files` and `folders` are (what, path)
    of the command's inputs: a report may not be one of the files, nor lie in one of the folders.
    """
    files, folders = list(files), list(folders)
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if not path:
            continue
        target = Path(path).expanduser().resolve()
        for what, folder in folders:
            root = Path(folder).expanduser().resolve()
            if target == root or root in target.parents:
                raise UserError(
                    f"{flag} {path} is inside {what} {folder}: write reports elsewhere, never "
                    "into an input of the command"
                )
        for what, file in files:
            if _same_file(target, Path(file)):
                raise UserError(f"{flag} {path} would overwrite {what} {file}: write it elsewhere")
        if target in seen:
            raise UserError(f"{flag} and {seen[target]} both name {path}: give each its own file")
        seen[target] = flag


def _same_file(target: Path, other: Path) -> bool:
    other = other.expanduser()
    if target == other.resolve():
        return True
    try:  # hard links, bind mounts
        return target.exists() and other.exists() and os.path.samefile(target, other)
    except OSError:
        return False


def write_report_file(path: str | Path, text: str) -> None:
    """Write `text` to `path`, making its folder; `$GITHUB_STEP_SUMMARY` is appended to, as GitHub
    expects (other steps may have written to it already)."""
    p = Path(path)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    append = bool(summary) and p.resolve() == Path(summary).resolve()
    target = p.resolve()  # through a symlink: replace the file it names, keep the link
    try:
        if append or (target.exists() and not target.is_file()):
            if target.is_dir():
                raise UserError(f"cannot write {p}: it is a folder")
            # appending, or a FIFO or device the user named (/dev/stdout): write in place
            with target.open("a" if append else "w", encoding="utf-8") as fh:
                fh.write(text)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, text)
    except OSError as exc:
        raise UserError(f"cannot write {p}: {exc.strerror or exc}") from None


def _write_atomically(target: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode_for(target: Path) -> int:
    """The existing file's permissions, else what `open(..., "w")` would give (mkstemp: 0600)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
