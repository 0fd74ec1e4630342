"""tfbackend's plan against vLLM 0.32's own builds, saved in reports/agreement-builds.tar.gz.

The builds were made by the installed vLLM (scripts/agreement_report.py --raw); re-diffing them
needs no vLLM, so this guards every architecture whose agreement was hard-won against a change
in the plan, on any machine.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
ARCHIVE = os.path.join(ROOT, "reports", "agreement-builds.tar.gz")

# Every family the report once listed as disagreeing, and a few that always agreed.
MODEL_TYPES = [
    "biogpt",
    "deepseek_v3",
    "ernie4_5_moe",
    "falcon_h1",
    "gemma4_text",
    "gpt2",
    "gpt_bigcode",
    "gpt_oss",
    "granite_swa",
    "hy_v3",
    "inkling_text",
    "laguna",
    "llama",
    "llama4_text",
    "longcat_flash",
    "mimo_v2_flash",
    "minicpm3",
    "mixtral",
    "modernbert-decoder",
    "opt",
    "phi4_multimodal",
    "phimoe",
    "qwen2_moe",
    "youtu",
    "zaya",
]


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def report_script():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import agreement_report

        yield agreement_report
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("builds")
    with tarfile.open(ARCHIVE) as tar:
        try:
            tar.extractall(out, filter="data")
        except TypeError:  # a Python without extraction filters; the archive is our own
            tar.extractall(out)
    return out / "agreement-builds"


# Model types vLLM reads with its own config class: tfbackend follows it only with vLLM installed.
VLLM_CONFIG_TYPES = ["deepseek_v32", "hy_v4"]


@pytest.mark.parametrize(
    "model_type",
    MODEL_TYPES
    + [
        pytest.param(
            m,
            marks=[
                pytest.mark.vllm,
                pytest.mark.skipif(not _has_vllm(), reason="vLLM not installed"),
            ],
        )
        for m in VLLM_CONFIG_TYPES
    ],
)
def test_plan_agrees_with_vllms_own_build(model_type, report_script, builds, tmp_path):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    saved = {}
    for tp in (1, 2):
        with open(builds / f"{model_type}@tp{tp}.json") as fh:
            saved[tp] = json.load(fh)
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    layers = saved[1].get("layers")
    _, facts, arch, text_of, reloads = report_script.prepare(
        model_type, arch, str(tmp_path), layers
    )
    for tp, build in saved.items():
        row = report_script.row_for(
            model_type, arch, text_of, tp, facts, build["ranks"], build["why"], reloads
        )
        assert row.status == "agree", (tp, row.detail)
        assert row.agreed == row.compared > 0
