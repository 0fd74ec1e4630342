"""Hostile and broken input to `tfbackend run` (issue 13): consent, pickles, signals, leftovers.

Real ranks (gloo on CPU), real checkpoints, the real command in its own process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._run_models import write_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FAST = {"TFBACKEND_START_METHOD": "forkserver"}
CPU = ("--device", "cpu", "--dtype", "float32", "--max-prompts", "1")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_model("llama", tmp_path_factory.mktemp("hostile-run") / "llama")


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _env(tmpdir: Path | None = None) -> dict:
    env = {**os.environ, **FAST, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def cli(*args, tmpdir: Path | None = None, timeout: float = 300, **kw):
    return subprocess.run(
        [sys.executable, "-m", "tfbackend", "run", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env(tmpdir), **kw,
    )  # fmt: skip


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


# -- 1. no code runs without consent, and nothing prompts ---------------------------------------


def test_a_tokenizer_with_its_own_code_is_never_imported_nor_prompted_for(llama, tmp_path):
    """1: an auto_map in tokenizer_config.json reached transformers' "Do you wish to run the
    custom code? [y/N]" prompt (on stdout, so --json was not JSON); answering y imported it."""
    model = copy_model(llama, tmp_path / "m")
    marker = tmp_path / "imported"
    (model / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    (model / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}})
    )
    p = cli(model, *CPU, "--json", input="y\ny\ny\n")
    assert not marker.exists(), "the repo's tokenizer code ran without --trust-remote-code"
    assert "Do you wish to run" not in p.stdout + p.stderr
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)  # nothing but JSON on stdout
    assert data["verdict"] == "pass"
    assert "fixed-seed token ids" in data["prompt_source"]
    assert any("--trust-remote-code" in n and "tokenizer" in n for n in data["notes"])


# -- 2. nothing is unpickled --------------------------------------------------------------------


class _Plant:
    """Unpickling this writes a marker file: what a malicious pytorch_model.bin can do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def test_a_pickle_checkpoint_is_refused_before_anything_is_loaded(llama, tmp_path):
    """2: the reference's from_pretrained reached torch.load's unpickler for pytorch_model.bin,
    and for a malicious file the error even advised weights_only=False."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_bytes((llama / "config.json").read_bytes())
    marker = tmp_path / "unpickled"
    import torch

    torch.save({"w": _Plant(str(marker))}, model / "pytorch_model.bin")
    p = cli(model, *CPU)
    assert not marker.exists()
    assert p.returncode == 2
    line = one_error_line(p.stderr)
    assert "safetensors" in line and "pytorch_model.bin" in line
    assert "weights_only=False" not in p.stderr
    assert "reference" not in p.stderr  # refused while resolving: nothing was loaded


# -- 3/13. bounds and numbers checked before anything heavy -------------------------------------


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--timeout", "-5"], "--timeout"),
        (["--timeout", "nan"], "--timeout"),
        (["--timeout", "inf"], "--timeout"),
        (["--max-prompts", "-1"], "--max-prompts"),
        (["--max-prompts", "0"], "--max-prompts"),
        (["--tp", "99999999999999999999"], "4096"),
        (["--pp", "5000"], "4096"),
    ],
)
def test_numeric_options_are_validated_before_anything_is_resolved(args, flag):
    """13: `--timeout -5` loaded the reference, then said "timed out after -5s"; `--timeout nan`
    was accepted; `--max-prompts -1` silently used 2 of 3 prompts. (A missing model proves the
    order: the option is judged first.)"""
    p = cli("./no/such/model", "--device", "cpu", *args, timeout=120)
    assert p.returncode == 2
    assert flag in one_error_line(p.stderr)


# -- 15. broken inputs name the file or flag ----------------------------------------------------


