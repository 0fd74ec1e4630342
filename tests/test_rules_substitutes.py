"""Rules for what vLLM's substitutes hand the model's own forward (rules/substitutes.py).

Each failing case is a false PASS that vLLM 0.32's real forward exposed on CPU
(reports/parity.md); each neighbour is an architecture vLLM serves with the same logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.falcon.modeling_falcon import FalconLinear

from tfbackend.check import CheckOptions, check
from tfbackend.inspect.linear_forward import linear_forward_fact
from tfbackend.parity.tiny import make_tiny_model

MODELS = (
    "phimoe", "llama4_text", "dbrx", "glm_moe_dsa", "inkling_text", "mimo_v2_flash",
    "llama", "mixtral", "qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_bigcode", "gpt_oss",
)  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("substitutes")
    return {m: make_tiny_model(m, root / m) for m in MODELS}


def _found(folder, rule_id, tp=1):
    return [f for f in check(str(folder), CheckOptions(tp=tp)).findings if f.rule_id == rule_id]


@pytest.mark.parametrize(
    "model_type,cls", [("phimoe", "PhimoeTopKRouter"), ("llama4_text", "Llama4Router")]
)
def test_a_router_subclassing_linear_loses_its_forward(folders, model_type, cls):
    # vLLM swaps every nn.Linear instance for its own linear: Phi-MoE then raised "too many
    # values to unpack (expected 3)" in vLLM's forward.
    for tp in (1, 2):
        (found,) = _found(folders[model_type], "TFB113", tp)
        assert found.severity.value == "error" and found.data["classes"] == [cls]
        assert "ReplicatedLinear" in found.message and "tuple" in found.message


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3", "llama"])
def test_plain_linears_and_vllm_routed_routers_are_fine(folders, model_type):
    assert _found(folders[model_type], "TFB113") == []


def test_a_linear_subclass_that_computes_a_linear_is_recognised():
    # Falcon's FalconLinear rewrites the matmul by hand: same values, nothing lost.
    fact = linear_forward_fact(FalconLinear(16, 8, bias=True))
    assert fact == {"class": "FalconLinear", "returns": "tensor", "same_values": True}
    with torch.device("meta"):
        big = FalconLinear(4096, 2048)
    assert linear_forward_fact(big)["same_values"] is None  # too large to run: not decided
    assert linear_forward_fact(torch.nn.Linear(4, 4)) is None


def test_replicated_attention_projections_fail_at_tp2(folders):
    # DBRX has no tp_plan and its packed Wqkv is not fused: vLLM raised in Attention.forward.
    (found,) = _found(folders["dbrx"], "TFB216", 2)
    assert found.severity.value == "error" and "Wqkv" in found.message
    assert _found(folders["dbrx"], "TFB216", 1) == []


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode", "mixtral", "deepseek_v3"])
def test_split_attention_projections_are_fine_at_tp2(folders, model_type):
    assert _found(folders[model_type], "TFB216", 2) == []


def test_an_attention_that_indexes_the_mask_fails(folders):
    # GLM-MoE-DSA's indexer reads attention_mask[:, 0, :, :]; under vLLM the mask is None.
    for tp in (1, 2):
        (found,) = _found(folders["glm_moe_dsa"], "TFB407", tp)
        assert found.severity.value == "error"
        assert found.data["reads"] == ["attention_mask[:, 0, :, :]"]
        assert "None" in found.message


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v3", "glm4_moe", "gpt_oss", "mixtral"])
def test_guarded_or_forwarded_masks_are_fine(folders, model_type):
    assert _found(folders[model_type], "TFB407") == []


@pytest.mark.parametrize(
    "model_type,why", [("inkling_text", "KV heads"), ("mimo_v2_flash", "value heads of 128")]
)
def test_layers_wider_than_vllms_attention_fail(folders, model_type, why):
    # Inkling's sliding layers hold twice the config's KV heads ("view size is not compatible"
    # in vLLM's forward); the tiny MiMo-V2-Flash's value head (128) is wider than its q/k head.
    (found,) = _found(folders[model_type], "TFB408")
    assert found.severity.value == "error" and why in found.message


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "deepseek_v3", "gpt_oss", "glm4_moe"])
def test_attention_geometry_of_served_models_is_fine(folders, model_type):
    assert _found(folders[model_type], "TFB408") == []


def test_input_first_experts_fail_in_weight_loading(folders):
    # Llama 4's experts are gate_up_proj [E, H, 2I]: vLLM's _load_w2 raised.
    (found,) = _found(folders["llama4_text"], "TFB519")
    assert found.severity.value == "error" and "[E, 2I, H]" in found.message


@pytest.mark.parametrize(
    "model_type", ["qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "gpt_oss", "phimoe"]
)
def test_standard_experts_are_fine(folders, model_type):
    assert _found(folders[model_type], "TFB519") == []
