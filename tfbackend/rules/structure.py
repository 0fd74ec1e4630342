"""TFB1xx: the model's structure and where its code comes from."""

from __future__ import annotations

from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule


@rule(
    "TFB101",
    "Custom code in the repo",
    Severity.WARNING,
    rationale="""
The config's `auto_map` points at Python files in the repo. vLLM runs them only with
`trust_remote_code=True`; without it vLLM uses the implementation built into transformers (when
the model_type has one), which may differ from what the repo's authors ran.
""",
    fix="review the repo's code; pass --trust-remote-code to check what vLLM would run with it",
)
def custom_code(ctx, r):
    src = ctx.facts.source
    if not src.has_custom_code:
        return
    if src.custom_code_used:
        yield r.finding(
            "the repo's own modelling code was executed (--trust-remote-code): vLLM needs "
            "trust_remote_code=True too",
            severity=Severity.INFO,
            fix="serve with --trust-remote-code",
        )
    else:
        yield r.finding(
            "the repo ships custom code (auto_map) that was not run: this check used the "
            f"{ctx.facts.config.model_type!r} implementation built into transformers"
        )


@rule(
    "TFB102",
    "Multimodal config: the language model was checked",
    Severity.INFO,
    rationale="""
The config nests a text config inside a multimodal one. tfbackend checks the language model the
backend wraps; vision or audio towers are outside this check.
""",
    fix="nothing to do for text serving; towers are served by vLLM's multimodal mixin",
)
def multimodal(ctx, r):
    if ctx.facts.config.is_multimodal:
        yield r.finding(
            f"{ctx.facts.config.model_type} is multimodal: checked its text model "
            f"({ctx.facts.model_class})"
        )


def layer_lists(facts) -> list:
    """ModuleLists holding one entry per decoder layer, not nested inside another such list."""
    n = facts.config.num_hidden_layers
    found = []
    for m in facts.modules:
        if m.kind != "module_list" or not n or m.attrs.get("length") != n:
            continue
        if any(m.qualname.startswith(f.qualname + ".") for f in found):
            continue
        found.append(m)
    return found


@rule(
    "TFB103",
    "Architecture unknown to the installed transformers",
    Severity.ERROR,
    rationale="""
vLLM resolves the backend's model class as `getattr(transformers, architectures[0])`, then
through the config's `auto_map`. When neither finds it, `model_impl="transformers"` raises
"Cannot find model module. 'X' is not a registered model in the Transformers library".
""",
    fix="upgrade transformers to a version that ships the architecture, or fix "
    "`architectures` in config.json",
)
def unknown_architecture(ctx, r):
    import transformers

    archs = ctx.facts.config.architectures
    if not archs or ctx.facts.source.has_custom_code:
        return
    arch = archs[0]
    try:
        known = getattr(transformers, arch, None) is not None
    except Exception:  # noqa: BLE001 - it exists, but an optional dependency is missing here
        known = True
    if not known:
        yield r.finding(
            f"architectures[0] = {arch!r} is not a class of transformers "
            f"{transformers.__version__} and the config has no auto_map",
            architecture=arch,
        )


@rule(
    "TFB104",
    "No ModuleList of decoder layers",
    Severity.WARNING,
    rationale="""
The backend finds the decoder layers as the `nn.ModuleList` with num_hidden_layers entries: it
splits that list over pipeline stages, records Eagle3 auxiliary hidden states from it and skips
MTP layers beyond it. A model without one serves at pp=1, but none of those work.
""",
    fix="serve with pp=1 and without Eagle3 speculative decoding",
)
def no_layer_list(ctx, r):
    n = ctx.facts.config.num_hidden_layers
    if n and not layer_lists(ctx.facts):
        lists = [
            m
            for m in ctx.facts.modules
            if m.kind == "module_list" and not any(ch.isdigit() for ch in m.qualname)
        ]
        seen = ", ".join(f"{m.qualname} ({m.attrs.get('length')})" for m in lists[:4])
        yield r.finding(
            f"no ModuleList has num_hidden_layers={n} entries"
            + (f"; ModuleLists found: {seen}" if seen else ""),
        )


