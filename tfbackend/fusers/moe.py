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
    """vLLM 0.32's MoEBlockFuser.match: the first child whose forward is
    `topk(softmax|sigmoid(linear(x)))` routes; a shared expert is the one child the first
    addition with the experts' output adds."""

    name = "MoEBlockFuser"

    def fuse_blocks(self, facts, plan, profile, stage_of) -> list[PlanEntry]:
        return _fuse_moe(self, facts, plan, profile, stage_of)

    def aliases(self, facts, plan) -> list[PlanEntry]:
        """The shared expert's modules again under the runner's path (vLLM replaces its
        layers after the fuser wrapped it: one module object, two names)."""
        return _alias_shared_experts(facts, plan)

    def match(self, block: dict, experts: str) -> dict:
        """This release's verdict on a block, from what the walk read (inspect/moe_blocks.py):
        `routing` "internal" (vLLM routes), "external" (the HF gate routes, vLLM runs the rest)
        or None (the block's forward stays, vLLM smuggles its top-k ids in), and why."""
        if block["returns_tuple"]:
            return verdict(reason=f"{block['block_class']}.forward returns a tuple")
        router = scoring = None
        for name, reading in block["routers"].items():
            if _state_ok(reading) and isinstance(before := reading["before"], dict):
                if before["from_linear"]:
                    router, scoring = name, before["op"]
                    break
        if router is None:
            return verdict(reason=no_router(block["routers"]))
        shared = shared_gate = None
        if set(block["children"]) - {experts, router}:
            if not block["traced"]:  # vLLM gives up on the block: routing stays in Transformers
                return verdict(reason=f"{block['block_class']}.forward not traceable")
            shared, shared_gate = block["first_add"]["shared"], block["first_add"]["gate"]
            if shared_gate is not None and shared_gate not in block["scalar_gates"]:
                return verdict(reason=f"shared-expert gate {shared_gate} is not a one-logit linear")
            dropped = sorted(set(block["stateful"]) - {experts, router, shared, shared_gate})
            if dropped:
                return verdict(
                    reason=f"child {dropped[0]} holds state and is not the shared expert its "
                    "forward adds to the experts' output"
                )
        return verdict(router, scoring, shared, shared_gate, "internal")

    def without_vllm_routing(self, found: dict) -> dict:
        """The verdict when vLLM must not route this block (the fp16 fallback): 0.32 keeps the
        whole block in Transformers."""
        return verdict(reason="routed_scaling_factor with a shared expert in float16")


def verdict(router=None, scoring=None, shared=None, shared_gate=None, routing=None, reason=""):
    return {
        "router": router,
        "scoring": scoring,
        "shared": shared,
        "shared_gate": shared_gate,
        "routing": routing,
        "reason": reason,
    }


def _state_ok(reading: dict) -> bool:
    # vLLM first asks that the router's whole state be `weight` plus an optional
    # `e_score_correction_bias` (Ernie 4.5 keeps that bias in a child, `moe_statics`: rejected)
    state = set(reading["state"])
    return "weight" in state and not state - {"weight", "e_score_correction_bias"}


def no_router(routers: dict) -> str:
    """Why no child passed as the router, told for the likeliest one (a child with a weight)."""
    for name, reading in routers.items():
        state = set(reading["state"])
        if not any(n.rsplit(".", 1)[-1] == "weight" for n in state):
            continue
        extra = sorted(state - {"weight", "e_score_correction_bias"})
        if extra:
            return (
                f"router {name} holds {', '.join(extra)}: vLLM accepts only weight and "
                "e_score_correction_bias"
            )
        return f"router {name}'s forward is not topk(softmax|sigmoid(linear(x)))"
    return "no child holds a router weight"


def _routing_stays(block: str, why: str) -> PlanNote:
    return PlanNote(
        NoteCode.ROUTING_IN_TRANSFORMERS, f"routing stays in Transformers: {why}", block
    )


def _block_match(fuser: MoEBlockFuser, facts: ModelFacts, experts: ModuleFact, notes: list):
    """The fuser's verdict on the block of `experts`, the fp16 fallback applied, and the router's
    fact when vLLM routes (transformers/moe.py)."""
    block = experts.qualname.rsplit(".", 1)[0]
    child = experts.qualname.rsplit(".", 1)[1]
    found = fuser.match(experts.attrs["moe_block"], child)
    if found["routing"] is None:
        notes.append(_routing_stays(block, found["reason"]))
        return found, None
    cfg = facts.config
    scale = cfg.raw.get("routed_scaling_factor")
    internal = found["routing"] == "internal"
    if found["shared"] and internal and scale not in (None, 1.0) and cfg.dtype == "float16":
        # vLLM would divide the shared output by the scale, which only its own fp16 decoder
        # layers undo (moe.py: reaches_fp16_trick), so it falls back to Transformers routing
        notes.append(
            _routing_stays(
                block,
                f"routed_scaling_factor={scale} with a shared expert in float16 (the config's "
                "dtype)",
            )
        )
        found = fuser.without_vllm_routing(found)
    router = facts.module(f"{block}.{found['router']}") if found["routing"] == "internal" else None
    return found, router


def _fuse_moe(fuser: MoEBlockFuser, facts: ModelFacts, plan: ReplacementPlan, profile, stage_of):
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
        found, router = _block_match(fuser, facts, m, plan.notes)
        shared, shared_gate = found["shared"], found["shared_gate"]
        if router is not None and params and (bias := router.params.get("e_score_correction_bias")):
            # The router's bias goes to FusedMoE as a kwarg; an nn.Parameter assigned to a module
            # becomes its parameter (a buffer, as most models keep it, does not)
            params.append(ParamShard("e_score_correction_bias", list(bias), list(bias), None))
        routing = "internal" if router else "external"
        # MoERunner when the fused forward replaces the block's (vLLM routes, or the HF gate
        # routes through custom_routing_function while the runner runs the shared expert)
        fused = found["routing"] is not None
        shared_extra = {"shared_expert": f"{block}.{shared}"} if shared and fused else {}
        entries.append(
            entry(
                m.qualname,
                [m.qualname],
                m.class_name,
                K_EXPERTS,
                # vLLM routes in Transformers through its own runner subclass, which smuggles
                # the HF top-k ids into FusedMoE (transformers/moe.py: TransformersMoERunner)
                "MoERunner" if fused else "TransformersMoERunner",
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
        if shared and fused:
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
