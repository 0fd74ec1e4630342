"""The source's small files that travel with the converted weights.

vLLM reads config.json (and generation_config.json for default sampling) from the converted
folder, and its tokenizer unless `skip_tokenizer_init`; a model's licence and card belong with
its weights. So every top-level file is copied except the weights themselves: the safetensors
files and their index (replaced by the per-rank files) and pickles (never read).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tfbackend.convert.writer import WrittenFile
from tfbackend.inspect.checkpoint import INDEX_NAME, PICKLE_SUFFIXES

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", *PICKLE_SUFFIXES)
SKIPPED_NAMES = {INDEX_NAME, "pytorch_model.bin.index.json"}


def files_to_copy(source_dir: Path) -> list[Path]:
    out = []
    for path in sorted(source_dir.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.name in SKIPPED_NAMES:
            continue
        out.append(path)
    return out


def copy_files(paths: list[Path], dest: Path) -> list[WrittenFile]:
    written = []
    for path in paths:
        target = dest / path.name
        shutil.copyfile(path, target)  # follows the hub cache's symlinks to the blobs
        sha = hashlib.sha256()
        with target.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        written.append(WrittenFile(path.name, target.stat().st_size, sha.hexdigest(), 0))
    return written
