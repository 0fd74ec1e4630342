"""`apply` builds every target the planner emits, from the table in replace/builders.py, and
refuses what it cannot build: on real tiny models built on the meta device (no weights)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from tfbackend.inspect import SourceInfo, facts_from_config
from tfbackend.parity.tiny import tiny_config
from tfbackend.replace import layers as L
from tfbackend.replace.apply import NotBuildable, apply
from tfbackend.replace.builders import BUILDERS, target_key
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import select_profile

ATTN = "model.layers.0.self_attn"


def _facts(config):
    return facts_from_config(config, SourceInfo("local", "x", "config.json"))


def _default_profile(facts):
    return select_profile(None, facts.versions.get("vllm"))  # what `check` uses


def _applied(model_type: str, rank: int, tp: int = 2, **plan_edits):
    config = tiny_config(model_type)
    facts = _facts(config)
    plan = build_plan(facts, tp=tp, pp=1, profile=_default_profile(facts))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return plan, model, apply(plan, model, L.ParallelContext(rank=rank, world=tp))


@pytest.mark.slow
def test_every_target_the_zoo_plans_has_a_builder():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    missing: dict[str, set[str]] = {}
    planned = 0
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            facts = _facts(tiny_config(model_type))
        except Exception:  # noqa: BLE001 - no tiny model of it (tiny_zoo records why)
            continue
        for tp in (1, 2):
            plan = build_plan(facts, tp=tp, pp=1, profile=_default_profile(facts))
            planned += 1
            for entry in plan.entries:
                if target_key(entry) not in BUILDERS:
                    missing.setdefault(target_key(entry), set()).add(model_type)
    assert planned > 300  # every architecture but the few without a tiny model, twice
    assert not missing


def test_a_target_without_a_builder_raises_naming_it_and_the_module():
    config = tiny_config("llama")
    facts = _facts(config)
    plan = build_plan(facts, tp=2, pp=1, profile=_default_profile(facts))
    o_proj = next(e for e in plan.entries if e.qualname == f"{ATTN}.o_proj")
    plan.entries[plan.entries.index(o_proj)] = dataclasses.replace(o_proj, target="MysteryLinear")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotBuildable, match=rf"'MysteryLinear' \(linear\) for {ATTN}.o_proj"):
        apply(plan, model, L.ParallelContext(rank=0, world=2))


def test_a_packed_qkv_it_cannot_compute_raises_instead_of_running_replicated():
    # GPT-BigCode's c_attn: vLLM rewrites the forward's split to per-rank widths
    with pytest.raises(NotBuildable, match=r"'QKVParallelLinear' .*c_attn: fuser 'packed_qkv'"):
        _applied("gpt_bigcode", rank=0)


def test_fused_qkv_is_one_gemm_whose_rows_are_this_ranks_heads():
    # 4 q heads and 2 kv heads of 32 over 2 ranks: rank 1 holds q heads 2-3 and kv head 1
    plan, model, applied = _applied("qwen3", rank=1)
    attn = model.model.layers[0].self_attn
    assert applied.installed[f"{ATTN}.qkv_proj"] == "FusedColumnLinear"
    assert isinstance(attn.qkv_proj, L.FusedColumnLinear)
    assert attn.qkv_proj.weight.shape == (64 + 32 + 32, 128)
    assert attn.qkv_proj.pieces["weight"] == [
        (f"{ATTN}.q_proj.weight", L.Shard(0, 64, 64)),
        (f"{ATTN}.k_proj.weight", L.Shard(0, 32, 32)),
        (f"{ATTN}.v_proj.weight", L.Shard(0, 32, 32)),
    ]
    assert all(isinstance(getattr(attn, n), L.FusedPart) for n in ("q_proj", "k_proj", "v_proj"))
    # the parts hold no parameters: the fused weight is counted once, under qkv_proj
    names = {n for n, _ in model.named_parameters()}
    assert f"{ATTN}.qkv_proj.weight" in names and f"{ATTN}.q_proj.weight" not in names


def test_kv_heads_fewer_than_tp_are_whole_heads_in_the_fused_qkv():
    config = tiny_config("llama")
    config.num_key_value_heads = 1
    facts = _facts(config)
    plan = build_plan(facts, tp=2, pp=1, profile=_default_profile(facts))
    for rank in (0, 1):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        apply(plan, model, L.ParallelContext(rank=rank, world=2))
        pieces = model.model.layers[0].self_attn.qkv_proj.pieces["weight"]
        assert [shard for _, shard in pieces] == [
            L.Shard(0, 64 * rank, 64),
            L.Shard(0, 0, 32),
            L.Shard(0, 0, 32),
        ]


def test_gate_up_is_merged_and_the_activation_is_the_and_mul_kernels():
    plan, model, _ = _applied("gemma3_text", rank=1)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_up_proj.pieces["weight"] == [
        ("model.layers.0.mlp.gate_proj.weight", L.Shard(0, 128, 128)),
        ("model.layers.0.mlp.up_proj.weight", L.Shard(0, 128, 128)),
    ]
    assert isinstance(mlp.act_fn, L.AndMulActivation) and mlp.act_fn.name == "gelu_pytorch_tanh"
    assert isinstance(mlp.down_proj, L.RowParallelLinear)


def test_offset_norms_are_built_as_offset_norms():
    plan, model, applied = _applied("gemma3_text", rank=0)
    targets = {e.target for e in plan.entries if e.kind == "norm"}
    assert targets == {"TPAwareGemmaRMSNorm"}
    norms = [m for m in model.modules() if isinstance(m, L.RMSNorm)]
    assert norms and all(type(m) is L.OffsetRMSNorm for m in norms)


def test_learned_sinks_are_split_per_rank():
    plan, model, _ = _applied("gpt_oss", rank=1)
    attn = model.model.layers[0].self_attn
    assert attn.sinks.shape == (2,)  # two of four heads
    assert attn.shards["sinks"] == L.Shard(0, 2, 2)


def test_moe_block_becomes_a_runner_holding_the_routed_experts():
    plan, model, applied = _applied("qwen3_moe", rank=1)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, L.MoERunner)
    routed = experts.routed_experts
    assert isinstance(routed, L.FusedMoE)
    assert routed.w13_weight.shape == (4, 64, 128) and routed.w2_weight.shape == (4, 128, 32)
    assert routed.checkpoint_prefix == "model.layers.0.mlp.experts"
    assert "model.layers.0.mlp.gate" in applied.kept  # the HF router routes


def test_shared_experts_keep_their_planned_layers():
    plan, model, applied = _applied("qwen2_moe", rank=0)
    shared = model.model.layers[0].mlp.shared_expert
    assert isinstance(shared.gate_up_proj, L.FusedColumnLinear)
    assert isinstance(shared.down_proj, L.RowParallelLinear)
    gate = model.model.layers[0].mlp.shared_expert_gate
    assert isinstance(gate, L.ReplicatedLinear)
    assert any("shared expert" in why for why in applied.kept.values())
