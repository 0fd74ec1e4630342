"""Pipeline stages: vLLM's layer split and which pp_plan modules each stage keeps."""

from __future__ import annotations

import os

from tfbackend.plan import StageSpec


def get_pp_indices(num_layers: int, rank: int, pp: int) -> tuple[int, int]:
    """vLLM's split: remainders go to the stages before the last (or VLLM_PP_LAYER_PARTITION)."""
    override = os.environ.get("VLLM_PP_LAYER_PARTITION")
    if override:
        partitions = [int(x) for x in override.split(",")]
        if len(partitions) != pp or sum(partitions) != num_layers:
            raise ValueError(
                f"VLLM_PP_LAYER_PARTITION={override} must list {pp} numbers summing to {num_layers}"
            )
    else:
        partitions = [num_layers // pp] * pp
        remaining = num_layers % pp
        for i in range(2, remaining + 2):
            partitions[-i] += 1
    start = sum(partitions[:rank])
    return start, start + partitions[rank]


def stage_layout(
    names: list[str], layers_name: str, num_layers: int, pp: int, tied: bool
) -> list[StageSpec]:
    """What each stage keeps, given the ordered pp modules and the one layer list among them."""
    idx = names.index(layers_name)
    before, after = names[:idx], names[idx + 1 :]
    stages = []
    for rank in range(pp):
        first, last = rank == 0, rank == pp - 1
        keep_before = first or (tied and last)
        kept = [n for n in before if keep_before] + [n for n in after if last]
        missing = [n for n in before if not keep_before] + [n for n in after if not last]
        start, end = get_pp_indices(num_layers, rank, pp)
        stages.append(
            StageSpec(
                rank=rank, layers=[start, end], modules=kept, missing=missing, has_lm_head=last
            )
        )
    return stages
