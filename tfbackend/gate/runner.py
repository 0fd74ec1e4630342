"""Run every model of a manifest in this one process: imports are paid once, not once per model.

Each (tp, pp) goes through the same `tfbackend.check.check` that `tfbackend check` calls, so a gate
verdict is exactly what `check` says for that model. `run` (parity on GPUs) is optional: it needs
`--run` and the parity engine, which is imported lazily and may be absent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from tfbackend.errors import UserError
from tfbackend.gate.manifest import Manifest, ModelEntry
from tfbackend.gate.result import (
    RUN_ERROR,
    RUN_FAILED,
    RUN_PASSED,
    RUN_SKIPPED,
    CheckOutcome,
    GateReport,
    GateResult,
    RunOutcome,
)
from tfbackend.rules.findings import Verdict

ENGINE_UNAVAILABLE = "run skipped: parity engine unavailable"


@dataclass
class GateOptions:
    run: bool = False  # prove models that ask for it (`run = true`) with the parity engine
    device: str = "auto"  # auto | cuda | cpu, passed to the parity engine
    token: str | None = None
    offline: bool | None = None
    progress: bool = True  # a progress bar on stderr
    trust_remote_code: bool = False  # every model's own code may run; else per manifest entry


def run_gate(manifest: Manifest, options: GateOptions | None = None) -> GateReport:
    options = options or GateOptions()
    start = time.perf_counter()
    results = [GateResult(model=m) for m in manifest.models]
    total = sum(len(m.layouts) * (2 if m.run else 1) for m in manifest.models)
    engine: Callable[..., Any] | None = None
    engine_loaded = False
    with _progress(options.progress, total) as advance:
        for result in results:
            m = result.model
            for tp, pp in m.layouts:
                advance(f"check {m.name} tp={tp} pp={pp}")
                result.checks.append(_check(m, tp, pp, options))
            if not m.run:
                continue
            if options.run and not engine_loaded:
                engine, engine_loaded = parity_engine(), True
            for check in result.checks:
                advance(f"run {m.name} tp={check.tp} pp={check.pp}")
                result.runs.append(_run(m, check, options, engine))
    versions = next((c.report.versions for r in results for c in r.checks if c.report), {})
    return GateReport(
        manifest=str(manifest.path),
        results=results,
        versions=dict(versions),
        ran=options.run,
        seconds=time.perf_counter() - start,
    )


def _trusted(m: ModelEntry, options: GateOptions) -> bool:
    """The repo's code runs only with consent: `--trust-remote-code`, or the model's own key."""
    return options.trust_remote_code or m.trust_remote_code


def _check(m: ModelEntry, tp: int, pp: int, options: GateOptions) -> CheckOutcome:
    from tfbackend.check import CheckOptions, check

    t0 = time.perf_counter()
    try:
        report = check(
            m.source,
            CheckOptions(
                tp=tp,
                pp=pp,
                revision=m.revision,
                token=options.token,
                offline=options.offline,
                vllm_version=m.vllm_version,
                ignore=list(m.ignore),
                strict=m.strict,
                trust_remote_code=_trusted(m, options),
            ),
        )
    except UserError as exc:
        return CheckOutcome(
            tp, pp, error=str(exc), error_type=type(exc).__name__, seconds=time.perf_counter() - t0
        )
    except Exception as exc:  # noqa: BLE001 - one broken model must not stop the gate
        return CheckOutcome(
            tp,
            pp,
            error=f"unexpected {type(exc).__name__}: {exc}",
            error_type=type(exc).__name__,
            seconds=time.perf_counter() - t0,
        )
    return CheckOutcome(tp, pp, report=report, seconds=time.perf_counter() - t0)


# -- run: the parity engine, when there is one --------------------------------------------------


def parity_engine() -> Callable[..., Any] | None:
    """`tfbackend.parity.run_parity`, or None when the engine is not installed in this build.

    Contract assumed: `run_parity(model, *, tp, pp, revision, token, device, trust_remote_code)`
    returns an object
    with `verdict` (a Verdict, its value, or `passed: bool`) and `to_dict()` holding `metrics`.
    """
    try:
        from tfbackend import parity
    except ImportError:
        return None
    fn = getattr(parity, "run_parity", None)
    return fn if callable(fn) else None


def _run(
    m: ModelEntry, check: CheckOutcome, options: GateOptions, engine: Callable[..., Any] | None
) -> RunOutcome:
    tp, pp = check.tp, check.pp
    skip = _skip_reason(m, check, options, engine)
    if skip:
        return RunOutcome(tp, pp, RUN_SKIPPED, skip)
    device = options.device
    if device == "auto":
        device = "cuda" if _cuda_count() else "cpu"
    if device == "cuda" and _cuda_count() < tp * pp:
        return RunOutcome(tp, pp, RUN_SKIPPED, f"needs {tp * pp} GPUs, found {_cuda_count()}")
    t0 = time.perf_counter()
    try:
        result = engine(
            m.source, tp=tp, pp=pp, revision=m.revision, token=options.token, device=device,
            trust_remote_code=_trusted(m, options),
            # the plan the check judged is the one the run proves
            **({"vllm_version": m.vllm_version} if m.vllm_version else {}),
        )  # fmt: skip
    except UserError as exc:
        return RunOutcome(tp, pp, RUN_ERROR, str(exc), seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a crashed run is reported, the gate goes on
        message = f"unexpected {type(exc).__name__}: {exc}"
        return RunOutcome(tp, pp, RUN_ERROR, message, seconds=time.perf_counter() - t0)
    data = result.to_dict() if hasattr(result, "to_dict") else {}
    passed = _passed(result, data)
    return RunOutcome(
        tp,
        pp,
        RUN_PASSED if passed else RUN_FAILED,
        "logits match the reference" if passed else "logits differ from the reference",
        metrics=flat_metrics(data.get("metrics", {})),
        data=data,
        seconds=time.perf_counter() - t0,
    )


def _skip_reason(m: ModelEntry, check: CheckOutcome, options: GateOptions, engine) -> str | None:
    if not options.run:
        return "run not requested (pass --run)"
    if engine is None:
        return ENGINE_UNAVAILABLE
    if check.verdict is None or check.verdict is Verdict.FAIL:
        return "run skipped: the check fails at this layout"
    if check.tp * check.pp > m.run_gpus:
        return f"run skipped: needs {check.tp * check.pp} GPUs, the manifest allows {m.run_gpus}"
    return None


def _passed(result: Any, data: dict[str, Any]) -> bool:
    verdict = getattr(result, "verdict", None) or data.get("verdict")
    if verdict is not None:
        return str(getattr(verdict, "value", verdict)).upper() != Verdict.FAIL.value
    return bool(getattr(result, "passed", data.get("passed", False)))


def flat_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Nested metric tables → {"prompt0.kl_max": 1e-6, ...}: numbers only, for baselines."""
    out: dict[str, float] = {}
    items = metrics.items() if isinstance(metrics, dict) else enumerate(metrics or [])
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, (dict, list)):
            out.update(flat_metrics(value, f"{name}."))
    return out


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# -- progress -----------------------------------------------------------------------------------


def _progress(enabled: bool, total: int):
    if not enabled:
        return nullcontext(lambda description: None)
    return _RichProgress(total)


class _RichProgress:
    """A bar on stderr, so stdout stays clean for tables and pipes."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.total = total
        self.task = None
        self.started = False

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("gate", total=self.total)
        return self.advance

    def advance(self, description: str) -> None:
        # advance when the next step starts: the bar counts finished steps
        if self.started:
            self.progress.advance(self.task)
        self.started = True
        self.progress.update(self.task, description=description)

    def __exit__(self, *exc) -> None:
        if self.started:
            self.progress.advance(self.task)
        self.progress.__exit__(*exc)
