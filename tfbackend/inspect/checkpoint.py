"""Checkpoint headers: tensor names, dtypes and shapes, read without reading a single weight.

A safetensors file starts with an 8-byte little-endian header length and a JSON header; that is
all we read (locally with a bounded `read`, remotely through `huggingface_hub`'s range requests).
Pickle checkpoints (`.bin`, `.pt`) are listed, never opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from tfbackend.errors import CheckpointError
from tfbackend.inspect.facts import SourceInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# A header is JSON describing tensors; anything near this size is not a header but damage.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Every dtype the safetensors library reads, with its size in bits: its `Dtype` enum, as the
# library's own error lists it ("unknown variant `X`, expected one of `BOOL`, `F4`, …",
# safetensors 0.8.0). A header with any other dtype is refused by the library, so by vLLM's loader.
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}  # fmt: skip

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# Where the headers came from.
FORMAT_SAFETENSORS = "safetensors"
FORMAT_PICKLE = "pickle"  # .bin/.pt only: never unpickled
FORMAT_NONE = "none"  # no weight files at all (a config-only folder)
FORMAT_UNAVAILABLE = "unavailable"  # could not be read (offline, no network)


@dataclass
class TensorHeader:
    name: str
    dtype: str  # safetensors spelling: "BF16", "F32", …
    shape: list[int]
    file: str

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BITS.get(self.dtype, 8) // 8


@dataclass
class CheckpointHeaders:
    """The tensors a checkpoint holds, as its headers describe them."""

    location: str  # folder or hub id
    origin: str  # "local", "hub" or "hub-cache"
    format: str
    files: list[str] = field(default_factory=list)
    tensors: dict[str, TensorHeader] = field(default_factory=dict)
    sharded: bool = False
    pickle_files: list[str] = field(default_factory=list)
    unavailable_reason: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "origin": self.origin,
            "format": self.format,
            "files": list(self.files),
            "sharded": self.sharded,
            "num_tensors": len(self.tensors),
            "total_bytes": self.total_bytes,
            "bytes_by_dtype": self.bytes_by_dtype(),
            "pickle_files": list(self.pickle_files),
            "unavailable_reason": self.unavailable_reason,
        }


def read_file_header(path: str | Path) -> dict[str, TensorHeader]:
    """The tensors of one safetensors file, from its header only.

    Raises CheckpointError when the file is not a regular file, or its header is truncated, not
    JSON, names a dtype the safetensors library does not know, or points past the file end.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _damaged(path, f"cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            from tfbackend.userfiles import not_regular

            raise not_regular(path, "checkpoint file", CheckpointError)
        size = st.st_size
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, "shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise _damaged(path, f"header claims {n:,} bytes but the file has {size:,} (truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _damaged(path, f"header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a JSON object")
    data_bytes = size - 8 - n
    tensors: dict[str, TensorHeader] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(info["dtype"]), [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"entry {name!r} lacks dtype/shape/data_offsets") from None
        if dtype not in DTYPE_BITS:
            raise _damaged(
                path, f"tensor {name!r} has dtype {dtype!r}, which the safetensors library refuses"
            )
        if end > data_bytes or begin > end:
            raise _damaged(path, f"tensor {name!r} ends past the end of the file (truncated)")
        bits = prod(shape) * DTYPE_BITS[dtype]
        if any(d < 0 for d in shape) or bits % 8 or bits // 8 != end - begin:
            raise _damaged(
                path,
                f"tensor {name!r} ({dtype} {shape}) needs {bits / 8:,.1f} bytes but its "
                f"data_offsets span {end - begin:,}",
            )
        tensors[name] = TensorHeader(name=name, dtype=dtype, shape=shape, file=path.name)
    return tensors


def read_index(path: str | Path) -> dict[str, str]:
    """The weight_map of a safetensors index: tensor name → shard file in the same folder."""
    from tfbackend.userfiles import read_text

    path = Path(path)
    text = read_text(path, "safetensors index", error=CheckpointError)
    try:
        weight_map = json.loads(text)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise CheckpointError(
            f"{path} is not a valid safetensors index (no weight_map): re-download it"
        ) from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v
        for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{path} is not a valid safetensors index: its weight_map must map tensor names to "
            "shard file names in the same folder; re-download it"
        )
    return weight_map


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable safetensors file: {what}; re-download or re-save it"
    )


