"""What vLLM's backend needs of the model before it replaces anything.

vLLM builds `AutoModel.from_config(config)` (nothing else: no causal-LM fallback), then decorates
the class of `model.get_decoder()` for torch.compile, which needs the arguments it marks dynamic
to be named in that class's forward (vllm/compilation/decorators.py).
"""

from __future__ import annotations

import inspect
from typing import Any


def decoder_signature(model: Any) -> tuple[str | None, list[str] | None, bool]:
    """(decoder class name, its forward's named arguments, whether it takes **kwargs)."""
    try:
        decoder = model.get_decoder()
    except Exception:  # noqa: BLE001 - models without a decoder accessor
        decoder = model
    cls = type(decoder)
    try:
        params = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return cls.__name__, None, False
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    var_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    return cls.__name__, [n for n in named if n != "self"], var_kwargs


def architecture_compatible(architecture: str | None) -> bool | None:
    """vLLM's registry gate on the architecture class (registry.py, `model_impl="transformers"`):
    it must declare `_supports_attention_backend` or pass transformers' own source heuristic
    `_can_set_attn_implementation()`; else "The Transformers implementation of ... is not
    compatible with vLLM". None: not a transformers class (custom code), not judged here."""
    import transformers

    cls = getattr(transformers, architecture or "", None)
    if not isinstance(cls, type) or not hasattr(cls, "is_backend_compatible"):
        return None
    try:
        return bool(cls.is_backend_compatible() or cls._can_set_attn_implementation())
    except Exception:  # noqa: BLE001 - a heuristic that cannot read the source: not judged
        return None
