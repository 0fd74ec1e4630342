"""First module, in execution order, whose output diverges from the reference.

Both models get forward hooks on the same input; outputs are keyed by module name (`apply`
keeps names). A column-parallel output is this rank's slice of the reference output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tfbackend.replace.layers import PLACEHOLDERS, ColumnParallelLinear

TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}


@dataclass
class Divergence:
    module: str
    rel_error: float | None  # max |Δ| / max |ref|; None when the module raised
    error: str | None = None  # what it raised
    plan_entry: dict | None = None
    checked: int = 0  # modules compared before it


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return getattr(out, "last_hidden_state", None)


class Recorder:
    """Forward hooks recording each module's output (in completion order) and the stack of
    modules currently running (to name the one that raised)."""

    def __init__(self, model: nn.Module, record: bool = True):
        self.outputs: list[tuple[str, torch.Tensor, tuple[int, int] | None]] = []
        self.stack: list[str] = []
        self.record = record
        self._handles = []
        for name, module in model.named_modules():
            if not name or isinstance(module, PLACEHOLDERS):
                continue
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave(name, module)))

    def _enter(self, name):
        def hook(module, args):
            self.stack.append(name)

        return hook

    def _leave(self, name, module):
        def hook(mod, args, out):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            t = first_tensor(out)
            if self.record and t is not None:
                slice_ = None
                if isinstance(module, ColumnParallelLinear) and not module.gather_output:
                    shard = module.shards["weight"]
                    slice_ = (shard.start, shard.size)
                self.outputs.append((name, t.detach().float().cpu(), slice_))

        return hook

    @property
    def raising_module(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def first_divergence(
    reference: dict[str, torch.Tensor],
    wrapped: list[tuple[str, torch.Tensor, tuple[int, int] | None]],
    dtype: str,
    *,
    raised_in: str | None = None,
    error: str | None = None,
) -> Divergence | None:
    tol = TOLERANCE.get(dtype, 5e-2)
    checked = 0
    for name, out, slice_ in wrapped:
        ref = reference.get(name)
        if ref is None:
            continue
        if slice_ is not None:
            ref = ref[..., slice_[0] : slice_[0] + slice_[1]]
        if ref.shape != out.shape:
            return Divergence(
                name,
                None,
                f"output shape {tuple(out.shape)} vs reference {tuple(ref.shape)}",
                checked=checked,
            )
        rel = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        if rel > tol:
            return Divergence(name, rel, checked=checked)
        checked += 1
    if raised_in:
        return Divergence(raised_in, None, error, checked=checked)
    return None
