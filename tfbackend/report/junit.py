"""JUnit XML for CI test views (GitHub test reporters, GitLab, Jenkins).

Shape (the common JUnit schema those tools read): <testsuites> → one <testsuite> per model → one
<testcase> per tp/pp check, per rule that fired, per parity run, and, for the gate, one for the
model's expectation (and one for the baseline when given). Every testcase has name, classname and
time; <failure>/<error>/<skipped> carry message and type.

How findings map, chosen for what those tools display:
- error finding → <failure type="TFB201"> (red in every tool). When the model is *expected* to fail
  and does, it is <skipped type="xfail"> instead, as pytest reports an expected failure, so a known
  broken model does not paint CI red; a regression against the baseline is always a <failure>.
- warning finding → a passing testcase whose <system-out> holds the message and fix: it does not
  fail the build, and all three tools show system-out on the testcase page. (<skipped> would count
  it among skipped tests, which reads as "not checked".)
- info findings → listed in the check testcase's <system-out>, not testcases of their own.
- a model that could not be checked (bad source, network) → <error> on its check testcase.
classname is `tfbackend.<command>.<model>` with dots in the model name turned into `_`, because
Jenkins splits classname at its last dot into package and class.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from tfbackend.rules.findings import Finding, Severity, Verdict


def check_junit(report, name: str | None = None) -> str:
    """One check (`tfbackend check --junit`): one testsuite, failures for error findings."""
    name = name or report.summary.source
    suite = _Suite(name, _classname("check", name))
    layout = f"tp={report.tp} pp={report.pp}"
    case = suite.case(f"check {layout}")
    if report.verdict is Verdict.FAIL:
        errors = [f for f in report.findings if f.severity is Severity.ERROR]
        why = _count(errors, "error finding") if errors else "warnings fail under --strict"
        _sub(case, "failure", f"FAIL: {why}", "CheckFailed", _lines(report.findings))
    _out(case, _verdict_text(report.verdict.value, report.findings))
    for f in report.findings:
        if f.severity is not Severity.INFO:
            _finding_case(suite, f, layout, regression=False, expected_failure=False)
    return _document("tfbackend check", [suite])


def gate_junit(report) -> str:
    """A whole gate (`tfbackend gate --junit`): one testsuite per model."""
    return _document("tfbackend gate", [_gate_suite(result, report) for result in report.results])


def _gate_suite(result, report) -> _Suite:
    suite = _Suite(result.name, _classname("gate", result.name))
    expected = result.expected
    expected_failure = result.met and expected is Verdict.FAIL
    regressed = {(c.rule_id, c.tp, c.pp) for c in result.regressions if c.kind == "finding"}

    label = result.model.expected_label
    case = suite.case(f"expected {label}")
    if not result.met:
        got = result.verdict.value if result.verdict else "ERROR (not checked)"
        hint = " (better than expected: update the manifest)" if result.status != "missed" else ""
        _sub(case, "failure", f"expected {label}, got {got}{hint}", "ExpectationMissed")

    for check in result.checks:
        case = suite.case(f"check {check.layout}", check.seconds)
        if check.error:
            _sub(case, "error", check.error, check.error_type or "Error")
            continue
        verdict = check.verdict
        if _rank(verdict) > _rank(expected):
            _sub(case, "failure", f"expected {label}, got {verdict.value}", "CheckFailed")
        elif verdict is Verdict.FAIL:
            _sub(case, "skipped", "expected to fail, and fails", "xfail")
        _out(case, _verdict_text(verdict.value, check.findings))
        for f in check.findings:
            if f.severity is not Severity.INFO:
                key = (f.rule_id, check.tp, check.pp)
                _finding_case(suite, f, check.layout, key in regressed, expected_failure)

    for run in result.runs:
        case = suite.case(f"run {run.layout}", run.seconds)
        kind = {"failed": "failure", "skipped": "skipped", "error": "error"}.get(run.status)
        if kind:
            _sub(case, kind, run.message, {"failure": "ParityMismatch"}.get(kind, kind))
        if run.metrics:
            _out(case, "\n".join(f"{k} = {v:.6g}" for k, v in sorted(run.metrics.items())))

    if report.baseline:
        case = suite.case("no regressions vs baseline")
        if result.regressions:
            lines = [
                f"{c.kind}: {c.layout} {c.message}".replace("  ", " ") for c in result.regressions
            ]
            _sub(case, "failure", _count(result.regressions, "regression"), "Regression", lines)
        if result.known:
            _out(case, "known in the baseline:\n" + "\n".join(c.message for c in result.known))
    return suite


def _finding_case(suite, f: Finding, layout: str, regression: bool, expected_failure: bool) -> None:
    case = suite.case(f"{f.rule_id} {f.title} [{layout}]")
    detail = _finding_lines(f)
    if f.severity is Severity.ERROR:
        if regression:
            _sub(case, "failure", f"regression: {f.message}", f.rule_id, detail)
        elif expected_failure:
            _sub(case, "skipped", f"expected failure: {f.message}", "xfail")
        else:
            _sub(case, "failure", f.message, f.rule_id, detail)
    else:
        _out(case, "\n".join([f"{f.severity.value}: {f.message}", *detail[1:]]))


# -- XML building -------------------------------------------------------------------------------


class _Suite:
    def __init__(self, name: str, classname: str) -> None:
        self.element = ET.Element("testsuite", name=name)
        self.classname = classname
        self.time = 0.0

    def case(self, name: str, seconds: float = 0.0) -> ET.Element:
        self.time += seconds
        return ET.SubElement(
            self.element, "testcase", name=name, classname=self.classname, time=f"{seconds:.3f}"
        )

    def finish(self) -> ET.Element:
        cases = self.element.findall("testcase")
        counts = {
            "tests": len(cases),
            "failures": sum(c.find("failure") is not None for c in cases),
            "errors": sum(c.find("error") is not None for c in cases),
            "skipped": sum(c.find("skipped") is not None for c in cases),
        }
        for key, value in counts.items():
            self.element.set(key, str(value))
        self.element.set("time", f"{self.time:.3f}")
        return self.element


def _document(name: str, suites: list[_Suite]) -> str:
    root = ET.Element("testsuites", name=name)
    elements = [s.finish() for s in suites]
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(sum(int(e.get(key)) for e in elements)))
    root.set("time", f"{sum(s.time for s in suites):.3f}")
    root.extend(elements)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _sub(case: ET.Element, tag: str, message: str, type_: str, lines: Iterable[str] = ()) -> None:
    el = ET.SubElement(case, tag, message=message, type=type_)
    text = "\n".join(lines)
    if text:
        el.text = text


def _out(case: ET.Element, text: str) -> None:
    if text:
        ET.SubElement(case, "system-out").text = text


def _classname(command: str, name: str) -> str:
    return f"tfbackend.{command}.{name.replace('.', '_')}"


def _finding_lines(f: Finding) -> list[str]:
    lines = [f"{f.rule_id} {f.severity.value}: {f.message}", f"fix: {f.fix}"]
    if f.modules:
        lines.append(
            "modules: " + ", ".join(f.modules[:10]) + (" …" if len(f.modules) > 10 else "")
        )
    return lines


def _lines(findings: list[Finding]) -> list[str]:
    return [f"{f.rule_id}: {f.message}" for f in findings]


def _verdict_text(verdict: str, findings: list[Finding]) -> str:
    return "\n".join(
        [f"verdict: {verdict}"] + [f"{f.rule_id} {f.severity.value}: {f.message}" for f in findings]
    )


def _count(items: list, what: str) -> str:
    return f"{len(items)} {what}{'' if len(items) == 1 else 's'}"


def _rank(v: Verdict) -> int:
    return {Verdict.PASS: 0, Verdict.PASS_WITH_WARNINGS: 1, Verdict.FAIL: 2}[v]
