"""`tfbackend run --device cpu`: real ranks (gloo), real checkpoints, logits against plain HF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._run_models import write_model, write_wrong_plan_model
from tfbackend.parity.runner import RunOptions, run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FAST = {"TFBACKEND_START_METHOD": "forkserver"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    os.environ.update(FAST)
    root = tmp_path_factory.mktemp("run")
    out = {k: write_model(k, root / k) for k in ("llama", "gemma3", "qwen3moe")}
    out["wrong"] = write_wrong_plan_model(root / "wrong")
    return out


def _opts(**kw) -> RunOptions:
    return RunOptions(**{"device": "cpu", "dtype": "float32", "timeout_s": 120, **kw})


@pytest.mark.parametrize(
    "kind,tp,pp",
    [
        ("llama", 2, 1),
        ("llama", 1, 2),
        ("llama", 2, 2),  # 4 ranks: tensor and pipeline parallel together
        ("gemma3", 2, 1),
        ("qwen3moe", 2, 1),
        ("qwen3moe", 1, 2),
        ("qwen3moe", 2, 2),
    ],
)
def test_wrapped_model_matches_reference(models, kind, tp, pp):
    report = run(str(models[kind]), _opts(tp=tp, pp=pp, max_prompts=2))
    assert report.verdict == "pass", report.failures
    assert all(m.top1_agreement == 1.0 for m in report.prompts)
    assert len(report.ranks) == tp * pp and all(r.shard_bytes > 0 for r in report.ranks)
    # Every rank reads its own slices, never the whole checkpoint.
    total = sum(f.stat().st_size for f in Path(models[kind]).glob("*.safetensors"))
    assert all(r.bytes_read < 0.8 * total for r in report.ranks)


def test_wrong_plan_fails_and_bisect_names_o_proj_of_layer_0(models):
    # vLLM 0.11's per-linear plan follows the tp_plan's colwise o_proj; 0.32's fused q/k/v makes
    # it rowwise whatever the tp_plan says (tests/test_run_plan.py)
    report = run(str(models["wrong"]), _opts(tp=2, bisect=True, max_prompts=1, vllm_version="0.11"))
    assert report.verdict == "fail" and report.exit_code == 1
    assert report.divergence.module == "model.layers.0.self_attn.o_proj"
    assert report.divergence.plan_entry["tp_style"] == "colwise"


def _cli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "tfbackend", "run", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **FAST, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def test_cli_json_reports_a_pass_with_exit_0(models):
    proc = _cli(
        str(models["llama"]),
        "--tp",
        "2",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-prompts",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["verdict"] == "pass" and data["tp"] == 2 and len(data["ranks"]) == 2


def test_a_failing_rank_stops_all_and_the_error_surfaces_once(models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(models["llama"]).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    # A checkpoint that lacks a tensor: transformers still loads the reference (random init),
    # every rank fails while loading.
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    proc = _cli(
        str(broken), "--tp", "2", "--device", "cpu", "--dtype", "float32", "--max-prompts", "1"
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "failed during load" in errors[0] and "down_proj" in errors[0]


def test_timeout_stops_the_ranks_and_leaves_no_orphans(models):
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # the clock counts the ranks' own work only; a warm forkserver runs the tiny model's ranks in
    # under half a second on an idle machine, so the limit is well below any rank's start-up
    with pytest.raises(Exception, match="timed out"):
        run(str(models["llama"]), _opts(tp=2, max_prompts=1, timeout_s=0.05))
    # The forkserver started with the earlier tests (it is in `before`); no rank outlives the run.
    alive = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not alive


def test_models_whose_attention_sdpa_cannot_compute_run_eager_on_both_sides():
    # GPT-OSS's learned sinks: transformers refuses sdpa for it, and `run` used to stop there
    from transformers import GptOssConfig, LlamaConfig

    from tfbackend.parity.reference import attn_implementation

    assert attn_implementation(GptOssConfig()) == "eager"
    assert attn_implementation(LlamaConfig()) == "sdpa"


def test_streamed_reference_gives_the_same_verdict_and_reads_the_checkpoint_once(models):
    report = run(str(models["qwen3moe"]), _opts(tp=2, max_prompts=2, reference="streamed"))
    assert report.verdict == "pass", report.failures
    assert report.reference_mode == "streamed" and report.reference_peak_kind == "rss_growth"
    total = sum(f.stat().st_size for f in Path(models["qwen3moe"]).glob("*.safetensors"))
    assert 0.95 * total < report.reference_bytes_read <= total  # each tensor once (headers aside)
    assert report.to_dict()["reference_peak_bytes"] > 0


def test_bisect_against_a_streamed_reference_names_o_proj_of_layer_0(models):
    report = run(
        str(models["wrong"]),
        _opts(tp=2, bisect=True, max_prompts=1, reference="streamed", vllm_version="0.11"),
    )
    assert report.verdict == "fail"
    assert report.divergence.module == "model.layers.0.self_attn.o_proj"
