"""The vllm-0.32 profile plans what vLLM's fusers build (no vLLM needed)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from tfbackend.inspect import SourceInfo, facts_from_config
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import PROFILES

TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def _plan(model_type, tp=1, pp=1, profile="vllm-0.32", **kw):
    config = AutoConfig.for_model(model_type, **kw)
    facts = facts_from_config(config, SourceInfo("local", "x", "config.json"))
    return build_plan(facts, tp=tp, pp=pp, profile=PROFILES[profile])


def _entry(plan, qualname):
    return next(e for e in plan.entries if e.qualname == qualname)


def test_llama_qkv_fuses_into_one_qkv_parallel_linear_with_kv_replicated_at_tp4():
    plan = _plan("llama", tp=4, hidden_size=64, intermediate_size=128, **TINY)
    qkv = _entry(plan, "model.layers.0.self_attn.qkv_proj")
    assert qkv.target == "QKVParallelLinear"
    assert sorted(qkv.sources) == [f"model.layers.0.self_attn.{p}_proj" for p in "kqv"]
    # 4 heads of 16 over 4 ranks: 1 q head, and the 2 kv heads replicated (1 per rank)
    assert qkv.params[0].rank_shape == [(1 + 2) * 16, 64]
    assert qkv.extra["kv_replicas"] == 2
    assert _entry(plan, "model.layers.0.self_attn.o_proj").target == "RowParallelLinear"
    assert plan.entry_for("model.layers.0.self_attn.q_proj") is qkv


def test_gate_up_and_activation_fuse_into_merged_column_and_silu_and_mul():
    plan = _plan("llama", tp=2, hidden_size=64, intermediate_size=128, **TINY)
    gate_up = _entry(plan, "model.layers.1.mlp.gate_up_proj")
    assert gate_up.target == "MergedColumnParallelLinear"
    assert gate_up.params[0].rank_shape == [128, 64]
    assert _entry(plan, "model.layers.1.mlp.act_fn").target == "SiluAndMul"
    assert _entry(plan, "model.layers.1.mlp.down_proj").params[0].rank_shape == [64, 64]


def test_gemma3_norms_are_tp_aware_gemma_and_activation_is_gelu_and_mul():
    plan = _plan("gemma3_text", hidden_size=64, intermediate_size=128, head_dim=16, **TINY)
    assert _entry(plan, "model.layers.0.input_layernorm").target == "TPAwareGemmaRMSNorm"
    assert _entry(plan, "model.layers.0.self_attn.q_norm").target == "TPAwareGemmaRMSNorm"
    act = _entry(plan, "model.layers.0.mlp.act_fn")
    assert (act.target, act.extra["activation"]) == ("GeluAndMul", "gelu_pytorch_tanh")
    assert _entry(plan, "model.embed_tokens").target == "Gemma3TextScaledWordEmbedding"


def test_qwen3_moe_block_becomes_moe_runner_with_gate_linear_and_routed_experts():
    plan = _plan(
        "qwen3_moe",
        tp=2,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        **TINY,
    )
    mlp = "model.layers.0.mlp"
    assert _entry(plan, f"{mlp}.experts").target == "MoERunner"
    routed = _entry(plan, f"{mlp}.experts.routed_experts")
    assert {p.name: p.rank_shape for p in routed.params} == {
        "w13_weight": [4, 32, 64],
        "w2_weight": [4, 64, 16],
    }
    assert _entry(plan, f"{mlp}.gate").target == "GateLinear"


def test_older_profile_keeps_separate_column_linears():
    plan = _plan("llama", tp=2, profile="vllm-0.11", hidden_size=64, intermediate_size=128, **TINY)
    assert _entry(plan, "model.layers.0.self_attn.q_proj").target == "ColumnParallelLinear"
    assert not [e for e in plan.entries if e.qualname.endswith("qkv_proj")]


def test_gpt2_conv1d_at_tp2_is_an_error_finding():
    from tfbackend.check import CheckOptions, check_facts

    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256)
    facts = facts_from_config(config, SourceInfo("local", "x", "config.json"))
    report = check_facts(facts, CheckOptions(tp=2, vllm_version="vllm-0.32"))
    assert any(f.rule_id == "TFB212" and f.severity.value == "error" for f in report.findings)


@pytest.mark.parametrize("tp", [1, 2])
def test_plan_json_lists_fused_sources(tp):
    plan = _plan("llama", tp=tp, hidden_size=64, intermediate_size=128, **TINY)
    data = plan.to_dict()
    fused = [e for e in data["entries"] if len(e["sources"]) > 1]
    assert {e["extra"]["fuser"] for e in fused} == {"qkv", "glu"}


def test_moe_router_that_is_not_a_lone_weight_routes_in_transformers_runner():
    # afmoe's router holds its linear as a child (`router.gate`): vLLM's MoEBlockFuser finds no
    # router, so routing stays in HF code and the experts become TransformersMoERunner.
    plan = _plan(
        "afmoe",
        tp=2,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        num_dense_layers=1,
        **TINY,
    )
    runner = _entry(plan, "model.layers.1.mlp.experts")
    assert (runner.target, runner.extra["routing"]) == ("TransformersMoERunner", "external")
    assert _entry(plan, "model.layers.1.mlp.router.gate").target == "ReplicatedLinear"


def test_every_vocab_size_key_makes_a_vocab_embedding():
    # vLLM 0.32 matches "vocab_size" anywhere in a config key: BERT's type_vocab_size=2 turns
    # token_type_embeddings into a VocabParallelEmbedding padded to 64 rows.
    plan = _plan(
        "bert",
        tp=2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
        type_vocab_size=2,
        is_decoder=True,
    )
    token_type = _entry(plan, "model.embeddings.token_type_embeddings")
    assert token_type.target == "VocabParallelEmbedding"
    assert token_type.params[0].rank_shape == [32, 64]


def test_router_that_scores_after_top_k_leaves_routing_in_transformers():
    # Cohere2-MoE's router is topk(linear(x)) then softmax: vLLM's MoEBlockFuser needs the
    # scorer to feed the top-k, so it keeps the HF router and routes externally.
    plan = _plan(
        "cohere2_moe",
        tp=2,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        **TINY,
    )
    assert _entry(plan, "model.layers.0.mlp.experts").target == "TransformersMoERunner"
    assert plan.entry_for("model.layers.0.mlp.gate") is None


QWEN2_MOE = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=96,
    num_experts=4,
    num_experts_per_tok=2,
    **TINY,
)


def test_qwen2_moe_shared_expert_and_its_gate_are_wrapped_in_the_moe_runner():
    # vLLM's MoEBlockFuser finds `experts + sigmoid(shared_expert_gate(x)) * shared_expert(x)`:
    # the runner holds SharedExperts → SharedExpertMLP(shared_experts=<the HF module>,
    # gate=ReplicatedLinear), so the shared expert's layers exist under two names
    plan = _plan("qwen2_moe", tp=2, **QWEN2_MOE)
    mlp = "model.layers.0.mlp"
    runner = _entry(plan, f"{mlp}.experts")
    assert (runner.target, runner.extra["shared_expert"]) == ("MoERunner", f"{mlp}.shared_expert")
    layer = f"{mlp}.experts._shared_experts._layer"
    assert _entry(plan, f"{mlp}.experts._shared_experts").target == "SharedExperts"
    assert _entry(plan, layer).target == "SharedExpertMLP"

    def shapes(qualname):
        e = _entry(plan, qualname)
        return e.target, {p.name: p.rank_shape for p in e.params}

    inner = f"{layer}.shared_experts"
    # gate/up of the 96-wide shared expert merged, then split over 2 ranks
    assert shapes(f"{inner}.gate_up_proj") == ("MergedColumnParallelLinear", {"weight": [96, 64]})
    assert shapes(f"{inner}.down_proj") == ("RowParallelLinear", {"weight": [64, 48]})
    assert shapes(f"{inner}.gate_up_proj") == shapes(f"{mlp}.shared_expert.gate_up_proj")
    assert _entry(plan, f"{inner}.act_fn").target == "SiluAndMul"
    # the one-logit gate is rebuilt replicated, reachable from the block and from the runner
    assert shapes(f"{layer}.gate") == ("ReplicatedLinear", {"weight": [1, 64]})
    assert shapes(f"{mlp}.shared_expert_gate") == ("ReplicatedLinear", {"weight": [1, 64]})
    assert _entry(plan, f"{layer}.gate").extra["alias_of"] == f"{mlp}.shared_expert_gate"


def test_shared_expert_aliases_cost_no_memory_twice():
    from tfbackend.memory import estimate_memory

    config = AutoConfig.for_model("qwen2_moe", **QWEN2_MOE)
    facts = facts_from_config(config, SourceInfo("local", "x", "config.json"))
    plan = build_plan(facts, tp=1, pp=1, profile=PROFILES["vllm-0.32"])
    unaliased = build_plan(facts, tp=1, pp=1, profile=PROFILES["vllm-0.32"])
    unaliased.entries = [e for e in plan.entries if "_shared_experts" not in e.qualname]

    def weight_bytes(p):
        return estimate_memory(facts, p, dtype="bfloat16").stages[0].weight_bytes

    assert weight_bytes(plan) == weight_bytes(unaliased)


def test_llama4_moe_block_returns_a_tuple_so_routing_stays_in_transformers():
    # Llama4TextMoe.forward returns (out, router_logits): MoEBlockFuser.match gives up at
    # `_returns_tuple` (its router, topk before sigmoid, would not match either)
    plan = _plan(
        "llama4_text",
        tp=2,
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=128,
        num_local_experts=4,
        num_experts_per_tok=1,
        head_dim=16,
        **TINY,
    )
    ff = "model.layers.0.feed_forward"
    assert _entry(plan, f"{ff}.experts").target == "TransformersMoERunner"
    assert _entry(plan, f"{ff}.router").target == "ReplicatedLinear"
    assert not [e for e in plan.entries if e.qualname.startswith(f"{ff}.experts.gate")]
    assert any("Llama4TextMoe.forward returns a tuple" in n for n in plan.notes)


def test_llama4_router_scores_after_top_k_and_is_no_vllm_router():
    import torch
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    from tfbackend.inspect.moe_blocks import router_reading

    with torch.device("meta"):
        router = Llama4Router(Llama4TextConfig(hidden_size=64, num_local_experts=4))
    # vLLM 0.32 asks for the score before the top-k; Llama 4 applies its sigmoid after
    reading = router_reading(router)
    assert reading["before"] is None
    assert reading["after"] == {"op": "sigmoid", "from_linear": True}


def test_ernie4_5_moe_router_keeps_its_bias_in_a_child_so_routing_stays_in_transformers():
    # Ernie4_5_MoeTopKRouter's state is weight + moe_statics.e_score_correction_bias: vLLM's
    # _match_router allows only `weight` and a top-level `e_score_correction_bias`
    plan = _plan(
        "ernie4_5_moe",
        tp=2,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        moe_num_experts=4,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=0,
        **TINY,
    )
    mlp = "model.layers.0.mlp"
    assert _entry(plan, f"{mlp}.experts").target == "TransformersMoERunner"
    assert plan.entry_for(f"{mlp}.gate") is None  # the HF router stays as is
    assert not [e for e in plan.entries if "_shared_experts" in e.qualname]
    assert _entry(plan, f"{mlp}.shared_experts.gate_up_proj").target == (
        "MergedColumnParallelLinear"
    )


def test_a_router_bias_that_is_a_parameter_becomes_a_parameter_of_the_routed_experts():
    # Laguna keeps e_score_correction_bias as an nn.Parameter of its router: vLLM hands it to
    # FusedMoE, which then owns it (laguna@tp1/2 in reports/agreement.md). GLM-4 MoE keeps a
    # buffer, which stays a buffer.
    from transformers import Glm4MoeConfig, LagunaConfig

    tiny = dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts_per_tok=2,
        vocab_size=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    laguna = LagunaConfig(**tiny, num_experts=8, shared_expert_intermediate_size=32)
    glm = Glm4MoeConfig(
        **tiny, n_routed_experts=8, n_group=1, topk_group=1, first_k_dense_replace=1
    )
    for config, bias in ((laguna, [[8], [8]]), (glm, [])):
        facts = facts_from_config(config, SourceInfo("local", "tiny", "<memory>"))
        plan = build_plan(facts, tp=2, pp=1, profile=PROFILES["vllm-0.32"])
        routed = [e for e in plan.entries if e.qualname.endswith(".routed_experts")]
        assert routed, config.model_type
        got = [
            [p.full_shape, p.rank_shape]
            for p in routed[-1].params
            if p.name == "e_score_correction_bias"
        ]
        assert got == ([bias] if bias else []), config.model_type
