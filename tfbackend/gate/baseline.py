"""Compare a gate with a previous one (`--baseline previous.json`, a file written by `gate --json`).

What got worse is a regression; what was already there is known. Models are matched by name (id, and
`@revision` when pinned), checks by (tp, pp), findings by rule id:
- verdict: the model's verdict is worse than in the baseline (PASS → PASS WITH WARNINGS → FAIL);
- finding: an error finding whose rule id the baseline did not have for this model at this tp/pp;
- run: a run that passed in the baseline now fails;
- metric: a parity metric moved in its bad direction beyond tolerance: an error size (KL, |Δlogit|)
  grew by more than max(abs_tol, rel_tol × |old|); a rate (top-1 agreement, top-k containment) fell
  by more than rate_tol, absolute (rates live in [0, 1], where 10% relative is a lot).
A model the baseline does not have is new: its expectation gates it; nothing in it is a regression.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfbackend.errors import UserError
from tfbackend.gate.result import (
    RUN_FAILED,
    RUN_PASSED,
    Change,
    GateReport,
    GateResult,
    verdict_rank,
)
from tfbackend.rules.findings import Verdict

REL_TOL = 0.25  # parity metrics of random-weight tiny models wobble run to run; judge big moves
ABS_TOL = 1e-4
RATE_TOL = 0.02  # e.g. one position in 50 losing its top-1 agreement
# metrics where a larger value is better; every other metric (KL, |Δlogit|, …) is better smaller
_HIGHER_IS_BETTER = ("agree", "contain", "match", "accuracy", "top1", "top_1")

Layout = tuple[int, int]


class BaselineError(UserError):
    """The baseline file is missing or is not a gate JSON report."""


@dataclass
class BaselineModel:
    name: str
    verdict: Verdict | None  # None: the model errored then
    errors: dict[Layout, set[str]] = field(default_factory=dict)  # rule ids of error findings
    runs: dict[Layout, str] = field(default_factory=dict)
    metrics: dict[Layout, dict[str, float]] = field(default_factory=dict)


@dataclass
class Baseline:
    path: str
    models: dict[str, BaselineModel]


def load_baseline(path: str | Path) -> Baseline:
    from tfbackend.userfiles import read_text

    p = Path(path)
    if not p.exists():
        raise BaselineError(f"no such baseline: {p} (write one with `tfbackend gate ... --json`)")
    try:
        data = json.loads(read_text(p, "baseline", error=BaselineError))
    except (ValueError, RecursionError) as exc:
        raise BaselineError(f"cannot read baseline {p}: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != "gate" or "models" not in data:
        raise BaselineError(f"{p} is not a gate report: write one with `tfbackend gate ... --json`")
    try:
        models = [_model(m) for m in data["models"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise BaselineError(f"{p}: malformed gate report ({exc!r})") from None
    return Baseline(path=str(p), models={m.name: m for m in models})


def _model(raw: dict[str, Any]) -> BaselineModel:
    verdict = raw.get("verdict")
    out = BaselineModel(
        name=raw["name"],
        verdict=Verdict(verdict) if verdict in Verdict._value2member_map_ else None,
    )
    for c in raw.get("checks", []):
        report = c.get("report") or {}
        out.errors[(c["tp"], c["pp"])] = {
            f["rule_id"] for f in report.get("findings", []) if f.get("severity") == "error"
        }
    for r in raw.get("runs", []):
        key = (r["tp"], r["pp"])
        out.runs[key] = r.get("status", "")
        out.metrics[key] = {k: float(v) for k, v in (r.get("metrics") or {}).items()}
    return out


def apply_baseline(
    report: GateReport, baseline: Baseline, *, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL
) -> GateReport:
    """Fill each result's `regressions` and `known`; the gate fails on any regression."""
    report.baseline = baseline.path
    for result in report.results:
        old = baseline.models.get(result.name)
        if old is None:
            continue
        result.baseline_verdict = old.verdict.value if old.verdict else "ERROR"
        _compare(result, old, rel_tol, abs_tol)
    return report


def _compare(result: GateResult, old: BaselineModel, rel_tol: float, abs_tol: float) -> None:
    name = result.name
    now = result.verdict
    if now is not None and old.verdict is not None:
        change = Change("verdict", name, f"verdict {old.verdict.value} → {now.value}")
        if verdict_rank(now) > verdict_rank(old.verdict):
            result.regressions.append(change)
        elif now is old.verdict and now is not Verdict.PASS:
            result.known.append(change)
    for check, finding in result.error_findings():
        key = (check.tp, check.pp)
        if key not in old.errors:
            continue  # a layout the baseline did not check: new, not worse
        change = Change(
            "finding",
            name,
            f"{finding.rule_id}: {finding.message}",
            tp=check.tp,
            pp=check.pp,
            rule_id=finding.rule_id,
        )
        if finding.rule_id in old.errors[key]:
            result.known.append(change)
        else:
            result.regressions.append(change)
    for run in result.runs:
        key = (run.tp, run.pp)
        if run.status == RUN_FAILED and old.runs.get(key) == RUN_PASSED:
            result.regressions.append(
                Change("run", name, "parity run passed in the baseline, fails now", run.tp, run.pp)
            )
        for metric, value in sorted(run.metrics.items()):
            before = old.metrics.get(key, {}).get(metric)
            if before is None:
                continue
            if _higher_is_better(metric):
                worse, allowed, tol = before - value, RATE_TOL, f"{RATE_TOL:g} absolute"
            else:
                worse, allowed = value - before, max(abs_tol, rel_tol * abs(before))
                tol = f"{rel_tol:.0%} or {abs_tol:g}"
            if worse > allowed:
                message = f"{metric} {before:.3g} → {value:.3g} (tolerance {tol})"
                result.regressions.append(Change("metric", name, message, run.tp, run.pp))


def _higher_is_better(metric: str) -> bool:
    leaf = metric.rsplit(".", 1)[-1].lower()
    return any(word in leaf for word in _HIGHER_IS_BETTER)
