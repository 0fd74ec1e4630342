"""The output folder: refused when it would clobber something, written beside it, renamed in.

Everything is written into a hidden folder next to --out (same filesystem, so the final rename
is atomic) and renamed to --out only once every file and the manifest are complete: an
interrupted conversion leaves no --out that looks finished, and its staging folder is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from tfbackend.errors import UserError


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: Path, source_dir: Path | None, overwrite: bool) -> Path:
    """The resolved --out, or a UserError saying why it cannot be written."""
    out = out.expanduser().resolve()
    if source_dir is not None:
        source_dir = source_dir.resolve()
        if _inside(out, source_dir) or _inside(source_dir, out):
            raise UserError(
                f"--out {out} overlaps the source folder {source_dir}: convert never writes into "
                "the source; choose a folder elsewhere"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty: pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: its parent folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: cannot write in {out.parent}")
    return out


@contextlib.contextmanager
def staged(out: Path):
    """A fresh folder beside `out`; on success it replaces `out`, on failure it is removed."""
    stage = out.parent / f".{out.name}.tfbackend-partial-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _replace(stage, out)


def _replace(stage: Path, out: Path) -> None:
    if not out.exists():
        os.replace(stage, out)
        return
    # Swap the old folder aside first: `out` holds either the old or the new files, never a mix
    old = out.parent / f".{out.name}.tfbackend-old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        os.replace(old, out)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
