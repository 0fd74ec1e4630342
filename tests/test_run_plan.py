"""`run` executes the plan `check` prints (vLLM 0.32's fusers by default): real tiny models of the
zoo, real gloo ranks on CPU, logits against plain transformers."""

from __future__ import annotations

import os

import pytest

from tests._run_models import write_wrong_plan_model
from tfbackend.parity.runner import RunOptions, run
from tfbackend.parity.tiny import make_tiny_model

pytestmark = pytest.mark.slow
FAMILIES = (
    "qwen3",  # fused q/k/v with q/k norms
    "gemma3_text",  # offset norms, GeluAndMul, sliding layers, scaled embedding rebased
    "qwen3_moe",  # MoE runner with routed experts split on the intermediate dim
    "gpt_oss",  # learned sinks split per rank
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    os.environ["TFBACKEND_START_METHOD"] = "forkserver"
    root = tmp_path_factory.mktemp("run-plan")
    out = {k: make_tiny_model(k, root / k) for k in FAMILIES}
    out["wrong"] = write_wrong_plan_model(root / "wrong")
    return out


def _opts(**kw) -> RunOptions:
    return RunOptions(**{"device": "cpu", "dtype": "float32", "timeout_s": 300, "tp": 2, **kw})


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_default_plan_matches_the_reference_at_tp2(models, kind):
    report = run(str(models[kind]), _opts(max_prompts=2))
    assert report.profile == "vllm-0.32"
    assert report.verdict == "pass", (report.failures, report.model_error)
    assert all(m.top1_agreement == 1.0 and m.max_dlogit < 1e-4 for m in report.prompts)


def test_vllm_032_serves_a_wrong_o_proj_style_correctly_and_0_11_does_not(models):
    # The fused q/k/v's output projection is always rowwise in vLLM 0.32, whatever the tp_plan
    # says; vLLM 0.11 follows the tp_plan's (wrong) colwise.
    fused = run(str(models["wrong"]), _opts(max_prompts=1))
    assert fused.verdict == "pass", fused.failures
    per_linear = run(str(models["wrong"]), _opts(max_prompts=1, bisect=True, vllm_version="0.11"))
    assert per_linear.profile == "vllm-0.11" and per_linear.verdict == "fail"
    assert per_linear.divergence.module == "model.layers.0.self_attn.o_proj"


def test_an_unknown_vllm_version_is_refused_before_anything_runs(models):
    from tfbackend.errors import UserError

    with pytest.raises(UserError, match="unknown vLLM version or profile"):
        run(str(models["qwen3"]), _opts(vllm_version="banana"))
