"""Attention instances as vLLM 0.32 builds them: per-layer geometry of heterogeneous configs, and
the dispatching module's own parameters (learned sinks split over tp)."""

from __future__ import annotations

from tests import _rules_support as base
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import PROFILES

V032 = PROFILES["vllm-0.32"]


def gemma4_text(**kw):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        **{
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "global_head_dim": 32,
            "vocab_size": 256,
            "vocab_size_per_layer_input": 256,
            "hidden_size_per_layer_input": 8,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "architectures": ["Gemma4ForCausalLM"],
            **kw,
        }
    )


def test_gpt_oss_sinks_are_split_over_tp_like_the_heads():
    facts = base.facts(base.gpt_oss())
    for tp in (1, 2):
        plan = build_plan(facts, tp=tp, profile=V032)
        for spec in plan.attention:
            assert spec.sinks
            [sinks] = spec.params
            assert (sinks.name, sinks.full_shape, sinks.shard_dim) == ("sinks", [4], 0)
            assert sinks.rank_shape == [4 // tp]


def test_sinks_stay_whole_before_the_fuser_era():
    # Only 0.32's AttentionFuser re-creates the sinks per rank.
    plan = build_plan(base.facts(base.gpt_oss()), tp=2, profile=PROFILES["vllm-0.11"])
    assert [p.rank_shape for p in plan.attention[0].params] == [[4]]


def test_attention_without_own_parameters_has_none_in_the_plan():
    plan = build_plan(base.facts(base.llama()), tp=2, profile=V032)
    assert all(spec.params == [] for spec in plan.attention)


def test_gemma4_full_attention_layers_get_their_own_head_size():
    # Gemma4TextConfig is heterogeneous: full-attention layers take global_head_dim through
    # per_layer_config, and a whole-model `config.head_dim` read raises. vLLM sizes each
    # Attention from model_arch_config[i]; hidden/heads (64/4 = 16, or 288 at the default
    # config) is nobody's head size.
    facts = base.facts(gemma4_text())
    assert [g["head_dim"] for g in facts.config.layer_geometry] == [16, 32, 16, 32]
    assert facts.config.head_dim == 32  # the whole-model value: the largest layer's
    plan = build_plan(facts, tp=2, profile=V032)
    got = [(a.head_size, a.heads_per_rank, a.kv_heads_per_rank) for a in plan.attention]
    assert got == [(16, 2, 1), (32, 2, 1), (16, 2, 1), (32, 2, 1)]
    assert [a.sliding_window for a in plan.attention] == [16, None, 16, None]


def test_gemma4_layer_kv_heads_follow_the_layer_config():
    # attention_k_eq_v gives full-attention layers num_global_key_value_heads of their own
    facts = base.facts(gemma4_text(attention_k_eq_v=True, num_global_key_value_heads=1))
    plan = build_plan(facts, tp=1, profile=V032)
    assert [a.num_kv_heads for a in plan.attention] == [2, 1, 2, 1]


def test_homogeneous_config_has_no_layer_geometry():
    facts = base.facts(base.llama())
    assert facts.config.layer_geometry is None
    assert facts.config.head_dim == 16
