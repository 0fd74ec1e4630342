"""The `check` pipeline: source → facts → plan → findings → report. No printing here."""

from __future__ import annotations

from dataclasses import dataclass, field

from tfbackend.errors import CheckpointError, UserError
from tfbackend.inspect.facts import ModelFacts


@dataclass
class CheckOptions:
    tp: int = 1
    pp: int = 1
    revision: str | None = None
    token: str | None = None
    offline: bool | None = None
    trust_remote_code: bool = False
    vllm_version: str | None = None
    select: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    strict: bool = False
    dtype: str | None = None  # served dtype; default: the config's, else bfloat16
    max_model_len: int | None = None  # default: config max_position_embeddings, capped
    gpu_memory: float = 80.0  # GiB per GPU
    no_checkpoint: bool = False  # skip reading the checkpoint's headers
    with_vllm: bool = False  # build vLLM's own model on meta and diff it against the plan
    vllm_timeout: float = 300.0

    def validate(self) -> None:
        from tfbackend.limits import check_at_least_one, check_parallel, check_positive
        from tfbackend.rules.registry import check_rule_ids

        check_parallel(self.tp, self.pp)
        check_at_least_one("--max-model-len", self.max_model_len)
        check_positive("--gpu-memory", self.gpu_memory, " of GiB")
        check_rule_ids("--select", self.select)
        check_rule_ids("--ignore", self.ignore)
        if self.dtype is not None:
            from tfbackend.memory import DTYPE_BYTES, normalise_dtype

            if normalise_dtype(self.dtype) not in DTYPE_BYTES:
                raise UserError(f"--dtype {self.dtype!r} is not one of bfloat16, float16, float32")


def check(model: str, options: CheckOptions):
    from tfbackend.inspect import gather_facts

    options.validate()
    facts = gather_facts(
        model,
        revision=options.revision,
        token=options.token,
        offline=options.offline,
        trust_remote_code=options.trust_remote_code,
    )
    return check_facts(facts, options)


def check_facts(facts: ModelFacts, options: CheckOptions):
    from tfbackend.replace.grouping import group_entries
    from tfbackend.replace.planner import build_plan
    from tfbackend.replace.profiles import select_profile
    from tfbackend.report.model import CheckReport
    from tfbackend.report.summary import summarize
    from tfbackend.rules.findings import sort_findings, verdict_of
    from tfbackend.rules.registry import RuleContext, run_rules

    options.validate()
    profile = select_profile(options.vllm_version, facts.versions.get("vllm"))
    plan = build_plan(facts, tp=options.tp, pp=options.pp, profile=profile)
    sections = _weights_and_memory(facts, plan, options)
    if options.with_vllm:
        from tfbackend.vllm_bridge import cross_check

        sections["vllm_agreement"] = cross_check(facts, plan, timeout=options.vllm_timeout)
    ctx = RuleContext(
        facts=facts, plan=plan, profile=profile, tp=options.tp, pp=options.pp, options=sections
    )
    findings = sort_findings(run_rules(ctx, select=options.select, ignore=options.ignore))
    report = CheckReport(
        summary=summarize(facts),
        tp=options.tp,
        pp=options.pp,
        profile=profile.name,
        profile_summary=profile.summary,
        plan=plan,
        groups=group_entries(plan),
        findings=findings,
        verdict=verdict_of(findings, strict=options.strict),
        versions=facts.versions,
        sections=sections,
        read_with=read_with(facts.versions.get("transformers"), profile),
    )
    return report


def read_with(transformers_version: str | None, profile) -> dict:
    """Which transformers the plan was read from, and whether the profile's vLLM serves with it."""
    from packaging.specifiers import SpecifierSet

    spec = profile.transformers_range()
    inside = None
    if transformers_version and spec != "any":
        inside = SpecifierSet(spec).contains(transformers_version, prereleases=True)
    return {"transformers": transformers_version, "serving_range": spec, "in_range": inside}


def _weights_and_memory(facts: ModelFacts, plan, options: CheckOptions) -> dict:
    """Checkpoint headers against the model, and per-rank memory (sections "checkpoint", "memory")."""
    from tfbackend.inspect.checkpoint import read_headers
    from tfbackend.memory import estimate_memory, served_dtype
    from tfbackend.replace.names import compare_checkpoint, raw_text_config

    out: dict = {}
    dtype = served_dtype(options.dtype, facts.config.dtype)
    if not options.no_checkpoint:
        try:
            headers = read_headers(facts.source, token=options.token, offline=options.offline)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc} (or pass --no-checkpoint to skip the checkpoint check)"
            ) from exc
        out["checkpoint"] = compare_checkpoint(headers, facts, served_dtype=dtype)
    out["memory"] = estimate_memory(
        facts,
        plan,
        dtype=dtype,
        max_model_len=options.max_model_len,
        gpu_memory_gib=options.gpu_memory,
        raw_config=raw_text_config(facts),
    )
    return out
