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
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = self.ctx.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=self.weight.dtype, device=out.device)
        return out


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
    """x̂·w, normalised in float32 and cast back before the weight (Llama's order)."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = _empty(dim, dtype=dtype, device=device)
        self.shards: dict[str, Shard] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class OffsetRMSNorm(RMSNorm):
    """x̂·(1 + w), all in float32 (Gemma's order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


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
