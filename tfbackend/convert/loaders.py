"""How one vLLM parameter is cut from the checkpoint on one rank: its `weight_loader`, as data.

Read in vLLM 0.32 (model_executor/layers/):
- ColumnParallel/RowParallelLinear (linear.py): `narrow(output_dim | input_dim, tp_rank * size,
  size)`; a row-parallel bias, like every replicated parameter, is whole on each rank;
- QKVParallelLinear: `[q | k | v]` of this rank, kv heads taken at `tp_rank //
  num_kv_head_replicas` (replicated when kv heads < tp); a packed q/k/v tensor is split by
  `output_sizes` first (`loaded_shard_id is None`);
- MergedColumnParallelLinear: each source's rows of this rank, in source order (gate, then up);
  with `disable_tp` (MLA's fused_qkv_a_proj) each source whole;
- VocabParallelEmbedding / ParallelLMHead (vocab_parallel_embedding.py `weight_loader`): rows
  [org_vocab_start, org_vocab_end) of the original vocab, then zeros to the padded size
  (`param[loaded:].fill_(0)`);
- FusedMoE (fused_moe/routed_experts.py `_load_w13`/`_load_w2`): w13 per expert = this rank's
  gate rows (`w1`, first half), then up rows (`w3`); w2 per expert = this rank's down columns.
  A transformers-5 3-D checkpoint tensor (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) is
  chunked the same way (`fused_weight.chunk(2, dim=1)[0 → w1, 1 → w3]`).
"""

from __future__ import annotations

from math import prod
from typing import Protocol

from tfbackend.convert.layout import Blocked, Piece, rows, whole
from tfbackend.convert.sources import DOWN, GATE, UP
from tfbackend.inspect.facts import ModuleFact
from tfbackend.plan import ParamShard, PlanEntry


class Checkpoint(Protocol):
    """What the loaders ask of the checkpoint: names by target, and shapes."""

    def key(self, target: str, why: str) -> str: ...

    def shape(self, checkpoint_name: str) -> list[int]: ...

    def expert(self, experts: str, index: int, role: str) -> str | None: ...

    def fused(self, target: str) -> str | None: ...


Cut = tuple[list[Piece], list[str]]  # pieces, and the checkpoint tensors they read


def sharded(ckpt: Checkpoint, source: str, shard: ParamShard, r: int) -> Cut:
    name = ckpt.key(f"{source}.{shard.name}", "a parameter of the plan")
    shape = ckpt.shape(name)
    if list(shape) != list(shard.full_shape):
        raise Blocked(f"{name}: checkpoint shape {shape}, the plan expects {shard.full_shape}")
    if shard.shard_dim is None:
        return [Piece(name, whole(shape))], [name]
    per = shard.rank_shape[shard.shard_dim]
    return [Piece(name, rows(shape, shard.shard_dim, r * per, per))], [name]


def vocab(ckpt: Checkpoint, qualname: str, shard: ParamShard, r: int) -> Cut:
    name = ckpt.key(f"{qualname}.{shard.name}", "a vocab table")
    shape = ckpt.shape(name)
    size, per = shape[0], shard.rank_shape[0]
    start = r * per
    real = max(0, min(start + per, size) - start)
    pieces = [Piece(name, rows(shape, 0, start, real))] if real else []
    if pad := (per - real) * prod(shape[1:]):
        pieces.append(Piece(None, fill=0.0, fill_numel=pad))
    return pieces, [name]


