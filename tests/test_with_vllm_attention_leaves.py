"""vLLM's own build agrees with the plan on attention sinks per rank, per-layer head sizes,
the base model's own parameters, vision/audio convs and a norm inside a vocab embedding."""

from __future__ import annotations

import importlib.util

import pytest

from tests import _rules_support as base
from tests.test_plan_attention import gemma4_text
from tests.test_plan_leaves import inkling_text, phi4_multimodal, zaya
from tfbackend.inspect import SourceInfo, facts_from_config
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import PROFILES

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
]

MODELS = {
    "gpt_oss": (lambda: base.gpt_oss(), "GptOssForCausalLM"),
    "gemma4_text": (gemma4_text, "Gemma4ForCausalLM"),
    "zaya": (zaya, "ZayaForCausalLM"),
    "inkling_text": (inkling_text, "InklingForCausalLM"),
    "phi4_multimodal": (phi4_multimodal, "Phi4MultimodalForCausalLM"),
}
TPS = [1, 2]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    from tfbackend.vllm_bridge.run import build_with_vllm

    dirs, facts = {}, {}
    for name, (make, arch) in MODELS.items():
        config = make()
        config.architectures = [arch]
        d = tmp_path_factory.mktemp(name)
        config.save_pretrained(d)
        dirs[name] = str(d)
        facts[name] = facts_from_config(config, SourceInfo("local", str(d), str(d / "config.json")))
    out = {}
    for tp in TPS:
        runs = build_with_vllm(list(dirs.values()), tp=tp, pp=1, timeout=480)
        for name, build in zip(dirs, runs, strict=True):
            out[name, tp] = (facts[name], build)
    return out


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", list(MODELS))
def test_plan_and_vllm_agree(builds, name, tp):
    from tfbackend.vllm_bridge.diff import compare

    facts, build = builds[name, tp]
    assert build.error is None
    plan = build_plan(facts, tp=tp, pp=1, profile=PROFILES["vllm-0.32"])
    agreement = compare(facts, plan, build)
    assert agreement.vllm_error is None
    assert agreement.disagreements == []
    assert agreement.compared > 10


def test_vllm_splits_gpt_oss_sinks_over_tp(builds):
    _, build = builds["gpt_oss", 2]
    for rank in build.ranks:
        built = {m["qualname"]: m for m in rank["modules"]}
        assert built["model.layers.0.self_attn"]["params"] == {"sinks": [2]}


def test_vllm_sizes_gemma4_attention_per_layer(builds):
    _, build = builds["gemma4_text", 1]
    built = {m["qualname"]: m for m in build.ranks[0]["modules"]}
    sizes = [built[f"model.layers.{i}.self_attn.attn"]["attrs"]["head_size"] for i in range(4)]
    assert sizes == [16, 32, 16, 32]
