"""Per-rank memory: numbers checked against hand computation for a dense and an MoE config."""

from __future__ import annotations

import pytest

from tfbackend.check import CheckOptions, check_facts
from tfbackend.inspect import facts_from_config
from tfbackend.inspect.facts import SourceInfo
from tfbackend.memory import MAX_LEN_CAP, served_dtype

SOURCE = SourceInfo(kind="local", location="in-memory", config_path="")


def _llama(**kw):
    from transformers import LlamaConfig

    args = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,  # head size 16
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return facts_from_config(LlamaConfig(**{**args, **kw}), SOURCE)


def _memory(facts, **options):
    report = check_facts(facts, CheckOptions(**options))
    return report, report.sections["memory"]


# One Llama layer at tp=2, in elements per rank:
#   q [64→64] colwise 32×64=2048, k/v [64→32] colwise 16×64=1024 each, o rowwise 64×32=2048,
#   gate/up [64→128] colwise 64×64=4096 each, down rowwise 64×64=4096, two norms 2×64=128.
LLAMA_LAYER_TP2 = 2048 + 1024 + 1024 + 2048 + 3 * 4096 + 128
# Same layer at tp=1: 4096 + 2048 + 2048 + 4096 + 3 × 8192 + 128.
LLAMA_LAYER_TP1 = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128


def test_dense_weights_per_rank_match_hand_computation():
    _, mem = _memory(_llama(), tp=2, dtype="bfloat16")
    (stage,) = mem.stages
    embed = lm_head = (256 // 2) * 64  # vocab 256 (already a multiple of 64) split in two
    expected = 4 * LLAMA_LAYER_TP2 + embed + lm_head + 64  # + final norm
    assert stage.ranks == [0, 1]
    assert stage.weight_bytes == expected * 2


def test_dense_kv_cache_per_token_and_for_max_model_len():
    _, mem = _memory(_llama(), tp=2, dtype="bfloat16")
    (stage,) = mem.stages
    # 4 layers × (K and V) × 1 kv head per rank × head size 16 × 2 bytes
    assert stage.kv_bytes_per_token == 4 * 2 * 1 * 16 * 2 == 256
    assert mem.max_model_len == 512
    assert stage.kv_bytes_max_len == 256 * 512


def test_kv_heads_fewer_than_tp_are_replicated_in_the_kv_cache():
    _, mem = _memory(_llama(), tp=4, dtype="bfloat16")
    # 2 kv heads over 4 ranks: each rank keeps one whole kv head
    assert mem.stages[0].kv_bytes_per_token == 4 * 2 * 1 * 16 * 2


def test_pipeline_stages_hold_their_own_layers_and_ends():
    _, mem = _memory(_llama(), pp=2, dtype="bfloat16")
    first, last = mem.stages
    assert (first.ranks, last.ranks) == ([0], [1])
    assert first.weight_bytes == (256 * 64 + 2 * LLAMA_LAYER_TP1) * 2  # embedding + layers 0–1
    assert last.weight_bytes == (2 * LLAMA_LAYER_TP1 + 64 + 256 * 64) * 2  # layers 2–3, norm, head
    assert first.kv_bytes_per_token == last.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2


def test_tied_lm_head_costs_nothing_but_the_last_stage_keeps_the_embedding():
    _, mem = _memory(_llama(tie_word_embeddings=True), pp=2, dtype="bfloat16")
    first, last = mem.stages
    assert last.weight_bytes == (2 * LLAMA_LAYER_TP1 + 64 + 256 * 64) * 2
    assert first.weight_bytes == (256 * 64 + 2 * LLAMA_LAYER_TP1) * 2


def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        max_position_embeddings=256,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    return facts_from_config(config, SOURCE)


def test_moe_weights_per_rank_match_hand_computation():
    _, mem = _memory(_qwen3_moe(), tp=2, dtype="bfloat16")
    (stage,) = mem.stages
    layer = (
        16 * 32  # q_proj [32→32] colwise
        + 2 * 8 * 32  # k_proj, v_proj [32→16] colwise
        + 32 * 16  # o_proj rowwise
        + 2 * 8  # q_norm, k_norm (head size 8), replicated
        + 4 * (2 * 16 // 2) * 32  # experts w13 [E, 2I, H], I split over tp
        + 4 * 32 * (16 // 2)  # experts w2 [E, H, I], I split over tp
        + 4 * 32  # router weight [E, H]: HF code, whole on every rank
        + 2 * 32  # input / post-attention norms
    )
    embed = lm_head = (128 // 2) * 32
    assert stage.weight_bytes == (2 * layer + embed + lm_head + 32) * 2
    assert stage.kv_bytes_per_token == 2 * 2 * 1 * 8 * 2
    assert stage.kv_bytes_max_len == 64 * 256


def test_sliding_layers_hold_at_most_their_window():
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=128,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=1024,
    )
    _, mem = _memory(facts_from_config(config, SOURCE), dtype="bfloat16", max_model_len=512)
    per_layer = 2 * 1 * 16 * 2
    (stage,) = mem.stages
    assert stage.kv_bytes_per_token == 2 * per_layer
    assert stage.kv_bytes_max_len == per_layer * 64 + per_layer * 512


def test_rank_whose_weights_do_not_fit_is_an_error():
    report, mem = _memory(_llama(), tp=2, dtype="bfloat16", gpu_memory=0.0001)
    assert not mem.stages[0].weights_fit
    assert "TFB710" in [f.rule_id for f in report.findings] and report.exit_code == 1


def test_kv_for_one_max_len_sequence_that_does_not_fit_is_an_error():
    # budget int(0.00025 GiB × 0.9) = 241,591 B: weights 181,376 B fit, + 131,072 B of KV do not
    report, mem = _memory(_llama(), tp=2, dtype="bfloat16", gpu_memory=0.00025)
    (stage,) = mem.stages
    assert stage.weights_fit and not stage.fits
    assert stage.max_kv_tokens == (241591 - 181376) // 256
    (finding,) = [f for f in report.findings if f.rule_id == "TFB711"]
    assert "235 tokens fit" in finding.message


def test_defaults_follow_vllm_dtype_and_cap_the_context():
    assert served_dtype(None, "float32") == "bfloat16"  # vLLM's "auto" downcasts float32
    assert served_dtype(None, "float16") == "float16"
    assert served_dtype("fp32", "bfloat16") == "float32"
    _, mem = _memory(_llama(max_position_embeddings=10_000_000))
    assert mem.max_model_len == MAX_LEN_CAP and "capped" in mem.max_model_len_note


def test_memory_section_renders_per_rank_table():
    from rich.console import Console

    from tfbackend.report.sections import memory as section

    _, mem = _memory(_llama(), tp=2)
    console = Console(record=True, width=140)
    section.render(mem, console)
    text = console.export_text()
    assert "0–1" in text and "KV/token" in text and "yes" in text


@pytest.mark.parametrize("bad", [dict(gpu_memory=0), dict(max_model_len=0), dict(dtype="int3")])
def test_bad_memory_options_are_user_errors(bad):
    from tfbackend.errors import UserError

    with pytest.raises(UserError):
        CheckOptions(**bad).validate()
