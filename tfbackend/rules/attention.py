"""TFB4xx: attention dispatch and attention features."""

from __future__ import annotations

from tfbackend.report.findings import Severity
from tfbackend.rules.registry import rule


@rule(
    "TFB401",
    "Attention not dispatched through the attention interface",
    Severity.ERROR,
    rationale="""
The backend serves attention by registering its own function in transformers'
`ALL_ATTENTION_FUNCTIONS` and setting `_attn_implementation="vllm"`. A model whose attention
modules compute attention themselves never calls it: seed-era vLLM refuses models without
`_supports_attention_backend`; vLLM 0.32 looks for exactly one interface call in each attention
module's forward and raises "Layer N does not dispatch through the Transformers attention
interface" for any layer without one.
""",
    fix="use a transformers version whose implementation of this model supports the attention "
    "interface, or serve with vLLM's native implementation",
)
def attention_interface(ctx, r):
    facts = ctx.facts
    if ctx.profile.attention_check == "supports_backend":
        if not facts.supports_attention_backend:
            yield r.finding(
                f"{facts.model_class} does not declare _supports_attention_backend: vLLM refuses it"
            )
        return
    stage_layers = [a for a in ctx.plan.attention if a.qualname is None]
    if stage_layers:
        idx = [a.layer_idx for a in stage_layers]
        shown = ", ".join(str(i) for i in idx[:8]) + (" …" if len(idx) > 8 else "")
        others = sorted(
            {
                m.class_name
                for m in facts.modules
                if m.kind == "attention" and not m.attrs["interface"]
            }
        )
        yield r.finding(
            f"{len(idx)} of {len(ctx.plan.attention)} layers have no module calling "
            f"ALL_ATTENTION_FUNCTIONS (layers {shown})"
            + (f"; attention computed by {', '.join(others)}" if others else ""),
            modules=[
                m.qualname
                for m in facts.modules
                if m.kind == "attention" and not m.attrs["interface"]
            ][:16],
            layers=idx,
        )
