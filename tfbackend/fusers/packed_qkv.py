"""PackedQKVFuser (vLLM fusers/packed_qkv.py): one linear already holding q, k and v (split
(q, kv, kv) in the forward) becomes a QKVParallelLinear in place, under its own name."""

from __future__ import annotations

from tfbackend.fusers.base import Fuser, Outcome, candidate, linear, out_proj
from tfbackend.fusers.qkv import qkv_parallel


class PackedQKVFuser(Fuser):
    name = "PackedQKVFuser"
    key = "packed_qkv"

    def fuse(self, facts, plan, m, stage) -> Outcome | None:
        match = candidate(m, self.key)
        if match is None:
            return None
        packed = linear(facts, f"{m.qualname}.{match['qkv']}")
        if packed is None:
            return Outcome(why_not="the packed projection is not an nn.Linear fact")
        hd = match.get("head_dim") or facts.config.head_dim
        q_size, kv_size = match["q_size"], match["kv_size"]
        if not (
            hd
            and q_size % hd == 0
            and kv_size % hd == 0
            and packed.attrs["out_features"] == q_size + 2 * kv_size
        ):
            return Outcome(why_not="packed q/kv widths not compatible with one head-sharded GEMM")
        fused = qkv_parallel(
            packed.qualname,
            [packed],
            q_size,
            kv_size,
            hd,
            plan.tp,
            stage,
            "packed_qkv",
            "packed q/k/v sharded by heads",
        )
        return Outcome([fused, *out_proj(facts, plan, m, match, stage, "packed q/k/v")])
