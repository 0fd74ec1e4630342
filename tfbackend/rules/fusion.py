"""Rules about what the fuser-era backend builds, and about agreement with the real vLLM."""

from __future__ import annotations

from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule


@rule(
    "TFB891",
    "Plan disagrees with what vLLM built",
    Severity.ERROR,
    rationale="`check --with-vllm` built the model with the installed vLLM on meta, one gloo "
    "process per rank; a module whose class or per-rank shape differs from the plan means the "
    "prediction is wrong for this model.",
    fix="Report it to tfbackend with the JSON report; trust the vLLM side meanwhile.",
)
def vllm_disagreement(ctx, rule):
    agreement = ctx.options.get("vllm_agreement")
    if agreement is None:
        return
    for d in agreement.disagreements[:50]:
        yield rule.finding(
            f"rank {d.rank} {d.qualname} ({d.what}): tfbackend {d.ours} | vLLM {d.vllm}",
            modules=[d.qualname],
            rank=d.rank,
            ours=d.ours,
            vllm=d.vllm,
        )
    if agreement.run_error:
        yield rule.finding(
            f"the vLLM build did not complete: {agreement.run_error}", severity=Severity.WARNING
        )


@rule(
    "TFB892",
    "vLLM raised while building the model",
    Severity.ERROR,
    rationale="`check --with-vllm` built the model with the installed vLLM; it raised, so "
    "vLLM will refuse to serve this model at this tp/pp.",
    fix="Read the exception; the other findings usually name the cause.",
)
def vllm_raised(ctx, rule):
    agreement = ctx.options.get("vllm_agreement")
    if agreement is not None and agreement.vllm_error:
        yield rule.finding(agreement.vllm_error.splitlines()[0][:400])
