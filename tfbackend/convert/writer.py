"""Stream the layout into safetensors files: each piece read once, cast, written, forgotten.

Every tensor's shape and dtype is known before a byte is read, so each file's header is written
first and its data follows in header order; memory holds one piece at a time (a slice of one
checkpoint tensor), never a rank's state dict. The tp ranks of a stage advance tensor by tensor
together, so the slices of one checkpoint tensor are read back to back (its pages read from disk
once, whatever the split dimension). Each file's sha256 is computed as it is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tfbackend.convert.layout import OutTensor, Piece, RankLayout, dtype_bytes
from tfbackend.convert.shards import Part
from tfbackend.errors import CheckpointError

TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


@dataclass
class WrittenFile:
    name: str
    bytes: int
    sha256: str
    tensors: int


def header_bytes(tensors: list[OutTensor]) -> bytes:
    """The safetensors header: tensors in this order, contiguous, padded to 8 bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        size = t.numel * dtype_bytes(t.dtype)
        header[t.name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _FileWriter:
    def __init__(self, path: Path, tensors: list[OutTensor]):
        self.path = path
        self.tensors = len(tensors)
        self.expected = sum(t.numel * dtype_bytes(t.dtype) for t in tensors)
        self.sha = hashlib.sha256()
        self.fh = path.open("wb")
        head = header_bytes(tensors)
        self.size = 0
        self._write(head)
        self.data = 0

    def _write(self, data) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.size += len(data)

    def write(self, data) -> None:
        self._write(data)
        self.data += len(data)

    def close(self) -> WrittenFile:
        self.fh.close()
        if self.data != self.expected:  # a layout bug, never user input
            raise RuntimeError(f"{self.path.name}: wrote {self.data} bytes of {self.expected}")
        return WrittenFile(self.path.name, self.size, self.sha.hexdigest(), self.tensors)


class CheckpointSlices:
    """Sliced reads from the source's safetensors files (`safe_open(...).get_slice`)."""

    def __init__(self, folder: Path, file_of: dict[str, str]):
        self.folder = folder
        self.file_of = file_of
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def close(self) -> None:
        self._stack.close()

    def read(self, piece: Piece) -> torch.Tensor:
        if piece.source is None:
            return torch.full((piece.fill_numel,), piece.fill)
        fname = self.file_of[piece.source]
        handle = self._handles.get(fname)
        if handle is None:
            try:
                handle = self._stack.enter_context(safe_open(str(self.folder / fname), "pt"))
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise CheckpointError(f"{self.folder / fname}: cannot be read ({exc})") from exc
            self._handles[fname] = handle
        sl = handle.get_slice(piece.source)
        t = sl[tuple(slice(a, b) for a, b in piece.select)] if piece.select else sl[:]
        self.bytes_read += t.numel() * t.element_size()
        return t


def _as_bytes(t: torch.Tensor, dtype: str):
    t = t.to(TORCH_DTYPES[dtype]).contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().data


def write_stage(
    ranks: list[RankLayout],
    parts: dict[int, list[Part]],
    folder: Path,
    reader: CheckpointSlices,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> list[WrittenFile]:
    """Write the files of one pipeline stage's tp ranks, advancing them tensor by tensor."""
    cursors = [_RankCursor(rank, parts[i], folder) for i, rank in enumerate(ranks)]
    written: list[WrittenFile] = []
    try:
        longest = max((len(r.tensors) for r in ranks), default=0)
        for i in range(longest):
            for cursor in cursors:
                if i < len(cursor.rank.tensors):
                    written.extend(cursor.write_tensor(i, reader, on_bytes))
        for cursor in cursors:
            written.extend(cursor.finish())
    finally:
        for cursor in cursors:
            cursor.abort()
    return written


class _RankCursor:
    """One rank's files: the part being written and where the next part starts."""

    def __init__(self, rank: RankLayout, parts: list[Part], folder: Path):
        self.rank, self.parts, self.folder = rank, parts, folder
        self.part_index = -1
        self.current: _FileWriter | None = None
        self.ends_at = 0  # index of the first tensor past the current part

    def write_tensor(self, i: int, reader: CheckpointSlices, on_bytes) -> list[WrittenFile]:
        done = []
        if self.current is None or i >= self.ends_at:
            if self.current is not None:
                done.append(self.current.close())
            self.part_index += 1
            part = self.parts[self.part_index]
            self.current = _FileWriter(self.folder / part.file_name, part.tensors)
            self.ends_at = i + len(part.tensors)
        t = self.rank.tensors[i]
        for piece in t.pieces:
            data = _as_bytes(reader.read(piece), t.dtype)
            self.current.write(data)
            on_bytes(len(data))
        return done

    def finish(self) -> list[WrittenFile]:
        if self.current is None:
            return []
        out = [self.current.close()]
        self.current = None
        return out

    def abort(self) -> None:
        if self.current is not None:
            self.current.fh.close()
            self.current = None
