"""`tfbackend gate`: many tiny local models with mixed outcomes, one process, exit codes, baselines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gate_models import MIXED_MANIFEST, make_models
from typer.testing import CliRunner

from tfbackend.check import CheckOptions, check
from tfbackend.cli.app import app
from tfbackend.gate.baseline import BaselineError, apply_baseline, load_baseline
from tfbackend.gate.manifest import load_manifest
from tfbackend.gate.result import RUN_PASSED, RunOutcome
from tfbackend.gate.runner import ENGINE_UNAVAILABLE, GateOptions, parity_engine, run_gate
from tfbackend.report.markdown import gate_markdown
from tfbackend.rules.findings import Verdict

ROOT = Path(__file__).resolve().parents[1]
QUIET = GateOptions(progress=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gate")
    make_models(root)
    (root / "models.toml").write_text(MIXED_MANIFEST)
    return root


def manifest(root: Path, text: str, name: str = "m.toml"):
    (root / name).write_text(text)
    return load_manifest(root / name)


def gate(root: Path, text: str, name: str = "m.toml", **options):
    return run_gate(manifest(root, text, name), GateOptions(progress=False, **options))


@pytest.fixture(scope="module")
def cli_run(models):
    """The real command, once, in its own process (the way CI calls it)."""
    out = models / "out"
    cmd = [sys.executable, "-m", "tfbackend", "gate", str(models / "models.toml"), "--no-progress"]
    cmd += ["--junit", str(out / "gate.xml"), "--markdown", str(out / "gate.md")]
    cmd += ["--json", str(out / "gate.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, out


def test_a_model_missing_its_expectation_makes_the_gate_exit_1(cli_run):
    proc, _ = cli_run
    assert proc.returncode == 1, proc.stderr
    assert "tiny-nemotron" in proc.stdout and "missed" in proc.stdout
    assert "TFB201" in proc.stdout  # the finding that made it miss is printed
    assert "2 of 3 models met their expectation" in proc.stdout


def test_gate_json_holds_every_check_in_the_check_report_schema(cli_run):
    _, out = cli_run
    data = json.loads((out / "gate.json").read_text())
    assert data["kind"] == "gate" and data["exit_code"] == 1 and not data["passed"]
    by_name = {m["name"]: m for m in data["models"]}
    assert [(c["tp"], c["pp"]) for c in by_name["tiny-llama"]["checks"]] == [(1, 1), (2, 1)]
    opt = by_name["tiny-nemotron"]
    assert (opt["verdict"], opt["expected"], opt["status"]) == ("FAIL", "pass", "missed")
    (report,) = [c["report"] for c in opt["checks"]]
    assert report["profile"]["name"] == "vllm-0.11"
    errors = [(f["rule_id"], f["severity"]) for f in report["findings"] if f["severity"] == "error"]
    assert errors == [("TFB201", "error")]
    mx = by_name["tiny-mxfp4"]
    assert mx["met"] and mx["runs"][0]["status"] == "skipped"
    assert "pass --run" in mx["runs"][0]["message"]


def test_markdown_summary_names_every_model_and_the_miss(cli_run):
    _, out = cli_run
    md = (out / "gate.md").read_text()
    for name in ("tiny-llama", "tiny-nemotron", "tiny-mxfp4"):
        assert f"`{name}`" in md
    assert md.startswith("## tfbackend gate: ❌ 1 of 3 models missed their expectation")
    assert "| `tiny-nemotron` | tp=2 pp=1 | ❌ FAIL | pass | ❌ missed |" in md
    assert "TFB601" in md and "TFB201" in md
    # the model that needs a look comes first among the findings
    assert md.index("<code>tiny-nemotron</code>") < md.index("<code>tiny-llama</code>")


def test_gate_verdict_is_exactly_what_check_says(models):
    report = gate(
        models, '[[models]]\nid = "tiny-nemotron"\ntp = [1, 2]\nexpected = "pass-with-warnings"\n'
    )
    for outcome in report.results[0].checks:
        alone = check(str(models / "tiny-nemotron"), CheckOptions(tp=outcome.tp))
        assert outcome.report.to_dict() == alone.to_dict()


def test_all_expectations_met_exits_0(models):
    report = gate(
        models,
        '[[models]]\nid = "tiny-llama"\ntp = [1, 2]\npp = [1, 2]\nexpected = "pass"\n'
        '[[models]]\nid = "tiny-nemotron"\ntp = 2\nexpected = "pass-with-warnings"\n'
        '[[models]]\nid = "tiny-nemotron"\nrevision = "other"\nignore = ["TFB2"]\ntp = 2\n'
        'expected = "pass"\n',
    )
    assert [r.status for r in report.results] == ["met", "met", "met"]
    assert len(report.results[0].checks) == 4
    assert report.exit_code == 0


def test_strict_turns_warnings_into_a_fail(models):
    report = gate(
        models, '[[models]]\nid = "tiny-nemotron"\ntp = 2\nstrict = true\nexpected = "fail"\n'
    )
    assert report.results[0].verdict is Verdict.FAIL and report.exit_code == 0


def test_better_than_expected_is_a_miss_so_the_manifest_stays_true(models):
    report = gate(models, '[[models]]\nid = "tiny-llama"\nexpected = "fail"\n')
    assert report.results[0].status == "better than expected"
    assert report.exit_code == 1


def test_a_model_that_cannot_be_checked_is_an_error_not_a_crash(models):
    report = gate(
        models,
        '[[models]]\nid = "./no-such-model"\nexpected = "pass"\n'
        '[[models]]\nid = "tiny-llama"\nexpected = "pass"\n',
    )
    broken, fine = report.results
    assert broken.status == "error" and broken.verdict is None
    assert "no such file or folder" in broken.checks[0].error
    assert fine.status == "met"
    assert report.exit_code == 2  # only bad input: exit 2, as for check


def test_run_is_skipped_unless_asked_and_says_why_when_no_engine(models):
    text = '[[models]]\nid = "tiny-llama"\ntp = [1, 2]\nrun = true\ngpus = 1\nexpected = "pass"\n'
    report = gate(models, text)
    assert [r.message for r in report.results[0].runs] == ["run not requested (pass --run)"] * 2
    if parity_engine() is not None:
        pytest.skip("the parity engine is installed in this build")
    report = gate(models, text, run=True)
    assert [r.message for r in report.results[0].runs] == [ENGINE_UNAVAILABLE] * 2
    assert report.exit_code == 0  # a skipped run does not change the verdict


# -- baselines ----------------------------------------------------------------------------------


def baseline_of(report, path: Path):
    path.write_text(json.dumps(report.to_dict()))
    return load_baseline(path)


def test_unchanged_gate_has_no_regressions_and_lists_what_is_known(models, tmp_path):
    before = gate(models, MIXED_MANIFEST)
    now = apply_baseline(gate(models, MIXED_MANIFEST), baseline_of(before, tmp_path / "b.json"))
    assert now.regressions == []
    known = {(c.model, c.kind, c.rule_id) for r in now.results for c in r.known}
    assert ("tiny-mxfp4", "finding", "TFB601") in known
    assert ("tiny-nemotron", "finding", "TFB201") in known
    assert now.exit_code == 1  # still: opt misses its expectation


def test_injected_regression_is_caught_and_kept_apart_from_known_problems(models, tmp_path):
    before = gate(models, MIXED_MANIFEST).to_dict()
    # inject: in the baseline, the mxfp4 model passed with no findings
    mx = next(m for m in before["models"] if m["name"] == "tiny-mxfp4")
    mx["verdict"] = "PASS"
    mx["checks"][0]["report"]["findings"] = []
    (tmp_path / "b.json").write_text(json.dumps(before))

    now = apply_baseline(gate(models, MIXED_MANIFEST), load_baseline(tmp_path / "b.json"))
    regressions = {(c.model, c.kind, c.rule_id, c.tp, c.pp) for c in now.regressions}
    assert regressions == {
        ("tiny-mxfp4", "verdict", None, None, None),
        ("tiny-mxfp4", "finding", "TFB601", 1, 1),
    }
    opt = next(r for r in now.results if r.name == "tiny-nemotron")
    assert opt.regressions == [] and opt.known  # known, not worse
    assert now.exit_code == 1
    md = gate_markdown(now)
    assert md.index("### Regressions") < md.index("### Models")
    assert "| `tiny-mxfp4` | tp=1 pp=1 | finding | TFB601:" in md


def test_a_new_error_from_a_profile_change_is_a_regression_even_when_expected(models, tmp_path):
    before = gate(
        models, '[[models]]\nid = "tiny-nemotron"\ntp = 2\nexpected = "pass-with-warnings"\n'
    )
    now = gate(
        models,
        '[[models]]\nid = "tiny-nemotron"\ntp = 2\nvllm_version = "0.11"\nexpected = "fail"\n',
    )
    apply_baseline(now, baseline_of(before, tmp_path / "b.json"))
    assert now.results[0].met
    assert {c.kind for c in now.regressions} == {"verdict", "finding"}
    assert now.exit_code == 1


def test_parity_metrics_that_moved_beyond_tolerance_are_regressions(models, tmp_path):
    text = '[[models]]\nid = "tiny-llama"\nrun = true\nexpected = "pass"\n'
    before = gate(models, text)
    before.results[0].runs = [
        RunOutcome(1, 1, RUN_PASSED, metrics={"kl_max": 1e-3, "top1_agreement": 1.0, "d": 0.5})
    ]
    now = gate(models, text)
    now.results[0].runs = [
        RunOutcome(1, 1, RUN_PASSED, metrics={"kl_max": 5e-3, "top1_agreement": 0.9, "d": 0.55})
    ]
    apply_baseline(now, baseline_of(before, tmp_path / "b.json"))
    moved = sorted(c.message.split()[0] for c in now.regressions)
    assert moved == ["kl_max", "top1_agreement"]  # d moved 10%: within the 25% tolerance


def test_gate_cli_with_baseline_reports_no_regressions_for_the_same_models(models, tmp_path):
    runner = CliRunner()
    first = runner.invoke(
        app,
        ["gate", str(models / "models.toml"), "--no-progress", "--json", str(tmp_path / "b.json")],
    )
    assert first.exit_code == 1
    again = runner.invoke(
        app,
        [
            "gate",
            str(models / "models.toml"),
            "--no-progress",
            "--baseline",
            str(tmp_path / "b.json"),
        ],
    )
    assert again.exit_code == 1
    assert "No regressions vs" in again.stdout


def test_a_baseline_that_is_not_a_gate_report_is_bad_input(models, tmp_path):
    (tmp_path / "check.json").write_text('{"verdict": "PASS"}')
    with pytest.raises(BaselineError, match="not a gate report"):
        load_baseline(tmp_path / "check.json")
    result = CliRunner().invoke(
        app, ["gate", str(models / "models.toml"), "--baseline", str(tmp_path / "nope.json")]
    )
    assert result.exit_code == 2 and "no such baseline" in result.stderr


@pytest.mark.slow
def test_gate_run_proves_parity_with_the_native_engine_on_cpu(tmp_path, monkeypatch):
    from _run_models import write_model

    monkeypatch.setenv("TFBACKEND_START_METHOD", "forkserver")
    write_model("llama", tmp_path / "weights-llama")
    text = '[[models]]\nid = "weights-llama"\ntp = 2\nrun = true\ngpus = 2\nexpected = "pass"\n'
    report = gate(tmp_path, text, run=True, device="cpu")
    (outcome,) = report.results[0].runs
    assert outcome.status == RUN_PASSED, outcome.message
    assert outcome.metrics["top1_agreement"] == 1.0 and outcome.metrics["kl_max"] < 1e-6
