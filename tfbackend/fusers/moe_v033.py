"""vLLM 0.33's MoEBlockFuser (transformers/fusers/moe.py): the block is matched by its dataflow.

What changed from 0.32's match (fusers/moe.py), read from the 0.33.0 wheel:
- the gate is the child whose output `[2]` and `[1]` the experts are called with
  (`_match_experts`), not the first child that looks like a router;
- a router may score after its top-k (`score(topk(linear(x)))`: Llama 4's sigmoid);
- a shared expert is read from the block's output only: `experts(...) [* c] + shared(x)` or
  `+ sigmoid(g(x)) * shared(x)`, `g` a one-logit linear; anything else added fails the match;
- when the gate is no vLLM router but a shared expert is added to the unscaled experts' output,
  the block still fuses: the HF gate routes (`custom_routing_function=_hf_topk_router`) and the
  MoERunner runs the experts and the shared expert (external routing);
- the fp16 `routed_scaling_factor` fallback keeps that external routing instead of the whole
  block.
"""

from __future__ import annotations

from tfbackend.fusers.moe import MoEBlockFuser, _state_ok, no_router, verdict


class DataflowMoEBlockFuser(MoEBlockFuser):
    """MoEBlockFuser as vLLM 0.33 matches it."""

    def match(self, block: dict, experts: str) -> dict:
        if block["returns_tuple"]:
            return verdict(reason=f"{block['block_class']}.forward returns a tuple")
        if not block["traced"]:
            return verdict(reason=f"{block['block_class']}.forward not traceable")
        if block["experts_call"] is None:
            return verdict(
                reason=f"{experts} is not called as {experts}(x, ids, weights) with "
                "`_, weights, ids = gate(x)` on the block's input"
            )
        gate = block["experts_call"]["gate"]
        scoring = _scoring(block["routers"].get(gate))
        output = block["output"]
        if output is None or output.get("added_other"):
            return verdict(
                reason="its output is not experts(...) [* c] [+ shared(x)]: nothing to fuse"
            )
        shared, shared_gate = output["shared"], output["shared_gate"]
        dropped = sorted(set(block["stateful"]) - {experts, gate, shared, shared_gate})
        if dropped:
            return verdict(
                reason=f"child {dropped[0]} holds state and is neither the gate, the experts nor "
                "the shared expert of its output"
            )
        found = verdict(gate, scoring, shared, shared_gate, "internal" if scoring else None)
        found["routed_scaled"] = output["routed_scaled"]
        if scoring is None:
            found = self._external(found, no_router({gate: block["routers"][gate]}))
        return found

    def without_vllm_routing(self, found: dict) -> dict:
        """0.33 routes with the HF gate instead (its `divides_shared_output`), and still fuses
        the block where a shared expert can move into the runner."""
        return self._external(
            {**found, "scoring": None}, "routed_scaling_factor with a shared expert in float16"
        )

    @staticmethod
    def _external(found: dict, why: str) -> dict:
        # without vLLM routing only a shared expert moves into the runner, and only when the
        # block does not scale the experts' output (vLLM's routing would)
        if found["shared"] is None or found["routed_scaled"]:
            return verdict(reason=why)
        return {**found, "routing": "external"}


def _scoring(reading: dict | None) -> str | None:
    """softmax / sigmoid when the gate is a vLLM 0.33 router: `topk(score(linear(x)))`, or
    `score(topk(linear(x)))` when nothing scores before the top-k."""
    if reading is None or not _state_ok(reading):
        return None
    chosen = reading["before"] if reading["before"] is not None else reading["after"]
    if not isinstance(chosen, dict) or not chosen["from_linear"]:
        return None
    return chosen["op"]
