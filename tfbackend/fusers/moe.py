"""MoEBlockFuser (vLLM fusers/moe.py, transformers/moe.py): an experts block becomes a
MoERunner holding TransformersRoutedExperts; when its match moves routing into vLLM, the router
becomes a GateLinear and a shared expert (with its sigmoid gate) is wrapped in the runner."""

from __future__ import annotations

from dataclasses import replace

from tfbackend.fusers.base import Fuser, entry, linear
from tfbackend.inspect.facts import EXPERTS, ModelFacts, ModuleFact
from tfbackend.plan import (
    K_EXPERTS,
    K_LINEAR,
    K_ROUTER,
    K_SHARED_EXPERTS,
    K_UNCHANGED,
    NoteCode,
    ParamShard,
    PlanEntry,
    PlanNote,
    ReplacementPlan,
)
from tfbackend.plan.experts import moe_spec
from tfbackend.plan.shards import replicated_shards


class MoEBlockFuser(Fuser):
    name = "MoEBlockFuser"

    def fuse_blocks(self, facts, plan, profile, stage_of) -> list[PlanEntry]:
        return _fuse_moe(facts, plan, profile, stage_of)

    def aliases(self, facts, plan) -> list[PlanEntry]:
        """The shared expert's modules again under the runner's path (vLLM replaces its
        layers after the fuser wrapped it: one module object, two names)."""
        return _alias_shared_experts(facts, plan)


def _routing_stays(block: str, why: str) -> PlanNote:
    return PlanNote(
        NoteCode.ROUTING_IN_TRANSFORMERS, f"routing stays in Transformers: {why}", block
    )


def _block_match(facts: ModelFacts, experts: ModuleFact, notes: list[str]):
    """(router fact, shared-expert child name, shared-gate child name) when vLLM routes inside its
    MoERunner, router None when routing stays in Transformers (transformers/moe.py)."""
    block = experts.qualname.rsplit(".", 1)[0]
    verdict = experts.attrs["moe_block"]  # the walk reads every experts' block (moe_blocks.py)
    if verdict["router"] is None:
        notes.append(_routing_stays(block, verdict["reason"]))
        return None, None, None
    router = facts.module(f"{block}.{verdict['router']}")
    shared, gate = verdict["shared"], verdict["shared_gate"]
    cfg = facts.config
    scale = cfg.raw.get("routed_scaling_factor")
    if shared and scale not in (None, 1.0) and cfg.dtype == "float16":
        # vLLM would divide the shared output by the scale, which only its own fp16 decoder
        # layers undo (moe.py: reaches_fp16_trick), so it falls back to Transformers routing
        notes.append(
            _routing_stays(
                block,
                f"routed_scaling_factor={scale} with a shared expert in float16 (the config's "
                "dtype)",
            )
        )
        return None, None, None
    return router, shared, gate


def _fuse_moe(facts: ModelFacts, plan: ReplacementPlan, profile, stage_of):
    """experts → MoERunner holding TransformersRoutedExperts (w13 [E, 2I/tp, H], w2 [E, H, I/tp]);
    the router → GateLinear, aliased inside the runner when routing moves into vLLM, with the
    shared expert (and its sigmoid gate) wrapped in the runner too."""
    cfg, moe = facts.config, facts.config.moe
    entries: list[PlanEntry] = []
    for m in facts.modules:
        if m.kind != EXPERTS or m.attrs.get("layout") not in profile.moe_layouts:
            continue
        block = m.qualname.rsplit(".", 1)[0]
        stage = stage_of(m.qualname)
        spec = moe_spec(facts, m, plan, stage)
        plan.moe.append(spec)
        E, H, inter = spec.num_experts, cfg.hidden_size, spec.intermediate_size  # noqa: N806
        params = []
        if E and H and inter:
            per = inter // plan.tp
            params = [
                ParamShard("w13_weight", [E, 2 * inter, H], [E, 2 * per, H], 1),
                ParamShard("w2_weight", [E, H, inter], [E, H, per], 2),
            ]
        router, shared, shared_gate = _block_match(facts, m, plan.notes)
        if router is not None and params and (bias := router.params.get("e_score_correction_bias")):
            # The router's bias goes to FusedMoE as a kwarg; an nn.Parameter assigned to a module
            # becomes its parameter (a buffer, as most models keep it, does not)
            params.append(ParamShard("e_score_correction_bias", list(bias), list(bias), None))
        routing = "internal" if router else "external"
        shared_extra = {"shared_expert": f"{block}.{shared}"} if shared else {}
        entries.append(
            entry(
                m.qualname,
                [m.qualname],
                m.class_name,
                K_EXPERTS,
                # vLLM routes in Transformers through its own runner subclass, which smuggles
                # the HF top-k ids into FusedMoE (transformers/moe.py: TransformersMoERunner)
                "MoERunner" if router else "TransformersMoERunner",
                f"MoE block fused ({routing} routing)",
                [],
                stage,
                routing=routing,
                **shared_extra,
            )
        )
        entries.append(
            entry(
                f"{m.qualname}.routed_experts",
                [m.qualname],
                m.class_name,
                K_EXPERTS,
                "TransformersRoutedExperts",
                "experts stacked, split on the intermediate dim",
                params,
                stage,
                num_experts=E,
                top_k=moe.top_k,
            )
        )
        if router is not None:
            w = router.params["weight"]
            gate = entry(
                router.qualname,
                [router.qualname],
                router.class_name,
                K_ROUTER,
                "GateLinear",
                "router rebuilt as vLLM GateLinear (replicated)",
                [ParamShard("weight", list(w), list(w), None)],
                stage,
            )
            entries.append(gate)
            entries.append(_alias(gate, f"{m.qualname}.gate", "the runner's alias of the router"))
        if shared:
            entries.extend(_shared_wrappers(facts, m, shared, shared_gate, stage))
    return entries


