"""Regenerate the tiny models shipped in examples/models (fixed seed: the bytes are reproducible).

Random weights with an init that spreads logits (no near-ties for parity runs), saved in bfloat16
as most hub checkpoints are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

from tfbackend.parity.synthetic import make_random_model

HERE = Path(__file__).parent / "models"


def tiny_llama(out: Path) -> None:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    make_random_model(config, out, seed=0, dtype=torch.bfloat16)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "tiny-llama"
    tiny_llama(target)
    print(f"wrote {target}")
