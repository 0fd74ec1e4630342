"""Tiny real transformers configs for tests: real config classes, real shapes, a few KB."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MixtralConfig,
    Qwen3MoeConfig,
)

from tfbackend.inspect import facts_from_config
from tfbackend.inspect.facts import SourceInfo


def llama(**kw) -> LlamaConfig:
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        architectures=["LlamaForCausalLM"],
    )
    return LlamaConfig(**{**base, **kw})


def gemma3_text(**kw) -> Gemma3TextConfig:
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        sliding_window=16,
        max_position_embeddings=256,
        architectures=["Gemma3ForCausalLM"],
    )
    return Gemma3TextConfig(**{**base, **kw})


def qwen3_moe(**kw) -> Qwen3MoeConfig:
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        vocab_size=512,
        architectures=["Qwen3MoeForCausalLM"],
    )
    return Qwen3MoeConfig(**{**base, **kw})


def mixtral(**kw) -> MixtralConfig:
    base = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=512,
        architectures=["MixtralForCausalLM"],
    )
    return MixtralConfig(**{**base, **kw})


def gpt2(**kw) -> GPT2Config:
    base = dict(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=512,
        n_positions=128,
        architectures=["GPT2LMHeadModel"],
    )
    return GPT2Config(**{**base, **kw})


def facts(config):
    return facts_from_config(config, SourceInfo(kind="local", location="memory", config_path=""))


def save(config, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    return folder
