"""GLUFuser (vLLM fusers/glu.py): `act(gate(x)) * up(x)` becomes one MergedColumnParallelLinear
`gate_up_proj` and the activation its `...AndMul` kernel; the down projection is row-split."""

from __future__ import annotations

from tfbackend.fusers.base import Fuser, Outcome, candidate, entry, linear, row_parallel
from tfbackend.fusers.merged_column import merged
from tfbackend.inspect.vllm_names import ACT_AND_MUL
from tfbackend.plan import K_ACTIVATION


class GLUFuser(Fuser):
    name = "GLUFuser"
    key = "glu"

    def fuse(self, facts, plan, m, stage) -> Outcome | None:
        match = candidate(m, self.key)
        if match is None:
            return None
        gate = linear(facts, f"{m.qualname}.{match['gate']}")
        up = linear(facts, f"{m.qualname}.{match['up']}")
        if gate is None or up is None:
            return Outcome(why_not="gate/up not nn.Linear facts")
        if gate.attrs["out_features"] != up.attrs["out_features"]:
            return Outcome(why_not="gate and up differ in size")
        if not match.get("act_and_mul"):
            return Outcome(
                why_not=f"activation {match.get('act_class')} has no vLLM ...AndMul kernel"
            )
        fused, why = merged(
            facts, plan, m, [match["gate"], match["up"]], stage, self.key, "gate_up_proj"
        )
        if fused is None:
            return Outcome(why_not=why)
        fused.extra["activation"] = match["act_and_mul"]
        act = f"{m.qualname}.{match['act']}"
        out = [
            fused,
            entry(
                act,
                [act],
                match.get("act_class") or "",
                K_ACTIVATION,
                ACT_AND_MUL[match["act_and_mul"]],
                f"activation fused with the gate/up multiply ({match['act_and_mul']})",
                [],
                stage,
                activation=match["act_and_mul"],
            ),
        ]
        if match.get("down") and (down := linear(facts, f"{m.qualname}.{match['down']}")):
            out.append(
                row_parallel(down, plan.tp, "down projection of a fused GLU: always rowwise", stage)
            )
        return Outcome(out)
