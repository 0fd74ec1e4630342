"""`tfbackend run`: build the wrapped model per rank and compare its logits with plain HF."""

from __future__ import annotations


def run_parity(
    model: str,
    *,
    tp: int = 1,
    pp: int = 1,
    revision: str | None = None,
    token: str | None = None,
    device: str = "cuda",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    vllm_version: str | None = None,
):
    """One parity run with default options: the entry point the onboarding gate calls.

    CPU runs default to float32 (bf16 matmuls on CPU are slow and add no signal); GPU runs to
    bfloat16, the dtype models are served in. `vllm_version` picks the profile whose plan runs,
    as for `check` (the gate passes its manifest's).
    """
    from tfbackend.parity.runner import RunOptions, run

    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    return run(
        model,
        RunOptions(
            tp=tp,
            pp=pp,
            device=device,
            dtype=dtype,
            revision=revision,
            token=token,
            trust_remote_code=trust_remote_code,
            vllm_version=vllm_version,
        ),  # fmt: skip
    )
