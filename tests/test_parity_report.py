"""reports/parity.*: vLLM's saved scores re-judged here, without vLLM, on every CI machine.

Each run the report calls *matches* or *diverges* must be what tfbackend's verdict says of the
saved scores today, and the confusion matrix must follow from the runs it lists.
"""

from __future__ import annotations

import json
import math
import sys
import tarfile
from pathlib import Path

import pytest

from tfbackend.parity.scores import load_scores, rejudge
from tfbackend.parity.verdict import judge, thresholds_for

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "parity.json"
BUNDLE = ROOT / "reports" / "parity-scores.tar.gz"
sys.path.insert(0, str(ROOT / "scripts"))

pytestmark = pytest.mark.skipif(not REPORT.is_file(), reason="no parity report recorded yet")


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    out = {}
    folder = tmp_path_factory.mktemp("scores")
    with tarfile.open(BUNDLE) as tar:
        for member in tar.getmembers():
            path = folder / Path(member.name).name
            path.write_bytes(tar.extractfile(member).read())
            out[member.name] = load_scores(path)
    return out


def test_every_compared_run_has_its_scores(report, scores):
    compared = [
        f"{r['model_type']}-tp{r['tp']}.safetensors"
        for r in report["runs"]
        if (r.get("vllm") or {}).get("outcome") in ("matches", "diverges")
    ]
    assert compared, "the report compares no run"
    missing = sorted(set(compared) - set(scores))
    assert not missing, missing


def test_saved_scores_rejudge_to_the_recorded_outcome(report, scores):
    th = thresholds_for("float32")
    wrong = []
    for r in report["runs"]:
        v = r.get("vllm") or {}
        name = f"{r['model_type']}-tp{r['tp']}.safetensors"
        if v.get("outcome") not in ("matches", "diverges") or name not in scores:
            continue
        prompts, meta = scores[name]
        assert meta["engine"] == "vllm" and meta["tp"] == r["tp"]
        recorded = {p["name"]: p for p in v["prompts"]}
        failures = {}
        for pname, s in prompts.items():
            m = rejudge(pname, s)
            rec = recorded[pname]
            why = judge(m, th)
            if why:
                failures[pname] = why
            if rec["kl_mean"] is not None and math.isnan(rec["kl_mean"]):
                # NaN rows (vLLM's CPU kernels reading past a shard): top-k order among NaNs is
                # not defined, so only the outcome is re-judged
                continue
            assert m.top1_agreement == pytest.approx(rec["top1_agreement"], nan_ok=True), (
                name,
                pname,
            )
            assert m.max_dlogprob_topk == pytest.approx(
                rec["max_dlogprob_topk"], rel=1e-4, abs=1e-7, nan_ok=True
            ), (name, pname)
        outcome = "diverges" if failures else "matches"
        if outcome != v["outcome"]:
            wrong.append((name, v["outcome"], outcome, failures))
    assert not wrong, wrong


def test_the_matrix_follows_from_the_runs(report):
    from parity_report import CELLS, cell

    by_cell = {c: {} for c in CELLS}
    for r in report["runs"]:
        assert r["cell"] == cell(r), r["model_type"]
        by_cell[r["cell"]].setdefault(str(r["tp"]), []).append(r["model_type"])
    got = {c: {tp: sorted(v) for tp, v in d.items()} for c, d in by_cell.items()}
    assert got == report["matrix"]


def test_the_markdown_shows_the_same_counts(report):
    md = (ROOT / "reports" / "parity.md").read_text()
    tps = sorted({int(tp) for d in report["matrix"].values() for tp in d})
    for c, d in report["matrix"].items():
        counts = " | ".join(str(len(d.get(str(t), []))) for t in tps)
        assert f"| {c} | {counts} |" in md, c
