"""Rules that vLLM's real forward showed were missing (reports/parity.md): TFB213, TFB112, TFB214.

Each case is a false PASS that vLLM's real forward exposed (reports/parity.md): vLLM 0.32 builds
and runs these at tp 2 on CPU and computes other logits than transformers; at tp 1 they match.
"""

from __future__ import annotations

import pytest

from tfbackend.check import CheckOptions, check
from tfbackend.parity.tiny import make_tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    return {m: make_tiny_model(m, root / m) for m in ("bitnet", "afmoe", "biogpt", "llama")}


def _tfb213(folder, tp):
    report = check(str(folder), CheckOptions(tp=tp))
    return [f for f in report.findings if f.rule_id == "TFB213"]


@pytest.mark.parametrize(
    "model_type,consumer",
    [("bitnet", "down_proj"), ("afmoe", "o_proj"), ("biogpt", "out_proj")],
)
def test_slices_into_a_replicated_linear_fail_at_tp2(folders, model_type, consumer):
    (found,) = _tfb213(folders[model_type], 2)
    assert found.severity.value == "error"
    assert consumer in found.message
    assert any(m.endswith(consumer) for m in found.modules)


@pytest.mark.parametrize("model_type", ["bitnet", "afmoe", "biogpt"])
def test_nothing_is_split_at_tp1(folders, model_type):
    assert _tfb213(folders[model_type], 1) == []


def test_row_parallel_consumers_are_fine(folders):
    # Llama: q/k/v into o_proj and gate/up into down_proj, both made row-parallel by the plan.
    assert _tfb213(folders["llama"], 2) == []


def test_mrope_in_a_text_only_model_is_an_error(tmp_path):
    # TFB112: vLLM's runner asserts SupportsMRoPE, which only its multimodal class implements
    # (Cohere Compass text raised "M-RoPE support is not implemented." in reports/parity.md).
    folder = make_tiny_model("cohere_compass_text", tmp_path / "ccx")
    report = check(str(folder), CheckOptions(tp=1))
    (found,) = [f for f in report.findings if f.rule_id == "TFB112"]
    assert found.severity.value == "error" and found.data["mrope_section"]


def test_no_mrope_no_tfb112(folders):
    report = check(str(folders["llama"]), CheckOptions(tp=1))
    assert not [f for f in report.findings if f.rule_id == "TFB112"]


@pytest.mark.parametrize("model_type,attr", [("stablelm", "num_heads"), ("opt", "num_heads")])
def test_reshaping_by_the_whole_head_count_fails_at_tp2(model_type, attr, tmp_path):
    # TFB214: StableLM's view raised and OPT's folded the sequence in vLLM's forward at tp 2.
    folder = make_tiny_model(model_type, tmp_path / model_type)
    (found,) = [f for f in check(str(folder), CheckOptions(tp=2)).findings if f.rule_id == "TFB214"]
    assert found.severity.value == "error" and attr in found.data["attributes"]
    assert not [f for f in check(str(folder), CheckOptions(tp=1)).findings if f.rule_id == "TFB214"]


def test_a_head_dim_only_view_is_fine(folders):
    assert not [
        f
        for f in check(str(folders["llama"]), CheckOptions(tp=2)).findings
        if f.rule_id == "TFB214"
    ]


def test_sigmoid_routing_inside_vllm_is_a_cpu_only_warning(tmp_path):
    # TFB518: vLLM's CPU router asserts softmax (Laguna in reports/parity.md); grouped sigmoid
    # routing (DeepSeek-V3) and softmax routing (Qwen3-MoE) run there.
    got = {}
    for model_type in ("laguna", "deepseek_v3", "qwen3_moe"):
        folder = make_tiny_model(model_type, tmp_path / model_type)
        got[model_type] = [
            f for f in check(str(folder), CheckOptions(tp=1)).findings if f.rule_id == "TFB518"
        ]
    (found,) = got["laguna"]
    assert found.severity.value == "warning" and found.data["platforms"] == ["cpu"]
    assert got["deepseek_v3"] == [] and got["qwen3_moe"] == []


def test_gathered_attention_projections_fail_at_tp2_but_a_gathered_mlp_does_not(tmp_path):
    # TFB215: Phi-3's tp_plan gathers qkv_proj (vLLM's forward raised at tp 2); GLM gathers only
    # its MLP's gate_up_proj, which vLLM serves (reports/parity.md).
    phi3 = make_tiny_model("phi3", tmp_path / "phi3")
    glm = make_tiny_model("glm", tmp_path / "glm")
    (found,) = [f for f in check(str(phi3), CheckOptions(tp=2)).findings if f.rule_id == "TFB215"]
    assert found.severity.value == "error" and "qkv_proj" in found.message
    assert not [f for f in check(str(phi3), CheckOptions(tp=1)).findings if f.rule_id == "TFB215"]
    assert not [f for f in check(str(glm), CheckOptions(tp=2)).findings if f.rule_id == "TFB215"]


def test_head_count_reshape_with_replicated_projections_is_fine(tmp_path):
    # GPT-BigCode reshapes by self.num_heads but its c_attn stays replicated: vLLM serves it at
    # tp 2 with the same logits (reports/parity.md), so TFB214 must stay silent.
    folder = make_tiny_model("gpt_bigcode", tmp_path / "gpt_bigcode")
    assert not [f for f in check(str(folder), CheckOptions(tp=2)).findings if f.rule_id == "TFB214"]
