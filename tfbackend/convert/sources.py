"""Which checkpoint tensor holds each model tensor, named the way vLLM's loader maps them.

Built once from the checkpoint's headers and `replace.names.match_tensors` (vLLM 0.32's
`_create_hf_to_vllm_mapper` plus its expert mapping), so `convert` reads exactly the tensors a
normal `LLM(model=SOURCE)` load would read, and none of those it drops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tfbackend.inspect.checkpoint import CheckpointHeaders, TensorHeader
from tfbackend.inspect.facts import ModelFacts
from tfbackend.replace.names import (
    DOWN_NAMES,
    GATE_NAMES,
    IGNORED,
    UNEXPECTED,
    UP_NAMES,
    TensorMatch,
    match_tensors,
)

# Roles of a per-expert tensor inside vLLM's w13 (gate first, then up) and w2.
GATE, UP, DOWN = "gate", "up", "down"
_ROLE = {**dict.fromkeys(GATE_NAMES, GATE), **dict.fromkeys(UP_NAMES, UP)}
_ROLE.update(dict.fromkeys(DOWN_NAMES, DOWN))
_PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<idx>\d+)\.(?P<proj>\w+)\.weight$")


@dataclass
class SourceIndex:
    """The checkpoint's tensors, addressed by the model tensor each one fills."""

    headers: CheckpointHeaders
    by_target: dict[str, str] = field(default_factory=dict)  # model name → checkpoint name
    # (experts module, expert index, role) → checkpoint name of one expert's 2-D weight
    experts: dict[tuple[str, int, str], str] = field(default_factory=dict)
    ignored: list[TensorMatch] = field(default_factory=list)  # dropped by the loader on purpose
    unexpected: list[str] = field(default_factory=list)  # no parameter takes them

    def header(self, checkpoint_name: str) -> TensorHeader:
        return self.headers.tensors[checkpoint_name]

    def key(self, target: str) -> str | None:
        return self.by_target.get(target)

    def dropped(self, target: str) -> TensorMatch | None:
        """The checkpoint tensor the loader would have put there but drops (and why)."""
        return next((m for m in self.ignored if m.target == target), None)

    def expert(self, experts: str, index: int, role: str) -> str | None:
        return self.experts.get((experts, index, role))


def index_sources(headers: CheckpointHeaders, facts: ModelFacts) -> SourceIndex:
    out = SourceIndex(headers=headers)
    for match in match_tensors(headers, facts):
        if match.status == IGNORED:
            out.ignored.append(match)
            continue
        target = match.target or match.checkpoint_name
        if match.status == UNEXPECTED:
            # Not a parameter: it may still fill a persistent buffer (the layout asks)
            out.unexpected.append(match.checkpoint_name)
            out.by_target.setdefault(target, match.checkpoint_name)
            continue
        piece = _PER_EXPERT.match(match.checkpoint_name)
        if match.expert is not None and piece:
            role = _ROLE.get(piece.group("proj"))
            if role:
                out.experts[(target.rsplit(".", 1)[0], match.expert, role)] = match.checkpoint_name
            continue
        out.by_target[target] = match.checkpoint_name
        # transformers-4 style experts (a ModuleList): the parameter name is the expert's own
        listed = _PER_EXPERT.match(target)
        if listed and (role := _ROLE.get(listed.group("proj"))):
            key = (listed.group("experts"), int(listed.group("idx")), role)
            out.experts[key] = match.checkpoint_name
    return out
