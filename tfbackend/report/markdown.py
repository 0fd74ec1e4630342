"""Markdown summaries fit for `$GITHUB_STEP_SUMMARY` (GitHub-flavoured: tables, <details>).

Order follows what a reviewer needs: regressions first, then the verdict table, then findings per
model with the models that missed their expectation on top.
"""

from __future__ import annotations

import html

from tfbackend.rules.findings import Finding, Severity, Verdict

ICON = {Verdict.PASS: "✅", Verdict.PASS_WITH_WARNINGS: "⚠️", Verdict.FAIL: "❌"}
SEVERITY_ICON = {Severity.ERROR: "❌ error", Severity.WARNING: "⚠️ warning", Severity.INFO: "ℹ️ info"}
STATUS = {
    "met": "✅ met",
    "missed": "❌ missed",
    "better than expected": "❌ better than expected (update the manifest)",
    "error": "💥 not checked",
}


def check_markdown(report, name: str | None = None) -> str:
    name = name or report.summary.source
    v = report.verdict
    out = [
        f"## tfbackend check: `{name}` — {ICON[v]} {v.value}",
        "",
        f"tp={report.tp} pp={report.pp} · profile `{report.profile}` · "
        f"{report.summary.architecture or report.summary.model_class}",
        "",
    ]
    out += _findings_table(report.findings) or ["No findings."]
    return "\n".join(out) + "\n"


def gate_markdown(report) -> str:
    results = report.results
    missed = report.missed
    if report.passed:
        head = f"✅ all {len(results)} models met their expectation"
    else:
        parts = []
        if missed:
            parts.append(f"{len(missed)} of {len(results)} models missed their expectation")
        if report.regressions:
            parts.append(_plural(len(report.regressions), "regression"))
        head = "❌ " + ", ".join(parts)
    out = [f"## tfbackend gate: {head}", ""]
    out.append(
        f"Manifest `{report.manifest}` · {sum(len(r.checks) for r in results)} checks"
        + (f" · {sum(len(r.runs) for r in results)} runs" if report.ran else "")
        + f" · {report.seconds:.1f} s"
        + "".join(f" · {k} {v}" for k, v in sorted(report.versions.items()) if v)
    )
    out.append("")

    if report.baseline:
        out += [f"### Regressions vs `{report.baseline}`", ""]
        if report.regressions:
            out += ["| Model | Layout | Kind | What got worse |", "|---|---|---|---|"]
            out += [
                f"| `{_cell(c.model)}` | {c.layout or '—'} | {c.kind} | {_cell(c.message)} |"
                for c in report.regressions
            ]
        else:
            out.append("None: nothing got worse.")
        known = sum(len(r.known) for r in results)
        if known:
            out += [
                "",
                f"{_plural(known, 'known problem')} already in the baseline (not regressions).",
            ]
        out.append("")

    out += [
        "### Models",
        "",
        "| Model | Layouts | Verdict | Expected | Result |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        v = r.verdict
        verdict = f"{ICON[v]} {v.value}" if v else "💥 ERROR"
        layouts = ", ".join(c.layout for c in r.checks)
        if r.regressions:
            layouts += " · **regressed**"
        out.append(
            f"| `{_cell(r.name)}` | {layouts} | {verdict} | {r.model.expected_label} | {STATUS[r.status]} |"
        )
    out.append("")

    out += ["### Findings per model", ""]
    for r in sorted(results, key=lambda r: (not r.regressions, r.met, r.model.index)):
        out += _model_section(r)
    return "\n".join(out).rstrip() + "\n"


def _model_section(r) -> list[str]:
    v = r.verdict
    # markdown does not render inside <summary>: use HTML there
    title = (
        f"<code>{html.escape(r.name)}</code> — {v.value if v else 'ERROR'} "
        f"(expected {r.model.expected_label})"
    )
    body: list[str] = []
    for c in r.checks:
        if c.error:
            body.append(f"- {c.layout}: could not check: {_cell(c.error)}")
    rows = [(c.layout, f) for c in r.checks for f in c.findings]
    if rows:
        body += ["| Rule | Severity | Layout | Message | Fix |", "|---|---|---|---|---|"]
        body += [
            f"| {f.rule_id} | {SEVERITY_ICON[f.severity]} | {layout} | {_cell(f.message)} | "
            f"{_cell(f.fix)} |"
            for layout, f in rows
        ]
    runs_started = False
    for run in r.runs:
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in sorted(run.metrics.items())[:6])
        if not runs_started:
            body.append("")
            runs_started = True
        body.append(
            f"- run {run.layout}: {run.status} — {_cell(run.message)}"
            + (f" ({metrics})" if metrics else "")
        )
    if not body:
        body = ["No findings."]
    # a model that needs attention is open; the rest fold away
    open_ = " open" if not r.met or r.regressions else ""
    return [f"<details{open_}><summary>{title}</summary>", "", *body, "", "</details>", ""]


def _findings_table(findings: list[Finding]) -> list[str]:
    if not findings:
        return []
    rows = ["| Rule | Severity | Message | Fix |", "|---|---|---|---|"]
    rows += [
        f"| {f.rule_id} | {SEVERITY_ICON[f.severity]} | {_cell(f.message)} | {_cell(f.fix)} |"
        for f in findings
    ]
    return rows


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
