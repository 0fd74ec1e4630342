"""TFB71x: will each rank's weights and KV cache fit in its GPU?"""

from __future__ import annotations

from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule
from tfbackend.units import gib


def _ranks(st) -> str:
    lo, hi = st.ranks[0], st.ranks[-1]
    return f"rank {lo}" if lo == hi else f"ranks {lo}–{hi}"


@rule(
    "TFB710",
    "A rank's weights do not fit in GPU memory",
    Severity.ERROR,
    rationale="""
Weights per rank are the plan's per-rank shapes in the served dtype: split layers hold their
shard, replicated layers (and modules the backend leaves as HF code) are whole on every rank. vLLM
loads them before profiling; beyond `gpu_memory × gpu_memory_utilization` (0.9) it runs out of
memory.
""",
    fix="raise --tp or --pp, serve a quantized checkpoint, or use larger GPUs (--gpu-memory)",
)
def weights_do_not_fit(ctx, r):
    mem = ctx.options.get("memory")
    if mem is None:
        return
    for st in mem.stages:
        if not st.weights_fit:
            yield r.finding(
                f"stage {st.stage} ({_ranks(st)}): weights {gib(st.weight_bytes)} exceed "
                f"{gib(st.budget_bytes)} ({mem.gpu_memory_utilization:.0%} of "
                f"{mem.gpu_memory_gib:g} GiB)",
                stage=st.stage,
                weight_bytes=st.weight_bytes,
                budget_bytes=st.budget_bytes,
            )


@rule(
    "TFB711",
    "KV cache for one max-model-len sequence does not fit",
    Severity.ERROR,
    rationale="""
At start-up vLLM refuses to serve when the memory left after weights cannot hold the KV cache of
one sequence of max_model_len tokens ("To serve at least one request with the model's max seq
len … KV cache is needed, which is larger than the available KV cache memory"). KV per token per
layer is 2 × kv heads per rank × head size × dtype bytes; sliding layers hold at most their window.
""",
    fix="lower --max-model-len, or raise --tp/--pp so each rank holds fewer weights and kv heads",
)
def kv_does_not_fit(ctx, r):
    mem = ctx.options.get("memory")
    if mem is None:
        return
    for st in mem.stages:
        if st.weights_fit and not st.fits:
            fit = f"; about {st.max_kv_tokens:,} tokens fit" if st.max_kv_tokens is not None else ""
            yield r.finding(
                f"stage {st.stage} ({_ranks(st)}): weights {gib(st.weight_bytes)} + KV for "
                f"{mem.max_model_len:,} tokens {gib(st.kv_bytes_max_len)} exceed "
                f"{gib(st.budget_bytes)}{fit}",
                stage=st.stage,
                kv_bytes_max_len=st.kv_bytes_max_len,
                max_kv_tokens=st.max_kv_tokens,
            )
