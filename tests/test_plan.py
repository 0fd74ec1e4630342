"""The replacement plan follows vLLM's rules: first-matching tp_plan key, style table, shards."""

from tests import tiny
from tfbackend.check import CheckOptions, check_facts
from tfbackend.replace.planner import build_plan, match_tp_plan
from tfbackend.replace.profiles import PROFILES

SEED = PROFILES["vllm-0.11"]


def plan_for(config, tp=1, pp=1, profile=SEED):
    return build_plan(tiny.facts(config), tp=tp, pp=pp, profile=profile)


def test_llama_linears_follow_tp_plan_styles_with_per_rank_shapes():
    plan = plan_for(tiny.llama(), tp=2)
    q = plan.entry_for("model.layers.0.self_attn.q_proj")
    assert q.target == "ColumnParallelLinear"
    assert q.tp_style == "colwise" and q.tp_key == "layers.*.self_attn.q_proj"
    assert q.params[0].full_shape == [64, 64] and q.params[0].rank_shape == [32, 64]
    o = plan.entry_for("model.layers.3.self_attn.o_proj")
    assert o.target == "RowParallelLinear" and o.params[0].rank_shape == [64, 32]
    down = plan.entry_for("model.layers.1.mlp.down_proj")
    assert down.params[0].rank_shape == [64, 64]


def test_first_matching_key_wins_by_prefix_match():
    tp_plan = {"layers.*.mlp.gate": "replicate", "layers.*.mlp.gate_proj": "colwise"}
    # re.match is a prefix match: `mlp.gate` also catches `mlp.gate_proj`, and it comes first.
    assert match_tp_plan(tp_plan, "model.layers.0.mlp.gate_proj") == (
        "layers.*.mlp.gate",
        "replicate",
    )


def test_unknown_style_falls_back_to_replicated_and_says_so():
    tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.mlp.gate_proj": "packed_colwise",
    }
    plan = plan_for(tiny.llama(base_model_tp_plan=tp_plan), tp=2)
    gate = plan.entry_for("model.layers.1.mlp.gate_proj")
    assert gate.target == "ReplicatedLinear" and gate.tp_style == "packed_colwise"
    assert "silently replicated" in gate.reason
    assert gate.params[0].rank_shape == gate.params[0].full_shape
    up = plan.entry_for("model.layers.1.mlp.up_proj")
    assert up.target == "ReplicatedLinear" and up.tp_key is None


def test_gemma3_offset_norms_and_embed_scale_and_sliding_layers():
    facts = tiny.facts(tiny.gemma3_text(num_hidden_layers=6))
    plan = build_plan(facts, tp=2, pp=1, profile=PROFILES["vllm-0.32"])
    norm = plan.entry_for("model.layers.0.input_layernorm")
    assert norm.target == "TPAwareGemmaRMSNorm" and norm.extra["variant"] == "offset"
    seed = build_plan(facts, tp=2, pp=1, profile=SEED)
    assert seed.entry_for("model.layers.0.input_layernorm").target == "GemmaRMSNorm"
    emb = plan.entry_for("model.embed_tokens")
    # vLLM 0.32 rebases the scaled-embedding subclass onto VocabParallelEmbedding in place
    assert emb.target == "Gemma3TextScaledWordEmbedding"
    assert emb.extra["rebased_on"] == "VocabParallelEmbedding"
    assert emb.extra["has_embed_scale"] is True
    windows = [a.sliding_window for a in plan.attention]
    assert 16 in windows and None in windows  # sliding and full layers interleave


def test_llama_norm_is_plain_rmsnorm():
    plan = plan_for(tiny.llama(), profile=PROFILES["vllm-0.32"])
    assert plan.entry_for("model.norm").target == "TPAwareRMSNorm"
    assert plan_for(tiny.llama()).entry_for("model.norm").target == "RMSNorm"
    assert plan.entry_for("model.norm").extra["variant"] == "plain"


