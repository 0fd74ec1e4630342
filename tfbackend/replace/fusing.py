"""The profile's fusers applied to the facts (vLLM's fuser.py: `Fusers[m]`, then moe.py).

Each module is offered to the fusers that redefine a forward, in the profile's order; the first
that fuses it takes it and no later one is asked (MLA before q/k/v before sibling linears).
Then the block fusers (MoE) run over the whole model. What did not fuse is written into the
plan's notes with each fuser's reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tfbackend.inspect.facts import ModelFacts, ModuleFact
from tfbackend.plan import NoteCode, PlanEntry, PlanNote, ReplacementPlan

if TYPE_CHECKING:
    from tfbackend.replace.profiles import Profile


def fuse(facts: ModelFacts, plan: ReplacementPlan, profile: Profile, stage_of) -> list[PlanEntry]:
    """Every entry the profile's fusers build, in the order vLLM builds them."""
    redefining = [f for f in profile.fusers if f.redefines_forward]
    entries: list[PlanEntry] = []
    if redefining:
        for m in facts.modules:
            entries.extend(_fuse_module(facts, plan, m, redefining, stage_of(m.qualname)))
    for fuser in profile.fusers:
        entries.extend(fuser.fuse_blocks(facts, plan, profile, stage_of))
    return entries


def _fuse_module(facts, plan, m: ModuleFact, fusers, stage) -> list[PlanEntry]:
    why_not: list[str] = []
    for fuser in fusers:
        outcome = fuser.fuse(facts, plan, m, stage)
        if outcome is None:
            continue
        if outcome.entries:
            return outcome.entries
        why_not.append(f"{fuser.key}: {outcome.why_not}")
    fact = m.attrs.get("fusion")
    if fact and not fact["candidates"]:
        why_not = [str(fact.get("reason"))]  # no fuser matched, or its rewrite was refused
    if why_not:
        plan.notes.append(
            PlanNote(
                NoteCode.NOT_FUSED, f"not fused: {'; '.join(why_not)}", m.qualname, m.class_name
            )
        )
    return []
