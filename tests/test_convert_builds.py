"""convert's per-rank state dicts against vLLM 0.32's own builds (reports/agreement-builds.tar.gz).

No vLLM needed: for each architecture, every tensor `convert` would write must be a parameter
of vLLM's build on that rank (or a buffer), with the same shape, under the smallest of the names
vLLM reaches it by; and every parameter of vLLM's build must be written under one of them. The
checkpoint is described by headers only (`tests/_convert_builds.py`), so the builds' full-size
default configs need no weights.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile

import pytest

from tests._convert_builds import compare, synthetic_headers
from tfbackend.convert.sources import index_sources
from tfbackend.convert.state import build_layout
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import PROFILES

ROOT = os.path.join(os.path.dirname(__file__), "..")
ARCHIVE = os.path.join(ROOT, "reports", "agreement-builds.tar.gz")

# Each brings a layout of its own: fused and packed q/k/v, merged and disable_tp projections
# (MLA), vocab padding, routed experts from 3-D tensors, routers and their aliases, shared
# experts reached under the runner's path, sinks, score-correction buffers, HF-kept modules.
MODEL_TYPES = [
    "llama",
    "gemma3_text",
    "gpt_bigcode",
    "qwen3_moe",
    "mixtral",
    "qwen2_moe",
    "granitemoeshared",
    "deepseek_v3",
    "minicpm3",
    "glm4_moe",
    "longcat_flash",
    "gpt_oss",
    "falcon_h1",
    "zaya",
]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("builds")
    with tarfile.open(ARCHIVE) as tar:
        try:
            tar.extractall(out, filter="data")
        except TypeError:  # a Python without extraction filters; the archive is our own
            tar.extractall(out)
    return out / "agreement-builds"


@pytest.fixture(scope="module")
def prepare():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import agreement_report

        yield agreement_report.prepare
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))


def _layout(facts, tp):
    plan = build_plan(facts, tp=tp, pp=1, profile=PROFILES["vllm-0.32"])
    return build_layout(facts, plan, index_sources(synthetic_headers(facts), facts), "bfloat16")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_written_names_and_shapes_are_vllms_own_per_rank(model_type, builds, prepare, tmp_path):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    saved = {tp: json.loads((builds / f"{model_type}@tp{tp}.json").read_text()) for tp in (1, 2)}
    _, facts, *_ = prepare(
        model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], str(tmp_path),
        saved[1].get("layers"),
    )  # fmt: skip
    for tp, build in saved.items():
        layout = _layout(facts, tp)
        assert not layout.blockers, (tp, layout.blockers[:3])
        assert len(layout.ranks) == len(build["ranks"]) == tp
        for rank, built in zip(layout.ranks, build["ranks"], strict=True):
            buffers = {t.name for t in rank.tensors if t.buffer}
            assert compare(rank, built, buffers) == [], (tp, rank.tp_rank)


def test_a_parameter_vllms_loader_would_leave_uninitialised_blocks_the_conversion(
    builds, prepare, tmp_path
):
    # GPT-2's _keys_to_ignore_on_load_unexpected ("attn.bias") also matches c_attn.bias, and
    # vLLM applies it to every checkpoint key: there is no value to write for that parameter
    _, facts, *_ = prepare("gpt2", "GPT2LMHeadModel", str(tmp_path), None)
    layout = _layout(facts, 2)
    assert any("c_attn.bias" in b and "drops" in b for b in layout.blockers)
