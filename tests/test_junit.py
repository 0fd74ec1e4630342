"""JUnit XML and Markdown for CI: parsed back and checked against the JUnit shape CI tools read."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from gate_models import MIXED_MANIFEST, make_models
from typer.testing import CliRunner

from tfbackend.cli.app import app
from tfbackend.gate.baseline import apply_baseline, load_baseline
from tfbackend.gate.manifest import load_manifest
from tfbackend.gate.runner import GateOptions, run_gate
from tfbackend.report.junit import gate_junit

OUTCOMES = ("failure", "error", "skipped")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("junit")
    make_models(root)
    return root


def gate_xml(root: Path, text: str, baseline: Path | None = None) -> ET.Element:
    (root / "m.toml").write_text(text)
    report = run_gate(load_manifest(root / "m.toml"), GateOptions(progress=False))
    if baseline:
        apply_baseline(report, load_baseline(baseline))
    return parse(gate_junit(report))


def parse(xml: str) -> ET.Element:
    root = ET.fromstring(xml)
    assert_junit_shape(root)
    return root


def assert_junit_shape(root: ET.Element) -> None:
    """The common JUnit schema: testsuites/testsuite/testcase, counts that add up, required attrs."""
    assert root.tag == "testsuites"
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in root:
        assert suite.tag == "testsuite" and suite.get("name")
        cases = list(suite)
        assert all(c.tag == "testcase" for c in cases)
        counts = {
            "tests": len(cases),
            "failures": sum(c.find("failure") is not None for c in cases),
            "errors": sum(c.find("error") is not None for c in cases),
            "skipped": sum(c.find("skipped") is not None for c in cases),
        }
        for key, value in counts.items():
            assert int(suite.get(key)) == value, (suite.get("name"), key)
            totals[key] += value
        float(suite.get("time"))
        for case in cases:
            assert case.get("name") and case.get("classname")
            float(case.get("time"))
            outcomes = [child for child in case if child.tag in OUTCOMES]
            assert len(outcomes) <= 1
            for child in outcomes:
                assert child.get("message") and child.get("type")
            assert {child.tag for child in case} <= {*OUTCOMES, "system-out"}
    for key, value in totals.items():
        assert int(root.get(key)) == value


def suite_of(root: ET.Element, name: str) -> dict[str, ET.Element]:
    (suite,) = [s for s in root if s.get("name") == name]
    return {c.get("name"): c for c in suite}


def test_one_suite_per_model_one_case_per_check_and_per_rule(models):
    root = gate_xml(models, MIXED_MANIFEST)
    assert [s.get("name") for s in root] == ["tiny-llama", "tiny-nemotron", "tiny-mxfp4"]
    llama = suite_of(root, "tiny-llama")
    assert set(llama) == {"expected pass", "check tp=1 pp=1", "check tp=2 pp=1"}
    assert all(c.find("failure") is None for c in llama.values())
    assert {c.get("classname") for c in llama.values()} == {"tfbackend.gate.tiny-llama"}


def test_a_missed_expectation_and_its_error_rule_are_failures(models):
    opt = suite_of(gate_xml(models, MIXED_MANIFEST), "tiny-nemotron")
    failure = opt["expected pass"].find("failure")
    assert failure.get("type") == "ExpectationMissed"
    assert failure.get("message") == "expected pass, got FAIL"
    rule = opt["TFB201 No tp_plan with tp > 1 [tp=2 pp=1]"].find("failure")
    assert rule.get("type") == "TFB201"
    assert "no tp_plan and tp=2" in rule.get("message")
    assert "fix: add base_model_tp_plan" in rule.text


def test_an_expected_failure_is_skipped_as_xfail_not_red(models):
    mx = suite_of(gate_xml(models, MIXED_MANIFEST), "tiny-mxfp4")
    assert mx["expected fail"].find("failure") is None
    rule = mx["TFB601 Quantization method refused by the backend [tp=1 pp=1]"]
    assert rule.find("skipped").get("type") == "xfail"
    assert mx["run tp=1 pp=1"].find("skipped").get("message") == "run not requested (pass --run)"


def test_a_warning_is_a_passing_case_with_its_message_in_system_out(models):
    root = gate_xml(
        models, '[[models]]\nid = "tiny-nemotron"\ntp = 2\nexpected = "pass-with-warnings"\n'
    )
    case = suite_of(root, "tiny-nemotron")["TFB201 No tp_plan with tp > 1 [tp=2 pp=1]"]
    assert [child.tag for child in case] == ["system-out"]
    assert case.find("system-out").text.startswith("warning: NemotronModel has no tp_plan")


def test_a_model_that_cannot_be_checked_is_an_error(models):
    root = gate_xml(models, '[[models]]\nid = "./missing"\nexpected = "pass"\n')
    error = suite_of(root, "./missing")["check tp=1 pp=1"].find("error")
    assert error.get("type") == "SourceError" and "no such file" in error.get("message")


def test_a_regression_is_a_failure_even_for_a_model_expected_to_fail(models, tmp_path):
    before = '[[models]]\nid = "tiny-nemotron"\ntp = 2\nexpected = "pass-with-warnings"\n'
    (models / "b.toml").write_text(before)
    report = run_gate(load_manifest(models / "b.toml"), GateOptions(progress=False))
    (tmp_path / "b.json").write_text(json.dumps(report.to_dict()))
    root = gate_xml(
        models,
        '[[models]]\nid = "tiny-nemotron"\ntp = 2\nvllm_version = "0.11"\nexpected = "fail"\n',
        baseline=tmp_path / "b.json",
    )
    cases = suite_of(root, "tiny-nemotron")
    rule = cases["TFB201 No tp_plan with tp > 1 [tp=2 pp=1]"].find("failure")
    assert rule.get("message").startswith("regression: ")
    summary = cases["no regressions vs baseline"].find("failure")
    assert summary.get("type") == "Regression" and summary.get("message") == "2 regressions"


def test_check_writes_junit_markdown_and_json_file_and_keeps_json_on_stdout(models, tmp_path):
    out = tmp_path / "reports"
    args = ["check", str(models / "tiny-mxfp4"), "--json", "--json-file", str(out / "c.json")]
    args += ["--junit", str(out / "c.xml"), "--markdown", str(out / "c.md")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert json.loads(result.stdout) == json.loads((out / "c.json").read_text())
    root = parse((out / "c.xml").read_text())
    (suite,) = root
    cases = {c.get("name"): c for c in suite}
    assert cases["check tp=1 pp=1"].find("failure").get("message") == "FAIL: 1 error finding"
    rule = cases["TFB601 Quantization method refused by the backend [tp=1 pp=1]"]
    assert rule.find("failure").get("type") == "TFB601"
    md = (out / "c.md").read_text()
    assert "❌ FAIL" in md and "| TFB601 | ❌ error |" in md


def test_markdown_for_github_step_summary_is_appended_not_overwritten(
    models, tmp_path, monkeypatch
):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = CliRunner().invoke(
        app, ["check", str(models / "tiny-llama"), "--markdown", str(summary)]
    )
    assert result.exit_code == 0
    text = summary.read_text()
    assert text.startswith("earlier step\n## tfbackend check:") and "✅ PASS" in text
