"""tfbackend's plan agrees with vLLM's own construction (vLLM installed, CPU, meta, gloo).

One spawned worker run per (tp, pp) builds every tiny model, so vLLM is imported once per rank.
"""

from __future__ import annotations

import importlib.util

import pytest
from transformers import AutoConfig

from tfbackend.inspect import SourceInfo, facts_from_config
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import PROFILES

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
]

ATTN = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
MODELS = {
    "llama": ("LlamaForCausalLM", dict(hidden_size=64, intermediate_size=128, **ATTN)),
    "gemma3_text": (
        "Gemma3ForCausalLM",
        dict(hidden_size=64, intermediate_size=128, head_dim=16, **ATTN),
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            **ATTN,
        ),
    ),
    "mixtral": (
        "MixtralForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_local_experts=4,
            num_experts_per_tok=2,
            **ATTN,
        ),
    ),
    # shared expert + sigmoid gate, wrapped inside vLLM's MoERunner
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            num_experts=4,
            num_experts_per_tok=2,
            **ATTN,
        ),
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=256,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
}
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
# Built at tp 2 only (no _pp_plan): one packed c_attn that vLLM's PackedQKVFuser shards by heads.
TP2_ONLY = {
    "gpt_bigcode": (
        "GPTBigCodeForCausalLM",
        dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64),
    ),
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    from tfbackend.vllm_bridge.run import build_with_vllm

    dirs, facts = {}, {}
    for name, (arch, kw) in {**MODELS, **TP2_ONLY}.items():
        config = AutoConfig.for_model(name, **kw)
        config.architectures = [arch]
        d = tmp_path_factory.mktemp(name)
        config.save_pretrained(d)
        dirs[name] = str(d)
        facts[name] = facts_from_config(config, SourceInfo("local", str(d), str(d / "config.json")))
    out = {}
    for tp, pp in LAYOUTS:
        names = [n for n in dirs if n in MODELS or (tp, pp) == (2, 1)]
        runs = build_with_vllm([dirs[n] for n in names], tp=tp, pp=pp, timeout=480)
        for name, build in zip(names, runs, strict=True):
            out[name, tp, pp] = (facts[name], build)
    return out


@pytest.mark.parametrize(
    "name,tp,pp", [(n, tp, pp) for tp, pp in LAYOUTS for n in MODELS] + [("gpt_bigcode", 2, 1)]
)
def test_plan_and_vllm_agree_on_every_module_class_and_rank_shape(builds, name, tp, pp):
    from tfbackend.vllm_bridge.diff import compare

    facts, build = builds[name, tp, pp]
    assert build.error is None
    plan = build_plan(facts, tp=tp, pp=pp, profile=PROFILES["vllm-0.32"])
    agreement = compare(facts, plan, build)
    assert agreement.vllm_error is None
    assert agreement.disagreements == []
    assert agreement.compared > 10


def test_gpt_bigcode_packed_c_attn_is_a_qkv_parallel_linear_in_vllm_too(builds):
    _, build = builds["gpt_bigcode", 2, 1]
    built = {m["qualname"]: m for m in build.ranks[1]["modules"]}
    c_attn = built["model.h.0.attn.c_attn"]
    # 4 heads of 16 over 2 ranks, the single kv head replicated on both
    assert c_attn["class_name"] == "QKVParallelLinear"
    assert c_attn["params"]["weight"] == [(2 + 2 * 1) * 16, 64]
    assert built["model.h.0.attn.c_proj"]["class_name"] == "RowParallelLinear"


def test_gpt2_at_tp2_vllm_builds_full_size_conv1d_and_tfbackend_calls_it_an_error(builds):
    from tfbackend.check import CheckOptions, check_facts

    facts, build = builds["gpt2", 2, 1]
    built = {m["qualname"]: m for m in build.ranks[1]["modules"]}
    # vLLM splits the heads but leaves the Conv1D projection full size on every rank
    assert built["model.h.0.attn.attn"]["attrs"]["num_heads"] == 2
    assert built["model.h.0.attn.c_attn"]["params"]["weight"] == [64, 192]
    report = check_facts(facts, CheckOptions(tp=2, vllm_version="vllm-0.32"))
    assert report.verdict.value == "FAIL"
    assert [f.severity.value for f in report.findings if f.rule_id == "TFB212"] == ["error"]


def test_qwen2_moe_at_tp2_vllm_wraps_the_shared_expert_where_the_plan_says(builds):
    facts, build = builds["qwen2_moe", 2, 1]
    plan = build_plan(facts, tp=2, pp=1, profile=PROFILES["vllm-0.32"])
    layer = "model.layers.1.mlp.experts._shared_experts._layer"
    planned = {e.qualname: e for e in plan.entries if e.qualname.startswith(layer)}
    for rank in build.ranks:
        built = {m["qualname"]: m for m in rank["modules"] if m["qualname"].startswith(layer)}
        assert set(built) - {f"{layer}.shared_experts"} == set(planned)
        assert built[f"{layer}.shared_experts.down_proj"]["params"] == {"weight": [64, 48]}
        assert built[f"{layer}.gate"]["class_name"] == "ReplicatedLinear"
