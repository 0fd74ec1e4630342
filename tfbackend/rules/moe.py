"""TFB51x: mixture-of-experts blocks and what FusedMoE needs from the config."""

from __future__ import annotations

from tfbackend.fusers import MoEBlockFuser
from tfbackend.inspect.facts import EXPERTS
from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule


def _experts(ctx):
    return [m for m in ctx.facts.modules if m.kind == EXPERTS]


def _set(raw: dict, names) -> list[str]:
    return [n for n in names if raw.get(n) is not None]


@rule(
    "TFB510",
    "Experts layout",
    Severity.INFO,
    rationale="""
The backend fuses a child named `experts` into one FusedMoE when it is an `nn.ModuleList` of
expert MLPs (transformers 4.x) or holds only 3-D parameters (transformers 5: `gate_up_proj
[E, 2I, H]`, `down_proj [E, H, I]`). Seed-era vLLM knew only the ModuleList layout and the 0.6
port no MoE at all: there the experts stay Transformers code whose 3-D weights vLLM's loader
cannot shard or fill.
""",
    fix="on a layout the profile cannot fuse, use vLLM 0.32+ or the native implementation",
)
def experts_layout(ctx, r):
    blocks = _experts(ctx)
    if not blocks:
        return
    layouts = sorted({m.attrs["layout"] for m in blocks})
    unsupported = [lay for lay in layouts if lay not in ctx.profile.moe_layouts]
    count = blocks[0].attrs.get("count")
    if unsupported:
        yield r.finding(
            f"{len(blocks)} experts block(s) in the {', '.join(unsupported)} layout, which "
            f"{ctx.profile.name} cannot fuse",
            severity=Severity.ERROR,
            modules=[m.qualname for m in blocks][:16],
        )
    else:
        yield r.finding(
            f"{len(blocks)} experts block(s) ({', '.join(layouts)}, {count} experts each) "
            "become FusedMoE",
            modules=[m.qualname for m in blocks][:16],
        )


@rule(
    "TFB511",
    "MoE config field the backend needs is missing",
    Severity.ERROR,
    rationale="""
The MoE backend reads top_k from `num_experts_per_tok` or `top_k` and the expert width from
`moe_intermediate_size` or `intermediate_size`, and asserts both exist; the expert count comes
from vLLM's model config (`num_experts`, `moe_num_experts`, `n_routed_experts`,
`num_local_experts`) and is 0 when none is set. A model that names them otherwise (`moe_topk`,
`num_experts_per_token`) fails with an AssertionError at start-up. vLLM 0.33 reads top_k through
its `CONFIG_FIELD_ALIASES` (`num_experts_per_tok`, `num_experts_per_token`, `top_k_experts`,
`moe_topk`, `moe_top_k`, `top_k`): the names each profile reads are its `moe_top_k_attrs`.
""",
    fix="add num_experts_per_tok / num_local_experts to the config under the names vLLM reads",
)
def moe_fields(ctx, r):
    if not _experts(ctx) or not ctx.profile.moe_layouts:
        return
    cfg = ctx.facts.config
    raw = cfg.raw
    if not _set(raw, ctx.profile.moe_top_k_attrs):
        other = _set(raw, ("moe_topk", "num_experts_per_token", "moe_k"))
        yield r.finding(
            f"no {' / '.join(ctx.profile.moe_top_k_attrs)} in the config"
            + (f" (it has {other[0]}={raw[other[0]]})" if other else "")
            + ": `assert top_k is not None` fails",
            field="top_k",
        )
    if not _set(raw, ctx.profile.moe_num_experts_attrs):
        yield r.finding(
            f"no {' / '.join(ctx.profile.moe_num_experts_attrs)} in the config: vLLM sizes "
            "FusedMoE for 0 experts",
            field="num_experts",
        )
    if cfg.moe.intermediate_size is None:
        yield r.finding(
            "no moe_intermediate_size / intermediate_size: `assert intermediate_size` fails",
            field="intermediate_size",
        )


