"""Experts blocks: the MoE spec every profile records, and the per-block FusedMoE entry of the
backends before the fusers (seed `transformers_moe.py`)."""

from __future__ import annotations

from tfbackend.inspect.facts import EXPERTS, ModelFacts, ModuleFact
from tfbackend.plan import K_EXPERTS, MoESpec, ParamShard, PlanEntry, ReplacementPlan
from tfbackend.plan.shards import split


def moe_activation(facts: ModelFacts) -> str:
    arch = (facts.causal_lm_class or facts.model_class).lower()
    if "gptoss" in arch:
        return "swigluoai"
    if "grok1" in arch:
        return "gelu"
    return "silu"


def moe_spec(facts: ModelFacts, m: ModuleFact, plan: ReplacementPlan, stage) -> MoESpec:
    cfg, moe = facts.config, facts.config.moe
    inter = moe.intermediate_size
    parent = m.qualname.rsplit(".", 1)[0]
    shared = moe.num_shared_experts > 0 or any(
        "shared_expert" in x.qualname and x.qualname.startswith(parent + ".") for x in facts.modules
    )
    return MoESpec(
        qualname=m.qualname,
        layout=m.attrs["layout"],
        num_experts=moe.num_experts or m.attrs.get("count"),
        top_k=moe.top_k,
        hidden_size=cfg.hidden_size,
        intermediate_size=inter,
        intermediate_per_rank=split(inter, plan.tp) if inter else None,
        activation=moe_activation(facts),
        renormalize=moe.renormalize,
        num_shared_experts=moe.num_shared_experts,
        reduce_results=not shared,
        has_bias=bool(m.attrs.get("has_bias")),
        n_group=moe.n_group,
        topk_group=moe.topk_group,
        stage=stage,
    )


def plan_experts(facts, plan, profile, stage_of, fused: set[str]) -> None:
    """One FusedMoE per experts block of a layout the profile fuses, split on the intermediate
    dimension (blocks a fuser already took are skipped)."""
    cfg = facts.config
    hidden = cfg.hidden_size
    inter = cfg.moe.intermediate_size
    for m in facts.modules:
        if m.kind != EXPERTS or m.qualname in fused:
            continue
        layout = m.attrs["layout"]
        if layout not in profile.moe_layouts:
            continue
        experts = cfg.moe.num_experts or m.attrs.get("count")
        per_rank = split(inter, plan.tp) if inter else None
        params = []
        if experts and inter and hidden:
            params = [
                ParamShard(
                    "w13_weight", [experts, 2 * inter, hidden], [experts, 2 * per_rank, hidden], 1
                ),
                ParamShard("w2_weight", [experts, hidden, inter], [experts, hidden, per_rank], 2),
            ]
        stage = stage_of(m.qualname)
        plan.entries.append(
            PlanEntry(
                qualname=m.qualname,
                sources=[m.qualname],
                source_class=m.class_name,
                kind=K_EXPERTS,
                target="FusedMoE",
                reason=f"experts ({layout}) fused, split on the intermediate dimension",
                params=params,
                stage=stage,
            )
        )
        plan.moe.append(moe_spec(facts, m, plan, stage))
