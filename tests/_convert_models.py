"""Tiny random-weight models for the convert tests: head size 64 (vLLM's CPU attention has no
kernel for 16), a 300-token vocab (padded to 320: the last rank at tp 2 holds zero rows)."""

from __future__ import annotations

from pathlib import Path

SHAPE = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    head_dim=64,
    vocab_size=300,
    max_position_embeddings=256,
)


def config(kind: str):
    from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

    if kind == "llama":  # one kv head: replicated on both ranks at tp 2
        return LlamaConfig(
            **SHAPE,
            intermediate_size=256,
            num_key_value_heads=1,
            architectures=["LlamaForCausalLM"],
        )
    if kind == "qwen3moe-tied":
        return Qwen3MoeConfig(
            **SHAPE,
            num_key_value_heads=2,
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            tie_word_embeddings=True,
            architectures=["Qwen3MoeForCausalLM"],
        )
    if kind == "mixtral":
        return MixtralConfig(
            **SHAPE,
            intermediate_size=96,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            architectures=["MixtralForCausalLM"],
        )
    raise ValueError(kind)


def write(kind: str, folder: Path) -> Path:
    from tfbackend.parity.synthetic import make_random_model

    if not (folder / "config.json").is_file():
        make_random_model(config(kind), folder, seed=0)
    return folder
