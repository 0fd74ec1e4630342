"""One process per rank: build the wrapped model, load this rank's slices, run the prompts.

Ranks are laid out pipeline-outer (global rank = stage * tp + tp_rank), as vLLM does. Each rank
reports progress on a queue and writes its results (logits on the last stage's first TP rank,
stats everywhere, an error record if it failed) into a shared folder the parent reads.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tfbackend.plan import ReplacementPlan


@dataclass
class RankJob:
    """Everything a rank needs; pickled into the spawned process."""

    model_dir: str
    plan: ReplacementPlan
    tp: int
    pp: int
    device: str  # "cpu" | "cuda"
    dtype: str
    prompts: list[list[int]]
    port: int
    out_dir: str
    timeout_s: float
    bisect: bool = False
    trust_remote_code: bool = False
    # A converted folder's files, per global rank (parity/converted.py): read instead of model_dir
    converted: dict | None = None


@dataclass
class RankStats:
    rank: int
    stage: int
    tp_rank: int
    phases: dict[str, float] = field(default_factory=dict)  # seconds
    shard_bytes: int = 0  # parameters held by this rank
    bytes_read: int = 0  # checkpoint bytes this rank read
    peak_bytes: int = 0  # CUDA: max_memory_allocated; CPU: peak RSS
    peak_kind: str = "rss"


class ModelForwardError(RuntimeError):
    """The wrapped model itself raised during forward (a model failure, not an infra one)."""


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if the parent is killed outright, the kernel ends this rank too.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class RankStart:
    """What a spawned rank needs before the plan exists: it is started while the parent resolves
    the model, so its interpreter start and imports overlap the parent's; the job (with the run's
    folder) follows on `jobs`, and the parent's events say when it may load (memory) and run
    forward (timing)."""

    world: int
    device: str
    port: int
    spawned_at: float  # time.time() when the parent started the processes
    jobs: object  # a SimpleQueue: one RankJob per rank
    may_load: object  # multiprocessing Events
    may_forward: object


# What every rank imports anyway, loaded while it waits for the job, or once by the forkserver
# the ranks are forked from (the model's own module is imported by from_config).
PRELOAD = (
    "safetensors",
    "transformers.modeling_utils",
    "tfbackend.replace.apply",
    "tfbackend.parity.weights",
    "tfbackend.parity.bisect",
)


def rank_main(local: int, start: RankStart, queue) -> None:
    """Entry point of a spawned rank (`local` is its global rank)."""
    import importlib

    _die_with_parent()
    rank, out = local, None
    work = None
    try:
        for name in PRELOAD:
            importlib.import_module(name)
        ready = time.time()
        queue.put((rank, "ready", ready))
        job = start.jobs.get()
        job.port, out = start.port, Path(job.out_dir)
        device = torch.device("cuda", rank) if job.device == "cuda" else torch.device("cpu")
        work = RankWork(
            job, rank, device, on_phase=lambda name: queue.put((rank, name, time.time())),
            gates={"load": start.may_load, "forward": start.may_forward},
        )  # fmt: skip
        work.stats.phases["start"] = ready - start.spawned_at
        work.stats.phases["wait"] = time.time() - ready
        t = work.enter("init")
        if job.device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if job.device == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{job.port}",
            rank=rank,
            world_size=start.world,
            timeout=timedelta(seconds=max(30, job.timeout_s)),
            **({"device_id": device} if job.device == "cuda" else {}),
        )
        logits = work.run(t)
        if logits is not None:
            torch.save(logits, out / "logits.pt")
        if job.bisect and work.tp_rank == 0:
            torch.save(work.recorder.outputs, out / f"capture{work.stage}.pt")
        (out / f"rank{rank}.json").write_text(json.dumps(asdict(work.stats)))
        queue.put((rank, "done", time.time()))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - recorded for the parent, then re-raised
        if work is not None:  # before the job there is no folder: the parent sees the exit
            _record_error(exc, rank, work.phase, work.job, out, work.recorder)
        raise


class RankWork:
    """The work of one rank once its process group is up: build the wrapped model, load this
    rank's slices, run the prompts. The same for a rank tfbackend spawned (`rank_main`) and one
    torchrun started (`parity/launch.py`); `phase` and `recorder` say where it was if it raised."""

    def __init__(self, job: RankJob, rank: int, device: torch.device, on_phase=None, gates=None):
        self.job, self.rank, self.device = job, rank, device
        self.gates = gates or {}  # phase -> an Event set by whoever may hold this rank back
        self.stage, self.tp_rank = divmod(rank, job.tp)
        self.stats = RankStats(rank=rank, stage=self.stage, tp_rank=self.tp_rank)
        self.phase = "init"
        self.recorder = None
        self.ctx = None
        self._on_phase = on_phase or (lambda name: None)

    def enter(self, name: str) -> float:
        gate = self.gates.get(name)
        if gate is not None and not gate.is_set():
            self.phase = f"wait {name}"
            self._on_phase(self.phase)
            t = time.perf_counter()
            gate.wait()
            self.stats.phases["wait"] = self.stats.phases.get("wait", 0.0) + time.perf_counter() - t
        self.phase = name
        self._on_phase(name)
        return time.perf_counter()

    def connect(self, init_started: float) -> None:
        """This rank's TP group (`new_group` is collective: every rank calls it, in order)."""
        job = self.job
        if job.device == "cuda":
            # Memory stats need a live context ("Invalid device argument : did you call init?").
            torch.empty(0, device=self.device)
            torch.cuda.reset_peak_memory_stats()
        groups = [dist.new_group(list(range(s * job.tp, (s + 1) * job.tp))) for s in range(job.pp)]
        from tfbackend.replace.layers import ParallelContext

        self.ctx = ParallelContext(rank=self.tp_rank, world=job.tp, group=groups[self.stage])
        self.stats.phases["init"] = time.perf_counter() - init_started

    def run(self, init_started: float | None = None) -> list | None:
        """The logits of every prompt on the last stage's first TP rank, None elsewhere."""
        job, stats = self.job, self.stats
        if self.ctx is None:
            self.connect(init_started)

        t = self.enter("build")
        model, applied = _build(job, self.ctx, self.stage)
        stats.phases["build"] = time.perf_counter() - t

        t = self.enter("load")
        _materialise(model, job, self.device, stats)
        stats.phases["load"] = time.perf_counter() - t

        t = self.enter("forward")
        from tfbackend.parity.bisect import Recorder

        self.recorder = Recorder(model, record=job.bisect)
        logits = _forward_all(model, job, self.stage, self.tp_rank, self.device, self.recorder)
        stats.phases["forward"] = time.perf_counter() - t
        stats.peak_bytes, stats.peak_kind = _peak(job.device)
        return logits if self.stage == job.pp - 1 and self.tp_rank == 0 else None


