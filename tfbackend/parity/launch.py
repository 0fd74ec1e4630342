"""`run --launcher torchrun`: this process is one rank of a job torchrun started, on one host or
many.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m tfbackend run MODEL --tp 8 --pp 2 --launcher torchrun

The rank, world size and rendezvous come from torchrun's environment (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT`, env://); global rank = stage × tp + tp rank, as
tfbackend's own spawner lays them out. Every rank resolves the model on its own host (nodes share
no filesystem), builds and loads its shard, and runs the prompts (`workers.RankWork`, the same work
a spawned rank does). Global rank 0 also computes the reference, once (streamed when the model
does not fit), receives the last stage's logits and every rank's stats through torch.distributed,
and reports; the other processes print nothing and exit with rank 0's exit code.

Failures end every process with one line, printed by rank 0: each rank runs its work on a
thread while its main thread watches the rendezvous store for an error record, rank 0's verdict
and the deadline (`--timeout`), so a rank stuck in a collective with a dead peer still ends. A
rank that raised records what it raised (`workers.error_record`) and waits for rank 0 to report
it; if rank 0 does not within a grace period (rank 0 itself died), it prints its own line.
torchrun's elastic agent stops the other workers of a host once one exits non-zero, and torchrun
itself exits 1 for any worker that did not exit 0 (its own rule; each process's code is in the
summary it prints).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

from tfbackend.errors import FollowerExit, RunError, UserError

LAUNCHERS = ("spawn", "torchrun")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
POLL_S = 0.2
# A connection error on one rank is usually caused by a real error on another: wait for its record.
COLLECTIVE_GRACE_S = 3.0
REPORT_GRACE_S = 30.0  # how long a rank waits for rank 0 to report before it speaks itself
LEAVE_WAIT_S = 10.0  # rank 0 keeps the store alive this long for the others to read its verdict


def validate_launch(options) -> None:
    if options.launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be spawn or torchrun, got {options.launcher!r}")
    if options.launcher == "torchrun" and options.engine != "native":
        raise UserError(
            "--launcher torchrun runs the native engine only (vLLM starts its own workers)"
        )


def speaks(options) -> bool:
    """Whether this process writes to the console: every process but torchrun's non-zero ranks."""
    return options.launcher != "torchrun" or os.environ.get("RANK", "0") == "0"


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> TorchrunEnv:
        missing = [k for k in _ENV if k not in os.environ]
        if missing:
            raise UserError(
                f"--launcher torchrun: {', '.join(missing)} not set; start it with torchrun, "
                "e.g. torchrun --nproc-per-node 2 -m tfbackend run MODEL --tp 2 --launcher torchrun"
            )
        try:
            return cls(*(int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")))
        except ValueError:
            raise UserError(
                "--launcher torchrun: RANK, WORLD_SIZE, LOCAL_RANK must be integers"
            ) from None


def run_torchrun(model: str, options, progress):
    """Rank 0: the RunReport. Every other rank: FollowerExit with rank 0's exit code."""
    env = TorchrunEnv.from_environ()
    world = options.tp * options.pp
    if env.world != world:
        if env.rank:
            raise FollowerExit(2)  # every rank sees it; rank 0 says it
        raise UserError(
            f"torchrun started {env.world} processes but --tp {options.tp} --pp {options.pp} "
            f"needs {world}: set --nnodes × --nproc-per-node to {world}"
        )
    device = _device(options, env)
    import torch.distributed as dist

    timeout = timedelta(seconds=max(30.0, options.timeout_s))
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world, timeout=timeout))
    session = _Session(dist.PrefixStore("tfbackend/run", store), env, options, device)
    atexit.register(session.at_exit)
    signal.signal(signal.SIGTERM, session.on_term)
    session.start(model, dist.PrefixStore("default_pg", store), timeout, progress)
    return session.wait()


def _device(options, env: TorchrunEnv):
    import torch

    if options.device != "cuda":
        return torch.device("cpu")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if env.local_rank >= have:
        raise UserError(
            f"rank {env.rank}: LOCAL_RANK {env.local_rank} but {have} GPUs visible on this host: "
            "set --nproc-per-node to at most the GPUs per host"
        )
    return torch.device("cuda", env.local_rank)


