"""plan → wrapped model: the only code that touches modules.

`apply` takes a transformers causal LM built on the meta device and, for one rank, installs the
parallel layers the plan lists (with this rank's shard shapes), trims the modules other pipeline
stages own, and sets the attention modules' head counts to their local shard. Attention itself
stays the HF module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from tfbackend.replace import layers as L
from tfbackend.replace.plan import (
    K_EMBEDDING,
    K_EXPERTS,
    K_LINEAR,
    K_LM_HEAD,
    K_NORM,
    AttentionSpec,
    PlanEntry,
    ReplacementPlan,
)

_KV_PROJ = re.compile(r"\.(k_proj|v_proj|key|value|k|v)$")


@dataclass
class Applied:
    """What `apply` built on this rank: module names as the causal LM spells them."""

    stage: int
    entries: dict[str, PlanEntry] = field(default_factory=dict)  # module name → plan entry
    installed: dict[str, str] = field(default_factory=dict)  # module name → layer class


def base_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "") or "model"
    return prefix if hasattr(model, prefix) else "model"


def module_name(plan_qualname: str, prefix: str) -> str:
    """Plan names are vLLM's (`model.` + base-model path); the causal LM's base may be named
    otherwise (`transformer.`)."""
    if plan_qualname.startswith("model."):
        return f"{prefix}.{plan_qualname.removeprefix('model.')}"
    return plan_qualname


def apply(
    plan: ReplacementPlan, model: nn.Module, ctx: L.ParallelContext, *, stage: int = 0
) -> Applied:
    """Install the plan's layers into `model` (on meta) for the rank `ctx.rank` of stage `stage`."""
    prefix = base_prefix(model)
    applied = Applied(stage=stage)
    dtype = next(model.parameters()).dtype
    attn_by_layer = {a.layer_idx: a for a in plan.attention}
    for entry in plan.entries:
        if entry.stage is not None and entry.stage != stage and entry.kind != K_EMBEDDING:
            continue
        name = module_name(entry.qualname, prefix)
        try:
            old = model.get_submodule(name)
        except AttributeError:
            continue
        new = _build(entry, old, name, ctx, attn_by_layer, dtype)
        if new is None:
            continue
        model.set_submodule(name, new)
        applied.entries[name] = entry
        applied.installed[name] = type(new).__name__
    _set_local_heads(model, plan, ctx)
    if plan.pp > 1:
        _trim_to_stage(model, plan, stage, prefix)
    return applied


def _kv_shard(entry: PlanEntry, attn: AttentionSpec | None, ctx: L.ParallelContext):
    """kv heads fewer than tp: each rank holds whole kv heads, replicated across rank groups."""
    if attn is None or not attn.kv_replicated or not _KV_PROJ.search(entry.qualname):
        return None
    per_group = ctx.world // attn.num_kv_heads
    return (ctx.rank // per_group) * attn.head_size, attn.head_size


def _build(entry, old, name, ctx, attn_by_layer, dtype):
    kw = {"dtype": dtype, "device": "meta"}
    if entry.kind == K_LINEAR:
        bias = getattr(old, "bias", None) is not None
        if entry.target == "ColumnParallelLinear":
            idx = _layer_index(name)
            kv = _kv_shard(entry, attn_by_layer.get(idx), ctx)
            start, size = kv if kv else ctx.split(old.out_features)
            return L.ColumnParallelLinear(
                old.in_features, old.out_features, bias, ctx, start=start, size=size,
                gather_output=bool(entry.extra.get("gather_output")), **kw,
            )  # fmt: skip
        if entry.target == "RowParallelLinear":
            return L.RowParallelLinear(
                old.in_features, old.out_features, bias, ctx,
                input_is_parallel=entry.extra.get("input_is_parallel", True), **kw,
            )  # fmt: skip
        return L.ReplicatedLinear(old.in_features, old.out_features, bias, **kw)
    if entry.kind == K_EMBEDDING:
        if name.endswith("embed_tokens") or entry.extra.get("vocab_size"):
            scale = getattr(old, "scalar_embed_scale", None) or entry.extra.get("embed_scale")
            if scale is None and entry.extra.get("has_embed_scale"):
                raise ValueError(f"{name} scales its output but the scale is unknown")
            return L.VocabParallelEmbedding(
                old.num_embeddings, entry.extra["padded_vocab"], old.embedding_dim, ctx,
                embed_scale=scale, **kw,
            )  # fmt: skip
    if entry.kind == K_LM_HEAD:
        return L.ParallelLMHead(
            old.out_features, entry.extra["padded_vocab"], old.in_features, ctx, **kw
        )
    if entry.kind == K_NORM:
        weight = getattr(old, "weight", None)
        if weight is None or weight.dim() != 1:
            return None  # weightless norms stay HF code
        eps = entry.extra.get("eps") or getattr(old, "eps", None) or old.variance_epsilon
        cls = L.OffsetRMSNorm if entry.target == "GemmaRMSNorm" else L.RMSNorm
        return cls(weight.shape[0], float(eps), **kw)
    if entry.kind == K_EXPERTS:
        return _build_experts(entry, old, ctx, kw)
    return None


def _build_experts(entry, old, ctx, kw):
    params = {p.name: p.full_shape for p in entry.params}
    experts, two_inter, hidden = params["w13_weight"]
    return L.FusedMoE(
        experts, hidden, two_inter // 2, ctx, act_fn=getattr(old, "act_fn", None),
        reduce_results=entry.extra.get("reduce_results", True), **kw,
    )  # fmt: skip


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


def _set_local_heads(model: nn.Module, plan: ReplacementPlan, ctx: L.ParallelContext) -> None:
    """HF attention reshapes with -1 and head_dim; what it reads per module is the GQA ratio
    (and, in some models, head-count attributes)."""
    if ctx.world == 1:
        return
    prefix = base_prefix(model)
    for spec in plan.attention:
        if not spec.qualname or not spec.num_heads or not spec.num_kv_heads:
            continue
        try:
            attn = model.get_submodule(module_name(spec.qualname, prefix))
        except AttributeError:
            continue
        heads = spec.num_heads // ctx.world
        kv = 1 if spec.kv_replicated else spec.num_kv_heads // ctx.world
        if spec.mla:
            kv = heads  # the HF module still expands the latent into one K/V per query head
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = heads // kv
        for attr in _HEAD_ATTRS:
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, heads)
        for attr in _KV_ATTRS:
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, kv)


def _trim_to_stage(model: nn.Module, plan: ReplacementPlan, stage: int, prefix: str) -> None:
    """Modules other stages own become placeholders; the input embedding of a later stage
    returns the hidden states it receives."""
    spec = plan.stages[stage]
    layers = model.get_submodule(f"{prefix}.{plan.layers_module}")
    for i in range(len(layers)):
        if not spec.layers[0] <= i < spec.layers[1]:
            layers[i] = L.MissingLayer()
    base = model.get_submodule(prefix)
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    for name in list(spec.missing) + list(spec.modules):
        full = f"{prefix}.{name}"
        mod = model.get_submodule(full)
        if (
            mod is embed
            or isinstance(mod, L.VocabParallelEmbedding)
            and name.endswith("embed_tokens")
        ):
            if stage > 0:
                model.set_submodule(full, L.StageInput())
        elif name in spec.missing:
            model.set_submodule(full, L.MissingLayer())
    if not spec.has_lm_head and hasattr(model, "lm_head"):
        model.lm_head = L.MissingLayer()
