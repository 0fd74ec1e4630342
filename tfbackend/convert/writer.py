"""Stream the layout into safetensors files: each piece read once, cast, written, forgotten.

Every tensor's shape and dtype is known before a byte is read, so each file's header is written
first and its data follows in header order. The tp ranks of a stage advance tensor by tensor
together, so the slices of one checkpoint tensor are read back to back. The caller reads (a
piece that is one range of the file in 8 MiB chunks straight into a buffer; any other — a
column slice, a cast — whole) and hashes (sha256) what it read, while a thread writes the
previous buffer. Three buffers circulate, so memory holds a few chunks and at most a rank's
slice of one tensor, never a state dict.
"""

from __future__ import annotations

import hashlib
import json
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tfbackend.convert.layout import OutTensor, RankLayout
from tfbackend.convert.reader import TORCH_DTYPES, SourceReader
from tfbackend.convert.shards import Part

SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
# write() in chunks: one call moves at most ~2 GiB on Linux, and here (page cache under
# pressure) 4-8 MiB writes measured 2-3× faster than 64 MiB ones (benchmarks/convert.py)
_MAX_WRITE = 8 << 20
CHUNK = 8 << 20  # a contiguous piece moves in chunks: three such buffers are in flight at most


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
        header[t.name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _File:
    """One output file: hashed by the caller as each chunk is read, written by the sink."""

    def __init__(self, path: Path, tensors: list[OutTensor]):
        self.path, self.tensors = path, len(tensors)
        self.expected = sum(t.nbytes for t in tensors)
        self.sha = hashlib.sha256()
        self.fh = path.open("wb", buffering=0)
        self.size = 0
        self.header = memoryview(header_bytes(tensors))
        self.sha.update(self.header)

    def write(self, view: memoryview) -> None:
        for start in range(0, len(view), _MAX_WRITE):
            chunk = view[start : start + _MAX_WRITE]
            done = 0
            while done < len(chunk):
                done += self.fh.write(chunk[done:])
        self.size += len(view)

    def close(self) -> WrittenFile:
        self.fh.close()
        if self.size - len(self.header) != self.expected:  # a layout bug, never user input
            raise RuntimeError(f"{self.path.name}: wrote {self.size} bytes of {self.expected}")
        return WrittenFile(self.path.name, self.size, self.sha.hexdigest(), self.tensors)


class _Sink:
    """A thread writing in submission order while the caller reads and hashes the next chunk
    (hashing the bytes just read, still in cache, measured faster than on a third thread).
    A buffer returns to the caller once written; errors surface in the caller."""

    def __init__(self, buffers: int = 3):
        self.tasks: queue.Queue = queue.Queue(maxsize=buffers - 1)
        self.free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self.free.put(torch.empty(0, dtype=torch.uint8))
        self.done: list[WrittenFile] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tfbackend-convert-writer")
        self.thread.daemon = True
        self.thread.start()

    def _run(self) -> None:
        while (task := self.tasks.get()) is not None:
            fn, release = task
            try:
                if self.error is None:
                    fn()
            except BaseException as exc:  # handed to the caller's thread
                self.error = exc
            finally:
                if release is not None:
                    release()

    def _submit(self, fn, release=None) -> None:
        if self.error is not None:
            if release is not None:
                release()
            raise self.error
        self.tasks.put((fn, release))

    def buffer(self, nbytes: int) -> torch.Tensor:
        buf = self.free.get()
        return buf if buf.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)

    def open(self, file: _File) -> None:
        self._submit(lambda: file.write(file.header))

    def write(self, file: _File, buf: torch.Tensor, nbytes: int) -> None:
        view = memoryview(buf.numpy())[:nbytes]
        file.sha.update(view)
        self._submit(lambda: file.write(view), lambda: self.free.put(buf))

    def close(self, file: _File) -> None:
        self._submit(lambda: self.done.append(file.close()))

    def finish(self) -> None:
        self.tasks.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def write_stage(
    ranks: list[RankLayout],
    parts: dict[int, list[Part]],
    folder: Path,
    reader: SourceReader,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> list[WrittenFile]:
    """Write the files of one pipeline stage's tp ranks, advancing them tensor by tensor."""
    sink = _Sink()
    cursors = [_RankCursor(rank, parts[i], folder, sink) for i, rank in enumerate(ranks)]
    try:
        for i in range(max((len(r.tensors) for r in ranks), default=0)):
            for cursor in cursors:
                if i < len(cursor.rank.tensors):
                    cursor.write_tensor(i, reader, on_bytes)
        for cursor in cursors:
            cursor.finish()
    finally:
        try:
            sink.finish()
        finally:
            for cursor in cursors:
                cursor.abort()
    return sink.done


class _RankCursor:
    """One rank's files: the part being written and where the next part starts."""

    def __init__(self, rank: RankLayout, parts: list[Part], folder: Path, sink: _Sink):
        self.rank, self.parts, self.folder, self.sink = rank, parts, folder, sink
        self.part_index = -1
        self.current: _File | None = None
        self.ends_at = 0  # index of the first tensor past the current part

    def write_tensor(self, i: int, reader: SourceReader, on_bytes) -> None:
        if self.current is None or i >= self.ends_at:
            if self.current is not None:
                self.sink.close(self.current)
            self.part_index += 1
            part = self.parts[self.part_index]
            self.current = _File(self.folder / part.file_name, part.tensors)
            self.sink.open(self.current)
            self.ends_at = i + len(part.tensors)
        t = self.rank.tensors[i]
        dtype = TORCH_DTYPES[t.dtype]
        itemsize = torch.empty((), dtype=dtype).element_size()
        for piece in t.pieces:
            nbytes = piece.numel * itemsize
            direct = reader.direct(piece, dtype)
            if direct is not None:  # one range of the file: read and written in chunks
                fd, offset = direct
                for start in range(0, nbytes, CHUNK):
                    size = min(CHUNK, nbytes - start)
                    buf = self.sink.buffer(size)
                    reader.pread(fd, memoryview(buf.numpy())[:size], offset + start)
                    self.sink.write(self.current, buf, size)
                    on_bytes(size)
            elif nbytes:
                buf = self.sink.buffer(nbytes)
                reader.read_into(piece, buf[:nbytes].view(dtype))
                self.sink.write(self.current, buf, nbytes)
                on_bytes(nbytes)

    def finish(self) -> None:
        if self.current is not None:
            self.sink.close(self.current)
            self.current = None

    def abort(self) -> None:
        if self.current is not None:
            self.current.fh.close()
            self.current = None
