"""Fusion steps of the vLLM ≥ 0.32 profile: what the backend's fusers build instead of per-linear
replacements (vllm/model_executor/models/transformers/fuser.py, fusers/, moe.py).

Each step reads the fusion facts the walker recorded (`ModuleFact.attrs["fusion"]`), applies
vLLM's per-instance `validate` with this plan's tp, and returns the entries it made; the linears
they cover are then skipped by the per-linear pass, so tp_plan only decides what no fuser claimed.
What did not fuse is written into `plan.notes` with the reason.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from tfbackend.inspect.activations import ACT_AND_MUL
from tfbackend.inspect.facts import EXPERTS, LINEAR, ModelFacts, ModuleFact
from tfbackend.replace.experts import moe_spec
from tfbackend.replace.mla import fused_as_mla
from tfbackend.replace.plan import (
    K_ACTIVATION,
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
from tfbackend.replace.shards import replicated_shards, row_shards, stacked_shards

if TYPE_CHECKING:
    from tfbackend.replace.profiles import Profile

# Priority order of vLLM's FUSERS tuple (MLA is not modelled: see notes).
_PRIORITY = ("glu", "qkv", "packed_qkv", "merged_column")


def _linear(facts: ModelFacts, qualname: str) -> ModuleFact | None:
    m = facts.module(qualname)
    return m if m is not None and m.kind == LINEAR else None


def _entry(qualname, sources, source_class, kind, target, reason, params, stage, **extra):
    return PlanEntry(
        qualname=qualname,
        sources=sources,
        source_class=source_class,
        kind=kind,
        target=target,
        reason=reason,
        params=params,
        stage=stage,
        extra=extra,
    )


def _row(fact: ModuleFact, tp: int, why: str, stage) -> PlanEntry:
    return _entry(
        fact.qualname,
        [fact.qualname],
        fact.class_name,
        K_LINEAR,
        "RowParallelLinear",
        why,
        row_shards(fact, tp) if tp > 1 else replicated_shards(fact),
        stage,
    )


def _same_input_and_bias(parts: list[ModuleFact]) -> bool:
    return (
        len({p.attrs["in_features"] for p in parts}) == 1
        and len({bool(p.attrs.get("bias")) for p in parts}) == 1
    )


def _qkv(facts, plan, parent: ModuleFact, cand: dict, stage) -> tuple[list[PlanEntry], str]:
    names = [cand[x] for x in ("q", "k", "v")]
    parts = [_linear(facts, f"{parent.qualname}.{n}") for n in names]
    if None in parts:
        return [], "a q/k/v projection is not an nn.Linear fact"
    hd = cand.get("head_dim") or facts.config.head_dim
    qo, ko, vo = (p.attrs["out_features"] for p in parts)
    if not (hd and _same_input_and_bias(parts) and ko == vo and qo % hd == 0 and ko % hd == 0):
        return [], "q/k/v shapes not compatible with one head-sharded GEMM"
    fused = _qkv_parallel(
        f"{parent.qualname}.qkv_proj", parts, qo, ko, hd, plan.tp, stage, "qkv", "q/k/v fused"
    )
    return [fused, *_out_proj(facts, plan, parent, cand, stage, "fused q/k/v")], ""


def _packed_qkv(facts, plan, parent: ModuleFact, cand: dict, stage):
    """One linear already holding q, k and v (split (q, kv, kv) in the forward) becomes a
    QKVParallelLinear in place, under its own name (vLLM PackedQKVFuser)."""
    packed = _linear(facts, f"{parent.qualname}.{cand['qkv']}")
    if packed is None:
        return [], "the packed projection is not an nn.Linear fact"
    hd = cand.get("head_dim") or facts.config.head_dim
    q_size, kv_size = cand["q_size"], cand["kv_size"]
    if not (
        hd
        and q_size % hd == 0
        and kv_size % hd == 0
        and packed.attrs["out_features"] == q_size + 2 * kv_size
    ):
        return [], "packed q/kv widths not compatible with one head-sharded GEMM"
    fused = _qkv_parallel(
        packed.qualname,
        [packed],
        q_size,
        kv_size,
        hd,
        plan.tp,
        stage,
        "packed_qkv",
        "packed q/k/v sharded by heads",
    )
    return [fused, *_out_proj(facts, plan, parent, cand, stage, "packed q/k/v")], ""


def _qkv_parallel(qualname, parts, q_out, kv_out, hd, tp, stage, fuser, why) -> PlanEntry:
    heads, kv = q_out // hd, kv_out // hd
    heads_rank = heads // tp
    kv_rank = max(1, kv // tp)  # QKVParallelLinear replicates kv heads when kv < tp
    full_out, rank_out = (heads + 2 * kv) * hd, (heads_rank + 2 * kv_rank) * hd
    return _entry(
        qualname,
        [p.qualname for p in parts],
        parts[0].class_name,
        K_LINEAR,
        "QKVParallelLinear",
        f"{why} (vLLM {'QKVFuser' if fuser == 'qkv' else 'PackedQKVFuser'})",
        stacked_shards(parts, full_out, rank_out),
        stage,
        fuser=fuser,
        num_heads=heads_rank,
        num_kv_heads=kv_rank,
        head_size=hd,
        kv_replicas=max(1, tp // kv) if kv < tp else 1,
        output_sizes=[q_out, kv_out, kv_out],
    )


def _out_proj(facts, plan, parent, cand: dict, stage, of: str) -> list[PlanEntry]:
    if cand.get("o") and (o := _linear(facts, f"{parent.qualname}.{cand['o']}")):
        return [_row(o, plan.tp, f"output projection of {of}: always rowwise", stage)]
    return []


def _merged(facts, plan, parent, names: list[str], stage, fuser: str, name: str):
    parts = [_linear(facts, f"{parent.qualname}.{n}") for n in names]
    if None in parts:
        return None, "a projection is not an nn.Linear fact"
    outs = [p.attrs["out_features"] for p in parts]
    if not _same_input_and_bias(parts) or any(o % plan.tp for o in outs):
        return None, f"{' / '.join(names)}: inputs, biases or tp divisibility differ"
    entry = _entry(
        f"{parent.qualname}.{name}",
        [p.qualname for p in parts],
        parts[0].class_name,
        K_LINEAR,
        "MergedColumnParallelLinear",
        f"{' + '.join(names)} merged (vLLM {fuser} fuser)",
        stacked_shards(parts, sum(outs), sum(outs) // plan.tp),
        stage,
        fuser=fuser,
        output_sizes=outs,
    )
    return entry, ""


def _glu(facts, plan, parent, cand: dict, stage) -> tuple[list[PlanEntry], str]:
    gate = _linear(facts, f"{parent.qualname}.{cand['gate']}")
    up = _linear(facts, f"{parent.qualname}.{cand['up']}")
    if gate is None or up is None:
        return [], "gate/up not nn.Linear facts"
    if gate.attrs["out_features"] != up.attrs["out_features"]:
        return [], "gate and up differ in size"
    if not cand.get("act_and_mul"):
        return [], f"activation {cand.get('act_class')} has no vLLM ...AndMul kernel"
    merged, why = _merged(
        facts, plan, parent, [cand["gate"], cand["up"]], stage, "glu", "gate_up_proj"
    )
    if merged is None:
        return [], why
    act_class = ACT_AND_MUL[cand["act_and_mul"]]
    merged.extra["activation"] = cand["act_and_mul"]
    act = f"{parent.qualname}.{cand['act']}"
    out = [
        merged,
        _entry(
            act,
            [act],
            cand.get("act_class") or "",
            K_ACTIVATION,
            act_class,
            f"activation fused with the gate/up multiply ({cand['act_and_mul']})",
            [],
            stage,
            activation=cand["act_and_mul"],
        ),
    ]
    if cand.get("down") and (down := _linear(facts, f"{parent.qualname}.{cand['down']}")):
        out.append(_row(down, plan.tp, "down projection of a fused GLU: always rowwise", stage))
    return out, ""


def merged_name(names: list[str]) -> str:
    """vLLM's programmatic name for a merged projection (MergedColumnParallelFuser)."""
    from tfbackend.inspect.fx_match import merged_name as vllm_name  # torch.fx, when needed

    return vllm_name(names)


