"""Tiny random-weight models written once per session (fixed seed, spread logits)."""

from __future__ import annotations

import json
from pathlib import Path

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)  # fmt: skip


def tiny_config(kind: str):
    from transformers import Gemma3TextConfig, GptOssConfig, LlamaConfig, Qwen3MoeConfig

    if kind == "llama":
        return LlamaConfig(**TINY)
    if kind == "gemma3":
        return Gemma3TextConfig(
            **{**TINY, "num_key_value_heads": 1}, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    if kind == "qwen3moe":
        return Qwen3MoeConfig(
            **TINY, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True,
        )  # fmt: skip
    if kind == "gptoss":  # learned sinks (eager attention), sliding layers, 3-D experts with biases
        return GptOssConfig(
            **{**TINY, "intermediate_size": 32}, head_dim=16, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    raise ValueError(kind)


def write_model(kind: str, folder: Path) -> Path:
    from tfbackend.parity.synthetic import make_random_model

    if not (folder / "config.json").is_file():
        make_random_model(tiny_config(kind), folder, seed=0)
    return folder


def write_wrong_plan_model(folder: Path) -> Path:
    """Tiny Llama whose config's base_model_tp_plan marks o_proj colwise (a wrong plan)."""
    write_model("llama", folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    from transformers import LlamaConfig

    plan = dict(LlamaConfig.base_model_tp_plan)
    plan["layers.*.self_attn.o_proj"] = "colwise"
    cfg["base_model_tp_plan"] = plan
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder
