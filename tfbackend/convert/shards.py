"""Each rank's tensors cut into files no larger than --max-shard-size, named as vLLM looks for them.

vLLM 0.32 `ShardedStateLoader` globs `model-rank-{rank}-part-*.safetensors` when pp is 1 and
`model-pp-{pp_rank}-tp-{tp_rank}-part-*.safetensors` otherwise (TP_ONLY_PATTERN,
PP_AND_TP_PATTERN), and its `save_model` starts a new part when the next tensor would push the
current one past `max_size`. A tensor larger than the limit gets a part of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tfbackend.convert.layout import OutTensor, RankLayout, dtype_bytes
from tfbackend.errors import UserError

TP_ONLY_PATTERN = "model-rank-{rank}-part-{part}.safetensors"
PP_AND_TP_PATTERN = "model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors"
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


@dataclass
class Part:
    file_name: str
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel * dtype_bytes(t.dtype) for t in self.tensors)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' → bytes (decimal units, as huggingface_hub's)."""
    m = _SIZE.match(text or "")
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise UserError(
            f"--max-shard-size {text!r} is not a size: write it like 5GB, 500MB or 2GiB"
        )
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise UserError(f"--max-shard-size {text!r} must be at least one byte")
    return size


def file_pattern(pp: int) -> str:
    return PP_AND_TP_PATTERN if pp > 1 else TP_ONLY_PATTERN


def file_name(pp: int, pp_rank: int, tp_rank: int, part: int) -> str:
    return file_pattern(pp).format(rank=tp_rank, pp_rank=pp_rank, tp_rank=tp_rank, part=part)


def split_parts(rank: RankLayout, pp: int, max_bytes: int) -> list[Part]:
    parts: list[Part] = []
    current: list[OutTensor] = []
    size = 0
    for t in rank.tensors:
        nbytes = t.numel * dtype_bytes(t.dtype)
        if current and size + nbytes > max_bytes:
            parts.append(Part(file_name(pp, rank.pp_rank, rank.tp_rank, len(parts)), current))
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current or not parts:
        parts.append(Part(file_name(pp, rank.pp_rank, rank.tp_rank, len(parts)), current))
    return parts