@rule(
    "TFB105",
    "Several ModuleLists of decoder layers",
    Severity.WARNING,
    rationale="""
Models such as encoder–decoders, or models that keep separate local and global stacks, have
more than one ModuleList of num_hidden_layers entries. vLLM's pipeline split refuses them ("multiple
`ModuleList`s ... not supported") and its Eagle3 bookkeeping follows whichever list it meets last.
""",
    fix="serve with pp=1",
)
def several_layer_lists(ctx, r):
    found = layer_lists(ctx.facts)
    if len(found) > 1:
        yield r.finding(
            f"{len(found)} ModuleLists of {ctx.facts.config.num_hidden_layers} layers: "
            + ", ".join(m.qualname for m in found),
            modules=[m.qualname for m in found],
        )


@rule(
    "TFB106",
    "Text config missing the numbers the backend reads",
    Severity.ERROR,
    rationale="""
The backend reads hidden_size, num_hidden_layers, num_attention_heads and vocab_size from
`config.get_text_config()`. A config whose text part lacks them (a multimodal config whose
language model is not a recognised sub-config, or a config that names them differently)
cannot be sized: vLLM fails while building attention and the LM head.
""",
    fix="check that the config nests its language model as text_config (or names the fields "
    "as transformers does)",
)
def text_config_missing(ctx, r):
    cfg = ctx.facts.config
    missing = [
        name
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if getattr(cfg, name) is None
    ]
    if missing:
        yield r.finding(
            f"the text config of {cfg.model_type!r} has no {', '.join(missing)}", missing=missing
        )


@rule(
    "TFB107",
    "Non-causal attention: served as an encoder-only model",
    Severity.ERROR,
    rationale="""
vLLM serves no encoder–decoder models. In a text-only model, the backend treats the presence of
ANY module with `is_causal = False` as the sign of an encoder model and gives every layer
EncoderOnlyAttention (bidirectional, no KV cache). A causal LM with one such module among causal
ones (an encoder stack, a bidirectional block) then attends to the future in its causal layers:
wrong output. When every attention layer is non-causal the model is an encoder as transformers
runs it too (BertGeneration without `is_decoder`): vLLM computes the same prompt logits
(BertGeneration at tp 1 in reports/parity.md), but keeps no KV cache, so a decoding step sees
only its own token where transformers re-reads the whole sequence.
""",
    fix="serve with vLLM's native implementation, or as a pooling/embedding model if it is one; "
    "for a BERT-style decoder set is_decoder=true in config.json",
)
def encoder_only(ctx, r):
    facts = ctx.facts
    if not facts.has_non_causal_module or facts.config.is_multimodal:
        return
    attention = [m for m in facts.modules if m.kind == "attention"]
    non_causal = [m.qualname for m in attention if m.attrs.get("is_causal") is False]
    # the layers vLLM gives an Attention: those dispatching through the interface
    served = [m for m in attention if m.attrs.get("interface")]
    if served and all(m.attrs.get("is_causal") is False for m in served):
        yield r.finding(
            f"every attention layer of {facts.model_class} has is_causal=False: vLLM serves it "
            "encoder-only as transformers computes it (same prompt logits), with no KV cache, "
            "so tokens generated after the first are not transformers'",
            severity=Severity.WARNING,
            modules=non_causal[:16],
        )
        return
    yield r.finding(
        f"{facts.model_class} has modules with is_causal=False: every layer becomes "
        "EncoderOnlyAttention, so causal generation is wrong",
        modules=non_causal[:16],
    )


