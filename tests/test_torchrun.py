"""`tfbackend run --launcher torchrun` under a real torchrun (2 CPU processes, gloo): the verdict
and JSON printed once, by rank 0; failures end every process with one line; nothing left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests._run_models import write_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    return {k: write_model(k, root / k) for k in ("llama", "qwen3moe")}


def _torchrun(model, *args, timeout=420):
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*torchrun, "--standalone", "--nproc-per-node", "2", "-m", "tfbackend", "run", str(model),
           "--device", "cpu", "--dtype", "float32", "--max-prompts", "2", "--launcher", "torchrun",
           *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    left = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(model) in " ".join(p.info["cmdline"] or [])
    ]
    assert not left, f"processes left behind: {[p.pid for p in left]}"
    return proc


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_tp2_under_torchrun_prints_one_json_verdict(models):
    proc = _torchrun(models["llama"], "--tp", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)  # one JSON document: the other rank printed nothing
    assert data["verdict"] == "pass" and data["tp"] == 2 and data["exit_code"] == 0
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    assert all(r["shard_bytes"] > 0 for r in data["ranks"])
    assert data["reference_mode"] == "memory"  # auto: a tiny model fits


def test_pp2_under_torchrun_with_a_streamed_reference(models):
    # The logits come from rank 1 (the last stage) to rank 0 through torch.distributed.
    proc = _torchrun(models["qwen3moe"], "--pp", "2", "--reference", "streamed", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["verdict"] == "pass" and data["pp"] == 2
    assert [r["stage"] for r in data["ranks"]] == [0, 1]
    assert data["reference_mode"] == "streamed" and data["reference_bytes_read"] > 0
    assert not _errors(proc.stderr)


def test_a_failing_rank_ends_every_process_with_one_line(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["llama"], broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    # memory reference: transformers random-initialises the missing weight, the ranks refuse it
    proc = _torchrun(broken, "--tp", "2", "--reference", "memory")
    assert proc.returncode != 0  # torchrun exits 1 for any worker that exited non-zero
    errors = _errors(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "failed during load" in errors[0] and "down_proj" in errors[0]
    assert proc.stdout == ""


def test_a_wrapped_model_that_raises_fails_parity_with_one_report(models, tmp_path):
    # down_proj column-parallel: its output is half the hidden size, the residual add raises
    folder = tmp_path / "wrong"
    shutil.copytree(models["llama"], folder)
    from transformers import LlamaConfig

    cfg = json.loads((folder / "config.json").read_text())
    cfg["base_model_tp_plan"] = {
        **LlamaConfig.base_model_tp_plan,
        "layers.*.mlp.down_proj": "colwise",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    # vllm-0.11's per-linear plan follows that tp_plan; 0.32's GLU fuser makes down_proj rowwise
    proc = _torchrun(folder, "--tp", "2", "--json", "--vllm-version", "0.11")
    assert proc.returncode != 0
    data = json.loads(proc.stdout)
    assert data["verdict"] == "fail" and data["exit_code"] == 1
    assert data["divergence"]["module"] == "model.layers.0.mlp.down_proj"
    assert data["divergence"]["plan_entry"]["tp_style"] == "colwise"
    assert not _errors(proc.stderr)


def test_a_timeout_under_torchrun_ends_every_process_with_one_line(models):
    proc = _torchrun(models["llama"], "--tp", "2", "--timeout", "1")
    assert proc.returncode != 0
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "timed out after 1s" in errors[0], proc.stderr[-3000:]


def test_launcher_torchrun_outside_torchrun_says_how_to_start_it(models):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "tfbackend", "run", str(models["llama"]), "--device", "cpu",
         "--launcher", "torchrun"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert _errors(proc.stderr) == [proc.stderr.strip()] and "torchrun" in proc.stderr
