"""What vLLM's substitutes hand the model's own forward, where it expects something else.

vLLM 0.32 keeps the model's Python forward and swaps the modules under it: its own linears,
Attention sized from the config, FusedMoE loaded in its own weight layout, and no attention
mask. Each rule here is one place where the model's code and the substitute disagree, found by
vLLM's real forward raising on a model `check` passed (reports/parity.md): TFB113 (Phi-MoE,
Llama 4), TFB216 (DBRX at tp 2), TFB407 (GLM-MoE-DSA, HY-V4), TFB408 (Inkling, MiMo-V2-Flash),
TFB519 (Llama 4).
"""

from __future__ import annotations

from tfbackend.inspect.facts import ATTENTION, EXPERTS
from tfbackend.inspect.linear_forward import UNRUN
from tfbackend.plan import K_LINEAR
from tfbackend.replace.profiles import Capability
from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule
from tfbackend.rules.tensor_parallel import SPLIT_OUTPUT

# vLLM linear classes whose forward is `x @ W.T + b`, one tensor out (return_bias=False).
_PLAIN_LINEARS = frozenset({
    "ReplicatedLinear", "ColumnParallelLinear", "RowParallelLinear", "QKVParallelLinear",
    "MergedColumnParallelLinear",
})  # fmt: skip


@rule(
    "TFB113",
    "nn.Linear subclass whose own forward vLLM drops",
    Severity.ERROR,
    rationale="""
vLLM 0.32 replaces every module that `isinstance(..., nn.Linear)`, subclasses included, with
one of its linear classes (transformers/base.py `recursive_replace` → `replace_linear_class`),
which computes `x @ W.T + b` and returns that one tensor. A subclass that overrides `forward`
loses it. Phi-MoE's `PhimoeTopKRouter` returns `(logits, weights, experts)` and its MoE block
unpacks three values: `ValueError: too many values to unpack (expected 3)` in vLLM's first
forward; Llama 4's `Llama4Router` returns `(scores, logits)`. Routers of MoE blocks that vLLM
routes itself (its MoEBlockFuser rebuilds them as GateLinear) are not affected. The subclass's
forward is run here: on meta for what it returns, then, for weights up to 4M elements, on random
numbers against `F.linear`; a larger one is not decided (warning).
""",
    fix="serve with vLLM's native implementation of the architecture (Phi-MoE and Llama 4 have "
    "one), or make the subclass a plain nn.Module holding its weight",
)
def linear_subclass_forward(ctx, r):
    lost, undecided = [], []
    for e in ctx.plan.entries_of(K_LINEAR):
        if e.target not in _PLAIN_LINEARS:
            continue
        for source in e.sources:
            fact = ctx.facts.module(source)
            own = fact.attrs.get("own_forward") if fact else None
            if not own:
                continue
            if own["returns"] not in ("tensor", UNRUN) or own["same_values"] is False:
                lost.append((source, own, e.target))
            elif own["same_values"] is None:
                undecided.append((source, own, e.target))
    if lost:
        source, own, target = lost[0]
        what = (
            f"return a {own['returns']}"
            if own["returns"] != "tensor"
            else "compute other values than x @ W.T + b"
        )
        yield r.finding(
            f"{len(lost)} {own['class']} module(s) (e.g. {source}) override nn.Linear.forward and "
            f"{what}; vLLM replaces them with {target}, which returns the plain linear output",
            modules=[m for m, _, _ in lost][:16],
            classes=sorted({o["class"] for _, o, _ in lost}),
        )
    if undecided:
        source, own, target = undecided[0]
        yield r.finding(
            f"{len(undecided)} {own['class']} module(s) (e.g. {source}) override "
            f"nn.Linear.forward; vLLM replaces them with {target} and drops that forward. Whether "
            "it equals x @ W.T + b could not be decided ("
            + (
                "it raised on the probe inputs"
                if own["returns"] == UNRUN
                else "weight too large to run on the CPU"
            )
            + ")",
            severity=Severity.WARNING,
            modules=[m for m, _, _ in undecided][:16],
            classes=sorted({o["class"] for _, o, _ in undecided}),
        )


