"""Bounds on what a user can ask for, so hostile or mistyped input fails at once instead of
running for minutes (docs/limits.md). Each bound is far above any real model or cluster."""

from __future__ import annotations

import math

from tfbackend.errors import UserError

# tp × pp: the plan, the memory estimate and `run` hold something per rank. The largest vLLM
# deployments are a few hundred GPUs per model replica.
MAX_WORLD_SIZE = 4096

# num_hidden_layers of the language model. Building and walking a model costs time and memory
# per layer (1,000 layers: seconds; 100,000: minutes and gigabytes). Real checkpoints have at most
# a few hundred (Llama-3.1-405B: 126, the largest public merges ~200).
MAX_LAYERS = 1024

# A JSON or text file tfbackend reads itself: config.json, a safetensors index, a prompts file, a
# gate manifest or baseline. The largest real ones (a DeepSeek-V3 index) are around 10 MiB.
MAX_TEXT_BYTES = 64 * 1024 * 1024


def check_parallel(tp: int, pp: int) -> None:
    """`--tp`/`--pp`: each at least 1, their product at most MAX_WORLD_SIZE."""
    for flag, value in (("--tp", tp), ("--pp", pp)):
        if value < 1:
            raise UserError(f"{flag} must be 1 or more, got {value}")
    if tp * pp > MAX_WORLD_SIZE:
        raise UserError(
            f"--tp {tp} --pp {pp} asks for {tp * pp:,} ranks: tp × pp must be at most "
            f"{MAX_WORLD_SIZE} (tfbackend's bound on the world size)"
        )


def check_positive(flag: str, value: float, unit: str = "") -> None:
    """A finite number above 0 (nan and inf are refused: they compare false to everything)."""
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{flag} must be a positive finite number{unit}, got {value}")


def check_non_negative(flag: str, value: float, unit: str = "") -> None:
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{flag} must be a finite number, 0 or more{unit}, got {value}")


def check_at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} must be 1 or more, got {value}")
