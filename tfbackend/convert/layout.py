"""What each rank's files hold: named tensors, each the row-major concatenation of pieces.

Plain data, decided before a byte is read (`state.py` builds it from the plan, `loaders.py`
says how one parameter is cut); `writer.py` streams it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from tfbackend.replace.names import TORCH_DTYPE

FLOAT32 = "float32"
_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4,
          "int16": 2, "int8": 1, "uint8": 1, "bool": 1}  # fmt: skip
# safetensors dtype spelling → torch's
TORCH_OF = {**TORCH_DTYPE, "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
            "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def dtype_bytes(dtype: str) -> int:
    return _BYTES[dtype]


@dataclass
class Piece:
    """A contiguous run of an output tensor: `source[select]` (row-major) or a constant."""

    source: str | None  # checkpoint tensor name; None: `fill` repeated `fill_numel` times
    select: list[list[int]] = field(default_factory=list)  # [start, stop) for every source dim
    fill: float = 0.0
    fill_numel: int = 0

    @property
    def numel(self) -> int:
        if self.source is None:
            return self.fill_numel
        return prod(stop - start for start, stop in self.select)


def whole(shape: list[int]) -> list[list[int]]:
    return [[0, d] for d in shape]


def rows(shape: list[int], dim: int, start: int, size: int) -> list[list[int]]:
    """Every index of `shape`, except [start, start + size) along `dim`."""
    sel = whole(shape)
    sel[dim] = [start, start + size]
    return sel


@dataclass
class OutTensor:
    name: str
    shape: list[int]
    dtype: str  # torch spelling: "bfloat16", "float32", "int64", …
    pieces: list[Piece]
    origin: str  # the plan entry or module it comes from, for messages
    aliases: list[str] = field(default_factory=list)  # every name vLLM's model reaches it by
    buffer: bool = False  # a buffer of vLLM's model, not a parameter

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_bytes(self.dtype)


@dataclass
class RankLayout:
    pp_rank: int
    tp_rank: int
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Layout:
    """What every rank's files hold, or why the model cannot be converted."""

    tp: int
    pp: int
    dtype: str
    ranks: list[RankLayout] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    not_written: dict[str, str] = field(default_factory=dict)  # checkpoint tensor → why

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranks)


class Blocked(Exception):
    """One reason the model cannot be converted (collected into `Layout.blockers`)."""