@rule(
    "TFB512",
    "Shared experts",
    Severity.INFO,
    rationale="""
Shared experts run beside the routed ones. The backend counts them from `n_shared_experts` or
`moe_num_shared_experts` (seed era: `num_experts_shared` first) and, when neither is set but the
block has a `shared_expert` parameter, assumes one; their output is reduced after the MLP.
A count under a name the backend does not read is taken as 0 or 1.
""",
    fix="name the count as vLLM reads it (n_shared_experts)",
)
def shared_experts(ctx, r):
    blocks = _experts(ctx)
    if not blocks:
        return
    raw = ctx.facts.config.raw
    read = _set(raw, ctx.profile.moe_shared_attrs)
    unread = [
        n
        for n in ("num_experts_shared", "n_shared_experts", "moe_num_shared_experts")
        if n not in ctx.profile.moe_shared_attrs and raw.get(n)
    ]
    parents = {m.qualname.rsplit(".", 1)[0] for m in blocks}
    has_module = any(
        "shared_expert" in m.qualname and m.qualname.rsplit(".shared_expert", 1)[0] in parents
        for m in ctx.facts.modules
    )
    if unread and not read:
        n = raw[unread[0]]
        assumed = 1 if has_module else 0
        yield r.finding(
            f"{unread[0]}={n} is not read by {ctx.profile.name}: it assumes {assumed}",
            severity=Severity.WARNING if n != assumed else Severity.INFO,
        )
    elif read and raw[read[0]]:
        yield r.finding(f"{read[0]}={raw[read[0]]} shared expert(s) per MoE block")
    elif has_module:
        yield r.finding("shared expert modules found without a count: the backend assumes 1")


@rule(
    "TFB513",
    "Expert biases",
    Severity.INFO,
    rationale="""
When any parameter of the experts is named `*bias*`, FusedMoE is built with `has_bias=True` and
loads per-expert biases (gpt-oss). Kernels without bias support are not chosen.
""",
    fix="nothing to do",
)
def expert_bias(ctx, r):
    biased = [m for m in _experts(ctx) if m.attrs.get("has_bias")]
    if biased and ctx.profile.moe_layouts:
        yield r.finding(
            f"{len(biased)} experts block(s) carry biases: FusedMoE(has_bias=True)",
            modules=[m.qualname for m in biased][:16],
        )


_SILU = ("silu", "swish", "swiglu")


@rule(
    "TFB514",
    "Expert activation",
    Severity.ERROR,
    rationale="""
FusedMoE applies its own activation instead of the model's: vLLM 0.32 uses `swigluoai` when
the architecture name contains "gptoss" and `silu` otherwise (seed era: also `gelu` for grok1).
Experts whose config `hidden_act` is something else (gelu, relu²…) are computed with the wrong
function: wrong output.
""",
    fix="serve with vLLM's native implementation for this architecture",
)
def expert_activation(ctx, r):
    if not _experts(ctx) or not ctx.profile.moe_layouts:
        return
    arch = (ctx.facts.causal_lm_class or ctx.facts.model_class).lower()
    used = next((a for key, a in ctx.profile.moe_activations.items() if key in arch), "silu")
    act = (ctx.facts.config.hidden_act or "silu").lower()
    if used == "silu" and act not in _SILU:
        yield r.finding(
            f"the experts use hidden_act={act!r}; FusedMoE computes silu",
            activation=act,
            used=used,
        )
    elif used == "gelu" and "gelu" not in act:
        yield r.finding(f"the experts use hidden_act={act!r}; FusedMoE computes gelu")
    elif used != "silu":
        yield r.finding(f"FusedMoE activation: {used}", severity=Severity.INFO)


@rule(
    "TFB515",
    "Grouped top-k routing",
    Severity.INFO,
    rationale="""
With both `n_group` and `topk_group` set (DeepSeek-V3 style), vLLM 0.32 routes with grouped
top-k: experts are chosen from the best `topk_group` of `n_group` groups. With only one of them
set it routes with plain top-k, unlike the model.
""",
    fix="set both n_group and topk_group, or neither",
)
def grouped_topk(ctx, r):
    if not _experts(ctx):
        return
    moe = ctx.facts.config.moe
    if moe.n_group is not None and moe.topk_group is not None:
        if moe.n_group > 1:
            yield r.finding(f"grouped top-k: best {moe.topk_group} of {moe.n_group} groups")
    elif (moe.n_group or 0) > 1 or (moe.topk_group or 0) > 1:
        yield r.finding(
            f"n_group={moe.n_group}, topk_group={moe.topk_group}: only one is set, so vLLM "
            "routes with plain top-k",
            severity=Severity.WARNING,
        )


