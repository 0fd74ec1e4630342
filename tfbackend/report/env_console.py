"""Plain-text rendering of `tfbackend env`: pasteable as is into a bug report."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def render_env(env, console: Console) -> None:
    rows = [("tfbackend", env.tfbackend), ("python", env.python), ("platform", env.platform)]
    rows += [(name, version or "not installed") for name, version in env.packages.items()]
    if env.vllm_distribution:
        rows.append(("vllm distribution", env.vllm_distribution))
    rows += [
        ("torch CUDA build", env.torch_cuda or "none (CPU build)"),
        ("CUDA available", "yes" if env.cuda_available else "no"),
    ]
    if env.driver:
        rows.append(("NVIDIA driver", env.driver))
    rows += [
        (f"GPU {g.index}", f"{g.name}, {g.memory_gib:.1f} GiB, compute {g.capability}")
        for g in env.gpus
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        console.print(f"{key:<{width}}  {escape(str(value))}")
    for note in env.notes:
        console.print(f"note: {escape(note)}")