@rule(
    "TFB216",
    "Attention fed by replicated projections at tp > 1",
    Severity.ERROR,
    rationale="""
vLLM's Attention always holds heads / tp query heads and kv_heads / tp KV heads per rank
(kv heads replicated when fewer than tp). When nothing splits an attention module's projections
(no tp_plan key matches them and no fuser claims them, e.g. DBRX's packed `Wqkv`, whose split
sizes the PackedQKVFuser does not match), each rank computes every head and hands them to an
Attention built for a fraction of them: vLLM 0.32 raises in `Attention.forward` (`key.view(-1,
num_kv_heads, head_size)`: "view size is not compatible with input tensor's size and stride",
DBRX at tp 2 in reports/parity.md) or, where the view happens to fit, folds heads into tokens
and its CPU build writes past the KV cache (SIGSEGV: CTRL, Falcon-H1, JetMoE, Moshi, Zaya at
tp 2). Every linear inside the attention module counts, at any depth.
""",
    fix="serve with tp=1, add a tp_plan that splits the attention projections, or serve with "
    "vLLM's native implementation of the architecture",
)
def replicated_attention(ctx, r):
    if ctx.tp <= 1:
        return
    if not ctx.facts.tp_plan and ctx.profile.missing_tp_plan == "error":
        return  # vLLM refuses the model before any forward (TFB201 says so)
    entries = ctx.plan.entries_of(K_LINEAR)
    hit = []
    for spec in ctx.plan.attention:
        if spec.qualname is None or spec.mla or spec.heads_per_rank == spec.num_heads:
            continue
        # every linear inside the module, not only its children: Moshi's `q_proj.linear`,
        # Zaya's `qkv_proj.q_proj` sit one level down (both crashed vLLM at tp 2)
        inside = spec.qualname + "."
        own = [e for e in entries if any(s.startswith(inside) for s in e.sources)]
        if own and not any(e.target in SPLIT_OUTPUT for e in own):
            hit.append((spec, sorted({e.qualname.rsplit(".", 1)[-1] for e in own})))
    if hit:
        spec, names = hit[0]
        yield r.finding(
            f"{len(hit)} attention module(s) (e.g. {spec.qualname}) compute q/k/v with replicated "
            f"linears ({', '.join(names)}): every rank produces all {spec.num_heads} heads, while "
            f"vLLM's Attention on each rank serves {spec.heads_per_rank}",
            modules=[s.qualname for s, _ in hit][:16],
        )


@rule(
    "TFB407",
    "Attention forward reads the attention mask vLLM never passes",
    Severity.ERROR,
    rationale="""
vLLM computes masking inside its own Attention and passes the model no `attention_mask`;
transformers' masking_utils (`create_causal_mask` and friends) return None for vLLM's "vllm"
attention implementation, which is not in `ALL_MASK_ATTENTION_FUNCTIONS`. An attention forward
that uses the mask as a tensor outside an `attention_mask is not None` guard (GLM-MoE-DSA's and
HY-V4's sparse-attention indexer: `attention_mask[:, 0, :, :]`) raises `TypeError: 'NoneType'
object is not subscriptable` in vLLM's first forward. Branches are read as this instance takes
them under vLLM (`self.indexer is not None`, `_attn_implementation == "vllm"`). When the model
does not build its masks with masking_utils, whether it gets one could not be decided: warning.
""",
    fix="serve with vLLM's native implementation of the architecture (its sparse-attention "
    "indexer computes its own mask)",
)
def mask_tensor_reads(ctx, r):
    hits = [m for m in ctx.facts.by_kind(ATTENTION) if m.attrs.get("tensor_mask_reads")]
    if not hits:
        return
    reads = sorted({x for m in hits for x in m.attrs["tensor_mask_reads"]})
    classes = sorted({m.class_name for m in hits})
    decided = ctx.facts.masks_from_masking_utils
    yield r.finding(
        f"{len(hits)} attention module(s) ({', '.join(classes)}) use {', '.join(reads)} outside a "
        "None guard; "
        + (
            "the model builds its masks with masking_utils, which returns None under vLLM: "
            "the forward raises"
            if decided
            else "vLLM passes no attention_mask, and whether the model builds one itself could "
            "not be decided"
        ),
        severity=Severity.ERROR if decided else Severity.WARNING,
        modules=[m.qualname for m in hits][:16],
        reads=reads,
    )


