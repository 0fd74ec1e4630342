"""Walk a meta-built model into ModelFacts: the module inventory and the config numbers."""

from __future__ import annotations

import importlib.metadata
from operator import attrgetter
from typing import Any

from tfbackend.inspect import attention as attn
from tfbackend.inspect.facts import (
    ATTENTION,
    CONV1D,
    EMBEDDING,
    EXPERTS,
    LINEAR,
    MODULE_LIST,
    NORM,
    OTHER,
    ConfigFacts,
    ModelFacts,
    ModuleFact,
    MoEConfig,
    SourceInfo,
)
from tfbackend.inspect.fusables import fusion_fact
from tfbackend.inspect.norms import classify_norm, norm_eps, zero_initialised

LAYERNORM = "layernorm"

# Attribute aliases, in the order the backend tries them.
NUM_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "top_k", "moe_topk")
MOE_INTERMEDIATE = ("moe_intermediate_size", "intermediate_size")
SHARED_EXPERTS = ("num_experts_shared", "n_shared_experts", "moe_num_shared_experts")


def first_attr(obj: Any, names: tuple[str, ...], default: Any = None) -> tuple[Any, str | None]:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value, name
    return default, None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(value)  # per-layer lists: the backend sizes by the largest
    return None


def config_facts(config: Any, text: Any) -> ConfigFacts:
    heads = _int(getattr(text, "num_attention_heads", None))
    hidden = _int(getattr(text, "hidden_size", None))
    kv = _int(getattr(text, "num_key_value_heads", None)) or heads
    head_dim = _int(getattr(text, "head_dim", None))
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    num_experts, experts_attr = first_attr(text, NUM_EXPERTS)
    top_k, top_k_attr = first_attr(text, TOP_K)
    moe_inter, _ = first_attr(text, MOE_INTERMEDIATE)
    shared, _ = first_attr(text, SHARED_EXPERTS, 0)
    num_experts, top_k = _int(num_experts), _int(top_k)
    renorm = getattr(text, "norm_topk_prob", None)
    if renorm is None and top_k is not None:
        renorm = top_k > 1
    quant = getattr(config, "quantization_config", None) or getattr(
        text, "quantization_config", None
    )
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else dict(vars(quant))
    dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None)
    layer_types = getattr(text, "layer_types", None)
    tie = bool(
        getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
    )
    return ConfigFacts(
        model_type=getattr(config, "model_type", "") or "",
        architectures=list(getattr(config, "architectures", None) or []),
        hidden_size=hidden,
        num_hidden_layers=_int(getattr(text, "num_hidden_layers", None)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=_int(getattr(text, "intermediate_size", None)),
        vocab_size=_int(getattr(text, "vocab_size", None)),
        embedding_size=_int(getattr(text, "embedding_size", None)),
        tie_word_embeddings=tie,
        max_position_embeddings=_int(getattr(text, "max_position_embeddings", None)),
        sliding_window=_int(getattr(text, "sliding_window", None)),
        layer_types=list(layer_types) if isinstance(layer_types, (list, tuple)) else None,
        attn_logit_softcapping=getattr(text, "attn_logit_softcapping", None),
        final_logit_softcapping=getattr(text, "final_logit_softcapping", None),
        dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
        quantization=quant,
        kv_lora_rank=_int(getattr(text, "kv_lora_rank", None)),
        is_multimodal=config is not text,
        moe=MoEConfig(
            num_experts=num_experts,
            num_experts_attr=experts_attr,
            top_k=top_k,
            top_k_attr=top_k_attr,
            intermediate_size=_int(moe_inter),
            num_shared_experts=_int(shared) or 0,
            renormalize=bool(renorm) if renorm is not None else None,
            n_group=_int(getattr(text, "n_group", None)),
            topk_group=_int(getattr(text, "topk_group", None)),
        ),
    )


def _shape(t: Any) -> list[int]:
    return [int(d) for d in t.shape]


def _experts_fact(qualname: str, module: Any) -> ModuleFact:
    import torch.nn as nn

    params = {n: _shape(p) for n, p in module.named_parameters()}
    if isinstance(module, nn.ModuleList):
        layout, count = "module_list", len(module)
        first = dict(module[0].named_parameters()) if len(module) else {}
        params = {n: _shape(p) for n, p in first.items()}
    else:
        layout = "fused_3d"
        count = next((s[0] for s in params.values() if len(s) == 3), 0)
    return ModuleFact(
        qualname=qualname,
        class_name=type(module).__name__,
        kind=EXPERTS,
        params=params,
        attrs={
            "layout": layout,
            "count": count,
            "has_bias": any("bias" in n for n in params),
            "only_3d": all(len(s) == 3 for s in params.values()) and bool(params),
        },
    )


def _is_experts(name: str, module: Any) -> bool:
    import torch.nn as nn

    if name.rsplit(".", 1)[-1] != "experts":
        return False
    if isinstance(module, nn.ModuleList):
        return True
    own = list(module.parameters())
    return bool(own) and all(p.ndim == 3 for p in own)


def walk(model: Any, config: Any, text: Any, source: SourceInfo) -> ModelFacts:
    import torch.nn as nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every transformers 5 has it
        Conv1D = ()  # noqa: N806

    input_embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    modules: list[ModuleFact] = []
    norm_cache: dict[tuple, tuple[str, bool, bool | None]] = {}
    experts_prefixes: list[str] = []
    has_non_causal = False
    for name, module in model.named_modules():
        if not name:
            continue
        qualname = f"model.{name}"
        if getattr(module, "is_causal", True) is False:
            has_non_causal = True
        if any(qualname.startswith(p) for p in experts_prefixes):
            continue
        cls = type(module)
        own = {n: _shape(p) for n, p in module.named_parameters(recurse=False)}
        fact = ModuleFact(qualname=qualname, class_name=cls.__name__, kind=OTHER, params=own)
        if _is_experts(name, module):
            fact = _experts_fact(qualname, module)
            experts_prefixes.append(qualname + ".")
        elif isinstance(module, nn.Linear):
            fact.kind = LINEAR
            fact.attrs = {
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
            }
        elif Conv1D and isinstance(module, Conv1D):
            fact.kind = CONV1D
            fact.attrs = {"in_features": module.nx, "out_features": module.nf}
        elif isinstance(module, nn.Embedding):
            fact.kind = EMBEDDING
            scale = getattr(module, "embed_scale", None)
            fact.attrs = {
                "num_embeddings": module.num_embeddings,
                "embedding_dim": module.embedding_dim,
                "is_input": module is input_embedding
                or (input_embedding is not None and module in set(input_embedding.modules())),
                "embed_scale": float(scale) if isinstance(scale, (int, float)) else None,
                "has_embed_scale": scale is not None,
            }
        elif isinstance(module, nn.LayerNorm):
            fact.kind = LAYERNORM
            fact.attrs = {
                "exact_layernorm": cls is nn.LayerNorm,
                "bias": module.bias is not None,
                "eps": module.eps,
            }
        elif cls.__name__.endswith("Norm") and next(module.children(), None) is None:
            key = (cls, tuple(tuple(s) for s in own.values()), norm_eps(module))
            if key not in norm_cache:
                variant, is_rms = classify_norm(module)
                norm_cache[key] = (variant, is_rms, zero_initialised(module))
            variant, is_rms, zero_init = norm_cache[key]
            fact.kind = NORM
            fact.attrs = {
                "variant": variant,
                "is_rms": is_rms,
                "rms_named": cls.__name__.endswith("RMSNorm"),
                "zero_init": zero_init,
                "eps": norm_eps(module),
                "bias": "bias" in own,
                "with_scale": getattr(module, "with_scale", None),
            }
        elif isinstance(module, nn.ModuleList):
            fact.kind = MODULE_LIST
            fact.attrs = {"length": len(module)}
        else:
            call = attn.interface_call(cls)
            if call is not None or attn.looks_like_attention(cls):
                layer_idx = getattr(module, "layer_idx", None)
                fact.kind = ATTENTION
                fact.attrs = {
                    "interface": call is not None,
                    "layer_idx": layer_idx if isinstance(layer_idx, int) else None,
                    "is_causal": getattr(module, "is_causal", None),
                    "scaling": call.scaling if call else None,
                    "s_aux": call.s_aux if call else None,
                    "sinks_shape": _sinks_shape(module, call),
                }
        if fact.kind in (OTHER, ATTENTION) and (fusion := fusion_fact(module)) is not None:
            fact.attrs["fusion"] = fusion
        modules.append(fact)

    pp_plan = list(getattr(model, "_pp_plan", None) or {})
    pp_lists = []
    for key in pp_plan:
        try:
            if isinstance(attrgetter(key)(model), nn.ModuleList):
                pp_lists.append(key)
        except AttributeError:
            continue

    return ModelFacts(
        source=source,
        config=config_facts(config, text),
        model_class=type(model).__name__,
        causal_lm_class=None,
        tp_plan=dict(getattr(model, "tp_plan", None) or {}),
        pp_plan=pp_plan,
        pp_module_lists=pp_lists,
        supports_attention_backend=bool(getattr(model, "_supports_attention_backend", False)),
        attention_source_uses_interface=any(
            m.kind == ATTENTION and m.attrs.get("interface") for m in modules
        ),
        has_non_causal_module=has_non_causal,
        num_parameters=sum(p.numel() for p in model.parameters()),
        modules=modules,
        versions=versions(),
    )


def _sinks_shape(module: Any, call: attn.InterfaceCall | None) -> list[int] | None:
    if call is None or not call.s_aux or not call.s_aux.startswith("self."):
        return None
    value = getattr(module, call.s_aux.removeprefix("self."), None)
    return _shape(value) if hasattr(value, "shape") else None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "vllm", "huggingface-hub", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out
