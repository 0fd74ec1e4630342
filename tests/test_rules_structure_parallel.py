"""Structure (TFB1xx), tensor-parallel (TFB2xx) and pipeline (TFB3xx) rules on tiny real configs."""

from __future__ import annotations

import dataclasses

from _rules_support import cached, facts, findings, gpt2, llama, severities


def test_unknown_architecture_is_an_error():
    assert severities(findings(facts(llama(architectures=["MyLlamaForCausalLM"])), "TFB103")) == {
        "error"
    }
    assert not findings(facts(llama(architectures=["LlamaForCausalLM"])), "TFB103")


def test_layer_count_without_matching_module_list_warns():
    f = cached("llama")
    assert not findings(f, "TFB104")
    odd = dataclasses.replace(f, config=dataclasses.replace(f.config, num_hidden_layers=5))
    assert severities(findings(odd, "TFB104")) == {"warning"}


def test_encoder_decoder_has_several_layer_lists_and_is_served_encoder_only():
    from transformers import BartConfig

    bart = facts(
        BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, vocab_size=128,
                   encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_ffn_dim=64, decoder_ffn_dim=64)
    )  # fmt: skip
    assert findings(bart, "TFB105")
    assert severities(findings(bart, "TFB107")) == {"error"}
    assert not findings(cached("llama"), "TFB105")
    assert not findings(cached("llama"), "TFB107")


def test_text_config_without_sizes_is_an_error():
    f = cached("llama")
    assert not findings(f, "TFB106")
    bare = dataclasses.replace(f, config=dataclasses.replace(f.config, num_attention_heads=None))
    assert "num_attention_heads" in findings(bare, "TFB106")[0].message


def test_vision_tower_is_reported_for_multimodal_configs():
    assert "vision_config" in findings(cached("gemma3"), "TFB108")[0].message
    assert not findings(cached("llama"), "TFB108")


def test_unknown_tp_style_is_replicated_with_its_cost():
    config = llama()
    config.base_model_tp_plan = {
        **config.base_model_tp_plan,
        "layers.*.mlp.up_proj": "packed_colwise",
    }
    f = facts(config)
    # Per-linear replacement (vLLM before the fusers) reads the style and replicates.
    found = findings(f, "TFB202", tp=2, vllm="0.11")
    assert found and found[0].data["count"] == 2 and found[0].data["extra_bytes_per_rank"] > 0
    assert not findings(cached("llama"), "TFB202", tp=2, vllm="0.11")
    # vLLM 0.32 fuses gate/up before consulting the tp_plan: the odd style is never read.
    assert not findings(f, "TFB202", tp=2, vllm="0.32")


def test_tp_plan_key_that_matches_nothing_is_listed():
    config = llama()
    config.base_model_tp_plan = {**config.base_model_tp_plan, "layers.*.mlp.w9": "colwise"}
    assert findings(facts(config), "TFB208", tp=2)[0].data["keys"] == ["layers.*.mlp.w9"]
    assert not findings(cached("llama"), "TFB208", tp=2)


def test_linears_outside_the_plan_are_listed_with_their_size():
    config = llama()
    config.base_model_tp_plan = {
        k: v for k, v in config.base_model_tp_plan.items() if "mlp" not in k
    }
    f = facts(config)
    found = findings(f, "TFB209", tp=2, vllm="0.11")
    assert found and found[0].data["params"] == 2 * 3 * 64 * 128
    assert not findings(cached("llama"), "TFB209", tp=2, vllm="0.11")
    # vLLM 0.32's GLU fuser claims the MLP whatever the plan says.
    assert not findings(f, "TFB209", tp=2, vllm="0.32")


def test_prefix_key_shadowing_a_later_exact_key_is_an_error():
    config = llama()
    plan = dict(config.base_model_tp_plan)
    config.base_model_tp_plan = {"layers.*.mlp.gate": "rowwise", **plan}
    found = findings(facts(config), "TFB210", tp=2, vllm="0.11")
    assert severities(found) == {"error"}
    assert found[0].data["intended"] == "layers.*.mlp.gate_proj"
    assert not findings(cached("llama"), "TFB210", tp=2, vllm="0.11")


def test_expert_intermediate_must_divide_by_tp():
    from _rules_support import qwen3_moe

    assert findings(facts(qwen3_moe(moe_intermediate_size=30)), "TFB211", tp=4)
    assert not findings(cached("qwen3_moe"), "TFB211", tp=4)


def test_gpt2_conv1d_attention_cannot_be_split():
    f = facts(gpt2())
    assert severities(findings(f, "TFB212", tp=2)) == {"error"}
    assert not findings(f, "TFB212", tp=1)
    assert not findings(cached("llama"), "TFB212", tp=2)


def test_heads_kv_and_vocab_divisibility():
    f = cached("llama")
    assert findings(f, "TFB203", tp=8) and not findings(f, "TFB203", tp=4)
    assert findings(facts(llama(num_attention_heads=8, num_key_value_heads=6)), "TFB204", tp=4)
    assert not findings(f, "TFB204", tp=2)
    assert findings(f, "TFB205", tp=4) and not findings(f, "TFB205", tp=2)
    assert findings(facts(llama(intermediate_size=100)), "TFB206", tp=8)
    assert not findings(f, "TFB206", tp=2)
    assert findings(f, "TFB207", tp=3) and not findings(f, "TFB207", tp=2)


def test_missing_tp_plan_is_an_error_before_032_and_a_warning_after():
    f = facts(gpt2())
    assert severities(findings(f, "TFB201", tp=2)) == {"warning"}
    assert severities(findings(f, "TFB201", tp=2, vllm="0.11")) == {"error"}
    assert not findings(cached("llama"), "TFB201", tp=2)


def test_pipeline_rules():
    f = facts(llama(num_hidden_layers=3))
    assert findings(f, "TFB305", pp=2)[0].data["layers_per_stage"] == [2, 1]
    assert not findings(cached("llama"), "TFB305", pp=2)
    assert findings(cached("llama"), "TFB303", pp=4)
    assert not findings(cached("llama"), "TFB303", pp=2)
    assert findings(cached("llama"), "TFB304", pp=2, vllm="0.6")
    assert not findings(cached("llama"), "TFB304", pp=2)
    assert findings(facts(gpt2()), "TFB301", pp=2)
    assert not findings(cached("llama"), "TFB301", pp=2)


def test_tied_embeddings_are_held_by_both_ends_of_the_pipeline():
    assert findings(cached("gemma"), "TFB306", pp=2)
    assert not findings(cached("llama"), "TFB306", pp=2)
