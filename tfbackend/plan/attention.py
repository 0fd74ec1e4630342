"""Per-layer attention facts the planner hands to each AttentionSpec.

- geometry: `_create_attention_instances` sizes layer i's Attention from
  `model_arch_config[i]`, which on a heterogeneous config is that layer's own geometry;
- own parameters: the dispatching module stays HF code, but `AttentionFuser.fuse` swaps its
  learned sinks (`s_aux=self.<attr>`) for a fresh parameter of `numel // tp` elements loaded
  with `sharded_weight_loader(0)`: each rank holds its heads' sinks.
"""

from __future__ import annotations

import re

from tfbackend.inspect.facts import ConfigFacts, ModuleFact
from tfbackend.plan import ParamShard

_SELF_ATTR = re.compile(r"^self\.(\w+)$")


def layer_heads(cfg: ConfigFacts, layer_idx: int) -> tuple[int | None, int | None, int | None]:
    """(heads, kv heads, head size) of one layer, before the tp split."""
    layers = cfg.layer_geometry
    if layers and layer_idx < len(layers):
        g = layers[layer_idx]
        return g["num_attention_heads"], g["num_key_value_heads"], g["head_dim"]
    return cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim


def sinks_attr(m: ModuleFact) -> str | None:
    """The attribute vLLM re-creates per rank: `s_aux=` must read `self.<attr>` (AttentionFuser
    resolves nothing else) and the attribute must be a parameter (walk records its shape)."""
    match = _SELF_ATTR.match(m.attrs.get("s_aux") or "")
    if not match or match.group(1) not in m.params:
        return None
    return match.group(1)


def own_params(m: ModuleFact, tp: int, shards_sinks: bool) -> list[ParamShard]:
    """The dispatching module's own parameters per rank: sinks split over tp (flattened, as
    `torch.empty(numel // tp)` makes them), everything else whole on every rank."""
    sinks = sinks_attr(m) if shards_sinks else None
    out = []
    for name, shape in m.params.items():
        if name == sinks:
            numel = 1
            for d in shape:
                numel *= d
            out.append(ParamShard(name, list(shape), [numel // tp], 0))
        else:
            out.append(ParamShard(name, list(shape), list(shape), None))
    return out
