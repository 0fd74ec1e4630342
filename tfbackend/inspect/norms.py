"""Tell norm variants apart by running them, never by their class name.

Gemma computes x̂·(1+w), Llama x̂·w; Gemma3n's norm is named like Gemma's but is plain, and
Qwen3-Next's is offset. With the weight set to zero, a plain norm outputs zeros and an offset
norm outputs x̂ itself: one forward on a CPU copy settles it.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from tfbackend.inspect.facts import (
    NORM_GATED,
    NORM_NO_WEIGHT,
    NORM_OFFSET,
    NORM_PLAIN,
    NORM_UNKNOWN,
)

_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "norm_eps")
EPS_ATTRS = _EPS_ATTRS


def norm_eps(module: Any) -> float | None:
    for name in _EPS_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _required_positional_args(module: Any) -> int:
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return 1
    params = [
        p
        for p in list(sig.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(params)


def zero_initialised(module: Any) -> bool | None:
    """Whether the class initialises its weight to zeros (the heuristic older vLLM used)."""
    import torch

    try:
        with torch.device("cpu"):
            fresh = type(module)(1)
    except Exception:  # noqa: BLE001 - constructors take arbitrary arguments
        return None
    weight = getattr(fresh, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return bool(torch.all(weight == 0))


def classify_norm(module: Any) -> tuple[str, bool]:
    """Return (variant, is_rms): the norm's variant and whether it normalises by RMS alone."""
    import torch

    if _required_positional_args(module) >= 2:
        return NORM_GATED, True
    weight = getattr(module, "weight", None)
    size = int(weight.shape[-1]) if isinstance(weight, torch.Tensor) and weight.ndim else 8
    try:
        probe = copy.deepcopy(module).to_empty(device="cpu").float()
        with torch.no_grad():
            for _, param in probe.named_parameters():
                param.zero_()
            x = torch.randn(3, size, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
            eps = norm_eps(module) or 1e-6
            x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            out = probe(x)
            if isinstance(out, tuple):
                out = out[0]
            out = out.float()
    except Exception:  # noqa: BLE001 - a forward we cannot exercise on CPU is "unknown"
        return NORM_UNKNOWN, False
    if out.shape != x.shape:
        return NORM_UNKNOWN, False
    has_weight = isinstance(weight, torch.Tensor)
    if torch.allclose(out, x_hat, atol=1e-3, rtol=1e-3):
        return (NORM_OFFSET if has_weight else NORM_NO_WEIGHT), True
    if has_weight and torch.allclose(out, torch.zeros_like(out), atol=1e-6):
        return NORM_PLAIN, _rms_with_unit_weight(probe, x, x_hat)
    return NORM_UNKNOWN, False


def _rms_with_unit_weight(probe: Any, x: Any, x_hat: Any) -> bool:
    import torch

    with torch.no_grad():
        for name, param in probe.named_parameters():
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        out = probe(x)
        if isinstance(out, tuple):
            out = out[0]
    return bool(torch.allclose(out.float(), x_hat, atol=1e-3, rtol=1e-3))
