"""Attention (TFB4xx), norm (TFB50x) and MoE (TFB51x) rules on tiny real configs."""

from __future__ import annotations

import dataclasses

from _rules_support import cached, facts, findings, qwen3_moe, severities


def test_attention_not_through_the_interface_is_an_error():
    assert severities(findings(cached("qwen3_next"), "TFB401")) == {"error"}
    assert not findings(cached("llama"), "TFB401")


def test_sliding_window_layers_are_counted():
    assert findings(cached("gemma2"), "TFB402")[0].data["layers"] == [0]
    assert not findings(cached("llama"), "TFB402")


def test_soft_capping_is_reported():
    assert "capped" in findings(cached("gemma2"), "TFB403")[0].message
    assert not findings(cached("llama"), "TFB403")


def test_attention_sinks_are_reported():
    assert findings(cached("gpt_oss"), "TFB404")
    assert not findings(cached("llama"), "TFB404")


def test_mla_is_reported_and_warned_on_old_profiles():
    assert severities(findings(cached("deepseek_v3"), "TFB405")) == {"info"}
    assert severities(findings(cached("deepseek_v3"), "TFB405", vllm="0.11")) == {"warning"}
    assert not findings(cached("llama"), "TFB405")


def test_offset_norms_become_gemma_norms_and_name_based_detection_is_wrong():
    assert severities(findings(cached("gemma"), "TFB501")) == {"info"}
    assert severities(findings(cached("gemma"), "TFB501", vllm="0.6")) == {"error"}
    assert not findings(cached("llama"), "TFB501")


def test_gated_norms_stay_transformers_code():
    assert findings(cached("qwen3_next"), "TFB502")
    assert not findings(cached("llama"), "TFB502")


def _with_norm_attrs(f, **attrs):
    modules = [
        dataclasses.replace(m, attrs={**m.attrs, **attrs}) if m.kind == "norm" else m
        for m in f.modules
    ]
    return dataclasses.replace(f, modules=modules)


def test_norm_bias_is_lost_on_name_based_profiles():
    biased = _with_norm_attrs(cached("llama"), bias=True)
    assert severities(findings(biased, "TFB503", vllm="0.11")) == {"error"}
    assert severities(findings(biased, "TFB503")) == {"info"}
    assert not findings(cached("llama"), "TFB503", vllm="0.11")


def test_eps_under_an_unread_attribute_warns_on_seed_profiles():
    odd = _with_norm_attrs(cached("llama"), eps_attr="epsilon", eps=1e-5)
    assert severities(findings(odd, "TFB504", vllm="0.11")) == {"warning"}
    assert not findings(odd, "TFB504")  # 0.32 reads eps from the forward
    assert not findings(cached("llama"), "TFB504", vllm="0.11")


def test_experts_layout_fused_or_refused():
    assert severities(findings(cached("qwen3_moe"), "TFB510")) == {"info"}
    assert severities(findings(cached("qwen3_moe"), "TFB510", vllm="0.11")) == {"error"}
    assert not findings(cached("llama"), "TFB510")


def test_top_k_under_a_name_vllm_does_not_read_is_an_error():
    from transformers import AriaTextConfig

    aria = AriaTextConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_num_experts=4,
        moe_topk=2,
        vocab_size=256,
    )
    found = findings(facts(aria), "TFB511")
    assert severities(found) == {"error"} and "moe_topk" in found[0].message
    assert not findings(cached("qwen3_moe"), "TFB511")


def test_shared_experts_are_counted():
    assert "n_shared_experts=1" in findings(cached("deepseek_v3"), "TFB512")[0].message
    assert not findings(cached("qwen3_moe"), "TFB512")


def test_expert_biases_are_reported():
    config = qwen3_moe()
    f = facts(config)
    biased = dataclasses.replace(
        f,
        modules=[
            dataclasses.replace(m, attrs={**m.attrs, "has_bias": True})
            if m.kind == "experts"
            else m
            for m in f.modules
        ],
    )
    assert findings(biased, "TFB513")
    assert not findings(cached("qwen3_moe"), "TFB513")


def test_non_silu_experts_compute_the_wrong_activation():
    assert severities(findings(facts(qwen3_moe(hidden_act="gelu")), "TFB514")) == {"error"}
    assert not findings(cached("qwen3_moe"), "TFB514")


def test_grouped_top_k():
    assert "best 1 of 2" in findings(cached("deepseek_v3"), "TFB515")[0].message
    assert not findings(cached("qwen3_moe"), "TFB515")


def test_expert_parallel_is_explained_not_planned():
    assert findings(cached("qwen3_moe"), "TFB516", tp=2)
    assert "refuses" in findings(cached("qwen3_moe"), "TFB516", tp=2, vllm="0.11")[0].message
    assert not findings(cached("qwen3_moe"), "TFB516", tp=1)


def test_moe_block_tensor_the_fused_forward_never_reads_is_an_error():
    # MiniMax-M2 keeps e_score_correction_bias on the block and passes it to the router: vLLM
    # routes inside its MoERunner (the router alone matches) and never reads it
    from transformers import MiniMaxM2Config

    minimax_m2 = MiniMaxM2Config(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=256,
    )
    found = findings(facts(minimax_m2), "TFB517")
    assert severities(found) == {"error"} and "e_score_correction_bias" in found[0].message
    assert not findings(cached("deepseek_v3"), "TFB517")  # its bias lives in the router
