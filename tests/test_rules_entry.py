"""What vLLM 0.32 refuses before it replaces anything: the registry's compatibility gate (TFB401),
the decoder's compile arguments (TFB109), AutoModel's mapping (TFB110) and one attention module
per layer index (TFB406). Each config is real and tiny; each rule names the exception vLLM raises
for it (reports/agreement.md lists the real ones)."""

from __future__ import annotations

import pytest

from tests._rules_support import facts, findings, llama


def _mamba():
    from transformers import MambaConfig

    return MambaConfig(hidden_size=32, state_size=4, num_hidden_layers=2, vocab_size=64)


def _bart():
    from transformers import BartConfig

    return BartConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=64,
        max_position_embeddings=64,
    )


def _whisper():
    from transformers import WhisperConfig

    return WhisperConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


def _bloom():
    from transformers import BloomConfig

    return BloomConfig(hidden_size=32, n_layer=2, n_head=2, vocab_size=64)


def _emu3_text():
    from transformers.models.emu3.configuration_emu3 import Emu3TextConfig

    # As a checkpoint of the text model alone would name it.
    return Emu3TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["Emu3ForCausalLM"],
    )


def test_decoder_without_position_ids_is_refused():
    f = facts(_mamba())
    (found,) = findings(f, "TFB109")
    assert found.severity.value == "error"
    assert found.data["decoder"] == "MambaModel"
    assert "position_ids" in found.data["missing"]


def test_bart_decoder_is_the_class_vllm_compiles():
    # vLLM compiles AutoModel(config).get_decoder(): BartDecoder, whose forward has no
    # position_ids (BartModel's does not matter).
    (found,) = findings(facts(_bart()), "TFB109")
    assert found.data == {"missing": ["position_ids"], "decoder": "BartDecoder"}


def test_llama_decoder_names_every_compile_argument():
    assert findings(facts(llama()), "TFB109") == []


def test_older_profiles_do_not_compile_the_decoder():
    assert findings(facts(_mamba()), "TFB109", vllm="0.11") == []


def test_two_attention_modules_on_one_layer_index_are_refused():
    (found,) = findings(facts(_whisper()), "TFB406")
    assert found.severity.value == "error"
    assert "model.decoder.layers.0.self_attn" in found.modules
    assert "model.decoder.layers.0.encoder_attn" in found.modules
    assert 0 in found.data["layers"]


def test_one_attention_module_per_layer_passes():
    assert findings(facts(llama()), "TFB406") == []


def test_registry_gate_refuses_an_architecture_without_the_interface():
    (found,) = findings(facts(_bloom()), "TFB401")
    assert "BloomForCausalLM" in found.message
    assert "not compatible with vLLM" in found.message


def test_auto_model_without_a_mapping_is_refused():
    f = facts(_emu3_text())
    assert f.auto_model_error and "Unrecognized configuration class" in f.auto_model_error
    (found,) = findings(f, "TFB110")
    assert found.severity.value == "error"


def test_auto_model_builds_llama():
    assert facts(llama()).auto_model_error is None


@pytest.mark.parametrize("make", [_mamba, _bart])
def test_cli_exit_code_is_one_for_a_refused_model(make, tmp_path):
    from typer.testing import CliRunner

    from tfbackend.cli.app import app

    make().save_pretrained(tmp_path)
    out = CliRunner().invoke(app, ["check", str(tmp_path), "--json"])
    assert out.exit_code == 1, out.output
    assert '"TFB109"' in out.output


def _deepseek_v32():
    from transformers import DeepseekV32Config

    return DeepseekV32Config(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def test_without_vllm_a_model_type_vllm_reads_with_its_own_config_class_is_a_warning():
    import dataclasses

    # The facts as a machine without vLLM gathers them: transformers' class.
    f = dataclasses.replace(facts(_deepseek_v32()), vllm_config_class=None)
    (found,) = findings(f, "TFB111")
    assert found.severity.value == "warning"
    assert found.data["vllm_config_class"] == "DeepseekV3Config"
    assert findings(facts(llama()), "TFB111") == []
    assert findings(f, "TFB111", vllm="0.11") == []


@pytest.mark.vllm
def test_with_vllm_the_model_is_checked_as_vllm_reads_its_config():
    pytest.importorskip("vllm")
    f = facts(_deepseek_v32())
    # vLLM 0.32 reads deepseek_v32 as DeepseekV3Config: DeepSeek-V3 attention, no indexer
    assert f.vllm_config_class == "DeepseekV3Config"
    assert f.model_class == "DeepseekV3Model"
    assert not any(".indexer." in m.qualname for m in f.modules)
    (found,) = findings(f, "TFB111")
    assert found.severity.value == "info"


@pytest.mark.vllm
def test_with_vllm_a_config_vllms_own_class_cannot_build_is_an_error():
    # vLLM 0.32 reads kimi_linear with its KimiLinearConfig, from which transformers' model
    # cannot be built: vLLM fails while building (reports/agreement.md, kimi_linear).
    pytest.importorskip("vllm")
    from transformers import KimiLinearConfig

    config = KimiLinearConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    f = facts(config)
    assert f.vllm_config_class is None and f.vllm_config_error
    (found,) = findings(f, "TFB111")
    assert found.severity.value == "error"
    assert "KimiLinearConfig" in found.message
