"""Which linears vLLM 0.32's fusers merge, decided as vLLM decides it: a match on the FX trace of
the module class, kept only if vLLM's rewrite of the forward source succeeds (no vLLM needed)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from tfbackend.inspect import SourceInfo, facts_from_config
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import PROFILES

LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=256)


def _plan(model_type, tp=2, **kw):
    config = AutoConfig.for_model(model_type, **kw)
    facts = facts_from_config(config, SourceInfo("local", "x", "config.json"))
    return build_plan(facts, tp=tp, pp=1, profile=PROFILES["vllm-0.32"])


def _linear(plan, qualname):
    """What the plan builds at `qualname` (a fused module's own name, or an unfused source)."""
    entry = next((e for e in plan.entries if e.qualname == qualname), None)
    assert entry is not None, qualname
    return entry.target, {p.name: p.rank_shape for p in entry.params}


def _gpt_bigcode(tp, **kw):
    return _plan("gpt_bigcode", tp, n_embd=64, n_layer=2, n_head=4, vocab_size=256, **kw)


def test_opt_qkv_stays_unfused_because_the_scaled_query_taints_the_shared_input():
    # `query_states = self.q_proj(hidden_states) * self.scaling` is not provably fresh, so vLLM
    # counts it as a possible view of hidden_states; rebinding it before v_proj refuses the
    # rewrite, and every projection stays a ReplicatedLinear (OPT has no tp_plan).
    plan = _plan("opt", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, **LAYERS)
    attn = "model.decoder.layers.0.self_attn"
    assert plan.entry_for(f"{attn}.qkv_proj") is None
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert _linear(plan, f"{attn}.{proj}") == (
            "ReplicatedLinear",
            {"weight": [64, 64], "bias": [64]},
        )
    note = next(n for n in plan.notes if n.startswith(f"{attn} "))
    assert "rebound or mutated before all calls" in note


def test_biogpt_merges_k_and_v_read_through_the_cross_attention_branch():
    # The trace takes `key_value_states if is_cross_attention else hidden_states` with
    # `key_value_states is not None` true on a proxy: k and v share one input, q another.
    plan = _plan("biogpt", hidden_size=64, intermediate_size=128, **LAYERS)
    attn = "model.layers.0.self_attn"
    merged = plan.entry_for(f"{attn}.k_proj")
    assert merged.qualname == f"{attn}.merged_proj_6_k_proj_6_v_proj"
    assert plan.entry_for(f"{attn}.v_proj") is merged
    assert _linear(plan, merged.qualname) == (
        "MergedColumnParallelLinear",
        {"weight": [64, 64], "bias": [64]},
    )
    assert _linear(plan, f"{attn}.q_proj")[0] == "ReplicatedLinear"


@pytest.mark.parametrize(
    "tp,heads,kv_heads,rank_out,o_in", [(1, 4, 1, 96, 64), (2, 2, 1, 64, 32), (4, 1, 1, 48, 16)]
)
def test_gpt_bigcode_packed_c_attn_is_sharded_by_heads(tp, heads, kv_heads, rank_out, o_in):
    # c_attn(x).split((64, 16, 16)): one packed linear becomes a QKVParallelLinear in place; its
    # single kv head is replicated on every rank. c_proj, which produces the output, is rowwise.
    plan = _gpt_bigcode(tp)
    c_attn = plan.entry_for("model.h.0.attn.c_attn")
    assert c_attn.qualname == "model.h.0.attn.c_attn"
    assert _linear(plan, c_attn.qualname) == (
        "QKVParallelLinear",
        {"weight": [rank_out, 64], "bias": [rank_out]},
    )
    assert (c_attn.extra["num_heads"], c_attn.extra["num_kv_heads"]) == (heads, kv_heads)
    assert c_attn.extra["output_sizes"] == [64, 16, 16]
    target, shapes = _linear(plan, "model.h.0.attn.c_proj")
    assert target == "RowParallelLinear"
    assert shapes["weight"] == [64, o_in]
    assert _linear(plan, "model.h.0.mlp.c_fc")[0] == "ReplicatedLinear"


def test_gpt_bigcode_without_multi_query_splits_per_head_and_is_not_packed():
    # split(3 * [head_dim]) after a per-head view covers one head, not c_attn's whole width
    plan = _gpt_bigcode(2, multi_query=False)
    assert _linear(plan, "model.h.0.attn.c_attn")[0] == "ReplicatedLinear"
    assert _linear(plan, "model.h.0.attn.c_proj")[0] == "ReplicatedLinear"


def test_modernbert_decoder_output_projection_is_found_through_its_dropout():
    plan = _plan(
        "modernbert-decoder",
        hidden_size=64,
        intermediate_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        **LAYERS,
    )
    attn = "model.layers.0.attn"
    assert _linear(plan, f"{attn}.qkv_proj") == ("QKVParallelLinear", {"weight": [96, 64]})
    # `self.out_drop(self.Wo(attn_output))` is returned: Wo is the output projection
    assert _linear(plan, f"{attn}.Wo") == ("RowParallelLinear", {"weight": [64, 32]})
    # Wi(x).chunk(2) is one linear: nothing to merge in the MLP
    assert _linear(plan, "model.layers.0.mlp.Wi")[0] == "ReplicatedLinear"


def test_falcon_h1_multiplied_projections_taint_their_input_and_stay_unfused():
    # `y = self.up_proj(x) * self.act_fn(...)` and `... * self.key_multiplier` are products,
    # not fresh linear outputs: vLLM refuses both rewrites (and the GLU match: the activation
    # wraps `gate_proj(x) * gate_multiplier`, not the gate itself).
    plan = _plan(
        "falcon_h1",
        hidden_size=64,
        intermediate_size=128,
        num_key_value_heads=2,
        head_dim=16,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=1,
        **LAYERS,
    )
    layer = "model.layers.0"
    for proj in ("feed_forward.gate_proj", "feed_forward.up_proj", "self_attn.q_proj"):
        assert _linear(plan, f"{layer}.{proj}")[0] == "ReplicatedLinear"
    assert plan.entry_for(f"{layer}.self_attn.qkv_proj") is None
    assert _linear(plan, f"{layer}.self_attn.o_proj")[0] == "ReplicatedLinear"
