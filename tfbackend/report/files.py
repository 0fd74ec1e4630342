"""Write report files for CI (`--junit`, `--markdown`, `--json FILE`): the renderers give the text."""

from __future__ import annotations

import os
from pathlib import Path

from tfbackend.errors import UserError


def write_report_file(path: str | Path, text: str) -> None:
    """Write `text` to `path`, making its folder; `$GITHUB_STEP_SUMMARY` is appended to, as GitHub
    expects (other steps may have written to it already)."""
    p = Path(path)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    append = bool(summary) and p.resolve() == Path(summary).resolve()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a" if append else "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise UserError(f"cannot write {p}: {exc.strerror or exc}") from None