def test_vocab_is_padded_to_64_then_split():
    plan = plan_for(tiny.llama(vocab_size=1000), tp=4)
    emb = plan.entry_for("model.embed_tokens")
    assert emb.extra["padded_vocab"] == 1024
    assert emb.params[0].rank_shape == [256, 64]
    head = plan.entry_for("lm_head")
    assert head.target == "ParallelLMHead" and head.params[0].rank_shape == [256, 64]


def test_tied_lm_head_points_at_the_input_embedding():
    plan = plan_for(tiny.llama(tie_word_embeddings=True))
    head = plan.entry_for("lm_head")
    assert head.extra["tied"] is True and head.extra["tied_to"] == "model.embed_tokens"


def test_kv_heads_fewer_than_tp_are_replicated():
    plan = plan_for(tiny.llama(num_key_value_heads=1), tp=4)
    spec = plan.attention[0]
    assert spec.heads_per_rank == 1 and spec.kv_heads_per_rank == 1 and spec.kv_replicated


def test_moe_experts_become_one_fused_moe_with_numbers():
    plan = plan_for(tiny.qwen3_moe(), tp=2, profile=PROFILES["vllm-0.32"])
    assert len(plan.moe) == 2
    moe = plan.moe[0]
    assert (moe.num_experts, moe.top_k, moe.intermediate_size) == (4, 2, 32)
    assert moe.intermediate_per_rank == 16 and moe.activation == "silu"
    assert moe.layout == "fused_3d"
    runner = plan.entry_for("model.layers.0.mlp.experts")
    assert runner.target == "MoERunner"
    (experts,) = [e for e in plan.entries if e.qualname.endswith("0.mlp.experts.routed_experts")]
    assert experts.target == "TransformersRoutedExperts"
    w13 = experts.params[0]
    assert w13.full_shape == [4, 64, 64] and w13.rank_shape == [4, 32, 64]


def test_mixtral_experts_counted_from_num_local_experts():
    plan = plan_for(tiny.mixtral(), tp=2, profile=PROFILES["vllm-0.32"])
    assert plan.moe[0].num_experts == 4 and plan.moe[0].intermediate_size == 96


def test_pipeline_stages_follow_get_pp_indices():
    plan = plan_for(tiny.llama(num_hidden_layers=5), pp=2)
    assert [s.layers for s in plan.stages] == [[0, 3], [3, 5]]
    assert plan.stages[0].modules == ["embed_tokens"] and plan.stages[1].modules == ["norm"]
    assert plan.entry_for("model.layers.4.mlp.up_proj").stage == 1
    assert plan.entry_for("lm_head").stage == 1


def test_tied_embeddings_kept_on_first_and_last_stage():
    plan = plan_for(tiny.llama(tie_word_embeddings=True), pp=2)
    assert "embed_tokens" in plan.stages[0].modules and "embed_tokens" in plan.stages[1].modules


def test_gpt2_conv1d_is_left_full_size():
    plan = plan_for(tiny.gpt2(), tp=2)
    c_attn = plan.entry_for("model.h.0.attn.c_attn")
    assert c_attn.kind == "unchanged" and c_attn.params[0].rank_shape == c_attn.params[0].full_shape


def test_plan_is_json_serialisable_and_deterministic():
    import json

    a = json.dumps(plan_for(tiny.llama(), tp=2).to_dict(), sort_keys=True)
    b = json.dumps(plan_for(tiny.llama(), tp=2).to_dict(), sort_keys=True)
    assert a == b


def test_check_facts_gives_a_verdict():
    report = check_facts(tiny.facts(tiny.llama()), CheckOptions(tp=2))
    assert report.verdict.value == "PASS"


def test_tied_lm_head_takes_the_embedding_width_not_hidden_size():
    from transformers import ElectraConfig

    config = ElectraConfig(
        embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, vocab_size=512, is_decoder=True,
        architectures=["ElectraForCausalLM"],
    )  # fmt: skip
    head = plan_for(config, profile=PROFILES["vllm-0.32"]).entry_for("lm_head")
    assert head.extra["tied"] and head.params[0].full_shape == [512, 32]
