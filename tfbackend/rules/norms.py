"""TFB50x: norms: which vLLM norm each becomes, and whether that computes the same thing."""

from __future__ import annotations

from tfbackend.inspect.facts import NORM, NORM_GATED, NORM_OFFSET, NORM_PLAIN
from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule

_OFFSET_TARGETS = ("GemmaRMSNorm",)
_PLAIN_TARGETS = ("RMSNorm",)


def _norms(ctx):
    return [m for m in ctx.facts.modules if m.kind == NORM]


def _classes(mods) -> str:
    names = sorted({m.class_name for m in mods})
    return ", ".join(names[:4]) + (" …" if len(names) > 4 else "")


@rule(
    "TFB501",
    "Offset (Gemma-style) norms",
    Severity.INFO,
    rationale="""
Gemma-style RMSNorms compute x̂·(1 + w) and must become vLLM's GemmaRMSNorm; Llama-style ones
compute x̂·w and become RMSNorm. The class name does not tell (Gemma3n's norm is plain,
Qwen3-Next's is offset). vLLM 0.32 reads the dataflow of `forward`; seed-era vLLM guessed from a
zero-initialised weight; the 0.6 port from the name. tfbackend measures each norm on a CPU copy:
when the profile's choice disagrees with the measurement, the served model computes different
numbers at every layer.
""",
    fix="on a mismatch use a vLLM whose norm detection is structural (0.32+), or vLLM's native "
    "implementation",
)
def offset_norms(ctx, r):
    offset, wrong = [], []
    for m in _norms(ctx):
        variant = m.attrs.get("variant")
        entry = ctx.plan.entry_for(m.qualname)
        target = entry.target if entry and entry.kind == "norm" else None
        if variant == NORM_OFFSET:
            offset.append(m)
            if target in _PLAIN_TARGETS:
                wrong.append((m, "computes x̂·(1+w)", target))
        elif variant == NORM_PLAIN and target in _OFFSET_TARGETS:
            wrong.append((m, "computes x̂·w", target))
    if wrong:
        by = {}
        for m, what, target in wrong:
            by.setdefault((m.class_name, what, target), []).append(m.qualname)
        for (cls, what, target), mods in sorted(by.items()):
            yield r.finding(
                f"{len(mods)} {cls} {what} but {ctx.profile.name} makes it {target}: "
                "wrong output at every layer",
                severity=Severity.ERROR,
                modules=mods[:16],
            )
    elif offset:
        yield r.finding(
            f"{len(offset)} offset norm(s) ({_classes(offset)}) become GemmaRMSNorm",
            modules=[m.qualname for m in offset][:16],
        )


@rule(
    "TFB502",
    "Gated norms stay Transformers code",
    Severity.INFO,
    rationale="""
A norm whose forward takes a gate (`forward(x, gate)`, Mamba2 / Qwen3-Next linear attention)
does not match vLLM's RMSNorm pattern and stays the model's own module: it computes correctly
but is not fused, and it normalises whatever width reaches it on each rank.
""",
    fix="nothing to do",
)
def gated_norms(ctx, r):
    gated = [m for m in _norms(ctx) if m.attrs.get("variant") == NORM_GATED]
    if gated:
        yield r.finding(
            f"{len(gated)} gated norm(s) ({_classes(gated)}) are left as Transformers code",
            modules=[m.qualname for m in gated][:16],
        )


@rule(
    "TFB503",
    "Norms with a bias",
    Severity.INFO,
    rationale="""
vLLM's RMSNorm has no bias. vLLM 0.32 sees the trailing `+ bias` in the forward and leaves such
a norm as Transformers code; seed-era vLLM replaced every `*RMSNorm` by name, so the bias was
dropped and the checkpoint's `.bias` tensor had nowhere to load.
""",
    fix="on older vLLM serve with the native implementation",
)
def norm_bias(ctx, r):
    biased = [m for m in _norms(ctx) if m.attrs.get("bias")]
    if not biased:
        return
    replaced = [m for m in biased if m.attrs.get("rms_named")]
    if ctx.profile.norm_bias_replaced and replaced:
        yield r.finding(
            f"{len(replaced)} {_classes(replaced)} with a bias become a bias-less RMSNorm under "
            f"{ctx.profile.name}: the bias is lost",
            severity=Severity.ERROR,
            modules=[m.qualname for m in replaced][:16],
        )
    elif not ctx.profile.norm_bias_replaced:
        yield r.finding(
            f"{len(biased)} norm(s) with a bias ({_classes(biased)}) stay Transformers code",
            modules=[m.qualname for m in biased][:16],
        )


@rule(
    "TFB504",
    "Norm epsilon stored under an unusual attribute",
    Severity.WARNING,
    rationale="""
Seed-era vLLM built its RMSNorm with `eps` read from the module's `eps` or `variance_epsilon`
attribute, else 1e-6. A norm that keeps it elsewhere (`epsilon`, `norm_eps`) is rebuilt with
1e-6: slightly different numbers when the model's eps is not 1e-6. vLLM 0.32 reads eps from the
forward's own arithmetic.
""",
    fix="use vLLM 0.32+, or check that the model's eps is 1e-6",
)
def unusual_eps(ctx, r):
    attrs = ctx.profile.norm_eps_attrs
    if attrs is None:
        return
    off = [
        m
        for m in _norms(ctx)
        if m.attrs.get("rms_named")
        and m.attrs.get("eps_attr") not in attrs
        and m.attrs.get("eps") not in (None, 1e-6)
    ]
    if off:
        eps = sorted({m.attrs.get("eps") for m in off})
        yield r.finding(
            f"{len(off)} {_classes(off)} keep eps={eps[0]} in "
            f"{off[0].attrs.get('eps_attr')!r}: {ctx.profile.name} uses 1e-6",
            modules=[m.qualname for m in off][:16],
        )
