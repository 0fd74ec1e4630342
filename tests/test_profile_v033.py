"""vLLM 0.33 is one profile plus the fuser that changed (replace/profiles.py, fusers/moe_v033.py).

What 0.33's Transformers backend changed was read from its wheel; each behaviour here is checked
on a real transformers model and on a neighbour it must leave alone. vLLM 0.33's own builds of
the zoo are re-diffed in test_agreement_builds_v033.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from tfbackend.check import CheckOptions, check_facts
from tfbackend.fusers import DataflowMoEBlockFuser, MoEBlockFuser
from tfbackend.inspect import SourceInfo, facts_from_config
from tfbackend.replace.profiles import PROFILES, Capability, select_profile

SOURCE = SourceInfo("local", "tiny", "<memory>")
V032, V033 = PROFILES["vllm-0.32"], PROFILES["vllm-0.33"]


def _facts(model_type: str, **kw):
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type](**kw)
    return facts_from_config(config, SOURCE)


def _qwen2_moe(layers: int):
    return _facts(
        "qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=256,
    )  # fmt: skip


def _report(facts, profile: str, tp: int = 2):
    return check_facts(facts, CheckOptions(tp=tp, vllm_version=profile))


def _errors(report) -> set[str]:
    return {f.rule_id for f in report.findings if f.severity.value == "error"}


def _runner(report, block: str):
    return next(e for e in report.plan.entries if e.qualname == f"{block}.experts")


def test_the_release_is_one_profile_plus_the_fuser_that_changed():
    changed = {
        f.name for f in dataclasses.fields(V033) if getattr(V033, f.name) != getattr(V032, f.name)
    }
    assert changed == {
        "name",
        "vllm_min",
        "vllm_max",
        "summary",
        "fusers",
        "capabilities",
        "max_transformers",
        "serving_transformers",
        "min_torch",
        "moe_top_k_attrs",
        "config_overrides",
    }
    pairs = list(zip(V032.fusers, V033.fusers, strict=True))
    swapped = [(a.name, type(b).__name__) for a, b in pairs if type(a) is not type(b)]
    assert swapped == [("MoEBlockFuser", "DataflowMoEBlockFuser")]
    assert V033.fuser(MoEBlockFuser) is V033.fuser(DataflowMoEBlockFuser)  # a subclass
    assert V033.capabilities - V032.capabilities == {Capability.LOADS_TRANSPOSED_EXPERTS}
    assert (V032.vllm_max, V033.vllm_min, V033.vllm_max) == ("0.33.0", "0.33.0", None)
    # vLLM 0.33.0's requirements: transformers>=5.16.1,<5.21.0, torch==2.14.0
    assert V033.transformers_range() == ">=5.16.1,<5.21.0"
    assert V033.min_torch == "2.14.0"


@pytest.mark.parametrize(
    ("requested", "installed", "profile"),
    [
        ("0.33", None, "vllm-0.33"),
        ("0.33.0", "0.32.0", "vllm-0.33"),
        ("0.32.1", None, "vllm-0.32"),
        (None, "0.33.0", "vllm-0.33"),
        (None, "0.34.0", "vllm-0.33"),
        (None, None, "vllm-0.32"),  # the newest whose real forward was run (reports/parity.md)
    ],
)
def test_a_vllm_version_selects_its_profile(requested, installed, profile):
    assert select_profile(requested, installed).name == profile


def test_ernie_moe_keeps_its_router_but_033_runs_its_shared_expert_in_the_runner():
    # Ernie4_5_MoeTopKRouter holds moe_statics.e_score_correction_bias: no vLLM router in either
    # release. 0.32 leaves the whole block in Transformers; 0.33 fuses it with the HF gate routing
    # (custom_routing_function) and the shared expert wrapped in the MoERunner.
    facts = _facts(
        "ernie4_5_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, moe_num_experts=4,
        moe_k=2, moe_num_shared_experts=1, vocab_size=256,
    )  # fmt: skip
    old, new = _report(facts, "vllm-0.32"), _report(facts, "vllm-0.33")
    block = "model.layers.1.mlp"
    assert _runner(old, block).target == "TransformersMoERunner"
    assert not [e for e in old.plan.entries if e.target == "SharedExpertMLP"]
    runner = _runner(new, block)
    assert runner.target == "MoERunner"
    assert runner.extra["routing"] == "external"
    assert runner.extra["shared_expert"] == f"{block}.shared_experts"
    names = {e.qualname: e.target for e in new.plan.entries}
    assert names[f"{block}.experts._shared_experts._layer"] == "SharedExpertMLP"
    assert "GateLinear" not in names.values()  # the HF gate routes
    assert not _errors(new)


def test_qwen2_moe_routes_inside_vllm_in_both_releases():
    facts = _qwen2_moe(layers=2)
    for profile in ("vllm-0.32", "vllm-0.33"):
        report = _report(facts, profile)
        runner = _runner(report, "model.layers.0.mlp")
        assert (runner.target, runner.extra["routing"]) == ("MoERunner", "internal"), profile
        gates = {
            e.qualname: e.target
            for e in report.plan.entries
            if e.kind == "router" and e.qualname.startswith("model.layers.0.")
        }
        # the router, and the runner's alias of it
        assert gates == {
            "model.layers.0.mlp.gate": "GateLinear",
            "model.layers.0.mlp.experts.gate": "GateLinear",
        }, profile


def test_experts_that_declare_is_transposed_load_in_033_only():
    # Aria's experts are use_experts_implementation(is_transposed=True): [E, H, 2I]. 0.32 never
    # passes is_fused_checkpoint_transposed (TFB519); 0.33 passes it. Aria also names top_k
    # `moe_topk`, which 0.33's CONFIG_FIELD_ALIASES read and 0.32 does not (TFB511).
    facts = _facts(
        "aria_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, moe_num_experts=4, moe_topk=2,
        vocab_size=256,
    )  # fmt: skip
    experts = [m for m in facts.modules if m.qualname.endswith(".experts")]
    assert experts and all(m.attrs["is_transposed"] for m in experts)
    assert {"TFB511", "TFB519"} <= _errors(_report(facts, "vllm-0.32"))
    assert not {"TFB511", "TFB519"} & _errors(_report(facts, "vllm-0.33"))


def test_llama4_experts_are_input_first_without_declaring_it_and_fail_in_both():
    facts = _facts(
        "llama4_text", hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, vocab_size=256,
    )  # fmt: skip
    assert not any(m.attrs.get("is_transposed") for m in facts.modules)
    for profile in ("vllm-0.32", "vllm-0.33"):
        assert "TFB519" in _errors(_report(facts, profile)), profile


def test_the_walk_records_what_the_block_does_not_a_release_verdict():
    facts = _qwen2_moe(layers=1)
    experts = next(m for m in facts.modules if m.qualname.endswith(".experts"))
    block = experts.attrs["moe_block"]
    assert "router" not in block and "routing" not in block
    assert block["experts_call"] == {"gate": "gate"}
    assert block["first_add"] == {"shared": "shared_expert", "gate": "shared_expert_gate"}
    assert block["output"] == {
        "routed_scaled": False,
        "shared": "shared_expert",
        "shared_gate": "shared_expert_gate",
    }
    assert block["routers"]["gate"]["before"] == {"op": "softmax", "from_linear": True}


def test_deepseek_v4_hash_layers_stay_in_transformers_and_the_rest_fuse_in_033():
    # One block class, two gates: the first layers route by token hash (DeepseekV4HashRouter,
    # `is_hash` branches the forward to `gate(x, input_ids)`), the rest by sqrt-softplus top-k,
    # which is no vLLM router, so 0.33 routes those with the HF gate and runs the shared expert
    # in the runner. vLLM matches every block anew; a reading cached per class would give
    # every layer the first layer's verdict.
    facts = _facts(
        "deepseek_v4", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=64,
        qk_rope_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        vocab_size=256, index_n_heads=4, index_head_dim=16, num_nextn_predict_layers=0,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe"],
    )  # fmt: skip
    hashed, routed = "model.layers.0.mlp", "model.layers.1.mlp"
    old, new = _report(facts, "vllm-0.32"), _report(facts, "vllm-0.33")
    assert _runner(old, hashed).target == _runner(old, routed).target == "TransformersMoERunner"
    assert _runner(new, hashed).target == "TransformersMoERunner"
    runner = _runner(new, routed)
    assert (runner.target, runner.extra["routing"]) == ("MoERunner", "external")
    assert runner.extra["shared_expert"] == f"{routed}.shared_experts"
