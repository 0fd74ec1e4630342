"""TFB3xx: pipeline parallel."""

from __future__ import annotations

from tfbackend.report.findings import Severity
from tfbackend.rules.registry import rule


@rule(
    "TFB301",
    "No pp_plan with pp > 1",
    Severity.ERROR,
    rationale="""
The backend splits the model by its `_pp_plan` (the ordered top-level modules). Seed-era vLLM
raises `... does not support pipeline parallel` without one; vLLM 0.32+ infers the split from the
decoder's children in declaration order and warns that it may fail.
""",
    fix="add base_model_pp_plan to the config class, or serve with pp=1",
)
def no_pp_plan(ctx, r):
    if ctx.pp <= 1 or ctx.facts.pp_plan or not ctx.profile.supports_pp:
        return
    if ctx.profile.pp_without_plan == "infer":
        yield r.finding(
            f"{ctx.facts.model_class} has no pp_plan: vLLM infers the stage split from the "
            "decoder's children, which may fail on a non-standard layout",
            severity=Severity.WARNING,
        )
    else:
        yield r.finding(f"{ctx.facts.model_class} has no pp_plan and pp={ctx.pp}: vLLM refuses")


@rule(
    "TFB302",
    "Not exactly one ModuleList among the pipeline modules",
    Severity.ERROR,
    rationale="""
vLLM splits one `nn.ModuleList` of layers over the stages. With several (e.g. separate local and
global layer lists) it raises "Pipeline parallel of models with multiple ModuleLists ... not
supported"; with none, "Could not find ModuleList".
""",
    fix="serve with pp=1",
)
def module_lists(ctx, r):
    if ctx.pp <= 1 or not ctx.profile.supports_pp:
        return
    for note in ctx.plan.notes:
        if note.startswith("pipeline split impossible"):
            yield r.finding(note)


@rule(
    "TFB303",
    "More pipeline stages than layers",
    Severity.ERROR,
    rationale="""
`get_pp_indices` gives each stage num_hidden_layers // pp layers; with more stages than layers
some stages hold none and vLLM's stage bookkeeping breaks.
""",
    fix="use pp <= num_hidden_layers",
)
def too_many_stages(ctx, r):
    layers = ctx.facts.config.num_hidden_layers or 0
    if ctx.pp > 1 and layers and ctx.pp > layers:
        yield r.finding(f"pp={ctx.pp} but the model has {layers} layers")


@rule(
    "TFB304",
    "Pipeline parallel not supported by this vLLM",
    Severity.ERROR,
    rationale="The selected profile's backend has no pipeline parallel support at all.",
    fix="serve with pp=1, or use a newer vLLM",
)
def pp_unsupported(ctx, r):
    if ctx.pp > 1 and not ctx.profile.supports_pp:
        yield r.finding(f"{ctx.profile.name} cannot split the model over {ctx.pp} stages")