def read_local(folder: str | Path) -> CheckpointHeaders:
    """Headers of the safetensors checkpoint in a folder (sharded through its index)."""
    folder = Path(folder)
    out = CheckpointHeaders(location=str(folder), origin="local", format=FORMAT_NONE)
    index = folder / INDEX_NAME
    if index.exists():
        files = sorted(set(read_index(index).values()))
        out.sharded = True
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if files:
        out.format = FORMAT_SAFETENSORS
        out.files = files
        for name in files:
            path = folder / name
            if not path.exists():
                raise CheckpointError(
                    f"{index} lists {name}, which is missing from {folder}: download every shard"
                )
            out.tensors.update(read_file_header(path))
        return out
    out.pickle_files = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if out.pickle_files:
        out.format = FORMAT_PICKLE
    return out


def read_hub(
    repo_id: str, *, revision: str | None = None, token: str | None = None
) -> CheckpointHeaders:
    """Headers of a hub checkpoint: range requests online, the local cache when offline."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    token = token or os.environ.get("HF_TOKEN") or None
    out = CheckpointHeaders(location=repo_id, origin="hub", format=FORMAT_NONE)
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return _read_hub_cache(repo_id, revision, out)
    try:
        meta = huggingface_hub.get_safetensors_metadata(repo_id, revision=revision, token=token)
    except hf_errors.NotASafetensorsRepoError:
        return _hub_pickle_only(repo_id, revision, token, out)
    except hf_errors.SafetensorsParsingError as exc:
        raise CheckpointError(
            f"a safetensors header in {repo_id} could not be parsed: {str(exc).splitlines()[0]}"
        ) from exc
    except (hf_errors.OfflineModeIsEnabled, hf_errors.HfHubHTTPError, OSError) as exc:
        cached = _read_hub_cache(repo_id, revision, out)
        if cached.format != FORMAT_UNAVAILABLE:
            return cached
        cached.unavailable_reason = f"the hub could not be reached ({type(exc).__name__})"
        return cached
    out.format = FORMAT_SAFETENSORS
    out.sharded = meta.sharded
    out.files = sorted(meta.files_metadata)
    for fname, fmeta in meta.files_metadata.items():
        for name, info in fmeta.tensors.items():
            if info.dtype not in DTYPE_BITS:
                raise CheckpointError(
                    f"{repo_id}/{fname} is not a readable safetensors file: tensor {name!r} has "
                    f"dtype {info.dtype!r}, which the safetensors library refuses"
                )
            out.tensors[name] = TensorHeader(name, info.dtype, list(info.shape), fname)
    return out


def _read_hub_cache(
    repo_id: str, revision: str | None, out: CheckpointHeaders
) -> CheckpointHeaders:
    """Headers from files already in the hub cache; unavailable when they are not all there."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> str | None:
        path = try_to_load_from_cache(repo_id, name, revision=revision)
        return path if isinstance(path, str) else None

    index = cached(INDEX_NAME)
    single = None if index else cached(SINGLE_NAME)
    if index or single:
        folder = Path(index or single).parent
        try:
            local = read_local(folder)
        except CheckpointError:
            local = None
        if local is not None and local.format == FORMAT_SAFETENSORS:
            local.location, local.origin = repo_id, "hub-cache"
            return local
    out.format = FORMAT_UNAVAILABLE
    out.origin = "hub"
    out.unavailable_reason = "offline and the checkpoint's safetensors files are not in the cache"
    return out


def _hub_pickle_only(
    repo_id: str, revision: str | None, token: str | None, out: CheckpointHeaders
) -> CheckpointHeaders:
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except Exception as exc:  # noqa: BLE001 - any failure: we just do not know the format
        out.format = FORMAT_UNAVAILABLE
        out.unavailable_reason = f"no safetensors, and the file list failed ({type(exc).__name__})"
        return out
    out.pickle_files = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    out.format = FORMAT_PICKLE if out.pickle_files else FORMAT_NONE
    return out


def read_headers(
    source: SourceInfo, *, token: str | None = None, offline: bool | None = None
) -> CheckpointHeaders:
    """The checkpoint of a resolved source: a local folder's files, or the hub repo's."""
    if source.kind == "hub" and source.repo_id:
        if offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
        return read_hub(source.repo_id, revision=source.revision, token=token)
    if source.local_dir:
        return read_local(source.local_dir)
    return CheckpointHeaders(location=source.location, origin="local", format=FORMAT_NONE)
