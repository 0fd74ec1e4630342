"""Tiny real configs and a one-call `findings(...)` for the rule tests."""

from __future__ import annotations

import functools

from tfbackend.check import CheckOptions, check_facts
from tfbackend.inspect import SourceInfo, facts_from_config

SOURCE = SourceInfo("local", "tiny", "<memory>")


def llama(**kw):
    from transformers import LlamaConfig

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return LlamaConfig(**{**base, **kw})


def qwen3_moe(**kw):
    from transformers import Qwen3MoeConfig

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        vocab_size=256,
    )
    return Qwen3MoeConfig(**{**base, **kw})


def deepseek_v3(**kw):
    from transformers import DeepseekV3Config

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        vocab_size=256,
    )
    return DeepseekV3Config(**{**base, **kw})


def gemma(**kw):
    from transformers import GemmaConfig

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
    )
    return GemmaConfig(**{**base, **kw})


def gemma2(**kw):
    from transformers import Gemma2Config

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
    )
    return Gemma2Config(**{**base, **kw})


def gpt2(**kw):
    from transformers import GPT2Config

    return GPT2Config(**{**dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256), **kw})


def gpt_oss(**kw):
    from transformers import GptOssConfig

    base = dict(
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
    return GptOssConfig(**{**base, **kw})


def qwen3_next(**kw):
    from transformers import Qwen3NextConfig

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        vocab_size=256,
    )
    return Qwen3NextConfig(**{**base, **kw})


def gemma3(**kw):
    from transformers import Gemma3Config

    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
    )
    return Gemma3Config(text_config=text, **kw)


def facts(config):
    return facts_from_config(config, SOURCE)


@functools.cache
def cached(name: str):
    """Facts of an unmodified tiny config, built once per test session."""
    return facts(globals()[name]())


def findings(f, rule_id: str, *, tp: int = 1, pp: int = 1, vllm: str | None = None):
    report = check_facts(f, CheckOptions(tp=tp, pp=pp, vllm_version=vllm, select=[rule_id]))
    return [x for x in report.findings if x.rule_id == rule_id]


def severities(found) -> set[str]:
    return {x.severity.value for x in found}
