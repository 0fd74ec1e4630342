"""TFB4xx: attention dispatch and attention features."""

from __future__ import annotations

from tfbackend.fusers import MLAFuser
from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule


@rule(
    "TFB401",
    "Attention not dispatched through the attention interface",
    Severity.ERROR,
    rationale="""
The backend serves attention by registering its own function in transformers'
`ALL_ATTENTION_FUNCTIONS` and setting `_attn_implementation="vllm"`. A model whose attention
modules compute attention themselves never calls it: seed-era vLLM refuses models without
`_supports_attention_backend`; vLLM 0.32 first refuses, in its model registry, an
architecture that neither declares `_supports_attention_backend` nor passes transformers'
`_can_set_attn_implementation()` source check ("The Transformers implementation of X is not
compatible with vLLM"); then it looks for an interface call in each attention module's forward
and raises "Layer N does not dispatch through the Transformers attention interface" for any
layer without one.
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
    if facts.architecture_compatible is False:
        yield r.finding(
            f"{facts.causal_lm_class} neither declares _supports_attention_backend nor calls "
            "ALL_ATTENTION_FUNCTIONS.get_interface in its module: vLLM's registry refuses it "
            '("not compatible with vLLM")'
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


@rule(
    "TFB402",
    "Sliding-window attention",
    Severity.INFO,
    rationale="""
vLLM 0.32 gives a layer a sliding window when `config.layer_types[i] == "sliding_attention"`
(`per_layer_sliding_window`); without layer_types, `config.sliding_window` applies to every
layer. Any other layer type (e.g. Llama 4's "chunked_attention") is served as full attention:
outputs agree only while the context is shorter than the chunk.
""",
    fix="nothing to do for sliding windows; for other layer types keep prompts shorter than the "
    "chunk, or serve with vLLM's native implementation",
)
def sliding_window(ctx, r):
    cfg = ctx.facts.config
    types = cfg.layer_types or []
    sliding = [a.layer_idx for a in ctx.plan.attention if a.sliding_window]
    if sliding:
        yield r.finding(
            f"{len(sliding)} of {len(ctx.plan.attention)} layers use a sliding window of "
            f"{cfg.sliding_window} tokens",
            layers=sliding,
        )
    elif cfg.sliding_window and not types:
        yield r.finding(
            f"every layer uses a sliding window of {cfg.sliding_window} tokens (no layer_types)"
        )
    served = {a.layer_idx for a in ctx.plan.attention if a.qualname}
    odd: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        if t not in ("full_attention", "sliding_attention") and i in served:
            odd.setdefault(t, []).append(i)
    for t, layers in sorted(odd.items()):
        yield r.finding(
            f"{len(layers)} layer(s) of type {t!r} are served as full attention",
            severity=Severity.WARNING,
            layers=layers,
            layer_type=t,
        )


@rule(
    "TFB403",
    "Logit soft-capping",
    Severity.INFO,
    rationale="""
`attn_logit_softcapping` is passed to every vLLM Attention as `logits_soft_cap` (the attention
backend must support it: FlashAttention and FlashInfer do); `final_logit_softcapping` is applied
by the LogitsProcessor. Both reproduce the model's tanh capping.
""",
    fix="nothing to do; pick an attention backend that supports soft-capping",
)
def softcap(ctx, r):
    cfg = ctx.facts.config
    caps = []
    if cfg.attn_logit_softcapping:
        caps.append(f"attention logits capped at {cfg.attn_logit_softcapping}")
    if cfg.final_logit_softcapping:
        caps.append(f"final logits capped at {cfg.final_logit_softcapping}")
    if caps:
        yield r.finding("; ".join(caps))


@rule(
    "TFB404",
    "Attention sinks",
    Severity.INFO,
    rationale="""
A model that passes `s_aux=` to the attention interface (gpt-oss style learned sinks) gets the
sinks tensor handed to vLLM's Attention (`sinks=`); only attention backends that implement sinks
can serve it, and the sinks' heads are split over tp like the query heads.
""",
    fix="nothing to do; vLLM picks a sinks-capable attention backend",
)
def sinks(ctx, r):
    layers = [a.layer_idx for a in ctx.plan.attention if a.sinks]
    if layers:
        yield r.finding(f"{len(layers)} layer(s) pass attention sinks (s_aux)", layers=layers)


@rule(
    "TFB405",
    "Multi-head latent attention (MLA)",
    Severity.INFO,
    rationale="""
A config with `kv_lora_rank` is MLA (DeepSeek-V2/V3 style). vLLM 0.32's MLAFuser fuses the
latent projections and serves them with MLAAttention (compressed KV cache); if it matches no
layer, vLLM warns and falls back to full attention with head size qk_nope + qk_rope and a padded
value head, which computes the same result with a much larger KV cache; if it matches some
layers but not others, vLLM refuses to build (the latent cache cannot be allocated for the rest).
Older backends know nothing of MLA and size the KV cache from head_dim.
""",
    fix="nothing to do on vLLM 0.32+; on older vLLM serve with the native implementation",
)
def mla(ctx, r):
    cfg = ctx.facts.config
    if cfg.kv_lora_rank is None:
        return
    nope = cfg.raw.get("qk_nope_head_dim")
    rope = cfg.raw.get("qk_rope_head_dim")
    dims = f" (qk_nope {nope} + qk_rope {rope})" if nope is not None and rope is not None else ""
    if ctx.profile.fuser(MLAFuser) is not None:
        yield from _mla_on_fuser_era(ctx, r, f"MLA with kv_lora_rank={cfg.kv_lora_rank}{dims}")
    else:
        yield r.finding(
            f"MLA with kv_lora_rank={cfg.kv_lora_rank}{dims}: {ctx.profile.name} has no MLA "
            "support; the KV cache is sized from head_dim and may not match",
            severity=Severity.WARNING,
        )


# vLLM 0.32 transformers_utils/model_arch_config_convertor.py is_deepseek_mla: the model types
# whose head size it takes as kv_lora_rank + qk_rope_head_dim (and whose MLA metadata accepts it).
DEEPSEEK_MLA_TYPES = frozenset({
    "axk1", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "deepseek_v41",
    "dots3_note", "deepseek_mtp", "k3_dspark", "glm5_next", "glm5_next_text", "glm_moe_dsa",
    "glm4_moe_lite", "glm4_moe_lite_mtp", "kimi_k2", "kimi_linear", "longcat_flash",
    "pangu_ultra_moe", "pangu_ultra_moe_mtp", "bailing_hybrid", "bailing_hybrid_mtp",
    "bailing_hybrid_v3_mtp", "hy_v4", "hy_v4_mtp",
})  # fmt: skip


def _mla_on_fuser_era(ctx, r, what: str):
    """What the plan says vLLM 0.32 builds: every layer MLAAttention, none, or a mix it refuses."""
    layers = [a for a in ctx.plan.attention if a.qualname]
    latent = [a.layer_idx for a in layers if a.mla]
    if latent and len(latent) == len(layers):
        model_type = ctx.facts.config.model_type
        if model_type not in DEEPSEEK_MLA_TYPES:
            yield r.finding(
                f"{what}: MLAAttention serves every layer, but vLLM reads model_type "
                f"{model_type!r} as not MLA (is_deepseek_mla) and sizes attention from head_dim "
                f'({ctx.facts.config.head_dim}); its MLA metadata then raises "Head dimension '
                f'{ctx.facts.config.head_dim} is not supported by MLA" in the first forward',
                severity=Severity.ERROR,
                fix="serve with vLLM's native implementation of the architecture, or ask vLLM "
                "to add the model_type to ModelArchConfigConvertor.is_deepseek_mla",
            )
            return
        yield r.finding(f"{what}: served by MLAAttention ({len(latent)} layers)")
    elif latent:
        full = [a.layer_idx for a in layers if not a.mla]
        yield r.finding(
            f"{what}: {len(full)} layer(s) do not fuse as MLA while {len(latent)} do; vLLM "
            'raises ValueError ("did not fuse as MLA, but the rest of the model did")',
            severity=Severity.ERROR,
            layers=full,
        )
    else:
        yield r.finding(
            f"{what}: vLLM's MLAFuser matches no layer, so it falls back to full attention "
            "(head size qk_nope + qk_rope, value heads padded) with a much larger KV cache",
            severity=Severity.WARNING,
        )


@rule(
    "TFB406",
    "Several attention modules share one layer index",
    Severity.ERROR,
    rationale="""
vLLM 0.32 gives each decoder layer one Attention instance (one KV cache), keyed by the
`layer_idx` of the module that calls the attention interface. When two modules that call it
carry the same index (self- and cross-attention in a decoder layer, two stacks built with
the same indices, a block shared across layers), the backend raises "Layer N dispatches
attention from more than one module ..., which one vLLM attention layer cannot serve".
""",
    fix="serve with vLLM's native implementation of this architecture",
)
def one_attention_per_layer(ctx, r):
    if not ctx.profile.one_attention_per_layer:
        return
    by_layer: dict[int, list[str]] = {}
    for m in ctx.facts.modules:
        if m.kind == "attention" and m.attrs.get("interface"):
            idx = m.attrs.get("layer_idx")
            if isinstance(idx, int):
                by_layer.setdefault(idx, []).append(m.qualname)
    shared = {i: q for i, q in sorted(by_layer.items()) if len(q) > 1}
    if shared:
        i, names = next(iter(shared.items()))
        yield r.finding(
            f"{len(shared)} layer indices are claimed by more than one attention module "
            f"(layer {i}: {' and '.join(names[:2])}): vLLM raises while building",
            modules=[q for names in shared.values() for q in names][:16],
            layers=list(shared)[:32],
        )


def _served_attention(ctx, key: str):
    """Attention facts of the layers vLLM serves through its interface whose `key` attr is set."""
    return [
        m
        for m in ctx.facts.modules
        if m.kind == "attention" and m.attrs.get("interface") and m.attrs.get(key)
    ]


@rule(
    "TFB410",
    "Attention mask computed by the module: vLLM drops it",
    Severity.ERROR,
    rationale="""
vLLM's `vllm_attention_forward` (models/transformers/__init__.py, 0.32) takes the
`attention_mask` argument and never reads it: vLLM's own kernels apply the causal mask (and the
sliding window the config declares), nothing else. A module that hands the interface a mask it
computed itself (Doge's dynamic mask from `dt_proj` and `A`, an additive bias) is served
without it, on every platform: the logits differ from the first layer on (Doge at tp 1 and 2
in reports/parity.md). A mask read from what the model passed down (`attention_mask`, sliced
or looked up) is the causal mask vLLM reproduces and is fine.
""",
    fix="serve with vLLM's native implementation of the architecture; the backend has no way to "
    "pass a per-module mask or bias to vLLM's attention",
)
def module_mask(ctx, r):
    mods = _served_attention(ctx, "own_mask")
    if mods:
        classes = sorted({m.class_name for m in mods})
        masks = sorted({m.attrs["own_mask"] for m in mods})
        yield r.finding(
            f"{len(mods)} attention module(s) ({', '.join(classes)}) pass a mask they compute "
            f"({', '.join(masks)}) to the attention interface: vLLM's attention ignores the "
            "mask argument, so that mask or bias is never applied",
            modules=[m.qualname for m in mods][:16],
            masks=masks,
        )


@rule(
    "TFB411",
    "A sliding window vLLM applies and the model does not",
    Severity.ERROR,
    rationale="""
Without `layer_types` (or with every layer sliding), vLLM 0.32 puts `config.sliding_window` in
its CacheConfig (engine/arg_utils.py) and every Attention layer attends to that many tokens
only. Whether the model itself slides is its code's choice: a model that builds only
`create_causal_mask` and passes no `sliding_window=` to the attention interface (Moshi) attends
to the whole context in transformers. Past the window the two differ (Moshi's tiny model, window
8, diverged from position 8 on in reports/parity.md). While the window covers the whole context
(`sliding_window >= max_position_embeddings`, as Moshi's released checkpoints set it) nothing
differs.
""",
    fix="set sliding_window to null in config.json (or serve with --max-model-len at most the "
    "window); vLLM then attends to the whole context as the model does",
)
def unapplied_sliding_window(ctx, r):
    cfg, facts = ctx.facts.config, ctx.facts
    window = cfg.sliding_window
    types = cfg.layer_types
    if not window or (types and not all(t == "sliding_attention" for t in types)):
        return
    served = [m for m in facts.modules if m.kind == "attention" and m.attrs.get("interface")]
    if not served or any("sliding_window" in m.attrs.get("interface_keywords", []) for m in served):
        return
    if facts.builds_sliding_mask is None:
        yield r.finding(
            f"vLLM applies sliding_window={window} to every layer; the model's source could not "
            "be read to tell whether it slides too",
            severity=Severity.WARNING,
        )
        return
    if facts.builds_sliding_mask:
        return
    context = cfg.max_position_embeddings
    if context is not None and window >= context:
        yield r.finding(
            f"vLLM applies sliding_window={window} to every layer, which the model's code never "
            f"does; the window covers max_position_embeddings={context}, so nothing differs",
            severity=Severity.INFO,
        )
        return
    yield r.finding(
        f"vLLM applies sliding_window={window} to every layer (no layer_types), but "
        f"{facts.model_class} never slides (no sliding-window mask, no sliding_window= to the "
        f"attention interface): logits differ past {window} tokens",
        window=window,
    )


@rule(
    "TFB412",
    "Key/value heads widened before the attention interface",
    Severity.ERROR,
    rationale="""
vLLM sizes each Attention layer for the config's `num_key_value_heads` (per rank) and reads the
key and value it is handed as `[tokens, kv_heads, head_size]`. A forward that repeats or expands
key/value before the interface call (JetMoE's mixture-of-attention: `key_states.repeat(1,
top_k, 1, 1)`) hands it top_k times as many heads: vLLM reads them as that many times more
tokens. vLLM 0.32's CPU build then writes past its KV cache and the rank dies of SIGSEGV
(JetMoE at tp 1 and 2 in reports/parity.md); on GPU the cache receives the wrong rows and the
logits are wrong.
""",
    fix="serve with vLLM's native implementation of the architecture",
)
def widened_kv(ctx, r):
    mods = _served_attention(ctx, "kv_expanded")
    if mods:
        how = sorted({f for m in mods for f in m.attrs["kv_expanded"]})
        classes = sorted({m.class_name for m in mods})
        yield r.finding(
            f"{len(mods)} attention module(s) ({', '.join(classes)}) widen key/value with "
            f"{', '.join('.' + h + '()' for h in how)} before the attention interface: vLLM's "
            f"Attention expects {ctx.facts.config.num_key_value_heads} kv heads and reads the "
            "extra heads as extra tokens",
            modules=[m.qualname for m in mods][:16],
        )
