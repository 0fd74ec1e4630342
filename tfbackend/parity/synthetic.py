"""Random-weight models for tests and benchmarks: fixed seed, an init that spreads logits.

Default initialisers (std 0.02) give near-uniform logits whose top tokens are near-ties, so tiny
reduction-order differences flip the argmax. Scaling each matrix by 1/sqrt(fan_in) keeps
activations O(1) through the layers; a larger lm_head spreads the logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def spread_init_(model: torch.nn.Module, seed: int = 0, logit_scale: float = 4.0) -> None:
    gen = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float) -> None:
        p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))

    # A tied lm_head is the embedding table: give it the lm_head's scale, or a std-1 table makes
    # logits so peaked (std ~ sqrt(hidden)) that KL and containment measure nothing.
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if "bias" in name:
                    p.zero_()
                else:  # norm weights: keep each variant's neutral value, plus noise
                    p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype))
            elif "embed" in name:
                normal(p, logit_scale / math.sqrt(p.shape[-1]) if tied else 1.0)
            elif name.startswith("lm_head"):
                normal(p, logit_scale / math.sqrt(p.shape[-1]))
            elif p.dim() == 2 and name.endswith("gate.weight"):  # MoE router: spread its choices
                normal(p, 3.0 / math.sqrt(p.shape[-1]))
            else:
                normal(p, 1.0 / math.sqrt(p.shape[-1]))


def make_random_model(config, folder: str | Path, *, seed: int = 0, dtype=torch.float32) -> Path:
    """Write `config` with spread random weights (safetensors) into `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spread_init_(model, seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder
