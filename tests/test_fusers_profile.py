"""A profile is data: vLLM's fusers in its order, named capabilities; the plan's notes and
fallbacks are codes that rules and renderers test, not words."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

from tests._rules_support import cached, findings
from tfbackend.fusers import MLAFuser, RMSNormFuser
from tfbackend.plan import Fallback, NoteCode, PlanNote
from tfbackend.replace.planner import build_plan
from tfbackend.replace.profiles import PROFILES, Capability


def test_the_fuser_era_profile_lists_vllms_fusers_in_priority_order():
    names = [f.name for f in PROFILES["vllm-0.32"].fusers]
    # vllm/model_executor/models/transformers/fuser.py FUSERS, then moe.py's block fuser
    assert names == [
        "MLAFuser",
        "GLUFuser",
        "QKVFuser",
        "PackedQKVFuser",
        "MergedColumnParallelFuser",
        "RMSNormFuser",
        "AttentionFuser",
        "MoEBlockFuser",
    ]
    assert PROFILES["vllm-0.32"].fuser(MLAFuser) is PROFILES["vllm-0.32"].fusers[0]


def test_backends_before_the_fusers_fuse_nothing_and_name_norms_by_class():
    for name in ("vllm-0.6", "vllm-0.11"):
        profile = PROFILES[name]
        assert profile.fusers == () and profile.fuser(RMSNormFuser) is None
        assert not profile.can(Capability.SWAPS_LEAVES_WHOLE)
        plan = build_plan(cached("llama"), tp=2, pp=1, profile=profile)
        assert not [e for e in plan.entries if e.target == "QKVParallelLinear"]
        assert {e.target for e in plan.entries if e.kind == "norm"} == {"RMSNorm"}


def test_a_plan_note_is_the_line_users_read_and_keeps_its_code_through_copies():
    note = PlanNote(NoteCode.NOT_FUSED, "not fused: q/k/v shapes differ", "model.a", "Attn")
    assert note == "model.a (Attn): not fused: q/k/v shapes differ"
    assert (note.code, note.module, note.text) == (
        NoteCode.NOT_FUSED,
        "model.a",
        "not fused: q/k/v shapes differ",
    )
    for again in (pickle.loads(pickle.dumps(note)), copy.deepcopy(note)):
        assert again == note and again.code is NoteCode.NOT_FUSED and again.module == "model.a"
    assert json.dumps([note]) == json.dumps([str(note)])


def test_the_pipeline_rule_reads_the_split_note_by_its_code():
    # Gemma3n-like: two ModuleLists among the pp modules → the split is impossible
    facts = cached("llama")
    facts = dataclasses.replace(
        facts, pp_module_lists=["layers", "extra_layers"], pp_plan=[*facts.pp_plan, "extra_layers"]
    )
    plan = build_plan(facts, tp=1, pp=2, profile=PROFILES["vllm-0.32"])
    (note,) = plan.notes_of(NoteCode.PP_SPLIT_IMPOSSIBLE)
    assert not plan.stages
    (finding,) = findings(facts, "TFB302", pp=2)
    assert finding.message == note.text


def test_a_style_the_backend_does_not_know_is_marked_as_a_silent_fallback():
    facts = cached("llama")
    plan_keys = {k: ("packed_colwise" if "gate_proj" in k else s) for k, s in facts.tp_plan.items()}
    facts = dataclasses.replace(facts, tp_plan=plan_keys)
    plan = build_plan(facts, tp=2, pp=1, profile=PROFILES["vllm-0.11"])
    marked = {e.qualname.rsplit(".", 1)[-1] for e in plan.entries if e.extra.get("fallback")}
    assert marked == {"gate_proj"}
    gate = plan.entry_for("model.layers.0.mlp.gate_proj")
    assert (gate.target, gate.extra["fallback"]) == ("ReplicatedLinear", Fallback.UNKNOWN_STYLE)
    assert [f.data["style"] for f in findings(facts, "TFB202", tp=2, vllm="vllm-0.11")] == [
        "packed_colwise"
    ]