@rule(
    "TFB109",
    "Decoder forward lacks an argument vLLM compiles on",
    Severity.ERROR,
    rationale="""
vLLM 0.32 decorates the class of `model.get_decoder()` for torch.compile with `input_ids`,
`inputs_embeds` and `position_ids` as dynamic arguments, and `support_torch_compile` raises
"Argument position_ids not found in the forward method of <class>" for any of them the forward
does not name (a `**kwargs` catch-all does not count). It happens before any weight is read:
the model cannot be served through the backend at all. Encoder–decoder decoders (BART family)
and state-space models (Mamba, xLSTM) are the usual cases.
""",
    fix="serve with vLLM's native implementation of this architecture",
)
def decoder_compile_args(ctx, r):
    facts = ctx.facts
    needed = ctx.profile.decoder_compile_args
    if not needed or facts.decoder_forward_args is None:
        return
    missing = [a for a in needed if a not in facts.decoder_forward_args]
    if missing:
        yield r.finding(
            f"{facts.decoder_class}.forward does not name {', '.join(missing)}: vLLM's "
            "torch.compile decoration raises before the model is built",
            missing=missing,
            decoder=facts.decoder_class,
        )


@rule(
    "TFB110",
    "AutoModel cannot build this config",
    Severity.ERROR,
    rationale="""
The backend builds the model with `AutoModel.from_config(config)` and nothing else: a config
class transformers maps only to a task head (a causal LM) and not to a base model, e.g. a text
config saved on its own from a multimodal family, raises "Unrecognized configuration class ...
for this kind of AutoModel". tfbackend falls back to the causal LM's base model to keep
checking, but vLLM does not.
""",
    fix="give vLLM the full (e.g. multimodal) config the text config came from, or serve with "
    "vLLM's native implementation",
)
def auto_model(ctx, r):
    if ctx.facts.auto_model_error:
        yield r.finding(
            f"AutoModel.from_config raises for {ctx.facts.config.model_type!r}: "
            f"{ctx.facts.auto_model_error}"
        )


@rule(
    "TFB111",
    "vLLM parses this model type with its own config class",
    Severity.WARNING,
    rationale="""
For some model types vLLM does not use transformers' config class: its `_CONFIG_REGISTRY`
(vllm/transformers_utils/config.py) maps them to a class of its own, and the Transformers backend
then builds whatever `AutoModel` makes of that config. It can be another family's model: vLLM 0.32
reads deepseek_v32 as `DeepseekV3Config`, so the backend builds DeepSeek-V3 attention without the
V3.2 indexer; hy_v4's `HYV4Config` changes which linears are sharded. With vLLM installed,
tfbackend re-reads the config with vLLM's class and checks that model (info); without it, the
plan follows transformers' class and may not be what vLLM builds (warning). vLLM may also refuse
configs transformers accepts (deepseek_v4 on 0.32), or parse one transformers' model cannot be
built from (beam on 0.33: BeamConfig flattens the per-layer-type rope parameters, and BeamModel
raises KeyError 'full_attention'). The table of classes is each release's (its registry).
""",
    fix="run `tfbackend check --with-vllm` to see what the installed vLLM builds, or serve with "
    "vLLM's native implementation of this model type",
)
def vllm_config_class(ctx, r):
    model_type = ctx.facts.config.model_type
    vllm_class = ctx.profile.config_overrides.get(model_type)
    if vllm_class is None:
        return
    if ctx.facts.vllm_config_error:
        yield r.finding(
            f"vLLM parses {model_type!r} with its own {vllm_class}, and that fails: "
            f"{ctx.facts.vllm_config_error}; vLLM cannot build the model (the rest of this "
            "check read transformers' class)",
            severity=Severity.ERROR,
            fix="serve with vLLM's native implementation of this model type",
            vllm_config_class=vllm_class,
        )
    elif ctx.facts.vllm_config_class:
        yield r.finding(
            f"vLLM parses {model_type!r} with its own {ctx.facts.vllm_config_class}: checked "
            "as the installed vLLM reads it, not as transformers' class would build it",
            severity=Severity.INFO,
            fix="nothing to do; transformers' own implementation of the model type differs "
            "from what vLLM serves",
            vllm_config_class=ctx.facts.vllm_config_class,
        )
    else:
        yield r.finding(
            f"vLLM parses {model_type!r} with its own {vllm_class}, not transformers' config "
            "class: without vLLM installed this plan follows transformers' class, and the model "
            "vLLM builds may differ from it",
            vllm_config_class=vllm_class,
        )


