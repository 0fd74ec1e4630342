"""TFB2xx: tensor parallel: plans, styles and divisibility."""

from __future__ import annotations

from collections import Counter
from math import prod

from tfbackend.plan import K_EXPERTS, K_LINEAR, Fallback
from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule
from tfbackend.units import size


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
        if e.extra.get("fallback") == Fallback.UNKNOWN_STYLE:
            by_style.setdefault(e.tp_style, []).append(e)
    bpp = _bytes_per_param(ctx)
    for style, entries in sorted(by_style.items()):
        params = sum(prod(p.full_shape) for e in entries for p in e.params)
        extra = params * bpp * (ctx.tp - 1) // ctx.tp
        yield r.finding(
            f"{len(entries)} linear(s) with style {style!r} become ReplicatedLinear: "
            f"{size(extra)} more per rank than sharding would need",
            modules=[e.qualname for e in entries],
            style=style,
            count=len(entries),
            extra_bytes_per_rank=extra,
        )


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
    if kv == ctx.facts.config.num_attention_heads:
        return  # multi-head attention: TFB203 already says it
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
        if e.kind in ("embedding", "lm_head", "experts"):  # experts: TFB211
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


def _tp_plan_active(ctx) -> bool:
    return ctx.tp > 1 and bool(ctx.facts.tp_plan) and ctx.profile.honours_tp_plan


@rule(
    "TFB208",
    "tp_plan keys that match no module",
    Severity.INFO,
    rationale="""
vLLM prefixes every tp_plan key with `model.` and `re.match`es it against module names. A key
that matches no module and no parameter (a renamed module, a plan written for another
variant of the architecture) shards nothing: what it meant to shard is replicated.
""",
    fix="nothing to do if the module is absent by design; otherwise fix the key in "
    "base_model_tp_plan",
)
def unmatched_keys(ctx, r):
    import re

    if not _tp_plan_active(ctx):
        return
    names = [m.qualname for m in ctx.facts.modules]
    names += [f"{m.qualname}.{p}" for m in ctx.facts.modules for p in m.params]
    dead = [k for k in ctx.facts.tp_plan if not any(re.match(f"model.{k}", n) for n in names)]
    if dead:
        yield r.finding(
            f"{len(dead)} tp_plan key(s) match nothing in {ctx.facts.model_class}: "
            + ", ".join(dead[:6])
            + (" …" if len(dead) > 6 else ""),
            keys=dead,
        )


@rule(
    "TFB209",
    "Linears no tp_plan key matches: replicated",
    Severity.WARNING,
    rationale="""
A linear no tp_plan key matches (and no fuser claims) becomes ReplicatedLinear: every rank holds
and computes all of it. Routers and small gates are meant to be replicated; a large projection
left out of the plan costs memory and speed on every rank.
""",
    fix="add keys for the large linears to base_model_tp_plan, or accept the memory shown",
)
def replicated_linears(ctx, r):
    if not _tp_plan_active(ctx):
        return
    # Fused entries (QKV, merged gate/up, their row-parallel outputs) carry no tp_style either:
    # only what really became ReplicatedLinear counts.
    left = [
        e
        for e in ctx.plan.entries_of(K_LINEAR)
        if e.tp_style is None and e.target == "ReplicatedLinear"
    ]
    # (the plan models every fuser its profile names: what they claim is not in `left`)
    if not left:
        return
    bpp = _bytes_per_param(ctx)
    sizes = {e.qualname: sum(prod(p.full_shape) for p in e.params) for e in left}
    total = sum(sizes.values())
    extra = total * bpp * (ctx.tp - 1) // ctx.tp
    by_class = Counter(e.qualname.rsplit(".", 1)[-1] for e in left)
    kinds = ", ".join(f"{name} ×{n}" for name, n in by_class.most_common(6))
    # Under 1% of the model: routers and gates, replicated on purpose.
    small = total < 0.01 * max(ctx.facts.num_parameters, 1)
    yield r.finding(
        f"{len(left)} linear(s) replicated ({kinds}): {size(total * bpp)} in all, "
        f"{size(extra)} more per rank than sharding would need",
        severity=Severity.INFO if small else Severity.WARNING,
        modules=sorted(sizes, key=lambda q: -sizes[q])[:16],
        params=total,
        extra_bytes_per_rank=extra,
    )


