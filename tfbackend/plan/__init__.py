"""The replacement plan: what vLLM's Transformers backend will build, as plain data.

One `PlanEntry` per replaced module (or per fused group: `sources` may name several source
modules, e.g. q/k/v fused into one QKVParallelLinear). Deterministic and JSON-serialisable, so a
plan can be printed, diffed, tested and applied without re-deriving anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

PLAN_SCHEMA_VERSION = 1


class EntryKind(str, Enum):
    """What a plan entry replaces a module with; every kind a renderer or rule tests is here."""

    LINEAR = "linear"
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    NORM = "norm"
    LAYERNORM = "layernorm"
    EXPERTS = "experts"
    CONV = "conv"
    ROUTER = "router"  # an MoE router rebuilt as vLLM's GateLinear
    ACTIVATION = "activation"  # an activation fused with the gate/up multiply
    SHARED_EXPERTS = "shared_experts"  # the MoE runner's wrappers of a shared expert
    UNCHANGED = "unchanged"  # a module the backend leaves as HF code (listed when it matters)

    __str__ = str.__str__
    __format__ = str.__format__


K_LINEAR = EntryKind.LINEAR
K_EMBEDDING = EntryKind.EMBEDDING
K_LM_HEAD = EntryKind.LM_HEAD
K_NORM = EntryKind.NORM
K_LAYERNORM = EntryKind.LAYERNORM
K_EXPERTS = EntryKind.EXPERTS
K_CONV = EntryKind.CONV
K_ROUTER = EntryKind.ROUTER
K_ACTIVATION = EntryKind.ACTIVATION
K_SHARED_EXPERTS = EntryKind.SHARED_EXPERTS
K_UNCHANGED = EntryKind.UNCHANGED


class Fallback(str, Enum):
    """A fallback the backend takes without saying so (PlanEntry.extra["fallback"]): the
    console marks such entries, rules may count them."""

    NO_TP_PLAN_KEY = "no_tp_plan_key"  # no key matches: ReplicatedLinear
    UNKNOWN_STYLE = "unknown_style"  # a style the backend does not know: ReplicatedLinear

    __str__ = str.__str__
    __format__ = str.__format__


class NoteCode(str, Enum):
    """Why the planner wrote a note: what code tests, instead of the note's words."""

    NO_PP_PLAN = "no_pp_plan"  # this vLLM refuses pipeline parallel without a pp_plan
    PP_INFERRED = "pp_inferred"  # the split is inferred from the decoder's children
    PP_SPLIT_IMPOSSIBLE = "pp_split_impossible"  # not exactly one ModuleList to split
    NOT_FUSED = "not_fused"  # a module with sibling linears no fuser takes
    ROUTING_IN_TRANSFORMERS = "routing_in_transformers"  # MoE routing stays HF code
    MLA_NOT_FUSED = "mla_not_fused"  # a latent-attention module MLAFuser skips
    MLA_ROLES_MISSING = "mla_roles_missing"  # matched roles that are no nn.Linear facts
    MLA_FALLBACK = "mla_fallback"  # kv_lora_rank but no layer fuses: full attention
    MLA_MIXED = "mla_mixed"  # some layers fuse as MLA, this one does not: vLLM raises

    __str__ = str.__str__
    __format__ = str.__format__


class PlanNote(str):
    """A fact the planner had to assume or a fusion it did not make: a `code` to test, the
    `module` it is about (None: the whole model) and the `text` said about it.

    It is the line the user reads (`"<module> (<class>): <text>"`, the class when given), so
    renderers and the JSON
    print it as they print any string; code reads `code`, never the words.
    """

    code: NoteCode
    module: str | None
    text: str

    def __new__(
        cls,
        code: NoteCode,
        text: str,
        module: str | None = None,
        module_class: str = "",
        *,
        line: str | None = None,  # the line, when the text already names the module
    ) -> PlanNote:
        if line is None and module is None:
            line = text
        elif line is None:
            line = f"{module} ({module_class}): {text}" if module_class else f"{module}: {text}"
        note = super().__new__(cls, line)
        note.code, note.module, note.text = code, module, text
        return note

    def __reduce__(self):  # spawned ranks receive plans pickled
        return _note, (self.code, self.module, self.text, str(self))

    def __deepcopy__(self, memo) -> PlanNote:  # asdict copies; the note is immutable
        return self


def _note(code: NoteCode, module: str | None, text: str, line: str) -> PlanNote:
    note = str.__new__(PlanNote, line)
    note.code, note.module, note.text = code, module, text
    return note


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
    kind: EntryKind
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
    notes: list[PlanNote] = field(default_factory=list)  # facts the planner had to assume
    schema_version: int = PLAN_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def notes_of(self, code: NoteCode) -> list[PlanNote]:
        return [n for n in self.notes if n.code == code]

    def entries_of(self, kind: str) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind == kind]

    def entry_for(self, source: str) -> PlanEntry | None:
        return next((e for e in self.entries if source in e.sources), None)
