"""vLLM 0.32's MLA fusion (fusers/mla.py, MLAAttention) in the vllm-0.32 plan, on tiny real
MiniCPM3 / DeepSeek-V3 configs; the last tests cross-check with vLLM itself when installed."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from transformers import AutoConfig

from tests._rules_support import deepseek_v3
from tfbackend.inspect import SourceInfo, facts_from_config
from tfbackend.inspect.mla import mla_fact
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import PROFILES

LATENT = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
MINICPM3 = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    **LATENT,
)
ATTN = "model.layers.0.self_attn"

_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")


def _facts(config):
    return facts_from_config(config, SourceInfo("local", "x", "config.json"))


def _minicpm3(**kw):
    config = AutoConfig.for_model("minicpm3", **{**MINICPM3, **kw})
    config.architectures = ["MiniCPM3ForCausalLM"]
    return config


def _plan(facts, tp=2):
    return build_plan(facts, tp=tp, pp=1, profile=PROFILES["vllm-0.32"])


def _entry(plan, qualname):
    return next(e for e in plan.entries if e.qualname == qualname)


def _shapes(entry):
    return {p.name: (p.full_shape, p.rank_shape) for p in entry.params}


def _findings(facts, rule_id, tp=2):
    from tfbackend.check import CheckOptions, check_facts

    report = check_facts(facts, CheckOptions(tp=tp, vllm_version="vllm-0.32"))
    return [f for f in report.findings if f.rule_id == rule_id]


def test_minicpm3_latent_projections_are_planned_as_the_mla_fuser_builds_them_at_tp2():
    plan = _plan(_facts(_minicpm3()))
    fused = _entry(plan, f"{ATTN}.fused_qkv_a_proj")
    assert fused.target == "MergedColumnParallelLinear"
    assert fused.sources == [f"{ATTN}.q_a_proj", f"{ATTN}.kv_a_proj_with_mqa"]
    # disable_tp: q_lora 32 + latent 16 + rope 8, whole on every rank
    assert _shapes(fused) == {"weight": ([56, 64], [56, 64])}
    assert fused.extra["output_sizes"] == [32, 24]
    # 4 heads of (nope 8 + rope 8) / (nope 8 + v 8), split over 2 ranks
    assert _entry(plan, f"{ATTN}.q_b_proj").target == "ColumnParallelLinear"
    assert _shapes(_entry(plan, f"{ATTN}.q_b_proj"))["weight"] == ([64, 32], [32, 32])
    kv_b = _entry(plan, f"{ATTN}.kv_b_proj")
    assert (kv_b.target, _shapes(kv_b)["weight"]) == ("ColumnParallelLinear", ([64, 16], [32, 16]))
    alias = _entry(plan, f"{ATTN}.attn.kv_b_proj")
    assert alias.extra["alias_of"] == kv_b.qualname and _shapes(alias) == _shapes(kv_b)
    o = _entry(plan, f"{ATTN}.o_proj")
    assert (o.target, _shapes(o)["weight"]) == ("RowParallelLinear", ([64, 32], [64, 16]))
    assert not [e for e in plan.entries if "merged_proj_" in e.qualname]
    assert plan.entry_for(f"{ATTN}.kv_a_proj_with_mqa") is fused
    # MLAAttention: heads split, one latent KV head of kv_lora + rope
    assert {
        (a.mla, a.heads_per_rank, a.kv_heads_per_rank, a.head_size) for a in plan.attention
    } == {(True, 2, 1, 24)}
    # The plan is what vLLM builds, but vLLM's forward then raises: minicpm3 is not in vLLM's
    # is_deepseek_mla list, so its MLA metadata refuses head size 64 (reports/parity.md)
    assert [f.severity.value for f in _findings(_facts(_minicpm3()), "TFB405")] == ["error"]


def test_deepseek_v3_without_query_lora_replicates_the_latent_down_projection():
    plan = _plan(_facts(deepseek_v3(q_lora_rank=None)))
    kv_a = _entry(plan, f"{ATTN}.kv_a_proj_with_mqa")
    assert (kv_a.target, _shapes(kv_a)["weight"]) == ("ReplicatedLinear", ([24, 64], [24, 64]))
    q = _entry(plan, f"{ATTN}.q_proj")
    assert (q.target, _shapes(q)["weight"]) == ("ColumnParallelLinear", ([64, 64], [32, 64]))
    assert not [e for e in plan.entries if e.qualname.endswith("fused_qkv_a_proj")]
    assert all(a.mla and a.head_size == 24 for a in plan.attention)


def test_deepseek_v3_at_tp1_keeps_every_latent_projection_whole():
    plan = _plan(_facts(deepseek_v3()), tp=1)
    assert _shapes(_entry(plan, f"{ATTN}.q_b_proj"))["weight"] == ([64, 32], [64, 32])
    assert {(a.heads_per_rank, a.kv_heads_per_rank, a.kv_replicated) for a in plan.attention} == {
        (4, 1, False)
    }


def test_mla_fact_names_each_role_and_other_attention_is_not_mla():
    from tests._rules_support import llama

    facts = _facts(_minicpm3())
    attn = next(m for m in facts.modules if m.qualname == ATTN)
    assert attn.attrs["mla"] == {
        "fuser": "mla",
        "q_proj": None,
        "q_a_proj": "q_a_proj",
        "q_a_layernorm": "q_a_layernorm",
        "q_b_proj": "q_b_proj",
        "kv_a_proj": "kv_a_proj_with_mqa",
        "kv_a_layernorm": "kv_a_layernorm",
        "kv_b_proj": "kv_b_proj",
        "o_proj": "o_proj",
    }
    assert not [m for m in _facts(llama()).modules if "mla" in m.attrs]


def _refusing_attention(config):
    """DeepSeek-V3 attention whose KV expansion takes a third input: vLLM's rewrite finds no
    `self.<m>(kv, k_rot)` expansion and skips MLA for the class."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    class ScaledExpansionAttention(DeepseekV3Attention):
        def expand_kv(self, kv_nope, k_rot, scale=1.0):
            key, value = super().expand_kv(kv_nope, k_rot)
            return key * scale, value

    with torch.device("meta"):
        return ScaledExpansionAttention(config, layer_idx=0)