@rule(
    "TFB210",
    "tp_plan key shadows a later key (first match wins)",
    Severity.WARNING,
    rationale="""
vLLM takes the FIRST tp_plan key whose regex matches the start of a module name. A key such
as `layers.*.mlp.gate` also matches `layers.0.mlp.gate_proj`, so a router's style can land on a
projection. When a later key matches the module exactly with another style, the module gets the
wrong one: shapes per rank disagree with the checkpoint shards or the all-reduce is missing.
""",
    fix="anchor the key (`layers.*.mlp.gate$`) or order the more specific key first",
)
def shadowing(ctx, r):
    import re

    if not _tp_plan_active(ctx):
        return
    plan = ctx.facts.tp_plan
    for m in ctx.facts.modules:
        if m.kind != "linear":
            continue
        entry = ctx.plan.entry_for(m.qualname)
        if entry is not None and (len(entry.sources) > 1 or entry.extra.get("fuser")):
            continue  # fused (a packed qkv has one source): the fuser decides, not the tp_plan
        for key, style in plan.items():
            hit = re.match(f"model.{key}", m.qualname)
            if not hit:
                continue
            end = hit.end()
            if end == len(m.qualname) or m.qualname[end] == ".":
                break  # whole name, or a parent module: as intended
            exact = [
                (k, s)
                for k, s in plan.items()
                if k != key and re.fullmatch(f"model.{k}", m.qualname)
            ]
            if exact and exact[0][1] != style:
                yield r.finding(
                    f"{m.qualname}: key {key!r} ({style}) matches part of the name and comes "
                    f"first; {exact[0][0]!r} ({exact[0][1]}) is never used for it",
                    severity=Severity.ERROR,
                    modules=[m.qualname],
                    key=key,
                    intended=exact[0][0],
                )
            elif not exact:
                yield r.finding(
                    f"{m.qualname}: key {key!r} ({style}) matches only part of the name",
                    modules=[m.qualname],
                    key=key,
                )
            break


@rule(
    "TFB211",
    "Expert intermediate size not divisible by tp",
    Severity.ERROR,
    rationale="""
Without expert parallel, FusedMoE splits every expert's intermediate dimension over the ranks
(w13 on its rows, w2 on its columns) and the split must be exact
(`divide(intermediate_size, tp)`).
""",
    fix="choose a tp that divides moe_intermediate_size",
)
def expert_intermediate_divisible(ctx, r):
    if ctx.tp <= 1:
        return
    for spec in ctx.plan.moe:
        inter = spec.intermediate_size
        if inter and inter % ctx.tp:
            yield r.finding(
                f"expert intermediate size {inter} is not divisible by tp={ctx.tp} "
                f"({len(ctx.plan.moe)} MoE block(s))",
                modules=[e.qualname for e in ctx.plan.entries_of(K_EXPERTS)][:16],
                size=inter,
            )
            return


@rule(
    "TFB212",
    "Attention projections that are not nn.Linear while heads are split",
    Severity.ERROR,
    rationale="""
The backend replaces only `nn.Linear` (and its fusers match only `nn.Linear`). GPT-2-style
`Conv1D` projections stay full size on every rank, so the attention module produces every head
while the vLLM Attention it dispatches to was built for heads / tp: vLLM 0.32 builds such a
model at tp > 1 (a warning only) but it cannot compute correctly.
""",
    fix="serve with tp=1, or with vLLM's native implementation of the architecture",
)
def conv1d_attention(ctx, r):
    if ctx.tp <= 1:
        return
    attn = [m.qualname + "." for m in ctx.facts.modules if m.kind == "attention"]
    convs = [
        m.qualname
        for m in ctx.facts.modules
        if m.kind == "conv1d" and any(m.qualname.startswith(a) for a in attn)
    ]
    if convs:
        names = sorted({q.rsplit(".", 1)[-1] for q in convs})
        yield r.finding(
            f"{len(convs)} Conv1D projection(s) in attention ({', '.join(names)}) stay full size "
            f"while each rank serves heads / {ctx.tp}: wrong output",
            modules=convs[:16],
        )


