"""TFB1xx: the model's structure and where its code comes from."""

from __future__ import annotations

from tfbackend.report.findings import Severity
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
