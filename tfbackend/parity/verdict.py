"""Dtype-aware pass/fail for parity metrics (documented in docs/run.md)."""

from __future__ import annotations

from dataclasses import dataclass

from tfbackend.parity.metrics import PromptMetrics


@dataclass(frozen=True)
class Thresholds:
    dtype: str
    min_containment: float  # fraction of positions passing the top-k containment rule
    max_kl_mean: float
    max_kl_max: float
    max_dlogprob_topk: float | None  # None: not judged (reduction order makes it noisy)


THRESHOLDS = {
    # fp32: only reduction order differs (the all-reduce sums partial products in another order).
    "float32": Thresholds("float32", 1.0, 1e-6, 1e-5, 1e-3),
    # bf16/fp16: rounding after every op; judged as vLLM's check_logprobs_close does.
    "bfloat16": Thresholds("bfloat16", 0.99, 2e-2, 0.25, None),
    "float16": Thresholds("float16", 0.99, 1e-2, 0.15, None),
}


def thresholds_for(dtype: str) -> Thresholds:
    return THRESHOLDS[dtype]


def judge(metrics: PromptMetrics, th: Thresholds) -> list[str]:
    """Why this prompt fails (empty: it passes)."""
    why = []
    values = (metrics.kl_mean, metrics.kl_max, metrics.max_dlogprob_topk, metrics.max_dlogit)
    if any(v is not None and v != v for v in values):  # NaN compares false with every threshold
        why.append("non-finite scores (NaN): the engine computed no number for some token")
    if metrics.topk_containment < th.min_containment:
        why.append(f"top-k containment {metrics.topk_containment:.3f} < {th.min_containment}")
    if metrics.kl_mean is not None and metrics.kl_mean > th.max_kl_mean:
        why.append(f"KL mean {metrics.kl_mean:.2e} > {th.max_kl_mean:.0e}")
    if metrics.kl_max is not None and metrics.kl_max > th.max_kl_max:
        why.append(f"KL max {metrics.kl_max:.2e} > {th.max_kl_max:.0e}")
    if th.max_dlogprob_topk is not None and metrics.max_dlogprob_topk > th.max_dlogprob_topk:
        why.append(f"max |Δlogprob| {metrics.max_dlogprob_topk:.2e} > {th.max_dlogprob_topk:.0e}")
    return why