_SPLIT = ("QKVParallelLinear", "MergedColumnParallelLinear")


def _split_consumers(ctx):
    """(fused entry, consumer qualname, consumer target, traced) for every linear fed by the
    per-rank slices of a column-split fused projection, read from the module's FX dataflow
    (traced False: the trace stopped early, and a replicated sibling stands beside the slices)."""
    linears_by_parent: dict[str, list[str]] = {}
    for m in ctx.facts.by_kind("linear"):
        linears_by_parent.setdefault(m.qualname.rpartition(".")[0], []).append(m.qualname)
    for e in ctx.plan.entries:
        if e.target not in _SPLIT or len(e.sources) < 2:
            continue
        if not any(p.shard_dim is not None for p in e.params):
            continue  # built whole on every rank (MLA's fused_qkv_a_proj: disable_tp)
        parent = e.qualname.rpartition(".")[0]
        m = ctx.facts.module(parent)
        fusion = (m.attrs.get("fusion") or {}) if m else {}
        pieces = {s.rpartition(".")[2] for s in e.sources}
        for cand in fusion.get("candidates") or []:
            named = cand.get("linears") or [cand.get(k) for k in ("q", "k", "v", "gate", "up")]
            if {n for n in named if n} != pieces:
                continue
            downstream = cand.get("downstream") or []
            for name in downstream:
                consumer = ctx.plan.entry_for(f"{parent}.{name}")
                if consumer is not None:
                    yield e, consumer.qualname, consumer.target, True
            if not downstream:
                # The trace stops before the slices are used (a branch on the cache): every
                # replicated sibling computes full-width beside them, which is wrong either way.
                for qualname in linears_by_parent.get(parent, []):
                    sib = ctx.plan.entry_for(qualname)
                    if sib is not None and sib.target == "ReplicatedLinear":
                        yield e, sib.qualname, sib.target, False
            break


@rule(
    "TFB213",
    "A column-split projection feeds a linear that is not row-parallel",
    Severity.ERROR,
    rationale="""
vLLM's fusers turn sibling linears (q/k/v, gate/up, or any group reading one input) into one
QKVParallelLinear or MergedColumnParallelLinear and rewrite the forward to split its output by
`output_sizes / tp`: each rank then holds only its slice of every piece. Only a RowParallelLinear
consumes such slices correctly (it all-reduces the partial products). vLLM makes the consumer
row-parallel only when its fuser recognises it (the o_proj of q/k/v, the down projection of a GLU)
or a tp_plan says so; without a tp_plan any other consumer stays ReplicatedLinear and multiplies a
slice by the full weight. vLLM 0.32 builds such a model and its forward does not raise on CPU: the
logits are wrong (measured in reports/parity.md: BitNet's down_proj behind ffn_sub_norm, AFMoE's
o_proj behind its gated q/k/v/gate merge, BioGPT's out_proj behind a merged k/v). On GPU the
shapes disagree and the matmul raises.
""",
    fix="serve with tp=1, or add base_model_tp_plan keys that make the consumer rowwise "
    "(and the pieces colwise)",
)
def split_into_replicated(ctx, r):
    if ctx.tp <= 1:
        return
    bad: dict[str, tuple[str, str, bool]] = {}
    for fused, consumer, target, traced in _split_consumers(ctx):
        if target != "RowParallelLinear":
            bad.setdefault(consumer, (fused.qualname, target, traced))
    if not bad:
        return
    shown = {}
    for c, (f, t, traced) in bad.items():
        how = "reads the per-rank slices of" if traced else "is replicated beside the slices of"
        shown.setdefault(f"{c.rsplit('.', 1)[-1]} ({t}) {how} {f.rsplit('.', 1)[-1]}", c)
    untraced = not all(traced for _, _, traced in bad.values())
    yield r.finding(
        f"{len(bad)} linear(s) meet a 1/{ctx.tp} slice of a split projection but are not "
        f"row-parallel: {'; '.join(list(shown)[:3])}: wrong logits at tp={ctx.tp}"
        + (" (the forward's trace stops before the slices are used)" if untraced else ""),
        modules=sorted(bad)[:16],
    )


