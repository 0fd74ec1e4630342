"""TFB8xx: the installed transformers, torch and vLLM against what the profile's backend needs."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from tfbackend.report.findings import Severity
from tfbackend.rules.registry import rule


def _v(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def features(ctx) -> list[str]:
    """The backend features this model uses, as the profile's min_transformers names them."""
    facts = ctx.facts
    used = ["base"]
    if any(m.kind == "experts" for m in facts.modules):
        used.append("moe")
    if facts.has_non_causal_module and not facts.config.is_multimodal:
        used.append("encoder")
    if "video_config" in facts.config.sub_configs:
        used.append("video")
    return used


@rule(
    "TFB801",
    "transformers too old (or too new) for this vLLM",
    Severity.ERROR,
    rationale="""
The backend calls into transformers' model code and raises
`ImportError: Transformers modeling backend requires transformers>=X for <feature>` when the
installed version is older than a feature needs (seed era: 4.57.0.dev0 for MoE and encoder
models; vLLM 0.32: 5.18.0 for video inputs, and vLLM 0.32.0 itself pins
transformers>=5.16.1,<5.20.0). This checks the transformers installed where tfbackend runs:
check in the environment you will serve from.
""",
    fix="install a transformers version inside the profile's range",
)
def transformers_version(ctx, r):
    installed = _v(ctx.facts.versions.get("transformers"))
    if installed is None:
        return
    for feature in features(ctx):
        need = _v(ctx.profile.min_transformers.get(feature))
        if need and installed < need:
            yield r.finding(
                f"transformers {installed} < {need}, which {ctx.profile.name} needs for "
                f"{'the backend' if feature == 'base' else feature + ' models'}",
                feature=feature,
                required=str(need),
            )
    ceiling = _v(ctx.profile.max_transformers)
    if ceiling and installed >= ceiling:
        # Without vLLM here, this environment is not the serving one: the model code checked may
        # differ from what the serving transformers runs, which is worth knowing, not a defect.
        serving_here = bool(ctx.facts.versions.get("vllm"))
        yield r.finding(
            f"transformers {installed} is newer than {ctx.profile.name} supports (< {ceiling}): "
            + (
                "the backend may break on changed internals"
                if serving_here
                else "the serving environment will run an older transformers' model code"
            ),
            severity=Severity.WARNING if serving_here else Severity.INFO,
        )


@rule(
    "TFB802",
    "torch older than this vLLM needs",
    Severity.WARNING,
    rationale="""
Each vLLM release is built against one torch (vLLM 0.32.0: torch==2.13.0). A different torch
in the serving environment fails to import vLLM's compiled kernels. Checked on the environment
tfbackend runs in.
""",
    fix="install the torch version the vLLM release names",
)
def torch_version(ctx, r):
    installed = _v((ctx.facts.versions.get("torch") or "").split("+")[0])
    need = _v(ctx.profile.min_torch)
    if installed and need and installed.release[:2] != need.release[:2]:
        yield r.finding(f"torch {installed} here; {ctx.profile.name} is built for torch {need}")


@rule(
    "TFB803",
    "vLLM version checked against",
    Severity.INFO,
    rationale="""
Rules follow a profile: the backend's behaviour in one range of vLLM versions. The default is
the installed vLLM's profile, else the newest; `--vllm-version` picks another. A profile other
than the installed vLLM's describes a different backend than the one this machine would run.
""",
    fix="pass --vllm-version X.Y to check against the vLLM you serve with",
)
def vllm_version(ctx, r):
    from tfbackend.replace.profiles import profile_for_version

    installed = ctx.facts.versions.get("vllm")
    if not installed:
        yield r.finding(f"vLLM is not installed: checked against {ctx.profile.name}")
        return
    try:
        own = profile_for_version(installed).name
    except InvalidVersion:
        own = None
    if own and own != ctx.profile.name:
        yield r.finding(
            f"vLLM {installed} is installed ({own}) but the check used {ctx.profile.name}",
            severity=Severity.WARNING,
        )
