"""The compact scores a run keeps re-judge to exactly the metrics the run computed."""

from __future__ import annotations

import pytest
import torch

from tfbackend.parity.metrics import compare_logits
from tfbackend.parity.scores import load_scores, rejudge, save_scores, scores_of


@pytest.fixture(scope="module")
def logits(tmp_path_factory):
    """A tiny Llama's logits in fp32 and in bf16: two real sides that differ a little."""
    from transformers import AutoModelForCausalLM

    from tfbackend.parity.tiny import make_tiny_model

    folder = make_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    ids = torch.randint(3, 500, (1, 33), generator=torch.Generator().manual_seed(0))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        with torch.inference_mode():
            out[dtype] = model(input_ids=ids).logits[0].float()
    return out[torch.float32], out[torch.bfloat16]


def test_rejudged_metrics_equal_the_full_row_comparison(logits, tmp_path):
    ref, test = logits
    assert not torch.equal(ref, test)
    path = tmp_path / "s.safetensors"
    save_scores(path, {"p0": scores_of(ref, test)}, {"engine": "vllm"})
    loaded, meta = load_scores(path)
    assert meta == {"engine": "vllm"}
    got, want = rejudge("p0", loaded["p0"]), compare_logits("p0", ref, test)
    for field in ("positions", "top1_agreement", "topk_containment"):
        assert getattr(got, field) == getattr(want, field)
    for field in ("kl_mean", "kl_max", "max_dlogprob_topk", "max_dlogit"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-5, abs=1e-9)


def test_a_disagreeing_side_rejudges_as_disagreeing(logits):
    ref, _ = logits
    shuffled = ref[:, torch.randperm(ref.shape[-1], generator=torch.Generator().manual_seed(1))]
    got, want = rejudge("p", scores_of(ref, shuffled)), compare_logits("p", ref, shuffled)
    assert got.top1_agreement == want.top1_agreement < 0.5
    assert got.max_dlogprob_topk == pytest.approx(want.max_dlogprob_topk, rel=1e-5)


def test_score_files_are_safetensors_never_pickles(logits, tmp_path):
    ref, test = logits
    path = tmp_path / "s.safetensors"
    save_scores(path, {"p0": scores_of(ref, test)}, {})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # raises on anything but a safetensors file
        assert "p0/kl" in f.keys()


def test_nan_scores_never_pass(logits):
    # vLLM's CPU kernels read past a shard for BitNet at tp 2 and returned NaN rows: a NaN
    # compares false with every threshold, so the verdict must name it.
    from tfbackend.parity.verdict import judge, thresholds_for

    ref, _ = logits
    test = ref.clone()
    test[3, 7] = float("nan")
    m = compare_logits("p", ref, test)
    assert any("NaN" in why for why in judge(m, thresholds_for("float32")))
