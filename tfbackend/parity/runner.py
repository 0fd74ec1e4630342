"""The `run` pipeline: resolve → plan → reference → spawn ranks → compare → verdict. No printing:
progress goes to a callback, results into a RunReport."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from tfbackend.errors import UserError
from tfbackend.parity.result import RunReport, judge_run, plan_entry
from tfbackend.parity.source import analyse, check_devices, locate

PHASES = ("resolve", "reference", "spawn ranks", "load shards", "forward", "compare")
Progress = Callable[[str, str, str], None]  # (phase, status, detail)


@dataclass
class RunOptions:
    tp: int = 1
    pp: int = 1
    device: str = "cuda"
    dtype: str = "bfloat16"
    reference_dtype: str | None = None
    prompts_file: str | None = None
    max_prompts: int | None = None
    bisect: bool = False
    timeout_s: float = 600.0
    engine: str = "native"
    offline: bool | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    token: str | None = None
    reference: str = "auto"  # "auto" | "memory" | "streamed" (parity/reference_mode.py)
    launcher: str = "spawn"  # "spawn" (tfbackend starts the ranks) | "torchrun" (parity/launch.py)
    debug: bool = False  # keep the engine's logs of a failed run
    scores_out: str | None = None  # write the compared scores here (parity/scores.py)
    original: str | None = None  # a converted folder's original checkpoint (parity/converted.py)
    vllm_version: str | None = None  # the profile to plan with, as `check --vllm-version`

    def validate(self) -> None:
        """Every option, before anything is resolved or loaded."""
        from tfbackend.limits import check_at_least_one, check_parallel, check_positive

        check_parallel(self.tp, self.pp)
        check_positive("--timeout", self.timeout_s, " of seconds")
        check_at_least_one("--max-prompts", self.max_prompts)
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"--device must be cpu or cuda, got {self.device!r}")
        for d in (self.dtype, self.reference_dtype or self.dtype):
            if d not in ("float32", "bfloat16", "float16"):
                raise UserError(f"dtype must be float32, bfloat16 or float16, got {d!r}")
        if self.engine not in ("native", "vllm"):
            raise UserError(f"--engine must be native or vllm, got {self.engine!r}")
        from tfbackend.parity.launch import validate_launch
        from tfbackend.parity.reference_mode import validate_mode

        validate_mode(self.reference)
        validate_launch(self)
        if self.vllm_version:
            from tfbackend.replace.profiles import select_profile

            select_profile(self.vllm_version, None)  # an unknown one is refused before resolve


def run_profile():
    """The per-linear profile `run` planned with before it executed the selected one: vLLM
    0.11's tp_plan semantics with transformers-5 3-D experts fused as 0.32 does. Not what `run`
    uses (`plan_profile`); kept for callers that build per-linear plans."""
    from tfbackend.replace.profiles import PROFILES

    return dataclasses.replace(PROFILES["vllm-0.11"], moe_layouts=("module_list", "fused_3d"))


def _noop(phase: str, status: str, detail: str = "") -> None:
    pass


def run(model: str, options: RunOptions, progress: Progress = _noop) -> RunReport:
    options.validate()
    if options.engine == "vllm":  # before minutes of resolve and reference
        from tfbackend.parity.engine_vllm import require_vllm

        if options.launcher == "torchrun":
            raise UserError("--engine vllm starts vLLM's processes itself: use --launcher spawn")
        require_vllm()
    from tfbackend.parity.converted import find_converted

    converted = find_converted(model, options)  # before minutes of resolve and reference
    if options.launcher == "torchrun":
        from tfbackend.parity.launch import run_torchrun

        return run_torchrun(model, options, progress)
    if converted is not None:  # the plan, config and reference are the original checkpoint's
        options = dataclasses.replace(options, revision=converted.revision)
    with contextlib.ExitStack() as stack:
        return _run_on_this_host(model, converted, options, progress, stack)


def _run_on_this_host(
    model, converted, options: RunOptions, progress: Progress, stack
) -> RunReport:
    """Ranks (native engine) start once the model is found, and do their imports while this
    process analyses it and computes the reference (parity/ranks.py)."""
    ref_dtype = options.reference_dtype or options.dtype
    phases: dict[str, float] = {}
    t = time.perf_counter()
    progress("resolve", "running", model)
    source, local_dir = locate(converted.original if converted else model, options)
    ranks = None
    if options.engine == "native":
        from tfbackend.parity.ranks import SpawnedRanks

        check_devices(options)
        ranks = stack.enter_context(SpawnedRanks(options, progress))
    facts, plan, config = analyse(source, local_dir, options)
    weights = None
    if converted is not None and options.engine == "native":
        from tfbackend.parity.converted import rank_weights

        weights = rank_weights(converted, facts, local_dir)
    phases["resolve"] = time.perf_counter() - t
    progress("resolve", "done", f"{facts.causal_lm_class}, {len(plan.entries)} plan entries")
    report = RunReport(
        model=model, engine=options.engine, tp=options.tp, pp=options.pp, device=options.device,
        dtype=options.dtype, reference_dtype=ref_dtype, profile=plan.profile, phases=phases,
    )  # fmt: skip

    from tfbackend.parity.prompts import build_prompts

    prompts, report.prompt_source, notes = build_prompts(
        local_dir, config, prompts_file=options.prompts_file, limit=options.max_prompts,
        trust_remote_code=options.trust_remote_code,
    )  # fmt: skip
    report.notes += notes
    if converted is not None:
        report.notes.append(converted.note())
        if options.dtype != converted.manifest.dtype:
            report.notes.append(
                f"the converted files hold {converted.manifest.dtype}; the engine computes in "
                f"{options.dtype}"
            )
    if ranks is not None:
        from tfbackend.parity.workers import RankJob

        job = RankJob(
            model_dir=local_dir, plan=plan, tp=options.tp, pp=options.pp, device=options.device,
            dtype=options.dtype, prompts=[p.ids for p in prompts], port=0, out_dir="",
            timeout_s=options.timeout_s, bisect=options.bisect,
            trust_remote_code=options.trust_remote_code, converted=weights,
        )  # fmt: skip
        ranks.send(job)

    t = time.perf_counter()
    from tfbackend.parity.reference_mode import choose, fits_beside, run_reference

    choice = choose(local_dir, ref_dtype, options.device, options.reference)
    if ranks is not None and fits_beside(choice, local_dir, options):
        ranks.allow_load()  # the shards load while the reference runs
    reference = run_reference(local_dir, prompts, options, report, progress, choice=choice)
    phases["reference"] = time.perf_counter() - t
    phases["reference load"] = reference.load_s
    phases["reference forward"] = reference.forward_s

    if options.engine == "vllm":
        from tfbackend.parity.engine_vllm import run_vllm

        if converted is not None:
            from tfbackend.parity.converted import LOAD_FORMAT

            return run_vllm(
                converted.folder, prompts, reference, options, report, progress,
                load_format=LOAD_FORMAT,
            )  # fmt: skip
        return run_vllm(local_dir, prompts, reference, options, report, progress)

    ranks.allow_forward()  # the reference is over (and freed)
    logits, captures = ranks.collect(report, progress, reference.captures)
    t = time.perf_counter()
    progress("compare", "running", "")
    judge_run(report, prompts, reference.logits, logits, options.dtype)
    if options.scores_out and logits is not None:
        from tfbackend.parity.scores import keep_scores

        keep_scores(options.scores_out, prompts, reference.logits, logits, report)
    if options.bisect and (report.verdict == "fail") and captures is not None:
        from tfbackend.parity.bisect import first_divergence

        report.divergence = report.divergence or first_divergence(
            reference.captures, captures, options.dtype
        )
    if report.divergence:
        report.divergence.plan_entry = plan_entry(plan, report.divergence.module)
    phases["compare"] = time.perf_counter() - t
    progress("compare", "done", report.verdict)
    return report