def fuse_projections(facts: ModelFacts, plan: ReplacementPlan, profile: Profile, stage_of):
    entries: list[PlanEntry] = []
    for m in facts.modules:
        fact = m.attrs.get("fusion")
        if not fact or fused_as_mla(plan, m.qualname):
            continue
        if not fact.get("fuser"):
            plan.notes.append(_not_fused(m, str(fact.get("reason"))))
            continue
        stage = stage_of(m.qualname)
        why_not: list[str] = []
        for cand in sorted(fact["candidates"], key=lambda c: _PRIORITY.index(c["fuser"])):
            if cand["fuser"] == "qkv":
                made, why = _qkv(facts, plan, m, cand, stage)
            elif cand["fuser"] == "glu":
                made, why = _glu(facts, plan, m, cand, stage)
            elif cand["fuser"] == "packed_qkv":
                made, why = _packed_qkv(facts, plan, m, cand, stage)
            else:
                names = cand["linears"]
                if any("." in n for n in names) or len(set(names)) != len(names):
                    made, why = [], "projection names not plain attributes"
                else:
                    one, why = _merged(
                        facts, plan, m, names, stage, "merged_column", merged_name(names)
                    )
                    made = [one] if one else []
            if made:
                entries.extend(made)
                break
            why_not.append(f"{cand['fuser']}: {why}")
        else:
            plan.notes.append(_not_fused(m, "; ".join(why_not)))
    return entries


def _not_fused(m: ModuleFact, why: str) -> PlanNote:
    return PlanNote(NoteCode.NOT_FUSED, f"not fused: {why}", m.qualname, m.class_name)


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


def _routing_stays(block: str, why: str) -> PlanNote:
    return PlanNote(
        NoteCode.ROUTING_IN_TRANSFORMERS, f"routing stays in Transformers: {why}", block
    )


def fuse_moe(facts: ModelFacts, plan: ReplacementPlan, profile: Profile, stage_of):
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
            _entry(
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
            _entry(
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
            gate = _entry(
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


def _alias(entry: PlanEntry, qualname: str, reason: str) -> PlanEntry:
    """The same module reached under a second name: same sources, so counted once."""
    return replace(
        entry, qualname=qualname, reason=reason, extra={**entry.extra, "alias_of": entry.qualname}
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
        _entry(
            f"{experts.qualname}._shared_experts",
            [source],
            source_class,
            K_SHARED_EXPERTS,
            "SharedExperts",
            "the runner computes the shared expert beside the routed ones",
            [],
            stage,
        ),
        _entry(
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
    gate_fact = _linear(facts, f"{block}.{gate}") if gate else None
    if gate_fact is not None:
        hf_gate = _entry(
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


def alias_shared_experts(facts: ModelFacts, plan: ReplacementPlan) -> list[PlanEntry]:
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
                unchanged = _entry(
                    m.qualname, [m.qualname], m.class_name, K_UNCHANGED, m.class_name,
                    "kept as HF code", replicated_shards(m), runner.stage,
                )  # fmt: skip
                name = inner + m.qualname.removeprefix(source)
                out.append(_alias(unchanged, name, "the runner's alias of an unchanged module"))
    return out