@rule(
    "TFB108",
    "Vision or audio tower present",
    Severity.INFO,
    rationale="""
A multimodal config carries towers (vision_config, audio_config, …) beside its language model.
vLLM 0.32's backend serves them through its multimodal mixin, which builds the whole model and
replaces the towers' Conv2d/Conv3d and linears too; tfbackend checks the language model only.
""",
    fix="nothing to do for text-only prompts; test image/audio inputs with `tfbackend run`",
)
def towers(ctx, r):
    subs = [s for s in ctx.facts.config.sub_configs if s != "text_config"]
    if ctx.facts.config.is_multimodal and subs:
        yield r.finding(
            f"{ctx.facts.config.model_type} carries {', '.join(subs)}: towers are not checked",
            towers=subs,
        )


@rule(
    "TFB112",
    "M-RoPE in a text-only model",
    Severity.ERROR,
    rationale="""
vLLM reads a config whose rope parameters carry `mrope_section` as M-RoPE (`uses_mrope`) and its
model runner then asserts that the model implements SupportsMRoPE. In vLLM 0.32's Transformers
backend only the multimodal class does; a text-only causal LM with M-RoPE raises
`AssertionError: M-RoPE support is not implemented.` in its first forward (Cohere Compass text in
reports/parity.md).
""",
    fix="serve the multimodal checkpoint (its outer config), or one whose rope parameters have "
    "no mrope_section",
)
def mrope_text_only(ctx, r):
    cfg = ctx.facts.config
    section = cfg.raw.get("mrope_section")
    if section is not None and not cfg.is_multimodal:
        yield r.finding(
            f"{cfg.model_type} declares mrope_section {section} but is served as a text-only "
            'causal LM: vLLM raises "M-RoPE support is not implemented." in the first forward',
            mrope_section=section,
        )


@rule(
    "TFB120",
    "Tokens mixed outside attention: a convolution over the sequence",
    Severity.ERROR,
    rationale="""
vLLM's Transformers backend calls the model once per step on every scheduled token of every
request, flattened into one `[1, tokens]` sequence, with `use_cache=False` and no
`past_key_values`: only attention learns where one request ends and the next begins (through
vLLM's own metadata) and only attention keeps state between steps (its KV cache). A
depthwise `nn.Conv1d` over the sequence (the short convolution of a Mamba/SSM mixer, Falcon-H1;
Zaya's CCA query/key convolution) runs across request boundaries, and when decoding it sees one
token with no conv or SSM state. Falcon-H1 and Zaya diverged from the second request of a batch
on in reports/parity.md (single requests matched at prefill); this holds on every platform.
""",
    fix="serve with vLLM's native implementation of the architecture (it keeps conv/SSM state "
    "per request)",
)
def sequence_convolution(ctx, r):
    # the decoder layers vLLM gives an Attention (a multimodal encoder's convolutions run
    # before the language model, on one request's features at a time)
    layers = tuple(a.qualname.rpartition(".")[0] + "." for a in ctx.plan.attention if a.qualname)
    convs = [
        m
        for m in ctx.facts.modules
        if (c := m.attrs.get("conv1d"))
        and c["depthwise"]
        and c["kernel"] > 1
        and layers
        and m.qualname.startswith(layers)
    ]
    if convs:
        classes = sorted({m.qualname.rsplit(".", 2)[-2] + " " + m.class_name for m in convs})
        yield r.finding(
            f"{len(convs)} depthwise Conv1d over the sequence ({', '.join(classes[:3])}): vLLM "
            "runs a batch as one sequence with no conv/SSM state, so requests leak into each "
            "other and decoding sees one token",
            modules=[m.qualname for m in convs][:16],
        )