def _build(job: RankJob, ctx, stage: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tfbackend.parity.reference import DTYPES, attn_implementation
    from tfbackend.replace.apply import apply

    config = AutoConfig.from_pretrained(job.model_dir, trust_remote_code=job.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=DTYPES[job.dtype],
            attn_implementation=attn_implementation(config),
            trust_remote_code=job.trust_remote_code,
        )
    applied = apply(job.plan, model, ctx, stage=stage)
    return model.eval(), applied


def _materialise(model, job: RankJob, device, stats: RankStats) -> None:
    from tfbackend.parity.weights import CheckpointReader, load_rank_weights
    from tfbackend.replace.apply import base_prefix, module_name

    model.to_empty(device=device)
    # Non-persistent buffers (rotary inv_freq, embed scales) are computed, not stored.
    with torch.no_grad():
        for module in model.modules():
            if any(True for _ in module.buffers(recurse=False)):
                model._init_weights(module)
    lm_head = job.plan.entry_for("lm_head")
    tied = None
    if lm_head and lm_head.extra.get("tied_to"):
        tied = module_name(lm_head.extra["tied_to"], base_prefix(model)) + ".weight"
    if job.converted is not None:
        from tfbackend.parity.converted import ConvertedReader

        reader = ConvertedReader(job.converted[stats.rank])
    else:
        reader = CheckpointReader(job.model_dir)
    try:
        load_rank_weights(model, reader, tied_source=tied)
    finally:
        reader.close()
    stats.bytes_read = reader.bytes_read
    stats.shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters())


