"""The `check` pipeline: source → facts → plan → findings → report. No printing here."""

from __future__ import annotations

from dataclasses import dataclass, field

from tfbackend.errors import UserError
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
    with_vllm: bool = False
    vllm_timeout: float = 300.0

    def validate(self) -> None:
        if self.tp < 1:
            raise UserError(f"--tp must be 1 or more, got {self.tp}")
        if self.pp < 1:
            raise UserError(f"--pp must be 1 or more, got {self.pp}")


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
    from tfbackend.report.findings import sort_findings, verdict_of
    from tfbackend.report.model import CheckReport
    from tfbackend.report.summary import summarize
    from tfbackend.rules.registry import RuleContext, run_rules

    options.validate()
    profile = select_profile(options.vllm_version, facts.versions.get("vllm"))
    plan = build_plan(facts, tp=options.tp, pp=options.pp, profile=profile)
    ctx = RuleContext(facts=facts, plan=plan, profile=profile, tp=options.tp, pp=options.pp)
    sections = {}
    if options.with_vllm:
        from tfbackend.vllm_bridge import cross_check

        agreement = cross_check(facts, plan, timeout=options.vllm_timeout)
        ctx.options["vllm_agreement"] = agreement
        sections["vllm_agreement"] = agreement.to_dict()
    findings = sort_findings(run_rules(ctx, select=options.select, ignore=options.ignore))
    return CheckReport(
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
    )
