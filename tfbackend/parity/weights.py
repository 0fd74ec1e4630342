"""Each rank reads only its own slices of the checkpoint (`safe_open(...).get_slice`).

Checkpoint names equal module parameter names for dense models; a fused layer (q/k/v, gate/up)
names the checkpoint slices of each of its parameters (`pieces`). MoE experts are found under the
names transformers writes: per-expert `experts.{e}.gate_proj/up_proj/down_proj` (or Mixtral's
`w1/w3/w2`), or fused 3-D `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tfbackend.errors import CheckpointError
from tfbackend.inspect.checkpoint import read_index
from tfbackend.replace.layers import FusedMoE, ParallelLMHead, Shard, VocabParallelEmbedding

_PER_EXPERT = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


class CheckpointReader:
    """Sliced reads from a folder of safetensors files (one file or an index)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(
                f"{folder} has no .safetensors files: `run` reads safetensors only"
            )
        self._stack = contextlib.ExitStack()
        self._handles = {
            f: self._stack.enter_context(safe_open(str(folder / f), "pt")) for f in files
        }
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.weight_map = weight_map
        self.bytes_read = 0

    def close(self) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> list[int]:
        return list(self._handles[self.weight_map[name]].get_slice(name).get_shape())

    def read(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        """The tensor, or rows [start, start+size) of dimension `shard.dim` (zero-padded past
        the end, for padded vocabularies)."""
        handle = self._handles[self.weight_map[name]]
        sl = handle.get_slice(name)
        if not sl.get_shape():  # a scalar (xIELU's beta): a slice cannot index 0 dimensions
            t = handle.get_tensor(name)
        elif shard is None:
            t = sl[:]
        else:
            full = sl.get_shape()[shard.dim]
            stop = min(shard.start + shard.size, full)
            index = [slice(None)] * len(sl.get_shape())
            index[shard.dim] = slice(min(shard.start, full), stop)
            t = sl[tuple(index)]
            missing = shard.size - t.shape[shard.dim]
            if missing > 0:
                pad_shape = list(t.shape)
                pad_shape[shard.dim] = missing
                t = torch.cat([t, t.new_zeros(pad_shape)], dim=shard.dim)
        self.bytes_read += t.numel() * t.element_size()
        return t


def load_rank_weights(
    model: nn.Module, reader: CheckpointReader, *, tied_source: str | None = None
) -> None:
    """Fill every parameter of the (already materialised) wrapped model with its slice."""
    missing: list[str] = []
    for mod_name, module in model.named_modules():
        if isinstance(module, FusedMoE):
            load_experts(module, getattr(module, "checkpoint_prefix", mod_name), reader)
            continue
        shards = getattr(module, "shards", {})
        pieces = getattr(module, "pieces", {})
        for p_name, param in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name in pieces:
                _load_pieces(param, pieces[p_name], reader, missing)
                continue
            source = _source_name(name, module, reader, tied_source)
            if source is None:
                missing.append(name)
                continue
            with torch.no_grad():
                param.copy_(reader.read(source, shards.get(p_name)).to(param.dtype))
        for b_name, buf in module.named_buffers(recurse=False):
            name = f"{mod_name}.{b_name}" if mod_name else b_name
            if buf is not None and name in reader:
                with torch.no_grad():
                    buf.copy_(reader.read(name).to(buf.dtype))
    if missing:
        raise CheckpointError(
            f"checkpoint has no tensor for {len(missing)} parameter(s), e.g. {missing[:3]}"
        )


def _load_pieces(param, pieces, reader: CheckpointReader, missing: list[str]) -> None:
    """A fused parameter: its checkpoint slices, concatenated along dim 0 in order (this rank's
    q, k, v; gate then up)."""
    absent = [name for name, _ in pieces if name not in reader]
    if absent:
        missing.extend(absent)
        return
    with torch.no_grad():
        offset = 0
        for name, shard in pieces:
            t = reader.read(name, shard).to(param.dtype)
            param[offset : offset + t.shape[0]].copy_(t)
            offset += t.shape[0]


def _source_name(name, module, reader, tied_source):
    if name in reader:
        return name
    if isinstance(module, ParallelLMHead | VocabParallelEmbedding) and tied_source in reader:
        return tied_source
    return None


def load_experts(module: FusedMoE, prefix: str, reader: CheckpointReader) -> None:
    start, per = module.start, module.w2_weight.shape[-1]
    inter = module.intermediate
    w13, w2 = module.w13_weight, module.w2_weight
    fused_gate_up = f"{prefix}.gate_up_proj"
    with torch.no_grad():
        if fused_gate_up in reader:
            w13[:, :per].copy_(reader.read(fused_gate_up, Shard(1, start, per)).to(w13.dtype))
            w13[:, per:].copy_(
                reader.read(fused_gate_up, Shard(1, inter + start, per)).to(w13.dtype)
            )
            w2.copy_(reader.read(f"{prefix}.down_proj", Shard(2, start, per)).to(w2.dtype))
            return
        for e in range(module.num_experts):
            gate, up, down = (
                _expert_name(reader, prefix, e, part) for part in ("gate", "up", "down")
            )
            w13[e, :per].copy_(reader.read(gate, Shard(0, start, per)).to(w13.dtype))
            w13[e, per:].copy_(reader.read(up, Shard(0, start, per)).to(w13.dtype))
            w2[e].copy_(reader.read(down, Shard(1, start, per)).to(w2.dtype))


def _expert_name(reader: CheckpointReader, prefix: str, e: int, part: str) -> str:
    for alias in _PER_EXPERT[part]:
        name = f"{prefix}.{e}.{alias}.weight"
        if name in reader:
            return name
    raise CheckpointError(
        f"no checkpoint tensor for expert {e} {part} under {prefix} (looked for "
        f"{', '.join(_PER_EXPERT[part])} and fused gate_up_proj/down_proj)"
    )