def test_a_truncated_checkpoint_names_the_file_before_any_rank_starts(llama, tmp_path):
    """15: a truncated checkpoint under `run` was an "unexpected" error naming no file."""
    model = copy_model(llama, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    p = cli(model, *CPU)
    assert p.returncode == 2
    line = one_error_line(p.stderr)
    assert str(weights) in line and "unexpected" not in line and "truncated" in line


def test_a_binary_prompts_file_names_the_flag_and_file(llama, tmp_path):
    """15: a binary --prompts file was "unexpected UnicodeDecodeError"."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    p = cli(llama, *CPU, "--prompts", prompts, timeout=180)
    assert p.returncode == 2
    line = one_error_line(p.stderr)
    assert "--prompts" in line and str(prompts) in line and "unexpected" not in line


def test_a_prompts_json_that_is_not_json_names_the_flag_and_file(llama, tmp_path):
    """15: the same for a .json prompts file that does not parse."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["unterminated')
    p = cli(llama, *CPU, "--prompts", prompts, timeout=180)
    assert p.returncode == 2
    line = one_error_line(p.stderr)
    assert "--prompts" in line and str(prompts) in line and "unexpected" not in line


# -- 6/7. no leftovers: temp folders, error files, ranks ----------------------------------------


def _start(model: Path, tmpdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tfbackend", "run", str(model), "--tp", "2", *CPU, *extra],
        cwd=ROOT, env=_env(tmpdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(predicate, timeout: float = 240.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(step)


def _run_dirs(tmpdir: Path) -> list[Path]:
    return list(tmpdir.glob("tfbackend-run-*"))


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _assert_no_leftovers(p: subprocess.Popen, tmpdir: Path, ranks: list, stderr: str) -> None:
    import psutil

    assert not _run_dirs(tmpdir), "the run's temporary folder was left behind"
    assert not list(tmpdir.glob("pytorch-errorfile-*")), "a rank's error file was left behind"
    assert "leaked semaphore" not in stderr, stderr
    alive = []
    for r in ranks:
        try:
            if r.status() != psutil.STATUS_ZOMBIE:
                alive.append(r)
        except psutil.NoSuchProcess:
            pass
    assert not [r for r in alive if "forkserver" not in " ".join(r.cmdline())], alive


def test_sigterm_stops_the_ranks_removes_the_temp_folder_and_exits_143(llama, tmp_path):
    """6: SIGTERM left the tfbackend-run-* folder behind (no handler) and a leaked semaphore."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    p = _start(llama, tmpdir, "--timeout", "300")
    # wait until the ranks run (each has reported a phase), then terminate the parent only
    _wait_for(lambda: len(_descendants(p.pid)) >= 2 and _run_dirs(tmpdir), step=0.05)
    time.sleep(1.0)
    ranks = _descendants(p.pid)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr
    _assert_no_leftovers(p, tmpdir, ranks, stderr)


def test_ctrl_c_while_the_ranks_start_leaves_nothing_behind(llama, tmp_path):
    """6: Ctrl-C at some moments (while ranks were being started) left the temp folder."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    p = _start(llama, tmpdir, "--timeout", "300")
    _wait_for(lambda: _run_dirs(tmpdir))  # the folder exists: the ranks are being started
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    _assert_no_leftovers(p, tmpdir, _descendants(p.pid), stderr)


def test_a_rank_that_raises_leaves_no_error_file_in_tmpdir(llama, tmp_path):
    """7: each rank that raised left a pytorch-errorfile-*.pickle in $TMPDIR."""
    from safetensors.torch import load_file, save_file

    model = copy_model(llama, tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]  # every rank fails while loading
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    p = cli(model, "--tp", "2", *CPU, tmpdir=tmpdir)
    assert p.returncode == 2 and "failed during load" in one_error_line(p.stderr)
    assert not list(tmpdir.glob("pytorch-errorfile-*"))
    assert not _run_dirs(tmpdir)


def test_a_fifo_in_the_model_folder_does_not_block_the_run(llama, tmp_path):
    """5: transformers reads what it finds in the folder (generation_config.json, tokenizer
    files); a FIFO there blocked the reference load forever."""
    model = copy_model(llama, tmp_path / "m")
    (model / "generation_config.json").unlink(missing_ok=True)
    os.mkfifo(model / "generation_config.json")
    p = cli(model, *CPU, timeout=180)
    assert p.returncode == 2
    line = one_error_line(p.stderr)
    assert "generation_config.json" in line and "not a regular file" in line
