"""What vLLM 0.32's `_recursive_replace` swaps whole (convs), what it never visits (children of a
swapped module) and what it keeps as it is (the base model's own parameters)."""

from __future__ import annotations

from tests import _rules_support as base
from tfbackend.inspect.facts import ModuleFact
from tfbackend.replace.leaves import conv_target
from tfbackend.replace.names import expected_parameters
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import PROFILES

V032 = PROFILES["vllm-0.32"]


def zaya(**kw):
    from transformers import ZayaConfig

    return ZayaConfig(
        **{
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 1,
            "router_hidden_size": 16,
            "vocab_size": 256,
            **kw,
        }
    )


def inkling_text(**kw):
    from transformers import InklingTextConfig

    return InklingTextConfig(
        **{
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "swa_num_attention_heads": 4,
            "swa_num_key_value_heads": 2,
            "swa_head_dim": 16,
            "sliding_window_size": 16,
            "d_rel": 4,
            "rel_extent": 32,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "vocab_size": 256,
            "layer_types": ["hybrid_sliding", "hybrid"],
            "mlp_layer_types": ["dense", "sparse"],
            **kw,
        }
    )


def phi4_multimodal(**kw):
    from transformers import Phi4MultimodalConfig

    return Phi4MultimodalConfig(
        **{
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            "vision_config": dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
                crop_size=28,
            ),
            "audio_config": dict(
                hidden_size=32,
                intermediate_size=64,
                num_blocks=1,
                num_attention_heads=2,
                ext_pw_out_channel=32,
                depthwise_separable_out_channel=32,
                nemo_conv_channels=32,
                input_size=16,
            ),
            **kw,
        }
    )


def test_base_model_own_parameters_are_a_fact_named_model():
    facts = base.facts(zaya())
    [root] = [m for m in facts.modules if m.qualname == "model"]
    assert root.class_name == "ZayaModel"
    assert root.params == {"input_hidden_states_scale": [64], "input_hidden_states_bias": [64]}
    # ... and the checkpoint is asked for them under the names vLLM loads
    assert expected_parameters(facts)["model.input_hidden_states_bias"] == [64]


def test_base_model_without_own_parameters_adds_no_fact():
    assert not [m for m in base.facts(base.llama()).modules if m.qualname == "model"]


def test_base_model_parameters_do_not_join_the_inferred_pipeline_split():
    plan = build_plan(base.facts(zaya()), tp=1, pp=2, profile=V032)
    assert "model" not in [n for st in plan.stages for n in st.modules]


def test_vision_and_audio_conv2d_become_conv2d_layers_whole_on_every_rank():
    facts = base.facts(phi4_multimodal())
    plan = build_plan(facts, tp=2, profile=V032)
    convs = plan.entries_of("conv")
    patch = "model.embed_tokens_extend.image_embed.img_processor.embeddings.patch_embedding"
    assert patch in [e.qualname for e in convs]
    assert {e.target for e in convs} == {"Conv2dLayer"}
    for e in convs:
        assert all(p.rank_shape == p.full_shape and p.shard_dim is None for p in e.params)
    # before the fuser era convs are not planned
    assert not build_plan(facts, tp=2, profile=PROFILES["vllm-0.11"]).entries_of("conv")


def test_only_exact_zero_padded_convs_are_swapped():
    def conv(exact=True, padding_mode="zeros", dims=2):
        attrs = {"exact": exact, "padding_mode": padding_mode, "dims": dims}
        return ModuleFact("model.c", "Conv2d", "conv", {}, attrs)

    assert conv_target(conv()) == "Conv2dLayer"
    assert conv_target(conv(dims=3)) == "Conv3dLayer"
    assert conv_target(conv(exact=False)) is None  # replace_conv_class hands a subclass back
    assert conv_target(conv(padding_mode="reflect")) is None


def test_norm_inside_a_vocab_embedding_is_left_as_hf_code():
    # InklingNormedEmbedding is an nn.Embedding holding `embed_norm`: vLLM swaps the embedding
    # and never visits its children, so the RMSNorm the fuser takes elsewhere stays HF code.
    plan = build_plan(base.facts(inkling_text()), tp=2, profile=V032)
    inner = plan.entry_for("model.embed_tokens.embed_norm")
    assert (inner.kind, inner.target) == ("unchanged", "InklingRMSNorm")
    assert "model.embed_tokens" in inner.reason
    assert [p.rank_shape for p in inner.params] == [[64]]
    assert plan.entry_for("model.layers.0.input_layernorm").target == "TPAwareRMSNorm"
    assert plan.entry_for("model.embed_tokens").kind == "embedding"
