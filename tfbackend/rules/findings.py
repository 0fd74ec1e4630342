"""Findings and the verdict they add up to."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Severity(str, Enum):
    ERROR = "error"  # blocks serving: vLLM refuses the model or computes wrong results
    WARNING = "warning"  # serves, degraded (memory, speed) or at risk
    INFO = "info"  # explains what the backend will do

    @property
    def rank(self) -> int:
        return {"error": 0, "warning": 1, "info": 2}[self.value]


class Verdict(str, Enum):
    PASS = "PASS"
    PASS_WITH_WARNINGS = "PASS WITH WARNINGS"
    FAIL = "FAIL"

    @property
    def exit_code(self) -> int:
        return 1 if self is Verdict.FAIL else 0


@dataclass
class Finding:
    rule_id: str
    severity: Severity
    title: str
    message: str
    fix: str
    modules: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "severity": self.severity.value,
            "title": self.title,
            "message": self.message,
            "fix": self.fix,
            "modules": list(self.modules),
            "data": dict(self.data),
        }


def verdict_of(findings: list[Finding], *, strict: bool = False) -> Verdict:
    severities = {f.severity for f in findings}
    if Severity.ERROR in severities or (strict and Severity.WARNING in severities):
        return Verdict.FAIL
    if Severity.WARNING in severities:
        return Verdict.PASS_WITH_WARNINGS
    return Verdict.PASS


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (f.severity.rank, f.rule_id))
