"""`tfbackend run` on a folder `tfbackend convert` wrote: the engine serves the converted per-rank
files, the reference is the original checkpoint the manifest records.

Native engine: real gloo ranks, each reading only its own converted files. vLLM engine (marked
`vllm`): vLLM's own `ShardedStateLoader` (`load_format="sharded_state"`) on CPU. Tiny random
models of `tests/_convert_models.py` (head size 64, vocab 300 padded to 320), float32, tp 2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._convert_models import write
from tfbackend.convert import ConvertOptions, convert
from tfbackend.errors import UserError
from tfbackend.parity.converted import find_converted
from tfbackend.parity.runner import RunOptions, run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KINDS = ("llama", "qwen3moe-tied")  # dense with one kv head replicated; MoE with tied embeddings
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_HOST_IP": "127.0.0.1"}  # fmt: skip
NO_VLLM = importlib.util.find_spec("vllm") is None


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """kind → (original folder, converted folder at tp 2)."""
    root = tmp_path_factory.mktemp("convert-run")
    out = {}
    for kind in KINDS:
        src = write(kind, root / kind / "src")
        result = convert(
            str(src), ConvertOptions(out=str(root / kind / "tp2"), tp=2, dtype="float32")
        )
        assert result.converted, result.blockers
        out[kind] = (src, root / kind / "tp2")
    return out


@pytest.fixture
def forkserver(monkeypatch):
    monkeypatch.setenv("TFBACKEND_START_METHOD", "forkserver")


def _opts(**kw) -> RunOptions:
    return RunOptions(**{"device": "cpu", "dtype": "float32", "timeout_s": 400, "tp": 2, **kw})


def _rank_bytes(folder: Path, rank: int) -> int:
    return sum(p.stat().st_size for p in folder.glob(f"model-rank-{rank}-part-*.safetensors"))


def _tensor_bytes(folder: Path, rank: int, name: str) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / f"model-rank-{rank}-part-0.safetensors"), "pt") as f:
        t = f.get_tensor(name)
    return t.numel() * t.element_size()


@pytest.mark.parametrize("kind", KINDS)
def test_native_engine_on_the_converted_folder_matches_the_original_reference(
    converted, forkserver, kind
):
    src, out = converted[kind]
    report = run(str(out), _opts(max_prompts=2))
    assert report.verdict == "pass", (report.failures, report.model_error)
    assert all(m.top1_agreement == 1.0 and m.max_dlogit < 1e-3 for m in report.prompts)
    assert any(f"original checkpoint {src}" in n for n in report.notes), report.notes
    # each rank read its own converted file, a tensor once (a tied embedding, kept under its
    # smallest name lm_head.weight, twice: for the embedding, then for lm_head)
    for r in report.ranks:
        again = _tensor_bytes(out, r.tp_rank, "lm_head.weight") if "tied" in kind else 0
        assert 0 < r.bytes_read <= _rank_bytes(out, r.tp_rank) + again


def test_the_native_engine_reads_the_converted_files_not_the_original(
    converted, forkserver, tmp_path
):
    from safetensors.torch import load_file, save_file

    src, out = converted["llama"]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    path = broken / "model-rank-1-part-0.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name] * 2  # same name, shape and dtype: only the values differ
    save_file(tensors, path)
    report = run(str(broken), _opts(max_prompts=1))
    assert report.verdict == "fail", report.prompts


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "tfbackend", "run", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TFBACKEND_START_METHOD": "forkserver"},
    )  # fmt: skip


def test_another_tp_is_refused_in_one_line_with_exit_2(converted):
    _, out = converted["llama"]
    proc = _cli(str(out), "--tp", "1", "--device", "cpu", "--dtype", "float32")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "converted for --tp 2 --pp 1" in lines[0] and "pass --tp 2 --pp 1" in lines[0]


def test_a_moved_original_is_refused_and_named_with_original(converted, tmp_path):
    src, out = converted["llama"]
    moved = tmp_path / "moved-src"
    shutil.copytree(src, moved)
    copy = tmp_path / "tp2"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "tfbackend-convert.json").read_text())
    manifest["source"]["local_dir"] = str(tmp_path / "gone")
    (copy / "tfbackend-convert.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="pass --original DIR"):
        find_converted(str(copy), _opts())
    found = find_converted(str(copy), _opts(original=str(moved)))
    assert found is not None and found.original == str(moved)
    # another checkpoint is not the original, whatever --original says
    other = write("qwen3moe-tied", tmp_path / "other")
    with pytest.raises(UserError, match="is not the checkpoint"):
        find_converted(str(copy), _opts(original=str(other)))


def test_a_manifest_that_is_not_a_regular_file_is_refused_not_read(tmp_path):
    folder = tmp_path / "fifo"
    folder.mkdir()
    os.mkfifo(folder / "tfbackend-convert.json")  # reading it would block
    with pytest.raises(UserError, match="not a regular file"):
        find_converted(str(folder), _opts())


def test_original_without_a_converted_folder_is_refused(converted):
    src, _ = converted["llama"]
    with pytest.raises(UserError, match="--original is for a folder"):
        find_converted(str(src), _opts(original=str(src)))


@pytest.mark.vllm
@pytest.mark.skipif(NO_VLLM, reason="vLLM not installed")
@pytest.mark.parametrize("kind", KINDS)
def test_vllm_engine_loads_the_converted_folder_with_sharded_state(converted, kind):
    # The folder holds only vLLM-named per-rank files: only load_format="sharded_state" loads it
    src, out = converted[kind]
    proc = _cli(str(out), "--engine", "vllm", "--device", "cpu", "--tp", "2", "--dtype",
                "float32", "--json", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["verdict"] == "pass" and data["engine"] == "vllm"
    assert any(f"original checkpoint {src}" in n for n in data["notes"]), data["notes"]
    for p in data["prompts"]:  # the full distribution: every logit of every position
        assert p["top1_agreement"] == 1.0 and p["kl_max"] < 1e-5 and p["max_dlogit"] < 1e-3
