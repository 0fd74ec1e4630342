"""What a gate produced: per model, every check and run, the verdict, and whether it met its expectation.

Renderers (console, JSON, JUnit, Markdown) read these objects and never compute from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tfbackend import __version__
from tfbackend.gate.manifest import ModelEntry
from tfbackend.report.model import CheckReport
from tfbackend.rules.findings import Finding, Severity, Verdict

GATE_SCHEMA_VERSION = "1.0"
_RANK = {Verdict.PASS: 0, Verdict.PASS_WITH_WARNINGS: 1, Verdict.FAIL: 2}


def verdict_rank(v: Verdict) -> int:
    return _RANK[v]


def worst(verdicts: list[Verdict]) -> Verdict:
    return max(verdicts, key=verdict_rank, default=Verdict.PASS)


@dataclass
class CheckOutcome:
    """One `check` of one model at one (tp, pp)."""

    tp: int
    pp: int
    report: CheckReport | None = None
    error: str | None = None  # the model could not be checked (bad source, network, config)
    error_type: str | None = None
    seconds: float = 0.0

    @property
    def layout(self) -> str:
        return f"tp={self.tp} pp={self.pp}"

    @property
    def verdict(self) -> Verdict | None:
        return self.report.verdict if self.report else None

    @property
    def findings(self) -> list[Finding]:
        return self.report.findings if self.report else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "pp": self.pp,
            "verdict": self.verdict.value if self.verdict else None,
            "error": self.error,
            "error_type": self.error_type,
            "seconds": round(self.seconds, 3),
            "report": self.report.to_dict() if self.report else None,  # the `check --json` schema
        }


RUN_PASSED, RUN_FAILED, RUN_SKIPPED, RUN_ERROR = "passed", "failed", "skipped", "error"


@dataclass
class RunOutcome:
    """One parity `run` of one model at one (tp, pp)."""

    tp: int
    pp: int
    status: str  # passed | failed | skipped | error
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # the engine's own result, as it gave it
    seconds: float = 0.0

    @property
    def layout(self) -> str:
        return f"tp={self.tp} pp={self.pp}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "pp": self.pp,
            "status": self.status,
            "message": self.message,
            "metrics": dict(self.metrics),
            "seconds": round(self.seconds, 3),
            "result": self.data,
        }


@dataclass(frozen=True)
class Change:
    """A difference from the baseline: a regression, or something already known there."""

    kind: str  # verdict | finding | metric | run
    model: str
    message: str
    tp: int | None = None
    pp: int | None = None
    rule_id: str | None = None

    @property
    def layout(self) -> str:
        return f"tp={self.tp} pp={self.pp}" if self.tp is not None else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "tp": self.tp,
            "pp": self.pp,
            "rule_id": self.rule_id,
            "message": self.message,
        }


@dataclass
class GateResult:
    model: ModelEntry
    checks: list[CheckOutcome] = field(default_factory=list)
    runs: list[RunOutcome] = field(default_factory=list)
    regressions: list[Change] = field(default_factory=list)
    known: list[Change] = field(default_factory=list)
    baseline_verdict: str | None = None  # None: no baseline, or the model is new to it

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def expected(self) -> Verdict:
        return self.model.expected

    @property
    def errored(self) -> bool:
        return any(c.error for c in self.checks) or any(r.status == RUN_ERROR for r in self.runs)

    @property
    def verdict(self) -> Verdict | None:
        """The worst over every check and finished run; None when something could not be checked."""
        if self.errored:
            return None
        verdicts = [c.verdict for c in self.checks if c.verdict]
        if any(r.status == RUN_FAILED for r in self.runs):
            verdicts.append(Verdict.FAIL)
        return worst(verdicts)

    @property
    def met(self) -> bool:
        """Exactly the expected verdict: a better one means the manifest is stale (like strict xfail)."""
        return self.verdict is self.expected

    @property
    def status(self) -> str:
        if self.errored:
            return "error"
        if self.met:
            return "met"
        return (
            "better than expected"
            if verdict_rank(self.verdict) < verdict_rank(self.expected)
            else "missed"
        )

    def error_findings(self) -> list[tuple[CheckOutcome, Finding]]:
        return [(c, f) for c in self.checks for f in c.findings if f.severity is Severity.ERROR]

    def to_dict(self) -> dict[str, Any]:
        m = self.model
        return {
            "name": self.name,
            "id": m.id,
            "source": m.source,
            "revision": m.revision,
            "expected": m.expected_label,
            "expected_verdict": m.expected.value,
            "verdict": self.verdict.value if self.verdict else "ERROR",
            "met": self.met,
            "status": self.status,
            "checks": [c.to_dict() for c in self.checks],
            "runs": [r.to_dict() for r in self.runs],
            "baseline_verdict": self.baseline_verdict,
            "regressions": [c.to_dict() for c in self.regressions],
            "known": [c.to_dict() for c in self.known],
        }


@dataclass
class GateReport:
    manifest: str
    results: list[GateResult]
    versions: dict[str, str | None] = field(default_factory=dict)
    baseline: str | None = None
    ran: bool = False  # --run was given
    seconds: float = 0.0
    tool_version: str = __version__
    schema_version: str = GATE_SCHEMA_VERSION

    @property
    def missed(self) -> list[GateResult]:
        return [r for r in self.results if not r.met]

    @property
    def regressions(self) -> list[Change]:
        return [c for r in self.results for c in r.regressions]

    @property
    def passed(self) -> bool:
        return not self.missed and not self.regressions

    @property
    def exit_code(self) -> int:
        """1 when a checked model missed or regressed; 2 when the only problem is models that could
        not be checked (input or environment); else 0."""
        if any(not r.errored for r in self.missed) or self.regressions:
            return 1
        return 2 if self.missed else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "gate",
            "tool": {"name": "tfbackend", "version": self.tool_version},
            "manifest": self.manifest,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "ran": self.ran,
            "baseline": self.baseline,
            "seconds": round(self.seconds, 3),
            "versions": dict(self.versions),
            "summary": {
                "models": len(self.results),
                "met": sum(r.met for r in self.results),
                "missed": len(self.missed),
                "errors": sum(r.errored for r in self.results),
                "regressions": len(self.regressions),
            },
            "models": [r.to_dict() for r in self.results],
        }
