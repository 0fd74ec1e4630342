"""TFB2xx: tensor parallel: plans, styles and divisibility."""

from __future__ import annotations

from collections import Counter

from tfbackend.replace.plan import K_LINEAR
from tfbackend.report.findings import Severity
from tfbackend.rules.registry import rule


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _bytes_per_param(ctx) -> int:
    dtype = (ctx.facts.config.dtype or "bfloat16").lower()
    return 4 if "32" in dtype else 2


@rule(
    "TFB201",
    "No tp_plan with tp > 1",
    Severity.ERROR,
    rationale="""
The backend shards linears by the model's `tp_plan` (transformers' `base_model_tp_plan`).
Without one, the seed-era backend raises `ValueError: ... does not support tensor parallel`;
vLLM 0.32+ only warns and relies on its fusers, replicating every linear they do not claim.
""",
    fix="add base_model_tp_plan to the config class (or config.json), or serve with tp=1",
)
def no_tp_plan(ctx, r):
    if ctx.tp <= 1 or ctx.facts.tp_plan or not ctx.profile.honours_tp_plan:
        return
    sev = Severity.ERROR if ctx.profile.missing_tp_plan == "error" else Severity.WARNING
    what = (
        "vLLM refuses to start"
        if sev is Severity.ERROR
        else "vLLM replicates every linear its fusers do not claim"
    )
    yield r.finding(f"{ctx.facts.model_class} has no tp_plan and tp={ctx.tp}: {what}", severity=sev)


@rule(
    "TFB202",
    "tp_plan style unknown to the backend: silently replicated",
    Severity.WARNING,
    rationale="""
vLLM maps tp_plan styles through a fixed table (colwise, rowwise, replicate, and in 0.32+
colwise_gather_output, rowwise_split_input). Any other style (packed_colwise, moe_tp_experts,
replicated_with_grad_allreduce, …) falls back to ReplicatedLinear without a word: the layer is
held in full on every rank.
""",
    fix="expect the memory below on every rank, or ask transformers for a plan in known styles",
)
def unknown_style(ctx, r):
    if ctx.tp <= 1:
        return
    by_style: dict[str, list] = {}
    for e in ctx.plan.entries_of(K_LINEAR):
        if (
            e.tp_style
            and e.tp_style not in ctx.profile.linear_styles
            and ctx.profile.honours_tp_plan
        ):
            by_style.setdefault(e.tp_style, []).append(e)
    bpp = _bytes_per_param(ctx)
    for style, entries in sorted(by_style.items()):
        params = sum(_numel(p.full_shape) for e in entries for p in e.params)
        extra = params * bpp * (ctx.tp - 1) // ctx.tp
        yield r.finding(
            f"{len(entries)} linear(s) with style {style!r} become ReplicatedLinear: "
            f"{_fmt_bytes(extra)} more per rank than sharding would need",
            modules=[e.qualname for e in entries],
            style=style,
            count=len(entries),
            extra_bytes_per_rank=extra,
        )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@rule(
    "TFB203",
    "Attention heads not divisible by tp",
    Severity.ERROR,
    rationale="""
vLLM gives each rank num_attention_heads / tp query heads and asserts that the division is
exact (`divide()` in vllm.distributed).
""",
    fix="choose a tp that divides num_attention_heads",
)
def heads_divisible(ctx, r):
    heads = ctx.facts.config.num_attention_heads
    if ctx.tp > 1 and heads and heads % ctx.tp:
        yield r.finding(f"num_attention_heads={heads} is not divisible by tp={ctx.tp}", heads=heads)


@rule(
    "TFB204",
    "KV heads not divisible by tp",
    Severity.ERROR,
    rationale="""
With num_key_value_heads >= tp, each rank holds kv_heads / tp KV heads; the split must be exact.
(With fewer KV heads than ranks they are replicated instead: see TFB205.)
""",
    fix="choose a tp that divides num_key_value_heads, or one at least as large",
)
def kv_heads_divisible(ctx, r):
    kv = ctx.facts.config.num_key_value_heads
    if ctx.tp > 1 and kv and kv >= ctx.tp and kv % ctx.tp:
        yield r.finding(f"num_key_value_heads={kv} is not divisible by tp={ctx.tp}", kv_heads=kv)


@rule(
    "TFB205",
    "Fewer KV heads than ranks: KV heads replicated",
    Severity.INFO,
    rationale="""
When num_key_value_heads < tp, vLLM keeps max(1, kv // tp) = 1 KV head per rank and replicates
the K/V projections: correct, but the KV cache and K/V weights are duplicated tp / kv times.
""",
    fix="fine for correctness; a smaller tp avoids the duplicate KV cache",
)
def kv_heads_replicated(ctx, r):
    kv = ctx.facts.config.num_key_value_heads
    if ctx.tp > 1 and kv and kv < ctx.tp and ctx.tp % kv == 0:
        yield r.finding(
            f"num_key_value_heads={kv} < tp={ctx.tp}: each KV head is held by {ctx.tp // kv} ranks",
            kv_heads=kv,
        )
    elif ctx.tp > 1 and kv and kv < ctx.tp:
        yield r.finding(
            f"num_key_value_heads={kv} < tp={ctx.tp} and tp is not a multiple of it: ranks "
            "cannot share KV heads evenly",
            severity=Severity.ERROR,
            fix="choose a tp that is a multiple of num_key_value_heads",
            kv_heads=kv,
        )


@rule(
    "TFB206",
    "A sharded dimension is not divisible by tp",
    Severity.ERROR,
    rationale="""
Column-parallel linears split their output features and row-parallel linears their input
features over the ranks; vLLM asserts the split is exact (intermediate_size, head dims, expert
intermediate size).
""",
    fix="choose a tp that divides the sizes listed",
)
def shard_divisible(ctx, r):
    if ctx.tp <= 1:
        return
    bad = Counter()
    examples: dict[tuple, list[str]] = {}
    for e in ctx.plan.entries:
        if e.kind == "embedding" or e.kind == "lm_head":
            continue
        for p in e.params:
            if p.shard_dim is None or p.shard_dim >= len(p.full_shape):
                continue
            size = p.full_shape[p.shard_dim]
            if size % ctx.tp:
                key = (e.target, p.name, size)
                bad[key] += 1
                examples.setdefault(key, []).append(e.qualname)
    for (target, pname, size), count in sorted(bad.items()):
        mods = examples[(target, pname, size)]
        yield r.finding(
            f"{count} {target} {pname} dimension(s) of size {size} do not divide by tp={ctx.tp}",
            modules=mods,
            size=size,
        )


@rule(
    "TFB207",
    "Padded vocab not divisible by tp",
    Severity.ERROR,
    rationale="""
VocabParallelEmbedding and ParallelLMHead pad the vocab to a multiple of 64 and give each rank
padded / tp rows; that division must be exact.
""",
    fix="choose a tp that divides the padded vocab (any power of two up to 64 does)",
)
def vocab_divisible(ctx, r):
    for e in ctx.plan.entries:
        if e.kind in ("embedding", "lm_head") and ctx.tp > 1:
            padded = e.extra.get("padded_vocab")
            if padded and padded % ctx.tp:
                yield r.finding(
                    f"{e.qualname}: padded vocab {padded} is not divisible by tp={ctx.tp}",
                    modules=[e.qualname],
                )
