"""plan → wrapped model: the only code that touches modules.

`apply` takes a transformers causal LM built on the meta device and, for one rank, builds every
entry of the plan with the builder its target names (`builders.BUILDERS`), shards the attention
modules' own parameters (learned sinks) as the plan says, sets their head counts to this rank's,
and trims the modules other pipeline stages own. Attention itself stays the HF module. An entry
without a builder raises `NotBuildable`: nothing the plan lists is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tfbackend.plan import K_EMBEDDING, PlanEntry, ReplacementPlan
from tfbackend.replace import layers as L
from tfbackend.replace.builders import Kept, NotBuildable, Site, build, install, module_name

__all__ = ["Applied", "NotBuildable", "apply", "base_prefix", "module_name"]


@dataclass
class Applied:
    """What `apply` built on this rank: module names as the causal LM spells them."""

    stage: int
    entries: dict[str, PlanEntry] = field(default_factory=dict)  # module name → plan entry
    installed: dict[str, str] = field(default_factory=dict)  # module name → layer class
    kept: dict[str, str] = field(default_factory=dict)  # module name → why nothing was installed


def base_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "") or "model"
    return prefix if hasattr(model, prefix) else "model"


def apply(
    plan: ReplacementPlan, model: nn.Module, ctx: L.ParallelContext, *, stage: int = 0
) -> Applied:
    """Install the plan's layers into `model` (on meta) for the rank `ctx.rank` of stage `stage`."""
    prefix = base_prefix(model)
    applied = Applied(stage=stage)
    dtype = next(model.parameters()).dtype
    attention = {a.layer_idx: a for a in plan.attention}
    for entry in plan.entries:
        if entry.stage is not None and entry.stage != stage and entry.kind != K_EMBEDDING:
            continue
        name = module_name(entry.qualname, prefix)
        made = build(Site(entry, name, model, ctx, dtype, plan, prefix, attention))
        applied.entries[name] = entry
        if isinstance(made, Kept):
            applied.kept[name] = made.reason
            continue
        install(model, name, made)
        applied.installed[name] = type(made).__name__
    _shard_attention_params(model, plan, ctx, prefix, dtype)
    _set_local_heads(model, plan, ctx)
    if plan.pp > 1:
        _trim_to_stage(model, plan, stage, prefix)
    return applied


def _shard_attention_params(model, plan: ReplacementPlan, ctx, prefix: str, dtype) -> None:
    """The attention module's own parameters the plan splits (vLLM 0.32 re-creates learned
    sinks per rank, one per local head): this rank's rows, read by the loader via `shards`."""
    import torch

    for spec in plan.attention:
        split = [p for p in spec.params if p.shard_dim is not None]
        if not split or not spec.qualname:
            continue
        attn = model.get_submodule(module_name(spec.qualname, prefix))
        shards = dict(getattr(attn, "shards", {}))
        for p in split:
            size = p.rank_shape[p.shard_dim]
            shape = list(p.rank_shape)
            old = getattr(attn, p.name)
            setattr(
                attn,
                p.name,
                nn.Parameter(
                    torch.empty(shape, dtype=old.dtype, device="meta"), requires_grad=False
                ),
            )
            shards[p.name] = L.Shard(p.shard_dim, ctx.rank * size, size)
        attn.shards = shards


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