def test_a_forward_the_rewrite_refuses_is_matched_but_not_fused():
    fact = mla_fact(_refusing_attention(deepseek_v3()))
    assert fact["fuser"] is None
    assert "KV expansion" in fact["reason"]
    assert fact["matched"]["kv_b_proj"] == "kv_b_proj"


def _with_mla_fact(facts, fact, layers):
    modules = [
        dataclasses.replace(m, attrs={**m.attrs, "mla": fact})
        if m.attrs.get("mla") and m.qualname.removeprefix("model.layers.").split(".")[0] in layers
        else m
        for m in facts.modules
    ]
    return dataclasses.replace(facts, modules=modules)


def test_no_layer_fused_as_mla_falls_back_to_full_attention_and_warns():
    refusal = mla_fact(_refusing_attention(deepseek_v3()))
    facts = _with_mla_fact(_facts(deepseek_v3()), refusal, {"0", "1"})
    plan = _plan(facts)
    assert not [e for e in plan.entries if e.extra.get("fuser") == "mla"]
    # vLLM recomputes the head size for full attention: qk_nope 8 + qk_rope 8
    assert {(a.mla, a.head_size) for a in plan.attention} == {(False, 16)}
    assert any("not fused as MLA" in n for n in plan.notes)
    assert [f.severity.value for f in _findings(facts, "TFB405")] == ["warning"]


def test_some_layers_fused_as_mla_and_others_not_is_an_error():
    refusal = mla_fact(_refusing_attention(deepseek_v3()))
    facts = _with_mla_fact(_facts(deepseek_v3()), refusal, {"1"})
    plan = _plan(facts)
    assert [a.mla for a in plan.attention] == [True, False]
    (finding,) = _findings(facts, "TFB405")
    assert finding.severity.value == "error"
    assert finding.data["layers"] == [1]


