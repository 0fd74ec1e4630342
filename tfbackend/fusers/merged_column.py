"""MergedColumnParallelFuser (vLLM fusers/merged_column.py): the one group of sibling linears
on a forward input becomes a MergedColumnParallelLinear under vLLM's programmatic name."""

from __future__ import annotations

from tfbackend.fusers.base import (
    Fuser,
    Outcome,
    candidate,
    entry,
    linear,
    same_input_and_bias,
)
from tfbackend.inspect.vllm_names import merged_name
from tfbackend.plan import K_LINEAR
from tfbackend.plan.shards import stacked_shards


def merged(facts, plan, parent, names: list[str], stage, fuser: str, name: str):
    """The MergedColumnParallelLinear entry of `names`, or None and why not (vLLM validate:
    one input, one bias setting, every width divisible by tp)."""
    parts = [linear(facts, f"{parent.qualname}.{n}") for n in names]
    if None in parts:
        return None, "a projection is not an nn.Linear fact"
    outs = [p.attrs["out_features"] for p in parts]
    if not same_input_and_bias(parts) or any(o % plan.tp for o in outs):
        return None, f"{' / '.join(names)}: inputs, biases or tp divisibility differ"
    made = entry(
        f"{parent.qualname}.{name}",
        [p.qualname for p in parts],
        parts[0].class_name,
        K_LINEAR,
        "MergedColumnParallelLinear",
        f"{' + '.join(names)} merged (vLLM {fuser} fuser)",
        stacked_shards(parts, sum(outs), sum(outs) // plan.tp),
        stage,
        fuser=fuser,
        output_sizes=outs,
    )
    return made, ""


class MergedColumnParallelFuser(Fuser):
    name = "MergedColumnParallelFuser"
    key = "merged_column"

    def fuse(self, facts, plan, m, stage) -> Outcome | None:
        match = candidate(m, self.key)
        if match is None:
            return None
        names = match["linears"]
        if any("." in n for n in names) or len(set(names)) != len(names):
            return Outcome(why_not="projection names not plain attributes")
        one, why = merged(facts, plan, m, names, stage, self.key, merged_name(names))
        return Outcome([one]) if one else Outcome(why_not=why)