class _Session:
    """One process of the job: its work thread, and the main thread's watch over the store."""

    def __init__(self, store, env: TorchrunEnv, options, device):
        self.store, self.env, self.options, self.device = store, env, options, device
        self.deadline = time.monotonic() + options.timeout_s
        self.code = 2  # what this process exits with, unless the run ends otherwise
        self.report = None  # rank 0's, once its reference is computed
        self.plan = None
        self.work = None  # this rank's workers.RankWork, once it builds
        self.phase_name = "init"
        self.exc: BaseException | None = None  # what this rank's work raised
        self.exc_at: float | None = None
        self.record: dict | None = None  # ... as recorded in the store
        self.thread: threading.Thread | None = None

    # -- the work thread ----------------------------------------------------------------------
    def start(self, model, pg_store, timeout, progress) -> None:
        args = (model, pg_store, timeout, progress if self.env.rank == 0 else _quiet)
        self.thread = threading.Thread(
            target=self._work, args=args, name="tfbackend-rank", daemon=True
        )
        self.thread.start()

    def _work(self, model, pg_store, timeout, progress) -> None:
        try:
            self.report = _rank_flow(self, model, pg_store, timeout, progress)
        except BaseException as exc:  # noqa: BLE001 - recorded for rank 0, handled by the main thread
            from tfbackend.parity.workers import error_record

            work = self.work
            record = error_record(
                exc, self.env.rank, self.phase_name, self.options.device,
                work.recorder if work else None,
            )  # fmt: skip
            self.exc, self.exc_at, self.record = exc, time.monotonic(), record
            try:
                n = self.store.add("errors", 1)
                self.store.set(f"error/{n}", json.dumps(record))
            except Exception:  # noqa: BLE001 - the store is gone: the main thread speaks itself
                pass

    def phase(self, name: str) -> None:
        self.phase_name = name
        try:
            self.store.set(f"phase/{self.env.rank}", name)
        except Exception:  # noqa: BLE001 - progress only
            pass

    # -- the main thread ----------------------------------------------------------------------
    def wait(self):
        try:
            out = self._watch()
        except FollowerExit as exc:
            self.code = exc.exit_code
            raise
        except KeyboardInterrupt:
            self.code = 130
            raise
        except BaseException:
            self.code = 2
            raise
        finally:
            # From here the CLI prints and the process exits through at_exit: a late SIGTERM
            # must not cut rank 0's report (or its "done") short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.code = out.exit_code
        return out

    def on_term(self, signum, frame):
        raise _Stopped()

    def _watch(self):
        try:
            return self._poll()
        except _Stopped:
            # torchrun's agent stops every worker of a host once one of them exits non-zero
            if self.env.rank != 0:
                raise FollowerExit(2) from None
            records = self._errors()
            if records:
                real = [r for r in records if r["kind"] not in ("collective", "interrupted")]
                return self._conclude((real or records)[0])
            raise RunError(
                "stopped by torchrun (SIGTERM) before the run ended: another process of this job "
                "exited; torchrun's summary names it"
            ) from None

    def _poll(self):
        rank0 = self.env.rank == 0
        first_error_seen = None
        while True:
            if not rank0:
                done = self._get("done")
                if done is not None:
                    self._leave()
                    raise FollowerExit(int(done))
            finished = not self.thread.is_alive()
            if rank0 and finished and self.exc is None:
                return self.report
            records = self._errors() or ([self.record] if self.record else [])
            if records and first_error_seen is None:
                first_error_seen = time.monotonic()
            now = time.monotonic()
            if rank0 and records:
                real = [r for r in records if r["kind"] not in ("collective", "interrupted")]
                if real or now - first_error_seen > COLLECTIVE_GRACE_S:
                    return self._conclude((real or records)[0])
            if not rank0 and self.exc is not None and now - self.exc_at > REPORT_GRACE_S:
                self._speak_for_self()
            if not rank0 and records and now - first_error_seen > REPORT_GRACE_S + 5:
                raise FollowerExit(2)  # rank 0 is gone; the rank that failed spoke for itself
            if now > self.deadline:
                if rank0:
                    raise RunError(self._timeout_message())
                if now > self.deadline + REPORT_GRACE_S:
                    if self.exc is not None:
                        self._speak_for_self()
                    raise RunError(self._timeout_message() + " (rank 0 did not report)")
            time.sleep(POLL_S)

    def _conclude(self, record: dict):
        """Rank 0: the run ends on this record (the earliest real error of any rank)."""
        if record["rank"] == 0 and isinstance(self.exc, UserError):
            raise self.exc
        if record["kind"] == "model" and self.report is not None:
            from tfbackend.parity.bisect import Divergence
            from tfbackend.parity.result import judge_run, plan_entry

            report = self.report
            report.model_error = record["message"]
            judge_run(report, [], [], None, self.options.dtype)
            report.divergence = Divergence(record["module"] or "?", None, record["message"])
            report.divergence.plan_entry = plan_entry(self.plan, report.divergence.module)
            return report
        if record["kind"] == "oom":
            raise RunError(record["message"])
        message = f"rank {record['rank']} failed during {record['phase']}: {record['message']}"
        if record["kind"] == "collective":
            message += " (a connection between ranks failed: did a process or host die?)"
        raise RunError(message)

    def _speak_for_self(self):
        """Rank 0 did not report this rank's error: say it here."""
        if isinstance(self.exc, UserError):
            raise self.exc
        raise RunError(
            f"rank {self.env.rank} failed during {self.record['phase']}: {self.record['message']}"
        )

    def _timeout_message(self) -> str:
        phases = {r: self._get(f"phase/{r}") for r in range(self.env.world)}
        stuck = ", ".join(
            f"rank {r} in {p or 'start-up'}" for r, p in sorted(phases.items()) if p != "done"
        )
        return (
            f"timed out after {self.options.timeout_s:.0f}s (--timeout); "
            f"ranks still running: {stuck or 'none'}"
        )

    def _errors(self) -> list[dict]:
        count = self._get("errors")
        if not count:
            return []
        records = [self._get(f"error/{n}") for n in range(1, int(count) + 1)]
        out = [json.loads(r) for r in records if r]
        out.sort(key=lambda r: r["time"])
        return out

    def _get(self, key: str) -> str | None:
        try:
            if not self.store.check([key]):
                return None
            return self.store.get(key).decode()
        except Exception:  # noqa: BLE001 - the store is gone (its host ended)
            return None

    def _leave(self) -> None:
        try:
            self.store.add("left", 1)
        except Exception:  # noqa: BLE001
            pass

    def at_exit(self) -> None:
        """After the CLI has printed: rank 0 publishes its exit code and keeps the store up until
        every other rank has read it; a process whose work thread is stuck in a collective ends
        without waiting for it."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if self.env.rank == 0:
            try:
                self.store.set("done", str(self.code))
                end = time.monotonic() + LEAVE_WAIT_S
                while time.monotonic() < end and int(self._get("left") or 0) < self.env.world - 1:
                    time.sleep(POLL_S)
            except Exception:  # noqa: BLE001
                pass
        if self.thread is not None and self.thread.is_alive():
            os._exit(self.code)


class _Stopped(BaseException):
    """SIGTERM, raised in the main thread (its handler runs there, between polls)."""


def _quiet(phase: str, status: str, detail: str = "") -> None:
    pass


def _rank_flow(session: _Session, model: str, pg_store, timeout, progress):
    """What one rank does, on its work thread. Rank 0 returns the RunReport."""
    import torch
    import torch.distributed as dist

    from tfbackend.parity.prompts import build_prompts
    from tfbackend.parity.result import RunReport, judge_run, plan_entry
    from tfbackend.parity.source import resolve_run
    from tfbackend.parity.workers import RankJob, RankStats, RankWork

    env, options, device = session.env, session.options, session.device
    rank0 = env.rank == 0
    if device.type == "cuda":
        torch.cuda.set_device(device)  # per thread
    t = time.perf_counter()
    session.phase("init")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", store=pg_store, rank=env.rank,
        world_size=env.world, timeout=timeout,
        **({"device_id": device} if device.type == "cuda" else {}),
    )  # fmt: skip
    pg_init_s = time.perf_counter() - t
    phases: dict[str, float] = {}
    t = time.perf_counter()
    session.phase("resolve")
    progress("resolve", "running", model)
    local_dir, facts, plan, config = resolve_run(model, options)
    session.plan = plan
    phases["resolve"] = time.perf_counter() - t
    progress("resolve", "done", f"{facts.causal_lm_class}, {len(plan.entries)} plan entries")
    prompts, prompt_source, prompt_notes = build_prompts(
        local_dir, config, prompts_file=options.prompts_file, limit=options.max_prompts,
        trust_remote_code=options.trust_remote_code,
    )  # fmt: skip
    job = RankJob(
        model_dir=local_dir, plan=plan, tp=options.tp, pp=options.pp, device=options.device,
        dtype=options.dtype, prompts=[p.ids for p in prompts], port=0, out_dir="",
        timeout_s=options.timeout_s, bisect=options.bisect,
        trust_remote_code=options.trust_remote_code,
    )  # fmt: skip
    work = session.work = RankWork(job, env.rank, device, on_phase=session.phase)
    # Groups first (a collective), so the other ranks build and load while rank 0 computes the
    # reference; they wait for rank 0 in their first forward collective.
    work.connect(time.perf_counter() - pg_init_s)
    report, reference = None, None
    if rank0:
        ref_dtype = options.reference_dtype or options.dtype
        report = RunReport(
            model=model, engine=options.engine, tp=options.tp, pp=options.pp,
            device=options.device, dtype=options.dtype, reference_dtype=ref_dtype,
            profile=plan.profile, phases=phases, prompt_source=prompt_source, notes=prompt_notes,
        )  # fmt: skip
        session.report = report
        t = time.perf_counter()
        session.phase("reference")
        from tfbackend.parity.peak import reset_peak
        from tfbackend.parity.reference_mode import run_reference

        reference = run_reference(local_dir, prompts, options, report, progress)
        phases["reference"] = time.perf_counter() - t
        phases["reference forward"] = reference.forward_s
        # rank 0's own peak (its RankStats) is its shard's, not the reference's
        reset_peak()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    t_ranks = time.perf_counter()
    progress("spawn ranks", "done", f"{env.world} processes from torchrun")
    progress("load shards", "running", "")
    logits = work.run()
    progress("load shards", "done", "")
    last = (options.pp - 1) * options.tp  # the last stage's first TP rank holds the logits
    if last != 0:
        if env.rank == last:
            _send_tensors(logits, 0, device)
        elif rank0:
            logits = _recv_tensors(last, device)
    stats = _gather_json(asdict(work.stats), env, device)
    captures = None
    if options.bisect:
        captures = _gather_captures(work, env, options, device)
    session.phase("done")
    dist.barrier()
    dist.destroy_process_group()
    progress("forward", "done", "")
    if not rank0:
        return None
    report.ranks = [RankStats(**s) for s in stats]
    phases["ranks"] = time.perf_counter() - t_ranks
    t = time.perf_counter()
    progress("compare", "running", "")
    judge_run(report, prompts, reference.logits, logits, options.dtype)
    if options.bisect and report.verdict == "fail" and captures is not None:
        from tfbackend.parity.bisect import first_divergence

        report.divergence = first_divergence(reference.captures, captures, options.dtype)
    if report.divergence:
        report.divergence.plan_entry = plan_entry(plan, report.divergence.module)
    phases["compare"] = time.perf_counter() - t
    progress("compare", "done", report.verdict)
    return report


# -- moving results to rank 0 through torch.distributed (nodes share no filesystem) -------------
def _send_bytes(data: bytes, dst: int, device) -> None:
    import torch
    import torch.distributed as dist

    dist.send(torch.tensor([len(data)], dtype=torch.int64, device=device), dst)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), dst)


def _recv_bytes(src: int, device) -> bytes:
    import torch
    import torch.distributed as dist

    n = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(n, src)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.recv(buf, src)
    return bytes(buf.cpu().numpy().tobytes())


def _send_tensors(tensors, dst: int, device, meta: list | None = None) -> None:
    import torch.distributed as dist

    header = {"tensors": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in tensors]}
    header["meta"] = meta
    _send_bytes(json.dumps(header).encode(), dst, device)
    for t in tensors:
        dist.send(t.contiguous().to(device), dst)


def _recv_tensors(src: int, device, with_meta: bool = False):
    import torch
    import torch.distributed as dist

    header = json.loads(_recv_bytes(src, device))
    out = []
    for shape, dtype in header["tensors"]:
        buf = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.recv(buf, src)
        out.append(buf.cpu())
    return (out, header["meta"]) if with_meta else out


def _gather_json(obj, env: TorchrunEnv, device) -> list | None:
    """Every rank's JSON-able object, in rank order, on rank 0 (JSON, not pickle)."""
    if env.rank:
        _send_bytes(json.dumps(obj).encode(), 0, device)
        return None
    return [obj] + [json.loads(_recv_bytes(r, device)) for r in range(1, env.world)]


def _gather_captures(work, env: TorchrunEnv, options, device) -> list | None:
    """Bisect: each stage's first TP rank recorded its modules' outputs; rank 0 needs them all."""
    heads = [s * options.tp for s in range(options.pp)]
    mine = work.recorder.outputs if env.rank in heads else None
    if env.rank in heads and env.rank != 0:
        names = [[name, list(sl) if sl else None] for name, _, sl in mine]
        _send_tensors([t for _, t, _ in mine], 0, device, meta=names)
        return None
    if env.rank != 0:
        return None
    out = list(mine)
    for src in heads[1:]:
        tensors, names = _recv_tensors(src, device, with_meta=True)
        out += [
            (n, t, tuple(sl) if sl else None) for (n, sl), t in zip(names, tensors, strict=True)
        ]
    return out
