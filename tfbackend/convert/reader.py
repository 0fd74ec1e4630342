"""Pieces of the source checkpoint, read with `pread` into buffers the caller owns.

Plain positioned reads of the byte ranges the safetensors headers give, rather than
`safe_open`'s memory map: a map keeps every page it touched resident for as long as the file is
open, which would make the conversion's footprint the model's size. A piece whose rows are
contiguous in the file is read straight into the output buffer; any other (a column slice) reads
the rows covering it once, kept for the next rank's slice of the same tensor, and copies out.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from tfbackend.convert.layout import TORCH_OF, Piece
from tfbackend.errors import CheckpointError

TORCH_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
    "float16": torch.float16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}  # fmt: skip


@dataclass
class _Entry:
    fd: int
    dtype: str  # torch spelling
    shape: list[int]
    start: int  # absolute offset of the tensor's first byte in its file

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=TORCH_DTYPES[self.dtype]).element_size()


def _header(path: Path) -> tuple[int, dict]:
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return 8 + n, json.loads(fh.read(n))


class SourceReader:
    """Positioned reads from a folder's safetensors files (opened lazily, closed by `close`)."""

    def __init__(self, folder: Path, file_of: dict[str, str]):
        self.folder = folder
        self.file_of = file_of
        self._fds: dict[str, int] = {}
        self._entries: dict[str, _Entry] = {}
        self._region: tuple[str, int, int] | None = None  # (tensor, first row, rows) in scratch
        self._scratch = bytearray()
        self.bytes_read = 0

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        fname = self.file_of[name]
        path = self.folder / fname
        try:
            if fname not in self._fds:
                self._fds[fname] = os.open(path, os.O_RDONLY)
            base, header = _header(path)
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc})") from exc
        fd = self._fds[fname]
        for key, info in header.items():
            if key != "__metadata__":
                self._entries[key] = _Entry(
                    fd, TORCH_OF[info["dtype"]], list(info["shape"]), base + info["data_offsets"][0]
                )
        return self._entries[name]

    def _pread(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.folder}: a safetensors file ends early (truncated)")
            done += n
        self.bytes_read += done

    def _rows(self, piece: Piece) -> tuple[_Entry, int, int, int, bool]:
        """(entry, first dim whose rows are read, byte offset, rows, dense): a piece reads rows of
        the first dimension that selects more than one index (contiguous in the file); dense
        when it is all of them, else a slice inside them (a column slice)."""
        e = self._entry(piece.source)
        shape, sel = e.shape, piece.select
        j = next((i for i, (a, b) in enumerate(sel) if b - a != 1), len(sel) - 1) if sel else 0
        row = prod(shape[j + 1 :]) * e.itemsize
        lead = 0
        for i in range(j):
            lead = (lead + sel[i][0]) * shape[i + 1]
        first = lead + (sel[j][0] if sel else 0)
        count = (sel[j][1] - sel[j][0]) if sel else 1
        dense = all(b - a == d for (a, b), d in zip(sel[j + 1 :], shape[j + 1 :], strict=True))
        return e, j, e.start + first * row, count, dense

    def direct(self, piece: Piece, dtype: torch.dtype) -> tuple[int, int] | None:
        """(fd, offset) when the piece's bytes are one range of the file already in `dtype`:
        the caller reads it in chunks straight into its own buffers (`pread`)."""
        if piece.source is None:
            return None
        e, _, offset, _, dense = self._rows(piece)
        return (e.fd, offset) if dense and TORCH_DTYPES[e.dtype] == dtype else None

    def pread(self, fd: int, view: memoryview, offset: int) -> None:
        self._pread(fd, view, offset)

    def read_into(self, piece: Piece, out: torch.Tensor) -> None:
        """Fill `out` (1-D, the output dtype, `piece.numel` elements) with the piece."""
        if piece.source is None:
            out.fill_(piece.fill)
            return
        e, j, offset, count, dense = self._rows(piece)
        if dense and TORCH_DTYPES[e.dtype] == out.dtype:
            self._pread(e.fd, memoryview(out.view(torch.uint8).numpy()), offset)
            return
        inner_shape = e.shape[j + 1 :]
        nbytes = count * prod(inner_shape) * e.itemsize
        key = (piece.source, offset, count)
        if self._region != key:  # the next rank's slice of the same rows reuses them
            if len(self._scratch) < nbytes:
                self._scratch = bytearray(nbytes)
            self._pread(e.fd, memoryview(self._scratch)[:nbytes], offset)
            self._region = key
        src = torch.frombuffer(
            self._scratch, dtype=TORCH_DTYPES[e.dtype], count=nbytes // e.itemsize
        )
        inner = tuple(slice(a, b) for a, b in piece.select[j + 1 :])
        picked = src.view(count, *inner_shape)[(slice(None), *inner)]
        out.view(picked.shape).copy_(picked)
