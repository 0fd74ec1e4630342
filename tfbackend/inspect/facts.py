"""ModelFacts: everything `check` knows about a model, gathered once from its config and meta build.

Facts are plain data. The planner and the rules read them; nothing downstream touches torch modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any


class ModuleKind(str, Enum):
    """What the walker took a module for; every kind a planner step or rule tests is here."""

    LINEAR = "linear"
    CONV1D = "conv1d"  # GPT-2 style transposed linear: the backend never replaces it
    CONV = "conv"  # nn.Conv2d / nn.Conv3d (and subclasses): vLLM 0.32 swaps the exact classes
    EMBEDDING = "embedding"
    NORM = "norm"  # a leaf *Norm / *NormGated, told apart by running it (attrs["variant"])
    LAYERNORM = "layernorm"  # nn.LayerNorm and subclasses
    EXPERTS = "experts"
    ATTENTION = "attention"
    MODULE_LIST = "module_list"
    OTHER = "other"

    # the value, not "ModuleKind.LINEAR", in messages and f-strings (as StrEnum does on 3.11)
    __str__ = str.__str__
    __format__ = str.__format__


# The kinds by their short names, as the planner and rules import them.
LINEAR = ModuleKind.LINEAR
CONV1D = ModuleKind.CONV1D
CONV = ModuleKind.CONV
EMBEDDING = ModuleKind.EMBEDDING
NORM = ModuleKind.NORM
LAYERNORM = ModuleKind.LAYERNORM
EXPERTS = ModuleKind.EXPERTS
ATTENTION = ModuleKind.ATTENTION
MODULE_LIST = ModuleKind.MODULE_LIST
OTHER = ModuleKind.OTHER

# Norm variants, decided by running the norm, not by reading its class name.
NORM_PLAIN = "plain"  # x̂ * w
NORM_OFFSET = "offset"  # x̂ * (1 + w), Gemma style
NORM_NO_WEIGHT = "no_weight"  # x̂ only
NORM_GATED = "gated"  # forward(x, gate): the backend leaves it alone
NORM_UNKNOWN = "unknown"  # could not be exercised on CPU


@dataclass
class SourceInfo:
    """Where the model came from."""

    kind: str  # "local" or "hub"
    location: str  # what the user typed
    config_path: str
    repo_id: str | None = None
    revision: str | None = None
    local_dir: str | None = None
    has_custom_code: bool = False
    custom_code_used: bool = False


@dataclass
class MoEConfig:
    """MoE numbers read with the same attribute aliases the backend uses."""

    num_experts: int | None = None
    num_experts_attr: str | None = None
    top_k: int | None = None
    top_k_attr: str | None = None
    intermediate_size: int | None = None
    num_shared_experts: int = 0
    renormalize: bool | None = None
    n_group: int | None = None
    topk_group: int | None = None


@dataclass
class ConfigFacts:
    """Numbers from the text config (the one the backend reads)."""

    model_type: str
    architectures: list[str]
    hidden_size: int | None
    num_hidden_layers: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    head_dim: int | None
    intermediate_size: int | None
    vocab_size: int | None
    embedding_size: int | None
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    sliding_window: int | None
    layer_types: list[str] | None
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    dtype: str | None
    quantization: dict[str, Any] | None
    kv_lora_rank: int | None
    is_multimodal: bool
    moe: MoEConfig = field(default_factory=MoEConfig)
    hidden_act: str | None = None
    # Sub-configs of a multimodal config other than the text one (vision_config, audio_config…)
    sub_configs: list[str] = field(default_factory=list)
    # Raw text-config values some rules read by name (MoE aliases, MTP counts…), set ones only
    raw: dict[str, Any] = field(default_factory=dict)
    # Every int under a key containing "vocab_size", sub-configs included: vLLM ≥ 0.32 takes an
    # nn.Embedding of any of these sizes for a vocab table (TransformersBase._vocab_embeddings)
    vocab_sizes: list[int] = field(default_factory=list)
    # A heterogeneous config's per-layer {head_dim, num_attention_heads, num_key_value_heads}
    # (transformers' per_layer_config; vLLM sizes each layer's Attention from its own); None
    # when every layer is the whole-model config. The whole-model numbers above are then the
    # largest layer's, as vLLM's ModelArchitectureConfig.from_layers keeps them.
    layer_geometry: list[dict[str, int]] | None = None


@dataclass
class ModuleFact:
    """One module of the meta-built base model."""

    qualname: str  # as vLLM names it: prefixed with "model."
    class_name: str
    kind: ModuleKind
    params: dict[str, list[int]] = field(default_factory=dict)  # direct parameters only
    attrs: dict[str, Any] = field(default_factory=dict)
    # Direct persistent buffers: vLLM's AutoWeightsLoader loads a checkpoint tensor into one
    # (xIELU's beta/eps), but never asks for them (its missing-weights check reads parameters).
    buffers: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class ModelFacts:
    source: SourceInfo
    config: ConfigFacts
    model_class: str
    causal_lm_class: str | None
    tp_plan: dict[str, str]  # the base model's plan, keys as transformers writes them
    pp_plan: list[str]  # keys of the base model's _pp_plan, in order
    pp_module_lists: list[str]  # pp_plan keys that are nn.ModuleList
    supports_attention_backend: bool
    attention_source_uses_interface: bool
    has_non_causal_module: bool
    num_parameters: int
    modules: list[ModuleFact]
    versions: dict[str, str | None]
    custom_code_modules: list[str] = field(default_factory=list)
    # What vLLM's entry point needs before any replacement: AutoModel building the config it is
    # given (None: it does), and the decoder class it compiles (`model.get_decoder()`) with the
    # arguments its forward names.
    auto_model_error: str | None = None
    decoder_class: str | None = None
    decoder_forward_args: list[str] | None = None
    decoder_forward_var_kwargs: bool = False
    architecture_compatible: bool | None = None  # vLLM 0.32's registry gate; None: not judged
    vllm_config_class: str | None = None  # the installed vLLM's own config class, when it has one
    vllm_config_error: str | None = None  # why transformers cannot build from vLLM's class
    # The base model's module builds masks with transformers' masking_utils: under vLLM's
    # "vllm" attention implementation those return None, so no layer ever sees a mask tensor.
    masks_from_masking_utils: bool = False
    # Whether the base model's own code ever applies `config.sliding_window` (a sliding-window
    # mask, or `sliding_window=` handed to the attention interface); None: source unreadable.
    builds_sliding_mask: bool | None = None

    def module(self, qualname: str) -> ModuleFact | None:
        """The fact for one module, by qualname (planning looks modules up per fused projection)."""
        return self._by_qualname.get(qualname)

    @cached_property
    def _by_qualname(self) -> dict[str, ModuleFact]:
        return {m.qualname: m for m in self.modules}

    def by_kind(self, kind: str) -> list[ModuleFact]:
        return [m for m in self.modules if m.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
