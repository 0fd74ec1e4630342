"""What every fuser of the plan is: one vLLM fuser class (fusers/base.py: BaseFuser), modelled.

vLLM's fuser `match`es the FX trace of a module class once, checks that its forward can be
rewritten, `validate`s each instance against the config and tp, then `fuse`s it. The walk
takes the trace and records the matches and rewrite verdicts as facts (inspect/fx_match.py,
inspect/mla.py, inspect/moe_blocks.py); a fuser here reads its own match from a module's facts,
validates it for this plan's tp, and returns the entries it builds. A profile lists its fusers
in vLLM's priority order (`Profile.fusers`); the planner asks them in that order, per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tfbackend.inspect.facts import LINEAR, ModelFacts, ModuleFact
from tfbackend.plan import K_LINEAR, PlanEntry, ReplacementPlan
from tfbackend.plan.shards import replicated_shards, row_shards


@dataclass
class Outcome:
    """A fuser's answer for one module: the entries it builds, or why it does not fuse it."""

    entries: list[PlanEntry] = field(default_factory=list)
    why_not: str = ""


class Fuser:
    """One fuser; the default of every hook is "does nothing", so a fuser defines only the
    steps its vLLM class takes part in."""

    name: ClassVar[str]  # vLLM's class name
    key: ClassVar[str] = ""  # the name its match has in the facts, and in "not fused" notes
    # Whether it gives a module a new forward: of those, the first that fuses a module is the
    # only one (vLLM's Fusers.__getitem__).
    redefines_forward: ClassVar[bool] = True

    def fuse(
        self, facts: ModelFacts, plan: ReplacementPlan, m: ModuleFact, stage
    ) -> Outcome | None:
        """This module's entries (None: no match of this fuser on it)."""
        return None

    def fuse_blocks(self, facts: ModelFacts, plan: ReplacementPlan, profile, stage_of) -> list:
        """Entries for whole blocks, after every module was offered to `fuse`."""
        return []

    def adjust_attention(self, facts: ModelFacts, plan: ReplacementPlan) -> None:
        """Change the planned attention layers this fuser rebuilds."""

    def aliases(self, facts: ModelFacts, plan: ReplacementPlan) -> list[PlanEntry]:
        """Entries naming planned modules again under the path the fused module gives them."""
        return []

    def __repr__(self) -> str:
        return self.name


def linear(facts: ModelFacts, qualname: str) -> ModuleFact | None:
    m = facts.module(qualname)
    return m if m is not None and m.kind == LINEAR else None


def entry(qualname, sources, source_class, kind, target, reason, params, stage, **extra):
    return PlanEntry(
        qualname=qualname,
        sources=sources,
        source_class=source_class,
        kind=kind,
        target=target,
        reason=reason,
        params=params,
        stage=stage,
        extra=extra,
    )


def same_input_and_bias(parts: list[ModuleFact]) -> bool:
    return (
        len({p.attrs["in_features"] for p in parts}) == 1
        and len({bool(p.attrs.get("bias")) for p in parts}) == 1
    )


def candidate(m: ModuleFact, fuser: str) -> dict | None:
    """The walk's match of one projection fuser on this module (fusables.fusion_fact)."""
    fact = m.attrs.get("fusion") or {}
    return next((c for c in fact.get("candidates", ()) if c["fuser"] == fuser), None)


def row_parallel(fact: ModuleFact, tp: int, why: str, stage) -> PlanEntry:
    """The projection after a fused one: RowParallelLinear whatever the tp_plan says."""
    params = row_shards(fact, tp) if tp > 1 else replicated_shards(fact)
    return entry(
        fact.qualname, [fact.qualname], fact.class_name, K_LINEAR, "RowParallelLinear", why,
        params, stage,
    )  # fmt: skip


def out_proj(facts: ModelFacts, plan: ReplacementPlan, parent, match: dict, stage, of: str):
    if match.get("o") and (o := linear(facts, f"{parent.qualname}.{match['o']}")):
        return [row_parallel(o, plan.tp, f"output projection of {of}: always rowwise", stage)]
    return []
