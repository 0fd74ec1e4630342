"""The replacement plan: what vLLM's Transformers backend will build, as plain data.

One `PlanEntry` per replaced module (or per fused group: `sources` may name several source
modules, e.g. q/k/v fused into one QKVParallelLinear). Deterministic and JSON-serialisable, so a
plan can be printed, diffed, tested and applied without re-deriving anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PLAN_SCHEMA_VERSION = 1

# Target kinds
K_LINEAR = "linear"
K_EMBEDDING = "embedding"
K_LM_HEAD = "lm_head"
K_NORM = "norm"
K_LAYERNORM = "layernorm"
K_EXPERTS = "experts"
K_CONV = "conv"
K_UNCHANGED = "unchanged"  # a module the backend leaves as HF code (listed when it matters)

# Shard dims of a parameter: None = replicated on every rank.
REPLICATED = None


@dataclass
class ParamShard:
    name: str  # parameter name on the target module, e.g. "weight"
    full_shape: list[int]
    rank_shape: list[int]
    shard_dim: int | None  # None: every rank holds the whole tensor


@dataclass
class PlanEntry:
    qualname: str  # the module that will exist in the wrapped model
    sources: list[str]  # source modules it replaces (several when fused)
    source_class: str
    kind: str
    target: str  # vLLM class name, e.g. "ColumnParallelLinear"
    tp_style: str | None = None
    tp_key: str | None = None  # the tp_plan key that matched, as written by transformers
    reason: str = ""  # why this target (shown to the user; fallbacks are explicit)
    params: list[ParamShard] = field(default_factory=list)
    stage: int | None = None  # pipeline stage holding it; None = every stage
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttentionSpec:
    layer_idx: int
    qualname: str | None
    attn_type: str  # "decoder" | "encoder_only"
    num_heads: int | None
    num_kv_heads: int | None
    heads_per_rank: int | None
    kv_heads_per_rank: int | None
    kv_replicated: bool
    head_size: int | None
    sliding_window: int | None
    logits_soft_cap: float | None
    scaling: str | None
    sinks: bool
    stage: int
    # The dispatching module's own parameters per rank (it stays HF code; vLLM 0.32 re-creates
    # its learned sinks split over tp). Empty when it holds none.
    params: list[ParamShard] = field(default_factory=list)
    mla: bool = False  # MLAAttention over the compressed latent (one KV head, head_size latent)


@dataclass
class MoESpec:
    qualname: str
    layout: str  # "module_list" | "fused_3d"
    num_experts: int | None
    top_k: int | None
    hidden_size: int | None
    intermediate_size: int | None
    intermediate_per_rank: int | None
    activation: str
    renormalize: bool | None
    num_shared_experts: int
    reduce_results: bool
    has_bias: bool
    n_group: int | None
    topk_group: int | None
    stage: int | None


@dataclass
class StageSpec:
    rank: int
    layers: list[int]  # [start, end)
    modules: list[str]  # pp_plan modules this stage keeps (outside the layer list)
    missing: list[str]  # pp_plan modules replaced by PPMissingLayer on this stage
    has_lm_head: bool


@dataclass
class ReplacementPlan:
    profile: str
    tp: int
    pp: int
    entries: list[PlanEntry] = field(default_factory=list)
    attention: list[AttentionSpec] = field(default_factory=list)
    moe: list[MoESpec] = field(default_factory=list)
    stages: list[StageSpec] = field(default_factory=list)
    layers_module: str | None = None  # the ModuleList pipeline parallel splits
    notes: list[str] = field(default_factory=list)  # facts the planner had to assume
    schema_version: int = PLAN_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def entries_of(self, kind: str) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind == kind]

    def entry_for(self, source: str) -> PlanEntry | None:
        return next((e for e in self.entries if source in e.sources), None)
