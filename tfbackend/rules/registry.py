"""The rule registry: every check is a small function with a stable id, registered here.

A rule reads facts and the plan and yields findings. It never prints, never touches modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tfbackend.inspect.facts import ModelFacts
from tfbackend.plan import ReplacementPlan
from tfbackend.replace.profiles import Profile
from tfbackend.rules.findings import Finding, Severity


@dataclass
class RuleContext:
    facts: ModelFacts
    plan: ReplacementPlan
    profile: Profile
    tp: int
    pp: int
    options: dict[str, Any] = field(default_factory=dict)  # e.g. checkpoint, memory results


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    severity: Severity  # the usual severity; a rule may raise or lower it per finding
    category: str
    rationale: str
    fix: str
    check: Callable[[RuleContext], Iterable[Finding]]

    @property
    def example(self) -> str:
        from tfbackend.rules.examples import EXAMPLES

        return EXAMPLES.get(self.id, "")

    def finding(
        self,
        message: str,
        *,
        severity: Severity | None = None,
        fix: str | None = None,
        modules: list[str] | None = None,
        **data: Any,
    ) -> Finding:
        return Finding(
            rule_id=self.id,
            severity=severity or self.severity,
            title=self.title,
            message=message,
            fix=fix or self.fix,
            modules=modules or [],
            data=data,
        )


REGISTRY: dict[str, Rule] = {}

CATEGORIES = {
    "1": "structure",
    "2": "tensor parallel",
    "3": "pipeline parallel",
    "4": "attention",
    "5": "norms and MoE",
    "6": "quantization",
    "7": "checkpoint and memory",
    "8": "versions and environment",
}


def rule(
    id: str, title: str, severity: Severity, *, rationale: str, fix: str
) -> Callable[[Callable[[RuleContext, Rule], Iterable[Finding]]], Rule]:
    """Register `fn(ctx, rule)` as rule `id`; the rule object lets it build its findings."""

    def register(fn: Callable[[RuleContext, Rule], Iterable[Finding]]) -> Rule:
        if id in REGISTRY:
            raise ValueError(f"rule {id} registered twice")
        holder: dict[str, Rule] = {}
        r = Rule(
            id=id,
            title=title,
            severity=severity,
            category=CATEGORIES.get(id[3], "other"),
            rationale=rationale.strip(),
            fix=fix,
            check=lambda ctx: fn(ctx, holder["rule"]),
        )
        holder["rule"] = r
        REGISTRY[id] = r
        return r

    return register


def load_all() -> dict[str, Rule]:
    """Import every rule module so that each registers itself."""
    import importlib
    import pkgutil

    import tfbackend.rules as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("registry", "examples", "pages"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return REGISTRY


def unknown_rule_ids(ids: list[str] | tuple[str, ...]) -> list[str]:
    """The ids (or prefixes) that name no rule: `TFB2` names every tensor-parallel rule,
    `TFB299` names none."""
    if not ids:
        return []
    rules = load_all()
    return [i for i in ids if not any(r.startswith(i.strip().upper()) for r in rules)]


def check_rule_ids(flag: str, ids: list[str]) -> None:
    """`--select`/`--ignore`: an id that names no rule would silently run (or skip) nothing."""
    unknown = unknown_rule_ids(ids)
    if unknown:
        from tfbackend.errors import UserError

        raise UserError(
            f"{flag} {unknown[0]}: no rule has that id or prefix (see `tfbackend rules`)"
        )


def selected(rule_id: str, select: list[str] | None, ignore: list[str] | None) -> bool:
    """`--select`/`--ignore` by id or prefix (TFB2 selects every tensor-parallel rule)."""
    if select and not any(rule_id.startswith(s) for s in select):
        return False
    return not (ignore and any(rule_id.startswith(s) for s in ignore))


def run_rules(
    ctx: RuleContext, *, select: list[str] | None = None, ignore: list[str] | None = None
) -> list[Finding]:
    findings: list[Finding] = []
    for rule_id in sorted(load_all()):
        if not selected(rule_id, select, ignore):
            continue
        findings.extend(_checked(REGISTRY[rule_id], ctx))
    return findings


def _checked(r: Rule, ctx: RuleContext) -> Iterator[Finding]:
    yield from r.check(ctx) or ()