def test_without_kv_lora_rank_mla_does_not_validate_and_the_projections_stay_apart():
    # The next fuser in vLLM's order, MergedColumn, matches the two down projections, but its
    # forward rewrite refuses MiniCPM3's (vLLM's get_fusers gives the same answer), so each
    # linear is replaced on its own from the tp_plan.
    facts = _facts(_minicpm3())
    facts = dataclasses.replace(facts, config=dataclasses.replace(facts.config, kv_lora_rank=None))
    plan = _plan(facts)
    assert not any(a.mla for a in plan.attention)
    assert not any(e.qualname.startswith(f"{ATTN}.merged_proj") for e in plan.entries)
    assert _entry(plan, f"{ATTN}.q_b_proj").target == "ColumnParallelLinear"
    assert any(
        n.startswith(f"{ATTN} (") and "merged_column matched but vLLM cannot rewrite" in n
        for n in plan.notes
    )


def test_applied_mla_plan_keeps_one_kv_group_per_query_head():
    from transformers import AutoModelForCausalLM

    from tfbackend.replace.apply import apply
    from tfbackend.replace.layers import ColumnParallelLinear, ParallelContext

    config = _minicpm3()
    plan = _plan(_facts(config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    apply(plan, model, ParallelContext(rank=1, world=2))
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_b_proj, ColumnParallelLinear)
    # the HF module still expands the latent into K/V per (local) query head
    assert attn.num_key_value_groups == 1


@_vllm
@pytest.mark.vllm
def test_mla_fact_agrees_with_vllms_own_matcher_and_rewrite():
    from transformers import AutoModel
    from vllm.model_executor.models.transformers.fusers.mla import MLAFuser
    from vllm.model_executor.models.transformers.fx_utils import trace

    def vllm_roles(module):
        fuser = MLAFuser.match(trace(module), module)
        try:
            fuser.update_forward(module)
        except Exception:  # noqa: BLE001 - vLLM then skips MLA for the class
            return None
        return {
            "fuser": "mla",
            "q_proj": fuser.q_proj_name,
            "q_a_proj": fuser.q_a_proj_name,
            "q_a_layernorm": fuser.q_a_layernorm_name,
            "q_b_proj": fuser.q_b_proj_name,
            "kv_a_proj": fuser.kv_a_proj_name,
            "kv_a_layernorm": fuser.kv_a_layernorm_name,
            "kv_b_proj": fuser.kv_b_proj_name,
            "o_proj": fuser.o_proj_name,
        }

    for config in (_minicpm3(), deepseek_v3(), deepseek_v3(q_lora_rank=None)):
        with torch.device("meta"):
            attn = AutoModel.from_config(config).layers[0].self_attn
        assert mla_fact(attn) == vllm_roles(attn)
    refusing = _refusing_attention(deepseek_v3())
    assert vllm_roles(refusing) is None and mla_fact(refusing)["fuser"] is None


@_vllm
@pytest.mark.vllm
def test_tiny_minicpm3_plan_agrees_with_vllms_own_build_at_tp2(tmp_path):
    from tfbackend.vllm_bridge.diff import compare
    from tfbackend.vllm_bridge.run import build_with_vllm

    config = _minicpm3()
    config.save_pretrained(tmp_path)
    facts = facts_from_config(
        config, SourceInfo("local", str(tmp_path), str(tmp_path / "config.json"))
    )
    (build,) = build_with_vllm([str(tmp_path)], tp=2, pp=1, timeout=480)
    assert build.error is None
    agreement = compare(facts, _plan(facts), build)
    assert agreement.vllm_error is None
    assert agreement.disagreements == []
    built = {m["qualname"]: m for m in build.ranks[1]["modules"]}
    assert built[f"{ATTN}.attn"]["class_name"] == "MLAAttention"
    assert agreement.compared > 30


@pytest.mark.parametrize("model_type,fails", [("minicpm3", True), ("deepseek_v3", False)])
def test_mla_of_a_model_type_vllm_does_not_read_as_mla_fails(model_type, fails, tmp_path):
    # vLLM 0.32's forward raised "Head dimension 64 is not supported by MLA" for MiniCPM3 and
    # AXK2 (reports/parity.md): their model_type is not in is_deepseek_mla.
    from tfbackend.check import CheckOptions, check
    from tfbackend.parity.tiny import make_tiny_model

    report = check(str(make_tiny_model(model_type, tmp_path / model_type)), CheckOptions(tp=1))
    errors = [f for f in report.findings if f.rule_id == "TFB405" and f.severity.value == "error"]
    assert bool(errors) is fails
    if fails:
        assert "is not supported by MLA" in errors[0].message