def _forward_all(model, job: RankJob, stage: int, tp_rank: int, device, recorder) -> list:
    from tfbackend.replace.apply import base_prefix
    from tfbackend.replace.layers import StageInput

    first, last = stage == 0, stage == job.pp - 1
    hidden = model.config.get_text_config().hidden_size
    dtype = next(model.parameters()).dtype
    base = model.get_submodule(base_prefix(model))
    stage_input = next((m for m in model.modules() if isinstance(m, StageInput)), None)
    logits = []
    with torch.inference_mode():
        for i, prompt in enumerate(job.prompts):
            recorder.record = job.bisect and i == 0
            ids = torch.tensor([prompt], device=device)
            if not first:
                received = torch.empty(1, len(prompt), hidden, dtype=dtype, device=device)
                dist.recv(received, src=(stage - 1) * job.tp + tp_rank)
                stage_input.received = received
            try:
                if last:
                    out = model(input_ids=ids, use_cache=False).logits[0]
                else:
                    out = base(input_ids=ids, use_cache=False).last_hidden_state
            except Exception as exc:  # noqa: BLE001 - a model failure, named by its module
                if isinstance(exc, torch.OutOfMemoryError) or _looks_collective(exc):
                    raise
                raise ModelForwardError(
                    f"{type(exc).__name__} in {recorder.raising_module}: {str(exc).splitlines()[0]}"
                ) from exc
            if last:
                logits.append(out.float().cpu())
            else:
                dist.send(out.contiguous(), dst=(stage + 1) * job.tp + tp_rank)
    return logits


def _peak(device: str) -> tuple[int, str]:
    if device == "cuda":
        return torch.cuda.max_memory_allocated(), "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


def _record_error(exc, rank, phase, job, out: Path, recorder) -> None:
    record = error_record(exc, rank, phase, job.device, recorder)
    try:
        (out / f"rank{rank}.error.json").write_text(json.dumps(record))
        if job.bisect and recorder is not None and rank % job.tp == 0:
            torch.save(recorder.outputs, out / f"capture{rank // job.tp}.pt")
    except OSError:
        pass


def error_record(exc, rank: int, phase: str, device: str, recorder) -> dict:
    """What a rank raised, classified: `model` (the wrapped model raised in forward), `oom`,
    `collective` (a connection failure, usually caused by another rank), `interrupted` or
    `error`."""
    kind = "error"
    message = (
        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    )
    if isinstance(exc, KeyboardInterrupt):
        kind, message = "interrupted", "interrupted"
    elif isinstance(exc, torch.OutOfMemoryError) and device == "cuda":
        kind = "oom"
        free, total = torch.cuda.mem_get_info()
        message = (
            f"rank {rank} ran out of GPU memory during {phase}: "
            f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated by tfbackend, "
            f"{free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB "
            f"({str(exc).splitlines()[0]})"
        )
    elif isinstance(exc, ModelForwardError):
        kind = "model"
        message = str(exc)
    elif isinstance(exc, dist.DistBackendError | RuntimeError) and _looks_collective(exc):
        kind = "collective"
    return {
        "rank": rank,
        "phase": phase,
        "kind": kind,
        "message": message,
        "module": recorder.raising_module if recorder else None,
        "time": time.time(),
        "traceback": traceback.format_exc(),
    }


def _looks_collective(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("connection", "gloo", "nccl", "timed out", "peer", "socket"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
