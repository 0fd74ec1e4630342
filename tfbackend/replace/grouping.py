"""Group plan entries by pattern (layer indices folded into `*`) for display."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tfbackend.plan import ReplacementPlan

_INDEX = re.compile(r"\.\d+(?=\.|$)")


def pattern_of(qualname: str) -> str:
    return _INDEX.sub(".*", qualname)


@dataclass
class PlanGroup:
    pattern: str
    count: int
    kind: str
    source_class: str
    target: str
    tp_style: str | None
    tp_key: str | None
    reason: str
    full_shape: list[int] | None
    rank_shape: list[int] | None
    sources: list[str] = field(default_factory=list)  # source patterns when fused
    stages: list[int] = field(default_factory=list)
    fallback: str | None = None  # a Fallback the backend takes silently (the reason says which)


def group_entries(plan: ReplacementPlan) -> list[PlanGroup]:
    groups: dict[tuple, PlanGroup] = {}
    for e in plan.entries:
        first = e.params[0] if e.params else None
        key = (
            pattern_of(e.qualname),
            e.kind,
            e.source_class,
            e.target,
            e.tp_style,
            e.tp_key,
            e.reason,
            tuple(first.full_shape) if first else None,
            tuple(first.rank_shape) if first else None,
        )
        g = groups.get(key)
        if g is None:
            g = groups[key] = PlanGroup(
                pattern=key[0],
                count=0,
                kind=e.kind,
                source_class=e.source_class,
                target=e.target,
                tp_style=e.tp_style,
                tp_key=e.tp_key,
                reason=e.reason,
                full_shape=list(first.full_shape) if first else None,
                rank_shape=list(first.rank_shape) if first else None,
                sources=list(dict.fromkeys(pattern_of(s) for s in e.sources))
                if len(e.sources) > 1
                else [],
                fallback=e.extra.get("fallback"),
            )
        g.count += 1
        if e.stage is not None and e.stage not in g.stages:
            g.stages.append(e.stage)
    return list(groups.values())
