"""What a `check` produced, in one object the renderers read (and never compute from)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from tfbackend import __version__
from tfbackend.plan import ReplacementPlan
from tfbackend.replace.grouping import PlanGroup
from tfbackend.rules.findings import Finding, Verdict

REPORT_SCHEMA_VERSION = "1.1"


@dataclass
class ModelSummary:
    source: str
    source_kind: str
    revision: str | None
    model_type: str
    architecture: str | None
    model_class: str
    parameters: int
    layers: int | None
    hidden_size: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    intermediate_size: int | None
    vocab_size: int | None
    tie_word_embeddings: bool
    dtype: str | None
    quantization: str | None
    num_experts: int | None
    experts_per_token: int | None
    moe_intermediate_size: int | None
    shared_experts: int
    sliding_window: int | None
    sliding_layers: int
    multimodal: bool
    custom_code: bool


@dataclass
class CheckReport:
    summary: ModelSummary
    tp: int
    pp: int
    profile: str
    profile_summary: str
    plan: ReplacementPlan
    groups: list[PlanGroup]
    findings: list[Finding]
    verdict: Verdict
    versions: dict[str, str | None]
    sections: dict[str, Any] = field(default_factory=dict)  # later checks add sections here
    # The model code the plan was read from, against what the profile's vLLM serves with:
    # {"transformers": "5.19.0", "serving_range": ">=5.16.1,<5.20", "in_range": True}
    read_with: dict[str, Any] = field(default_factory=dict)
    tool_version: str = __version__
    schema_version: str = REPORT_SCHEMA_VERSION

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool": {"name": "tfbackend", "version": self.tool_version},
            "verdict": self.verdict.value,
            "exit_code": self.exit_code,
            "model": asdict(self.summary),
            "parallel": {"tp": self.tp, "pp": self.pp},
            "profile": {"name": self.profile, "summary": self.profile_summary},
            "read_with": dict(self.read_with),
            "versions": dict(self.versions),
            "findings": [f.to_dict() for f in self.findings],
            "plan": self.plan.to_dict(),
            "plan_groups": [asdict(g) for g in self.groups],
            "sections": {name: plain(value) for name, value in self.sections.items()},
        }


def plain(value: Any) -> Any:
    """Sections hold dataclasses; the report's dict form holds only JSON types."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
