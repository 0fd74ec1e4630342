"""TFB8xx: the installed transformers, torch and vLLM against what the profile's backend needs."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from tfbackend.rules.findings import Severity
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
    "transformers too old for this vLLM",
    Severity.ERROR,
    rationale="""
The backend calls into transformers' model code and raises
`ImportError: Transformers modeling backend requires transformers>=X for <feature>` when the
installed version is older than a feature needs (seed era: 4.57.0.dev0 for MoE and encoder
models; vLLM 0.32: 5.18.0 for video inputs, and vLLM 0.32.0 itself pins
transformers>=5.16.1,<5.20.0). This checks the transformers installed where tfbackend runs:
check in the environment you will serve from. A transformers newer than the vLLM's pin is
TFB804.
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


@rule(
    "TFB804",
    "plan read from model code vLLM does not serve with",
    Severity.WARNING,
    rationale="""
`check` reads the model's code (its forward, its modules, its tp_plan) from the transformers
installed where it runs, and vLLM serves the model with the transformers its own pin allows
(vLLM 0.32: >=5.16.1,<5.20, which resolves to 5.19.0; vLLM 0.33: <5.21). Model code moves
between transformers releases: 5.24 wraps attention forwards in a decorator, renames modules,
adds tp_plan styles. A plan read from a transformers outside the profile's range describes code
vLLM never runs, so it may differ from what vLLM builds. The report's `read_with` says which
transformers the plan was read from.
""",
    fix="install the transformers the profile's vLLM serves with, then check again",
)
def plan_read_with_other_transformers(ctx, r):
    installed = _v(ctx.facts.versions.get("transformers"))
    ceiling = _v(ctx.profile.max_transformers)
    if installed is None or ceiling is None or installed < ceiling:
        return  # below the range, TFB801 already fails the model
    serving = ctx.profile.serving_transformers
    yield r.finding(
        f"the plan was read from transformers {installed}; {ctx.profile.name} serves with "
        f"transformers {ctx.profile.transformers_range()}"
        + (f" ({serving} on a fresh install)" if serving else "")
        + ", whose model code may differ",
        fix=(
            f"pip install 'transformers=={serving}' and check again"
            if serving
            else f"install transformers {ctx.profile.transformers_range()} and check again"
        ),
        installed=str(installed),
        serving_range=ctx.profile.transformers_range(),
        serving=serving,
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
