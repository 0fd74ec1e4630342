"""Which transformers activations have a vLLM `...AndMul` kernel (the GLU fuser's question)."""

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
