"""QKVFuser (vLLM fusers/qkv.py): three sibling linears on one input, q the widest, become one
head-sharded QKVParallelLinear `qkv_proj`; the projection the forward returns is row-split."""

from __future__ import annotations

from tfbackend.fusers.base import (
    Fuser,
    Outcome,
    candidate,
    entry,
    linear,
    out_proj,
    same_input_and_bias,
)
from tfbackend.plan import K_LINEAR
from tfbackend.plan.shards import stacked_shards


def qkv_parallel(qualname, parts, q_out, kv_out, hd, tp, stage, fuser, why):
    """The QKVParallelLinear entry: heads split over tp, kv heads replicated when fewer."""
    heads, kv = q_out // hd, kv_out // hd
    heads_rank = heads // tp
    kv_rank = max(1, kv // tp)  # QKVParallelLinear replicates kv heads when kv < tp
    full_out, rank_out = (heads + 2 * kv) * hd, (heads_rank + 2 * kv_rank) * hd
    return entry(
        qualname,
        [p.qualname for p in parts],
        parts[0].class_name,
        K_LINEAR,
        "QKVParallelLinear",
        f"{why} (vLLM {'QKVFuser' if fuser == 'qkv' else 'PackedQKVFuser'})",
        stacked_shards(parts, full_out, rank_out),
        stage,
        fuser=fuser,
        num_heads=heads_rank,
        num_kv_heads=kv_rank,
        head_size=hd,
        kv_replicas=max(1, tp // kv) if kv < tp else 1,
        output_sizes=[q_out, kv_out, kv_out],
    )


class QKVFuser(Fuser):
    name = "QKVFuser"
    key = "qkv"

    def fuse(self, facts, plan, m, stage) -> Outcome | None:
        match = candidate(m, self.key)
        if match is None:
            return None
        parts = [linear(facts, f"{m.qualname}.{match[x]}") for x in ("q", "k", "v")]
        if None in parts:
            return Outcome(why_not="a q/k/v projection is not an nn.Linear fact")
        hd = match.get("head_dim") or facts.config.head_dim
        qo, ko, vo = (p.attrs["out_features"] for p in parts)
        if not (hd and same_input_and_bias(parts) and ko == vo and qo % hd == 0 and ko % hd == 0):
            return Outcome(why_not="q/k/v shapes not compatible with one head-sharded GEMM")
        fused = qkv_parallel(
            f"{m.qualname}.qkv_proj", parts, qo, ko, hd, plan.tp, stage, "qkv", "q/k/v fused"
        )
        return Outcome([fused, *out_proj(facts, plan, m, match, stage, "fused q/k/v")])
