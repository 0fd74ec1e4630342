"""Does an nn.Linear subclass's own forward compute what vLLM's linear classes compute?

vLLM 0.32 swaps every `nn.Linear` instance, subclasses included, for one of its own linear
classes (transformers/base.py: `isinstance(child_module, nn.Linear)` → `replace_linear_class`),
which computes `x @ W.T + b` and returns that one tensor. A subclass whose forward does more
(a router returning `(logits, weights, experts)`) silently loses it. We run the subclass's
forward: on the meta device for what it returns, then, when the weight is small enough to
build on the CPU, on random numbers against `F.linear`.
"""

from __future__ import annotations

import copy
from typing import Any

# Largest weight (elements) built on the CPU to compare values: 2**22 floats is 16 MiB.
VALUE_CHECK_LIMIT = 1 << 22
ROWS = 3
UNRUN = "not run"  # the forward raised on both probe shapes: what it returns is not known


def linear_forward_fact(module: Any) -> dict[str, Any] | None:
    """None when the class keeps nn.Linear's forward; otherwise what its own forward returns:
    `returns` ("tensor", "tuple of N", UNRUN when it raised on meta), and `same_values`
    (True/False, or None when not decided: too large, or it failed on the CPU)."""
    import torch.nn as nn

    cls = type(module)
    if cls.forward is nn.Linear.forward:
        return None
    fact: dict[str, Any] = {"class": cls.__name__, "returns": _returns(module), "same_values": None}
    if fact["returns"] == "tensor" and module.weight.numel() <= VALUE_CHECK_LIMIT:
        fact["same_values"] = _same_values(module)
    return fact


def _returns(module: Any) -> str:
    import torch

    probe = copy.deepcopy(module).to("meta").eval()
    out, shape = None, ()
    # [rows, in] as a router gets it, else [1, rows, in] as a decoder layer's projection does
    for shape in ((ROWS,), (1, ROWS)):
        x = torch.empty(*shape, module.in_features, device="meta", dtype=module.weight.dtype)
        try:
            with torch.no_grad():
                out = probe(x)
            break
        except Exception as exc:  # noqa: BLE001 - what it raised is the answer
            out = exc
    if isinstance(out, Exception):
        return UNRUN
    if isinstance(out, torch.Tensor):
        return (
            "tensor"
            if tuple(out.shape) == (*shape, module.out_features)
            else (f"tensor of shape {list(out.shape)}")
        )
    if isinstance(out, (tuple, list)):
        return f"tuple of {len(out)}"
    return type(out).__name__


def _same_values(module: Any) -> bool | None:
    import torch
    import torch.nn.functional as F  # noqa: N812

    probe = copy.deepcopy(module).to_empty(device="cpu").float().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(ROWS, module.in_features, generator=gen)
        try:
            got = probe(x)
        except Exception:  # noqa: BLE001 - not decidable on the CPU
            return None
        want = F.linear(x, probe.weight, probe.bias)
    return isinstance(got, torch.Tensor) and torch.allclose(got, want, rtol=1e-4, atol=1e-4)