@rule(
    "TFB214",
    "Attention reshapes by the whole model's head count",
    Severity.ERROR,
    rationale="""
At tp > 1 each rank's q/k/v projections produce heads / tp heads, but vLLM's Transformers
backend leaves the attention module's attributes as the config set them. A forward that reshapes
with `self.num_heads` (or `num_key_value_heads`, `n_head`, …) asks for every head of the model:
the view raises (`shape '[1, 66, 4, 32]' is invalid for input of size 4224`, StableLM), or, with
a `-1` beside it, silently folds the sequence (OPT, Persimmon: vLLM 0.32 on CPU then crashes
in attention). Forwards written as `view(*input_shape, -1, self.head_dim)` are unaffected.
""",
    fix="serve with tp=1, or with vLLM's native implementation of the architecture",
)
def head_count_reshape(ctx, r):
    if ctx.tp <= 1:
        return
    hits = {
        m.qualname: m.attrs["head_count_reshapes"]
        for m in ctx.facts.modules
        if m.kind == "attention" and m.attrs.get("head_count_reshapes")
    }
    if hits:
        attrs = sorted({a for v in hits.values() for a in v})
        classes = sorted({m.class_name for m in ctx.facts.modules if m.qualname in hits})
        yield r.finding(
            f"{len(hits)} attention module(s) ({', '.join(classes)}) reshape by "
            f"{', '.join('self.' + a for a in attrs)}, the whole model's head count, while each "
            f"rank holds heads / {ctx.tp}: the forward raises or computes garbage",
            modules=sorted(hits)[:16],
            attributes=attrs,
        )


@rule(
    "TFB215",
    "Attention projections gathered to every rank",
    Severity.ERROR,
    rationale="""
A tp_plan style `colwise_gather_output` becomes ColumnParallelLinear(gather_output=True): every
rank gets the whole output. On an attention module's q/k/v projections (Phi-3's packed
`qkv_proj`, planned so for transformers' own TP, which slices the packed tensor by the full
head counts) the attention module then hands every head to a vLLM Attention built for
heads / tp: vLLM 0.32's forward raises (`view size is not compatible with input tensor's size
and stride`, Phi-3 and Phi-4-multimodal at tp 2 in reports/parity.md). Gathering an MLP's
gate/up (GLM) is harmless: its down projection splits the input again.
""",
    fix="serve with tp=1, or with vLLM's native implementation of the architecture (Phi-3 has one)",
)
def gathered_attention_projections(ctx, r):
    if ctx.tp <= 1:
        return
    attention = {m.qualname for m in ctx.facts.modules if m.kind == "attention"}
    gathered = [
        e.qualname
        for e in ctx.plan.entries_of(K_LINEAR)
        if e.tp_style == "colwise_gather_output" and e.qualname.rpartition(".")[0] in attention
    ]
    if gathered:
        names = sorted({q.rsplit(".", 1)[-1] for q in gathered})
        yield r.finding(
            f"{len(gathered)} attention projection(s) ({', '.join(names)}) are colwise_gather_output"
            f": every rank computes all heads while vLLM's Attention serves heads / {ctx.tp}",
            modules=gathered[:16],
        )


# Targets that split a projection's output over the ranks.
SPLIT_OUTPUT = frozenset(
    {"ColumnParallelLinear", "QKVParallelLinear", "MergedColumnParallelLinear"}
)