@rule(
    "TFB516",
    "Expert parallel",
    Severity.INFO,
    rationale="""
With tp > 1 FusedMoE splits each expert's intermediate dimension over the ranks. vLLM's
`--enable-expert-parallel` instead places whole experts on ranks (num_experts must divide by
the EP size). That is a vLLM serving flag, not a tfbackend option: the plan shows tensor-parallel
experts. Seed-era vLLM refused expert parallel for this backend (NotImplementedError).
""",
    fix="pass --enable-expert-parallel to vLLM if you want it (vLLM 0.32+ only)",
)
def expert_parallel(ctx, r):
    blocks = _experts(ctx)
    if not blocks or ctx.tp <= 1 or not ctx.profile.moe_layouts:
        return
    n = ctx.facts.config.moe.num_experts or blocks[0].attrs.get("count")
    if not ctx.profile.expert_parallel:
        yield r.finding(
            f"{ctx.profile.name} refuses --enable-expert-parallel for this backend: experts are "
            "split over tp only"
        )
    elif n and n % ctx.tp:
        yield r.finding(
            f"{n} experts do not divide over {ctx.tp} ranks: do not use "
            "--enable-expert-parallel at this size",
        )
    else:
        yield r.finding(
            f"experts split over tp={ctx.tp}; with vLLM's --enable-expert-parallel each rank "
            f"would hold {n // ctx.tp if n else '?'} whole experts instead"
        )


@rule(
    "TFB517",
    "MoE block tensors vLLM's routing never reads",
    Severity.ERROR,
    rationale="""
When vLLM 0.32 moves routing into its MoERunner it replaces the MoE block's forward with its own
(`fusers/moe.py: _moe_block_forward`: experts, router and shared expert only) and rebuilds the
router from the router module's own `weight` and `e_score_correction_bias`. A tensor the block
holds itself, e.g. an `e_score_correction_bias` buffer the block passes to its router
(MiniMax-M2, HY-V3), is loaded but never read: vLLM picks the experts without it, so the routing
differs from the model's.
""",
    fix="serve with vLLM's native implementation for this architecture",
)
def dropped_block_state(ctx, r):
    if not ctx.profile.moe_layouts:
        return
    routed_inside = {e.qualname for e in ctx.plan.entries if e.extra.get("routing") == "internal"}
    dropped = [
        m
        for m in _experts(ctx)
        if m.qualname in routed_inside and (m.attrs.get("moe_block") or {}).get("block_state")
    ]
    if dropped:
        names = dropped[0].attrs["moe_block"]["block_state"]
        block = dropped[0].qualname.rsplit(".", 1)[0]
        yield r.finding(
            f"{len(dropped)} MoE block(s) hold {', '.join(names)} themselves (e.g. {block}); "
            "vLLM routes inside its MoERunner without reading it",
            modules=[m.qualname.rsplit(".", 1)[0] for m in dropped][:16],
        )


@rule(
    "TFB518",
    "Sigmoid routing inside vLLM: not on vLLM's CPU build",
    Severity.WARNING,
    rationale="""
When vLLM routes inside its MoERunner (the block matched vLLM's MoEBlockFuser), the CPU build's
router (`fused_moe/router/cpu_router.py`, vLLM 0.32) handles grouped top-k, `sqrtsoftplus` and
softmax only: a sigmoid router without expert groups stops at `assert self.scoring_func ==
"softmax"` in the first forward (Laguna, MiniMax-M3 text in reports/parity.md). vLLM's GPU
routers compute sigmoid top-k; this holds for the CPU platform only.
""",
    fix="serve on GPU; on vLLM's CPU build the model does not run",
)
def cpu_sigmoid_router(ctx, r):
    groups = {m.qualname: m.n_group for m in ctx.plan.moe}
    routed_inside = {e.qualname for e in ctx.plan.entries if e.extra.get("routing") == "internal"}
    fuser = ctx.profile.fuser(MoEBlockFuser)
    sigmoid = {
        m.qualname
        for m in _experts(ctx)
        if fuser is not None
        and m.qualname in routed_inside
        and fuser.match(m.attrs["moe_block"], m.qualname.rsplit(".", 1)[1])["scoring"] == "sigmoid"
    }
    blocks = [
        m.qualname for m in _experts(ctx) if m.qualname in sigmoid and not groups.get(m.qualname)
    ]
    if blocks:
        yield r.finding(
            f"{len(blocks)} MoE block(s) route with sigmoid scores inside vLLM's MoERunner: "
            "vLLM's CPU build asserts softmax there (GPU unaffected)",
            modules=blocks[:16],
            platforms=["cpu"],
        )
