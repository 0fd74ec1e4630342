"""Per-prompt parity metrics between reference and wrapped logits ([positions, vocab])."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K = 5


@dataclass
class PromptMetrics:
    name: str
    positions: int
    top1_agreement: float  # fraction of positions with the same argmax
    topk_containment: float  # fraction passing vLLM's check_logprobs_close rule
    kl_mean: float | None  # KL(ref ‖ test) over positions
    kl_max: float | None
    max_dlogprob_topk: float  # max |Δ logprob| over the reference top-k tokens
    max_dlogit: float | None


def compare_logits(
    name: str, ref: torch.Tensor, test: torch.Tensor, k: int = TOP_K
) -> PromptMetrics:
    ref, test = ref.float(), test.float()
    if ref.shape != test.shape:
        raise ValueError(
            f"{name}: logits shapes differ: reference {tuple(ref.shape)}, wrapped {tuple(test.shape)}"
        )
    lp_ref, lp_test = ref.log_softmax(-1), test.log_softmax(-1)
    top_ref, top_test = lp_ref.topk(k, -1).indices, lp_test.topk(k, -1).indices
    same = top_ref[:, 0] == top_test[:, 0]
    # check_logprobs_close: where the chosen tokens differ, each must be in the other's top-k.
    ref_in_test = (top_test == top_ref[:, :1]).any(-1)
    test_in_ref = (top_ref == top_test[:, :1]).any(-1)
    contained = same | (ref_in_test & test_in_ref)
    kl = (lp_ref.exp() * (lp_ref - lp_test)).sum(-1).clamp_min(0)
    dlp = (lp_ref.gather(-1, top_ref) - lp_test.gather(-1, top_ref)).abs()
    return PromptMetrics(
        name=name,
        positions=ref.shape[0],
        top1_agreement=same.float().mean().item(),
        topk_containment=contained.float().mean().item(),
        kl_mean=kl.mean().item(),
        kl_max=kl.max().item(),
        max_dlogprob_topk=dlp.max().item(),
        max_dlogit=(ref - test).abs().max().item(),
    )


def compare_topk_logprobs(
    name: str, ref: torch.Tensor, test_topk: list[dict[int, float]], k: int = TOP_K
) -> PromptMetrics:
    """Against an engine that returns only top-k logprobs per position (vLLM prompt_logprobs):
    containment and logprob differences on the tokens it returned; no KL or logit diff."""
    lp_ref = ref.float().log_softmax(-1)
    top_ref = lp_ref.topk(k, -1).indices
    same = contained = 0
    dlp = 0.0
    for pos, returned in enumerate(test_topk):
        test_top1 = max(returned, key=returned.get)
        ref_top1 = int(top_ref[pos, 0])
        same += test_top1 == ref_top1
        contained += test_top1 == ref_top1 or (
            ref_top1 in returned and test_top1 in top_ref[pos].tolist()
        )
        for tok, lp in returned.items():
            if tok in top_ref[pos].tolist():
                dlp = max(dlp, abs(float(lp_ref[pos, tok]) - lp))
    n = max(len(test_topk), 1)
    return PromptMetrics(name, len(test_topk), same / n, contained / n, None, None, dlp, None)
