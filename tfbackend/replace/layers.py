"""Torch-native parallel layers, in the spirit of gpt-fast's tp.py.

Each layer holds only this rank's shard and records, in `shards`, which slice of the full
checkpoint tensor each of its parameters is: `weights.py` reads exactly that slice. Collectives
go through a `ParallelContext` passed in explicitly (no globals).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in its tensor-parallel group."""

    rank: int = 0
    world: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None with world 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension."""
        if self.world == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def split(self, size: int) -> tuple[int, int]:
        """(start, length) of this rank's equal share of `size` (which must divide)."""
        if size % self.world:
            raise ValueError(f"{size} does not split evenly over {self.world} ranks")
        per = size // self.world
        return self.rank * per, per


@dataclass(frozen=True)
class Shard:
    """Rows [start, start + size) of dimension `dim` of the checkpoint tensor (past its end: zeros)."""

    dim: int
    start: int
    size: int


def _empty(*shape: int, dtype=None, device=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _empty(out_features, in_features, dtype=dtype, device=device)
        self.bias = _empty(out_features, dtype=dtype, device=device) if bias else None
        self.shards: dict[str, Shard] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split: this rank computes rows [start, start + size) of the full output."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        ctx: ParallelContext,
        *,
        start: int,
        size: int,
        gather_output: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.ctx, self.gather_output = ctx, gather_output
        self.in_features, self.out_features = in_features, out_features
        self.weight = _empty(size, in_features, dtype=dtype, device=device)
        self.bias = _empty(size, dtype=dtype, device=device) if bias else None
        self.shards = {"weight": Shard(0, start, size), "bias": Shard(0, start, size)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return self.ctx.all_gather_last(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Input features split; partial products summed over the group (bias added once, after)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        ctx: ParallelContext,
        *,
        input_is_parallel: bool = True,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.ctx, self.input_is_parallel = ctx, input_is_parallel
        self.in_features, self.out_features = in_features, out_features
        self.start, size = ctx.split(in_features)
        self.weight = _empty(out_features, size, dtype=dtype, device=device)
        self.bias = _empty(out_features, dtype=dtype, device=device) if bias else None
        self.shards = {"weight": Shard(1, self.start, size)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = x[..., self.start : self.start + self.weight.shape[1]]
        y = self.ctx.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Vocab padded to `padded_vocab`, split in equal row blocks; lookups outside this rank's
    block give zeros and the all-reduce fills them in. `embed_scale` multiplies in the weight dtype,
    as transformers' scaled embeddings do."""

    def __init__(
        self,
        vocab_size: int,
        padded_vocab: int,
        dim: int,
        ctx: ParallelContext,
        *,
        embed_scale: float | None = None,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.ctx, self.vocab_size, self.embed_scale = ctx, vocab_size, embed_scale
        self.start, size = ctx.split(padded_vocab)
        self.weight = _empty(size, dim, dtype=dtype, device=device)
        self.shards = {"weight": Shard(0, self.start, size)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = vocab_parallel_lookup(ids, self.weight, self.start, self.ctx)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=self.weight.dtype, device=out.device)
        return out


def vocab_parallel_lookup(ids, weight, start: int, ctx: ParallelContext) -> torch.Tensor:
    """Rows of this rank's block [start, start + len(weight)); zeros elsewhere, filled in by
    the all-reduce."""
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), weight)
    return ctx.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class VocabParallelLookup(nn.Embedding):
    """The lookup an `nn.Embedding` subclass reaches through `super().forward` once rebased
    (`rebase_on_vocab_parallel`)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_lookup(ids, self.weight, self.vocab_start, self.ctx)


_REBASED: dict[type, type] = {}


def rebase_on_vocab_parallel(
    module: nn.Embedding, padded_vocab: int, ctx: ParallelContext, *, dtype=None, device=None
) -> nn.Embedding:
    """vLLM 0.32's `replace_embedding_class` for an `nn.Embedding` subclass: the module keeps
    its class (and its own forward: scaling, position offsets) and its lookup becomes
    vocab-parallel, as `type(cls.__name__, (cls, VocabParallelEmbedding), {})` does there."""
    cls = type(module)
    if cls not in _REBASED:
        _REBASED[cls] = type(cls.__name__, (cls, VocabParallelLookup), {})
    module.__class__ = _REBASED[cls]
    module.ctx = ctx
    module.vocab_start, size = ctx.split(padded_vocab)
    module.weight = _empty(size, module.embedding_dim, dtype=dtype, device=device)
    module.shards = {"weight": Shard(0, module.vocab_start, size)}
    return module


class ParallelLMHead(nn.Module):
    """Vocab-split output projection; logits gathered over the group and the padding cut off."""

    def __init__(
        self,
        vocab_size: int,
        padded_vocab: int,
        dim: int,
        ctx: ParallelContext,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.ctx, self.vocab_size = ctx, vocab_size
        start, size = ctx.split(padded_vocab)
        self.weight = _empty(size, dim, dtype=dtype, device=device)
        self.shards = {"weight": Shard(0, start, size)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_gather_last(F.linear(x, self.weight))[..., : self.vocab_size]


class RMSNorm(nn.Module):
    """x̂·w, normalised in float32 and cast back before the weight (Llama's order); x̂ alone
    for a weightless norm.

    TP-aware, as vLLM 0.32's TPAwareRMSNorm: an input narrower than the weight is this rank's
    shard of a column-parallel output (a q/k norm over all heads, OLMo-2's); it is gathered,
    normalised over the full width and this rank's slice returned."""

    def __init__(
        self, dim: int, eps: float, ctx: ParallelContext | None = None, *, has_weight=True,
        dtype=None, device=None,
    ):  # fmt: skip
        super().__init__()
        self.eps, self.ctx = eps, ctx or ParallelContext()
        self.weight = _empty(dim, dtype=dtype, device=device) if has_weight else None
        self.shards: dict[str, Shard] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.weight.shape[0] if self.weight is not None else x.shape[-1]
        if self.ctx.world > 1 and x.shape[-1] < full:
            if x.shape[-1] * self.ctx.world != full:
                raise ValueError(f"a norm of width {full} over a {x.shape[-1]}-wide shard")
            local = x.shape[-1]
            out = self._norm(self.ctx.all_gather_last(x))
            return out[..., self.ctx.rank * local : (self.ctx.rank + 1) * local]
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) if self.weight is None else self.weight * h.to(x.dtype)


class OffsetRMSNorm(RMSNorm):
    """x̂·(1 + w), all in float32 (Gemma's order)."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class FusedColumnLinear(nn.Module):
    """QKVParallelLinear / MergedColumnParallelLinear: several projections of one input as one
    column-parallel GEMM whose per-rank output is `[part_0 | part_1 | ...]` (`local_sizes`).

    `pieces` says, per parameter, which checkpoint rows fill it, in order: the loader
    concatenates them (q, k, v of this rank; gate then up). The HF module's own forward still
    calls each projection: those become `FusedPart`s reading one slice of this output."""

    def __init__(
        self, in_features: int, local_sizes: list[int], bias: bool, *, dtype=None, device=None
    ):
        super().__init__()
        self.in_features, self.local_sizes = in_features, list(local_sizes)
        self.weight = _empty(sum(local_sizes), in_features, dtype=dtype, device=device)
        self.bias = _empty(sum(local_sizes), dtype=dtype, device=device) if bias else None
        self.pieces: dict[str, list[tuple[str, Shard | None]]] = {}
        self._held: tuple[torch.Tensor, tuple[torch.Tensor, ...], set[int]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Slice `index` of this layer's output for `x`, the GEMM run once per input.

        The output is held until every part of it was taken once, then dropped; a part asked
        again, or for another input, runs the GEMM again, so the result is always that of
        `x`. (vLLM fuses only where nothing writes the input between the projections, its
        `_check_input_stable`, so in practice the GEMM runs once.)"""
        held = self._held
        if held is None or held[0] is not x or index in held[2]:
            held = self._held = (x, self(x).split(self.local_sizes, -1), set())
        held[2].add(index)
        out = held[1][index]
        if len(held[2]) == len(self.local_sizes):
            self._held = None
        return out


class FusedPart(nn.Module):
    """Stands where one fused projection was (`q_proj`, `gate_proj`): the HF forward calls it
    as before and gets its slice of the fused GEMM's output. Holds no parameters; the fused
    layer is kept out of the module tree here, so it is built, loaded and counted once, under
    the name the plan gives it."""

    def __init__(self, fused: FusedColumnLinear, index: int, output_slice: tuple[int, int]):
        super().__init__()
        self.index = index
        self.output_slice = output_slice  # (start, size) of the full projection's output
        self._fused = (fused,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].part(x, self.index)


# vLLM's ...AndMul kernels by activation name (layers/activation.py,
# _ACTIVATION_AND_MUL_REGISTRY): what each applies to the gate half.
AND_MUL: dict[str, Any] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "geglu": lambda x: F.gelu(x, approximate="none"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class AndMulActivation(nn.Module):
    """SiluAndMul / GeluAndMul over a fused gate/up output: `act(gate) * up`.

    The HF forward computes `act_fn(gate_proj(x)) * up_proj(x)`, and the gate and up
    projections are slices of one fused GEMM (`FusedPart`), so this module is called on the gate
    half and the HF multiply does the rest: the product vLLM's kernel computes, with the
    activation vLLM picks for this name (not the HF module's own formula)."""

    def __init__(self, name: str):
        super().__init__()
        if name not in AND_MUL:
            raise ValueError(f"no ...AndMul activation named {name!r}")
        self.name = name

    def forward(self, gate: torch.Tensor) -> torch.Tensor:
        return AND_MUL[self.name](gate)


class FusedMoE(nn.Module):
    """Routed experts with the intermediate dimension split over the group.

    Called exactly like transformers-5 experts modules: `(hidden [N, H], top_k_index [N, k],
    top_k_weights [N, k])`; the HF router stays in place. Each rank computes its slice of every
    expert's intermediate activations; the partial down projections are summed by the all-reduce.
    """

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        ctx: ParallelContext,
        *,
        act_fn=None,
        reduce_results: bool = True,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.ctx, self.num_experts, self.reduce_results = ctx, num_experts, reduce_results
        self.intermediate = intermediate
        self.start, per = ctx.split(intermediate)
        self.act_fn = act_fn or nn.SiLU()
        self.w13_weight = _empty(num_experts, 2 * per, hidden, dtype=dtype, device=device)
        self.w2_weight = _empty(num_experts, hidden, per, dtype=dtype, device=device)
        self.shards: dict[str, Shard] = {}  # loaded by weights.load_experts (names differ)

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:
                continue
            token, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden[token], self.w13_weight[expert]).chunk(2, dim=-1)
            h = F.linear(self.act_fn(gate) * up, self.w2_weight[expert])
            h = h * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return self.ctx.all_reduce(out) if self.reduce_results else out


class MoERunner(nn.Module):
    """vLLM 0.32's MoERunner where the HF experts module was: called as the HF block calls its
    experts (`hidden, top_k_index, top_k_weights`), computed by its `routed_experts` (the
    plan's TransformersRoutedExperts, installed as its child)."""

    def __init__(self):
        super().__init__()
        self.routed_experts: nn.Module | None = None

    def forward(self, hidden, top_k_index, top_k_weights):
        if self.routed_experts is None:
            raise RuntimeError("the MoE runner was built without its routed experts")
        return self.routed_experts(hidden, top_k_index, top_k_weights)


class StageInput(nn.Module):
    """Stands in for the input embedding on later pipeline stages: returns the hidden states
    received from the previous stage."""

    def __init__(self):
        super().__init__()
        self.received: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.received is None:
            raise RuntimeError("pipeline stage ran before receiving its input hidden states")
        return self.received


class MissingLayer(nn.Module):
    """A decoder layer (or norm) that lives on another pipeline stage: passes hidden states on."""

    def forward(self, hidden_states: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        return hidden_states if hidden_states is not None else kwargs["hidden_states"]


PLACEHOLDERS = (StageInput, MissingLayer)
