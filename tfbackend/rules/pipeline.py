"""TFB3xx: pipeline parallel."""

from __future__ import annotations

from tfbackend.plan import NoteCode
from tfbackend.rules.findings import Severity
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
    for note in ctx.plan.notes_of(NoteCode.PP_SPLIT_IMPOSSIBLE):
        yield r.finding(note.text)


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


@rule(
    "TFB305",
    "Uneven pipeline stages",
    Severity.INFO,
    rationale="""
`get_pp_indices` gives every stage num_hidden_layers // pp layers and hands the remainder to the
stages before the last (the last also holds the final norm and LM head). Uneven stages make the
busiest stage the pace of the pipeline; VLLM_PP_LAYER_PARTITION sets the split by hand.
""",
    fix="nothing to do; set VLLM_PP_LAYER_PARTITION to balance by hand",
)
def uneven_stages(ctx, r):
    stages = ctx.plan.stages
    if ctx.pp <= 1 or not stages:
        return
    sizes = [st.layers[1] - st.layers[0] for st in stages]
    if len(set(sizes)) > 1:
        split = " / ".join(str(n) for n in sizes)
        yield r.finding(
            f"{ctx.facts.config.num_hidden_layers} layers over {ctx.pp} stages: {split}",
            layers_per_stage=sizes,
        )


@rule(
    "TFB306",
    "Tied embeddings: the embedding is held by the first and the last stage",
    Severity.INFO,
    rationale="""
With tie_word_embeddings the LM head reuses the input embedding. Under pipeline parallel vLLM
keeps the modules before the layer list on the last stage as well as the first, so the embedding
table is stored twice (once per end of the pipeline) and loaded into both.
""",
    fix="nothing to do; count the table twice when sizing the last stage",
)
def tied_across_stages(ctx, r):
    if ctx.pp <= 1 or not ctx.plan.stages or not ctx.facts.config.tie_word_embeddings:
        return
    cfg = ctx.facts.config
    size = ""
    if cfg.vocab_size and cfg.hidden_size:
        nbytes = cfg.vocab_size * cfg.hidden_size * (4 if "32" in (cfg.dtype or "") else 2)
        size = f" ({nbytes / 2**20:.1f} MiB unsharded)"
    last = ctx.plan.stages[-1]
    yield r.finding(
        f"embedding kept on stage 0 and stage {last.rank}{size}: "
        f"stage {last.rank} holds {', '.join(last.modules) or 'it'}",
    )
