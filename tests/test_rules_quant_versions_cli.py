"""Quantization (TFB6xx) and version (TFB8xx) rules, profiles, the rule CLI, select/ignore/strict."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from _rules_support import cached, facts, findings, llama, severities

from tfbackend.check import CheckOptions, check_facts
from tfbackend.errors import UserError
from tfbackend.plan import ReplacementPlan
from tfbackend.replace.profiles import PROFILES, select_profile
from tfbackend.rules.registry import REGISTRY, RuleContext, load_all

ROOT = Path(__file__).resolve().parents[1]


def quantized(**q):
    config = llama()
    config.quantization_config = q
    return facts(config)


def test_mxfp4_is_refused():
    assert severities(findings(quantized(quant_method="mxfp4"), "TFB601")) == {"error"}
    assert not findings(quantized(quant_method="fp8"), "TFB601")


def test_unknown_method_warns():
    assert findings(quantized(quant_method="hqq"), "TFB602")
    assert not findings(quantized(quant_method="fp8"), "TFB602")


def test_bitsandbytes_needs_a_plugin_on_032_only():
    f = quantized(quant_method="bitsandbytes")
    assert findings(f, "TFB603")
    assert not findings(f, "TFB603", vllm="0.11")
    assert not findings(f, "TFB602")


def test_gptq_bias_handling_depends_on_the_profile():
    f = quantized(quant_method="gptq", bits=4)
    assert severities(findings(f, "TFB604")) == {"warning"}
    assert severities(findings(f, "TFB604", vllm="0.11")) == {"info"}
    assert not findings(quantized(quant_method="fp8"), "TFB604")


def test_excluded_modules_are_listed():
    f = quantized(quant_method="fp8", modules_to_not_convert=["mlp.down_proj"])
    assert len(findings(f, "TFB605")[0].modules) == 2
    assert not findings(quantized(quant_method="fp8"), "TFB605")


def test_kv_cache_scheme_is_reported():
    f = quantized(quant_method="compressed-tensors", kv_cache_scheme={"num_bits": 8})
    assert findings(f, "TFB606")
    assert not findings(quantized(quant_method="compressed-tensors"), "TFB606")


def _ctx(profile):
    f = cached("llama")
    return RuleContext(
        facts=f, plan=ReplacementPlan(profile.name, 1, 1), profile=profile, tp=1, pp=1
    )


def test_transformers_older_than_the_profile_needs_is_an_error():
    load_all()
    strict = dataclasses.replace(
        PROFILES["vllm-0.32"], min_transformers={"base": "99.0"}, max_transformers=None
    )
    assert {f.severity.value for f in REGISTRY["TFB801"].check(_ctx(strict))} == {"error"}
    assert not list(REGISTRY["TFB801"].check(_ctx(PROFILES["vllm-0.11"])))


def test_transformers_newer_than_the_vllm_pin_warns_that_the_plan_read_other_code():
    load_all()
    capped = dataclasses.replace(
        PROFILES["vllm-0.32"], max_transformers="1.0", serving_transformers="0.9.1"
    )
    ctx = _ctx(capped)
    assert not list(REGISTRY["TFB801"].check(ctx))
    (found,) = REGISTRY["TFB804"].check(ctx)
    assert found.severity.value == "warning"
    assert f"read from transformers {ctx.facts.versions['transformers']}" in found.message
    assert "pip install 'transformers==0.9.1'" in found.fix


def test_transformers_inside_the_profile_range_is_not_flagged():
    load_all()
    wide = dataclasses.replace(PROFILES["vllm-0.32"], max_transformers="99.0")
    assert not list(REGISTRY["TFB804"].check(_ctx(wide)))
    assert not list(REGISTRY["TFB804"].check(_ctx(PROFILES["vllm-0.11"])))  # no known pin


def test_torch_other_than_the_release_was_built_for_warns():
    load_all()
    other = dataclasses.replace(PROFILES["vllm-0.32"], min_torch="2.11.0")
    assert list(REGISTRY["TFB802"].check(_ctx(other)))
    assert not list(REGISTRY["TFB802"].check(_ctx(PROFILES["vllm-0.11"])))


def test_checking_another_vllm_than_the_installed_one_is_said():
    f = cached("llama")
    if f.versions.get("vllm"):
        assert findings(f, "TFB803", vllm="0.11")
        assert not findings(f, "TFB803")
    else:
        assert "not installed" in findings(f, "TFB803")[0].message


def test_profile_selection():
    assert select_profile("0.6.2", None).name == "vllm-0.6"
    assert select_profile("0.10.1", None).name == "vllm-0.11"
    assert select_profile("0.33", None).name == "vllm-0.33"
    assert select_profile("0.32.9", None).name == "vllm-0.32"
    assert select_profile(None, "0.33.0").name == "vllm-0.33"
    assert select_profile(None, "0.9.2").name == "vllm-0.11"
    assert select_profile(None, None).name == "vllm-0.32"
    assert select_profile("vllm-0.6", "0.32.0").name == "vllm-0.6"
    with pytest.raises(UserError):
        select_profile("not-a-version", None)


def test_select_ignore_and_strict():
    f = cached("llama")
    both = check_facts(f, CheckOptions(tp=8))
    assert {"TFB203", "TFB205"} <= {x.rule_id for x in both.findings}
    only = check_facts(f, CheckOptions(tp=8, select=["TFB205"]))
    assert {x.rule_id for x in only.findings} == {"TFB205"}
    skipped = check_facts(f, CheckOptions(tp=8, ignore=["TFB20"]))
    assert not any(x.rule_id.startswith("TFB20") for x in skipped.findings)
    gpt2_like = check_facts(facts(llama(architectures=None)), CheckOptions(tp=2, pp=2))
    assert gpt2_like.verdict.value == "PASS"
    # A warning that does not depend on what is installed: a tp_plan style the per-linear
    # backend does not know (TFB202), tensor-parallel rules only. Attention stays split: with
    # replicated q/k/v, vLLM's Attention (heads / tp per rank) would get every head (TFB216).
    split_attention = {f"layers.*.self_attn.{p}_proj": "colwise" for p in "qkv"}
    odd = facts(
        llama(
            base_model_tp_plan={
                **split_attention,
                "layers.*.self_attn.o_proj": "rowwise",
                "layers.*.mlp.up_proj": "packed_colwise",
            }
        )
    )
    options = dict(tp=2, vllm_version="0.11", select=["TFB2"])
    warned = check_facts(odd, CheckOptions(**options))
    assert warned.verdict.value == "PASS WITH WARNINGS"
    assert check_facts(odd, CheckOptions(**options, strict=True)).verdict.value == "FAIL"


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tfbackend", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_explain_prints_the_rule_page():
    out = _cli("explain", "tfb201")
    assert out.returncode == 0
    for part in ("TFB201", "Severity: error", "tensor parallel", "## Why", "## Fix", "## Example"):
        assert part in out.stdout


def test_explain_unknown_id_lists_valid_ids_and_exits_2():
    out = _cli("explain", "TFB999")
    assert out.returncode == 2
    assert "unknown rule" in out.stderr and "TFB201" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_rules_lists_every_rule():
    out = _cli("rules")
    assert out.returncode == 0
    assert len(out.stdout.strip().splitlines()) == len(load_all())


def test_every_rule_has_an_example_and_the_catalog_is_current():
    from tfbackend.rules.pages import catalog

    assert all(r.example for r in load_all().values())
    assert (ROOT / "docs" / "rules.md").read_text() == catalog()
