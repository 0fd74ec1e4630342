"""Shard arithmetic: the per-rank shapes of a replaced module's parameters.

Plain functions of a linear's fact and tp, shared by the per-linear pass and every fuser, so
no step has to reach back into the planner for them.
"""

from __future__ import annotations

from tfbackend.inspect.facts import ModuleFact
from tfbackend.plan import ParamShard


def pad_vocab(vocab: int, pad_to: int = 64) -> int:
    return ((vocab + pad_to - 1) // pad_to) * pad_to


def split(size: int, tp: int) -> int:
    """Per-rank size of a dimension split over tp ranks (floor when it does not divide: the
    divisibility rules report it)."""
    return size // tp if tp else size


def column_shards(fact: ModuleFact, tp: int) -> list[ParamShard]:
    out, inp = fact.attrs["out_features"], fact.attrs["in_features"]
    shards = [ParamShard("weight", [out, inp], [split(out, tp), inp], 0)]
    if fact.attrs.get("bias"):
        shards.append(ParamShard("bias", [out], [split(out, tp)], 0))
    return shards


def row_shards(fact: ModuleFact, tp: int) -> list[ParamShard]:
    out, inp = fact.attrs["out_features"], fact.attrs["in_features"]
    shards = [ParamShard("weight", [out, inp], [out, split(inp, tp)], 1)]
    if fact.attrs.get("bias"):
        shards.append(ParamShard("bias", [out], [out], None))
    return shards


def replicated_shards(fact: ModuleFact) -> list[ParamShard]:
    """Every direct parameter whole on every rank."""
    return [ParamShard(n, list(s), list(s), None) for n, s in fact.params.items()]


def stacked_shards(parts: list[ModuleFact], full_out: int, rank_out: int) -> list[ParamShard]:
    """Linears stacked on the output dim into one (QKV, merged column): split on dim 0."""
    inp = parts[0].attrs["in_features"]
    shards = [ParamShard("weight", [full_out, inp], [rank_out, inp], 0)]
    if parts[0].attrs.get("bias"):
        shards.append(ParamShard("bias", [full_out], [rank_out], 0))
    return shards


def whole_shards(part: ModuleFact, out: int | None = None) -> list[ParamShard]:
    """A linear's weight (and bias) of `out` rows, whole on every rank (`disable_tp`)."""
    out = out or part.attrs["out_features"]
    inp = part.attrs["in_features"]
    shards = [ParamShard("weight", [out, inp], [out, inp], None)]
    if part.attrs.get("bias"):
        shards.append(ParamShard("bias", [out], [out], None))
    return shards


SHARDERS = {
    "ColumnParallelLinear": column_shards,
    "RowParallelLinear": row_shards,
}
