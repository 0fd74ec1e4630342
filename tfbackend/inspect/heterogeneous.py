"""Per-layer attention geometry of a heterogeneous config (transformers' `per_layer_config`).

A heterogeneous text config (Gemma 4: full-attention layers with `global_head_dim` as their
`head_dim`) raises on a whole-model read of an attribute that varies by layer. vLLM 0.32 converts
each layer's config on its own (`ModelArchConfigConvertorBase.convert` →
`ModelArchitectureConfig.from_layers`): a varying number's whole-model value is the largest
layer's, and `_create_attention_instances` sizes each layer's Attention from
`model_arch_config[i]`, that layer's own geometry. We read the layers the same way.
"""

from __future__ import annotations

from typing import Any

# What vLLM's convertor reads for the kv heads, in its order (get_total_num_kv_heads).
KV_HEAD_ATTRS = (
    "n_head_kv",
    "num_kv_heads",
    "num_key_value_heads",
    "multi_query_group_num",
    "num_attention_groups",
)


def _first(config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _geometry(layer: Any) -> dict[str, int]:
    """One layer's heads, kv heads and head size, as the convertor's getters compute them."""
    heads = getattr(layer, "num_attention_heads", 0) or 0
    kv = _first(layer, KV_HEAD_ATTRS)
    head_dim = getattr(layer, "head_dim", None)
    if head_dim is None or head_dim <= 0:
        head_dim = getattr(layer, "hidden_size_per_head", None)
    if head_dim is None:
        hidden = getattr(layer, "hidden_size", 0) or 0
        head_dim = hidden // heads if heads else 0
    return {
        "head_dim": int(head_dim),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv if kv is not None else heads),
    }


def layer_geometry(text: Any) -> list[dict[str, int]] | None:
    """Each layer's attention geometry, or None when the config is not heterogeneous (every
    layer is then the whole-model config)."""
    try:
        if not getattr(text, "is_heterogeneous", False):
            return None
        layers = text.per_layer_config
        return [_geometry(layers[i]) for i in range(len(layers))]
    except Exception:  # noqa: BLE001 - a config whose layers cannot be resolved reads as whole
        return None


def whole_model(layers: list[dict[str, int]], name: str) -> int | None:
    """The whole-model value vLLM keeps for a per-layer number: the largest layer's."""
    values = [layer[name] for layer in layers if layer.get(name)]
    return max(values) if values else None
