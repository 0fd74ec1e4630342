"""Print the names of the manifest's models that a pull request changed, one per line.

    python changed_models.py BASE_REF models.toml

A model changed when its [[models]] entry is new or differs from BASE_REF's manifest (revision,
tp/pp, ignores, expectation, ...), or when it is a local path and a file under it changed.
When the manifest itself is new, every model is printed. Uses `git` and tfbackend's own parser,
so what counts as an entry is exactly what `tfbackend gate` reads.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

from tfbackend.gate.manifest import load_manifest


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def comparable(entry) -> tuple:
    return tuple(v for k, v in dataclasses.asdict(entry).items() if k != "index")


def main(base: str, manifest: str) -> None:
    path = Path(manifest)
    head = load_manifest(path)
    try:
        old_text = git("show", f"{base}:{path.as_posix()}")
    except subprocess.CalledProcessError:
        old = {}  # the manifest is new in this pull request
    else:
        # beside the real one, so relative model paths resolve the same way
        with tempfile.NamedTemporaryFile(
            "w", suffix=path.suffix, dir=path.parent, delete=False
        ) as fh:
            fh.write(old_text)
        try:
            old = {m.name: comparable(m) for m in load_manifest(fh.name).models}
        finally:
            Path(fh.name).unlink()
    root = Path(git("rev-parse", "--show-toplevel").strip())
    changed_files = [
        (root / f).resolve() for f in git("diff", "--name-only", f"{base}...HEAD").splitlines()
    ]
    for m in head.models:
        source = Path(m.source)
        touched = source.is_absolute() and any(f.is_relative_to(source) for f in changed_files)
        if old.get(m.name) != comparable(m) or touched:
            print(m.name)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
