"""The compared scores of a run, kept compactly, and their re-judging without any engine.

A run compares full logit rows; keeping them for every model of a zoo would take hundreds of MB.
What the verdict reads is smaller: per position the reference's top-k tokens, both sides'
log-probabilities of those tokens, the engine's own top-k, and the two full-row numbers (KL and
max |Δlogit|). With those, `rejudge` recomputes every metric of `compare_logits` exactly (its
top-k is at most `KEEP`), so a saved report can be checked on a machine without vLLM.
Written as safetensors (never a pickle), one file per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tfbackend.parity.metrics import TOP_K, PromptMetrics

KEEP = 10  # ≥ TOP_K: containment and |Δlogprob| read the first TOP_K of them


def scores_of(ref: torch.Tensor, test: torch.Tensor, k: int = KEEP) -> dict[str, torch.Tensor]:
    """The compact scores of one prompt from its full rows ([positions, vocab] each)."""
    ref, test = ref.float(), test.float()
    lp_ref, lp_test = ref.log_softmax(-1), test.log_softmax(-1)
    k = min(k, ref.shape[-1])
    ref_lp, ref_ids = lp_ref.topk(k, -1)
    test_lp, test_ids = lp_test.topk(k, -1)
    return {
        "ref_ids": ref_ids.to(torch.int32),
        "ref_lp": ref_lp,
        "test_lp_at_ref": lp_test.gather(-1, ref_ids),
        "test_ids": test_ids.to(torch.int32),
        "test_lp": test_lp,
        "kl": (lp_ref.exp() * (lp_ref - lp_test)).sum(-1).clamp_min(0),
        "dlogit": (ref - test).abs().amax(-1),
    }


def save_scores(path: str | Path, prompts: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {
        f"{name}/{key}": t.contiguous() for name, d in prompts.items() for key, t in d.items()
    }
    save_file(tensors, str(path), metadata={"prompts": json.dumps(list(prompts)), **{
        k: json.dumps(v) for k, v in meta.items()
    }})  # fmt: skip


def load_scores(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
        names = json.loads(raw.get("prompts", "[]"))
        prompts = {n: {} for n in names}
        for key in f.keys():
            name, _, field = key.rpartition("/")
            prompts[name][field] = f.get_tensor(key)
    meta = {k: json.loads(v) for k, v in raw.items() if k != "prompts"}
    return prompts, meta


def rejudge(name: str, s: dict[str, torch.Tensor], k: int = TOP_K) -> PromptMetrics:
    """`compare_logits`' metrics, from the compact scores."""
    ref_ids, test_ids = s["ref_ids"][:, :k], s["test_ids"][:, :k]
    same = ref_ids[:, 0] == test_ids[:, 0]
    ref_in_test = (test_ids == ref_ids[:, :1]).any(-1)
    test_in_ref = (ref_ids == test_ids[:, :1]).any(-1)
    contained = same | (ref_in_test & test_in_ref)
    dlp = (s["ref_lp"][:, :k] - s["test_lp_at_ref"][:, :k]).abs()
    return PromptMetrics(
        name=name,
        positions=int(ref_ids.shape[0]),
        top1_agreement=same.float().mean().item(),
        topk_containment=contained.float().mean().item(),
        kl_mean=s["kl"].mean().item(),
        kl_max=s["kl"].max().item(),
        max_dlogprob_topk=dlp.max().item(),
        max_dlogit=s["dlogit"].max().item(),
    )


def keep_scores(path: str | Path, prompts, ref_logits, test_logits, report) -> None:
    """Write the compact scores of a judged run (rows cut to what was compared)."""
    kept = {}
    for prompt, ref, test in zip(prompts, ref_logits, test_logits, strict=True):
        if test.shape[-1] != ref.shape[-1]:
            continue  # judged as a shape failure; nothing to keep
        kept[prompt.name] = scores_of(ref[: test.shape[0]], test)
    meta = {"engine": report.engine, "engine_version": report.engine_version,
            "tp": report.tp, "pp": report.pp, "dtype": report.dtype}  # fmt: skip
    save_scores(path, kept, meta)
