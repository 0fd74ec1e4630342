"""Names vLLM's fusers give and tables they read, without torch: which transformers activations
have an `...AndMul` kernel (GLUFuser), and what a merged projection is called
(MergedColumnParallelFuser)."""

from __future__ import annotations

from typing import Any

# transformers activation names with a vLLM `...AndMul` kernel
# (vllm/model_executor/layers/activation.py: _ACTIVATION_AND_MUL_REGISTRY)
ACT_AND_MUL = {
    "gelu": "GeluAndMul",
    "gelu_pytorch_tanh": "GeluAndMul",
    "silu": "SiluAndMul",
    "swish": "SiluAndMul",
    "geglu": "GeluAndMul",
    "swigluoai": "SwigluOAIAndMul",
}


def act_and_mul_name(act: Any) -> str | None:
    """The `...AndMul` name for a transformers activation module (vLLM's GLUFuser rule)."""
    import torch.nn as nn
    from transformers.activations import ACT2CLS

    for name, cls in ACT2CLS.items():
        cls = cls[0] if isinstance(cls, tuple) else cls
        if type(act) is cls and name in ACT_AND_MUL:
            return name
    if type(act) is nn.GELU:
        return "gelu_pytorch_tanh" if act.approximate == "tanh" else "gelu"
    return None


def merged_name(names: list[str]) -> str:
    """vLLM's name for the merged projection (lengths disambiguate `a_b` + `c` from `a` + `b_c`)."""
    return "merged_proj_" + "_".join(f"{len(n)}_{n}" for n in names)
