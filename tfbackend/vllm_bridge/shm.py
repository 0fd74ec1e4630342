"""Names of the shared-memory segments vLLM's CPU build makes for a tfbackend job, and their end.

vLLM's CPU communicator (`cpu_communicator._CPUSHMDistributed`) puts one segment per rank under
/dev/shm for every tensor- or pipeline-parallel group, named after `VLLM_DIST_IDENT`, which only
vLLM's own CPU worker sets. tfbackend's jobs give each run a name of its own, so two runs never
meet, and unlink what a killed rank left behind once every rank has stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "tfbackend-"
SHM_DIR = Path("/dev/shm")


def ident(run_id: str) -> str:
    """What the segments of run `run_id` are named after (one value on every rank)."""
    return f"{PREFIX}{run_id}"


def name_segments(run_id: str) -> None:
    """For jobs that set vLLM's groups up themselves (no vLLM worker sets VLLM_DIST_IDENT, and
    vLLM's communicator reads it whenever its CPU kernels are built in)."""
    os.environ["VLLM_DIST_IDENT"] = ident(run_id)


def unlink_segments(run_id: str) -> None:
    for segment in SHM_DIR.glob(f"{ident(run_id)}-*"):
        segment.unlink(missing_ok=True)