def _split_attention(ctx):
    """(spec, linear entries inside the attention module, linear entries beside it in its parent)
    for each layer whose heads vLLM splits over the ranks."""
    linears = ctx.plan.entries_of(K_LINEAR)
    for spec in ctx.plan.attention:
        if not spec.qualname or not spec.num_heads or spec.heads_per_rank == spec.num_heads:
            continue
        inside = [e for e in linears if e.qualname.startswith(spec.qualname + ".")]
        parent = spec.qualname.rpartition(".")[0]
        beside = [
            e
            for e in linears
            if e.qualname.startswith(parent + ".")
            and not e.qualname.startswith(spec.qualname + ".")
        ]
        yield spec, inside, beside


@rule(
    "TFB221",
    "Attention output leaves the module for a linear that is not row-parallel",
    Severity.ERROR,
    rationale="""
When an attention module holds only its q/k/v (BERT-style `self` attention, whose output
projection lives in a sibling `output.dense`), vLLM's QKV fuser splits the heads and the
module's output is each rank's heads / tp slice. The projection that consumes it is outside the
module, out of the fusers' sight, and without a tp_plan stays ReplicatedLinear: it multiplies a
slice by the full weight. vLLM 0.32's CPU linear kernel does not check the shapes and computes
garbage (BertGeneration at tp 2 in reports/parity.md); on GPU the matmul raises.
""",
    fix="serve with tp=1, or add base_model_tp_plan keys that make the output projection rowwise",
)
def attention_output_unreduced(ctx, r):
    if ctx.tp <= 1:
        return
    bad = [
        (spec, beside)
        for spec, inside, beside in _split_attention(ctx)
        if inside
        and all(e.target in SPLIT_OUTPUT for e in inside)
        and beside
        and not any(e.target == "RowParallelLinear" for e in beside)
    ]
    if bad:
        spec, beside = bad[0]
        yield r.finding(
            f"{len(bad)} attention module(s) return their per-rank heads ({spec.qualname}) to "
            f"{beside[0].qualname.rsplit('.', 2)[-2]}.{beside[0].qualname.rsplit('.', 1)[-1]} "
            f"({beside[0].target}), which needs the whole output: wrong logits at tp={ctx.tp}",
            modules=[s.qualname for s, _ in bad][:16],
        )


@rule(
    "TFB222",
    "Statistics over a column-split projection's features",
    Severity.ERROR,
    rationale="""
A projection vLLM fuses and splits by columns (MergedColumnParallelLinear, QKVParallelLinear)
leaves each rank only its 1/tp of the output features. When the forward then reduces over
those features before the next linear (Gemma 3n's activation sparsity: `mean` and `std` of
`gate_proj` over its features set a cut-off), each rank computes the statistic of its slice,
not of the whole: the activations and the logits differ at tp > 1 on every platform (Gemma 3n
text at tp 2 in reports/parity.md; tp 1 matches).
""",
    fix="serve with tp=1, or with vLLM's native implementation of the architecture",
)
def split_feature_statistics(ctx, r):
    if ctx.tp <= 1:
        return
    split = {
        s for e in ctx.plan.entries_of(K_LINEAR) if e.target in SPLIT_OUTPUT for s in e.sources
    }
    hits: dict[str, list[str]] = {}
    for m in ctx.facts.modules:
        for cand in (m.attrs.get("fusion") or {}).get("candidates", []):
            pieces = cand.get("linears") or [cand.get(k) for k in ("q", "k", "v", "gate", "up")]
            if cand.get("reduced") and any(f"{m.qualname}.{p}" in split for p in pieces if p):
                hits[m.qualname] = cand["reduced"]
    if hits:
        ops = sorted({o for v in hits.values() for o in v})
        yield r.finding(
            f"{len(hits)} module(s) take {', '.join(ops)} over the features of a projection "
            f"split 1/{ctx.tp} per rank ({next(iter(hits))}): each rank's statistic covers its "
            f"slice only, so the logits are wrong at tp={ctx.tp}",
            modules=sorted(hits)[:16],
            reductions=ops,
        )