@rule(
    "TFB408",
    "Attention layer's K/V widths differ from what vLLM sizes its Attention for",
    Severity.ERROR,
    rationale="""
vLLM 0.32 builds each layer's Attention from the config's whole-model `num_key_value_heads` and
head size (per layer only for transformers' per_layer_config), and `vllm_attention_forward`
(transformers/__init__.py) pads a value head narrower than the query/key head but passes a wider
one unchanged. A layer whose own k/v projections give another width breaks it: Inkling's and
MiMo-V2-Flash's sliding layers hold more KV heads than the config's count (`key.view(-1,
num_kv_heads, head_size)` raises "view size is not compatible"), and a value head wider than
the q/k head leaves the attention output heads x head_size wide while o_proj reads heads x
v_head_dim (`shape '[-1, 512]' is invalid`, the tiny MiMo). Real MiMo-V2-Flash (q/k 192, v 128:
padded) still has the doubled sliding KV heads: a tiny one with that geometry died of SIGSEGV in
vLLM's forward. Widths are read from the layer's `k_proj`/`v_proj`.
""",
    fix="serve with vLLM's native implementation of the architecture",
)
def kv_widths(ctx, r):
    hits = []
    for spec in ctx.plan.attention:
        if spec.qualname is None or spec.mla or not spec.head_size or not spec.num_kv_heads:
            continue
        k = ctx.facts.module(f"{spec.qualname}.k_proj")
        v = ctx.facts.module(f"{spec.qualname}.v_proj")
        if not (k and v and k.kind == v.kind == "linear"):
            continue
        expected = spec.num_kv_heads * spec.head_size
        k_out, v_out = k.attrs["out_features"], v.attrs["out_features"]
        if k_out != expected and k_out % spec.head_size == 0:
            hits.append(
                (
                    spec,
                    f"k_proj gives {k_out // spec.head_size} KV heads of {spec.head_size}, "
                    f"vLLM's Attention holds {spec.num_kv_heads}",
                )
            )
        elif k_out == expected and v_out > expected:
            hits.append(
                (
                    spec,
                    f"v_proj gives value heads of {v_out // spec.num_kv_heads}, wider than "
                    f"the head size {spec.head_size} vLLM's Attention is built with",
                )
            )
    if hits:
        spec, why = hits[0]
        yield r.finding(
            f"{len(hits)} attention layer(s) (e.g. layer {spec.layer_idx}, {spec.qualname}): "
            f"{why}: vLLM's forward raises",
            modules=[s.qualname for s, _ in hits][:16],
            layers=[s.layer_idx for s, _ in hits],
        )


@rule(
    "TFB519",
    "Fused experts stored transposed",
    Severity.ERROR,
    rationale="""
vLLM 0.32's FusedMoE loads 3-D expert tensors in transformers 5's standard orientation,
`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` (output before input), and the Transformers
backend never sets `is_fused_checkpoint_transposed`. Experts that store them input-first
(Llama 4's `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`, multiplied with `torch.bmm(x, W)`)
fail in weight loading (`_load_w2`: "The size of tensor a (128) must match the size of tensor b
(256)") or, where the two sizes are equal, load the transpose silently. The orientation is read
from the experts' parameter shapes against the config's hidden size. vLLM 0.33 passes the experts'
`is_transposed` (set by transformers' `use_experts_implementation(is_transposed=True)`, as GPT-OSS
declares) to FusedMoE as `is_fused_checkpoint_transposed`: under that profile, experts that declare
it load; Llama 4's, which do not, still fail.
""",
    fix="serve with vLLM's native implementation of the architecture (Llama 4 has one, which "
    "transposes these tensors while loading)",
)
def transposed_experts(ctx, r):
    hidden = ctx.facts.config.hidden_size
    if not hidden or not ctx.profile.moe_layouts:
        return
    hits = []
    loads_transposed = ctx.profile.can(Capability.LOADS_TRANSPOSED_EXPERTS)
    for m in ctx.facts.by_kind(EXPERTS):
        if m.attrs.get("layout") != "fused_3d":
            continue
        if loads_transposed and m.attrs.get("is_transposed"):
            continue  # vLLM >= 0.33 passes is_fused_checkpoint_transposed to FusedMoE
        for name, shape in m.params.items():
            if len(shape) != 3:
                continue
            down = "down" in name or name.startswith("w2")
            # vLLM's layout: [E, out, in]; down projects to H, gate/up read H
            want, other = (1, 2) if down else (2, 1)
            if shape[want] != hidden and shape[other] == hidden:
                hits.append((m.qualname, name, shape, down))
    if hits:
        qualname, name, shape, down = hits[0]
        want = "[E, H, I]" if down else "[E, 2I, H]"
        yield r.finding(
            f"{len({q for q, *_ in hits})} experts block(s) (e.g. {qualname}.{name} {shape}, "
            f"H={hidden}) store their weights input-first; vLLM's FusedMoE loads {want}: "
            "weight loading fails",
            modules=sorted({q for q, *_ in hits})[:16],
        )
