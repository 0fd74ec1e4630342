"""Regenerate the tiny models shipped in examples/models (fixed seed: the bytes are reproducible).

Random weights with a wide init so logits are spread out (no near-ties for parity runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

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
        dtype="float32",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "tiny-llama"
    tiny_llama(target)
    print(f"wrote {target}")