def _alias(made: PlanEntry, qualname: str, reason: str) -> PlanEntry:
    """The same module reached under a second name: same sources, so counted once."""
    return replace(
        made, qualname=qualname, reason=reason, extra={**made.extra, "alias_of": made.qualname}
    )


def _shared_layer(runner: str) -> str:
    # MoERunner keeps the wrapper as `_shared_experts` (SharedExperts), which holds the
    # transformers backend's SharedExpertMLP as `_layer` (fused_moe/runner/moe_runner.py)
    return f"{runner}._shared_experts._layer"


def _shared_wrappers(facts, experts: ModuleFact, shared: str, gate: str | None, stage):
    """SharedExperts → SharedExpertMLP(shared_experts=<the HF shared expert>, gate=<the sigmoid
    gate rebuilt as ReplicatedLinear>) (fusers/moe.py: MoEBlockFuser.shared_experts)."""
    block = experts.qualname.rsplit(".", 1)[0]
    layer = _shared_layer(experts.qualname)
    source = f"{block}.{shared}"
    source_class = getattr(facts.module(source), "class_name", "")
    out = [
        entry(
            f"{experts.qualname}._shared_experts",
            [source],
            source_class,
            K_SHARED_EXPERTS,
            "SharedExperts",
            "the runner computes the shared expert beside the routed ones",
            [],
            stage,
        ),
        entry(
            layer,
            [source],
            source_class,
            K_SHARED_EXPERTS,
            "SharedExpertMLP",
            "the HF shared expert"
            + (f" and its sigmoid gate ({gate})" if gate else "")
            + ", wrapped for the runner",
            [],
            stage,
        ),
    ]
    gate_fact = linear(facts, f"{block}.{gate}") if gate else None
    if gate_fact is not None:
        hf_gate = entry(
            gate_fact.qualname,
            [gate_fact.qualname],
            gate_fact.class_name,
            K_LINEAR,
            "ReplicatedLinear",
            "shared-expert gate rebuilt as ReplicatedLinear by the MoE fuser, whatever the tp_plan",
            replicated_shards(gate_fact),
            stage,
        )
        out += [hf_gate, _alias(hf_gate, f"{layer}.gate", "the runner's alias of the gate")]
    return out


def _alias_shared_experts(facts: ModelFacts, plan: ReplacementPlan) -> list[PlanEntry]:
    """Every planned module of a shared expert the runner wraps, again under the runner's path
    (`<experts>._shared_experts._layer.shared_experts.<...>`): one module object, two names.
    Runs once every module is planned, as vLLM replaces the shared expert's layers after the MoE
    fuser wrapped it."""
    out: list[PlanEntry] = []
    planned = {e.qualname for e in plan.entries} | {s for e in plan.entries for s in e.sources}
    for runner in [e for e in plan.entries if e.extra.get("shared_expert")]:
        source = runner.extra["shared_expert"]
        inner = f"{_shared_layer(runner.qualname)}.shared_experts"
        for e in list(plan.entries):
            if e.qualname.startswith(source + ".") and "alias_of" not in e.extra:
                name = inner + e.qualname.removeprefix(source)
                out.append(_alias(e, name, "the runner's alias of the shared expert's module"))
        for m in facts.modules:
            # HF modules with their own parameters that no entry replaces
            if m.qualname.startswith(source + ".") and m.params and m.qualname not in planned:
                unchanged = entry(
                    m.qualname, [m.qualname], m.class_name, K_UNCHANGED, m.class_name,
                    "kept as HF code", replicated_shards(m), runner.stage,
                )  # fmt: skip
                name = inner + m.qualname.removeprefix(source)
                out.append(_alias(unchanged, name, "the runner's alias of an unchanged module"))
    return out
