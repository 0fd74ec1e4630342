"""tfbackend's vllm-0.33 plan against vLLM 0.33's own builds, saved in
reports/agreement-0.33-builds.tar.gz.

vLLM 0.33.0 built these on the meta device (scripts/agreement_report.py --raw, with transformers
5.20.2); re-diffing them needs neither vLLM nor that transformers. The families are those whose
plan 0.33 changed (MoE blocks matched by their dataflow, external routing with a shared expert,
transposed experts, per-layer gates), the MLA models, and a few dense ones that must not move;
each re-diffs to full agreement under the transformers of CI's legs a (5.19) and c (the newest).
"""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from tests.test_agreement_builds import ROOT, report_script  # noqa: F401 - a fixture

PROFILE = "vllm-0.33"

MODEL_TYPES = [
    # MoE blocks, as 0.33 reads their dataflow
    "afmoe",
    "aria_text",  # is_transposed experts, top-k named moe_topk (5.20 code only: see below)
    "cohere2_moe",
    "deepseek_v3",
    "deepseek_v4",  # hash-routed layers, then external routing with the shared expert
    "ernie4_5_moe",  # external routing: no vLLM router, shared expert in the runner
    "glm4_moe",
    "gpt_oss",
    "granitemoeshared",  # (5.20 code only)
    "hy_v3",
    "laguna",
    "llama4_text",  # sigmoid after the top-k
    "mixtral",
    "olmoe",
    "phimoe",
    "qwen2_moe",  # sigmoid-gated shared expert
    "qwen3_moe",
    # MLA
    "glm4_moe_lite",
    "longcat_flash",
    "minicpm3",
    "youtu",
    # dense
    "falcon_h1",
    "gemma3_text",
    "gpt2",
    "llama",
    "modernbert-decoder",
]


@pytest.fixture(scope="module")
def builds(report_script, tmp_path_factory):  # noqa: F811 - the imported fixture
    archive, folder = report_script.archive_of(PROFILE)
    out = tmp_path_factory.mktemp("builds-0.33")
    with tarfile.open(os.path.join(ROOT, archive)) as tar:
        try:
            tar.extractall(out, filter="data")
        except TypeError:  # a Python without extraction filters; the archive is our own
            tar.extractall(out)
    return out / folder


# transformers 5.21+ routers return (logits, weights, ids), the order 0.33's match reads, so with
# their code 0.33 would fuse these blocks it built in Transformers from 5.20's; 0.33 serves <5.21
ROUTER_ORDER_CHANGED = {"aria_text", "granitemoeshared"}


def _served_by_033() -> bool:
    import transformers
    from packaging.version import Version

    from tfbackend.replace.profiles import PROFILES

    return Version(transformers.__version__) < Version(PROFILES[PROFILE].max_transformers)


@pytest.mark.parametrize(
    "model_type",
    [
        pytest.param(
            m,
            marks=pytest.mark.skipif(
                not _served_by_033(), reason="router order changed after vLLM 0.33's transformers"
            ),
        )
        if m in ROUTER_ORDER_CHANGED
        else m
        for m in MODEL_TYPES
    ],
)
def test_plan_agrees_with_vllm_033s_own_build(
    model_type,
    report_script,  # noqa: F811 - the imported fixture
    builds,
    tmp_path,
    monkeypatch,
):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # the script's profile is a module global, shared with test_agreement_builds.py (0.32)
    monkeypatch.setattr(report_script, "PROFILE", PROFILE)
    saved = {}
    for tp in (1, 2):
        with open(builds / f"{model_type}@tp{tp}.json") as fh:
            saved[tp] = json.load(fh)
    assert saved[1]["made_with"].startswith("transformers 5.20.2, vllm 0.33.0")
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    _, facts, arch, text_of, reloads = report_script.prepare(
        model_type, arch, str(tmp_path), saved[1].get("layers")
    )
    for tp, build in saved.items():
        row = report_script.row_for(
            model_type, arch, text_of, tp, facts, build["ranks"], build["why"], reloads
        )
        assert row.status == "agree", (tp, row.detail)
        assert row.agreed == row.compared > 0