def qkv(ckpt: Checkpoint, entry: PlanEntry, shard: ParamShard, r: int) -> Cut:
    x = entry.extra
    hd, heads, kv, replicas = x["head_size"], x["num_heads"], x["num_kv_heads"], x["kv_replicas"]
    q_full, kv_full = x["output_sizes"][0], x["output_sizes"][1]
    q_rank, kv_rank, kv_shard = heads * hd, kv * hd, r // replicas
    spans = [(r * q_rank, q_rank), (kv_shard * kv_rank, kv_rank), (kv_shard * kv_rank, kv_rank)]
    if len(entry.sources) == 3:
        names = [ckpt.key(f"{s}.{shard.name}", "a q/k/v projection") for s in entry.sources]
        offsets = [0, 0, 0]
    elif len(entry.sources) == 1:
        names = [ckpt.key(f"{entry.sources[0]}.{shard.name}", "a packed q/k/v projection")] * 3
        offsets = [0, q_full, q_full + kv_full]
    else:
        raise Blocked(f"{entry.qualname}: q/k/v from {len(entry.sources)} modules")
    pieces = [
        Piece(name, rows(ckpt.shape(name), 0, offset + start, size))
        for name, offset, (start, size) in zip(names, offsets, spans, strict=True)
    ]
    return pieces, sorted(set(names))


def merged(ckpt: Checkpoint, entry: PlanEntry, shard: ParamShard, r: int, tp: int) -> Cut:
    sizes = entry.extra.get("output_sizes") or []
    if len(sizes) != len(entry.sources):
        raise Blocked(f"{entry.qualname}: {len(entry.sources)} sources, sizes {sizes}")
    undivided = shard.rank_shape[0] == shard.full_shape[0]
    names, pieces = [], []
    for source, size in zip(entry.sources, sizes, strict=True):
        name = ckpt.key(f"{source}.{shard.name}", "a merged projection")
        shape = ckpt.shape(name)
        if shape[0] != size:
            raise Blocked(f"{name}: {shape[0]} rows, the plan merges {size}")
        per = size if undivided else size // tp
        pieces.append(Piece(name, rows(shape, 0, 0 if undivided else r * per, per)))
        names.append(name)
    return pieces, names


def experts(ckpt: Checkpoint, fact: ModuleFact, shard: ParamShard, r: int) -> Cut:
    """w13 [E, 2I/tp, H] or w2 [E, H, I/tp] of one rank, expert by expert."""
    if fact.attrs.get("has_bias"):
        raise Blocked(f"{fact.qualname}: experts with biases (w13_bias/w2_bias) are not converted")
    if shard.name == "w13_weight":
        roles, dim, per = (GATE, UP), 0, shard.rank_shape[1] // 2
    elif shard.name == "w2_weight":
        roles, dim, per = (DOWN,), 1, shard.rank_shape[2]
    else:
        raise Blocked(f"{fact.qualname}.{shard.name}: not a parameter convert lays out")
    stacked = {role: _stacked_param(fact, role) for role in roles}
    pieces, names = [], []
    for e in range(shard.rank_shape[0]):
        for role in roles:
            name = ckpt.expert(fact.qualname, e, role)
            if name is not None:
                pieces.append(Piece(name, rows(ckpt.shape(name), dim, r * per, per)))
            elif stacked[role] and (name := ckpt.fused(f"{fact.qualname}.{stacked[role]}")):
                pieces.append(_stacked_piece(ckpt.shape(name), name, e, role, r, per, shard))
            else:
                raise Blocked(
                    f"{fact.qualname}: the checkpoint has no {role} weight for expert {e}"
                )
            names.append(name)
    return pieces, sorted(set(names))


def _stacked_param(fact: ModuleFact, role: str) -> str | None:
    want = "gate_up" if role in (GATE, UP) else "down"
    return next((n for n, s in fact.params.items() if want in n and len(s) == 3), None)


def _stacked_piece(shape, name: str, e: int, role: str, r: int, per: int, shard) -> Piece:
    # only transformers 5's own orientation; a transposed one (GPT-OSS's [E, H, 2I]) is refused
    if len(shape) != 3 or shape[1] != shard.full_shape[1]:
        want = "[E, H, I]" if role == DOWN else "[E, 2I, H]"
        raise Blocked(f"{name}: shape {shape}, convert reads {want} ({shard.full_shape})")
    if role == DOWN:
        return Piece(name, [[e, e + 1], [0, shape[1]], [r * per, (r + 1) * per]])
    start = (0 if role == GATE else shape[1] // 2) + r * per
    return Piece(name, [[e, e + 1], [start, start + per], [0, shape[2]]])
