"""Modules vLLM 0.32's `_recursive_replace` swaps whole, and what that leaves behind.

`TransformersBase.recursive_replace` walks the children and, in this order, swaps any
`nn.Linear`, any `nn.Conv2d`/`nn.Conv3d` (`replace_conv_class`: Conv2dLayer/Conv3dLayer for the
exact classes with zero padding, the module itself otherwise), any vocab `nn.Embedding` and any
`nn.LayerNorm`, without descending into it. Only a module that none of those branches took is
fused or recursed into, so the children of a swapped module (Inkling's
`InklingNormedEmbedding.embed_norm`, an RMSNorm inside an nn.Embedding subclass) stay HF code.
"""

from __future__ import annotations

from tfbackend.inspect.facts import CONV, LAYERNORM, LINEAR, ModelFacts, ModuleFact
from tfbackend.plan import K_CONV, K_EMBEDDING, K_UNCHANGED, PlanEntry, ReplacementPlan
from tfbackend.plan.shards import replicated_shards
from tfbackend.replace.profiles import Capability, Profile


def conv_target(m: ModuleFact) -> str | None:
    """vLLM's class for a conv, or None when replace_conv_class hands the module back."""
    if not m.attrs.get("exact") or m.attrs.get("padding_mode") != "zeros":
        return None
    return "Conv2dLayer" if m.attrs.get("dims") == 2 else "Conv3dLayer"


def plan_convs(facts: ModelFacts, plan: ReplacementPlan, profile: Profile, stage_of) -> None:
    if not profile.replaces_conv:
        return

    for m in facts.modules:
        if m.kind != CONV:
            continue
        target = conv_target(m)
        if target is None:
            continue
        plan.entries.append(
            PlanEntry(
                qualname=m.qualname,
                sources=[m.qualname],
                source_class=m.class_name,
                kind=K_CONV,
                target=target,
                reason="nn.Conv2d/3d with zero padding: vLLM's conv layer, whole on every rank",
                params=replicated_shards(m),
                stage=stage_of(m.qualname),
            )
        )


def _swapped_whole(facts: ModelFacts, plan: ReplacementPlan) -> dict[str, str]:
    """qualname → class of every module the walk swaps without visiting its children."""
    out = {m.qualname: m.class_name for m in facts.modules if m.kind in (LINEAR, CONV, LAYERNORM)}
    out.update({e.qualname: e.source_class for e in plan.entries if e.kind == K_EMBEDDING})
    return out


def _swapped_ancestor(qualname: str, swapped: dict[str, str]) -> str | None:
    parts = qualname.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in swapped:
            return prefix
    return None


def leave_unvisited(facts: ModelFacts, plan: ReplacementPlan, profile: Profile) -> None:
    """Entries planned inside a module the walk swaps whole: vLLM never reaches them."""
    if not profile.can(Capability.SWAPS_LEAVES_WHOLE):
        return

    swapped = _swapped_whole(facts, plan)
    for i, e in enumerate(plan.entries):
        outer = _swapped_ancestor(e.qualname, swapped)
        m = facts.module(e.qualname)
        if outer is None or m is None:
            continue
        plan.entries[i] = PlanEntry(
            qualname=e.qualname,
            sources=e.sources,
            source_class=e.source_class,
            kind=K_UNCHANGED,
            target=m.class_name,
            reason=f"inside {outer} ({swapped[outer]}), which vLLM swaps whole without visiting "
            "its children: left as HF code",
            params=replicated_shards(m),
            stage=e.stage,
        )
