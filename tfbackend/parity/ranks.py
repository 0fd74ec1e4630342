"""The ranks `run` spawns on this host, started before the plan exists.

Starting a rank costs an interpreter and the imports of torch and transformers (seconds, more
than the rest of its work for a small model). That cost starts as soon as the model is found, so
it runs beside the parent's analysis and reference: spawned ranks (CUDA) start then and wait for
the job; on CPU the forkserver starts then, imports once, and forks the ranks with the job. The
job is the plan, pickled once by the parent (never recomputed per rank); each rank builds, then
waits twice more: to load until the parent says the shards fit beside the reference (or the
reference is freed), and to run forward until the reference's forward is over, so neither forward
is timed while the other runs.

`--timeout` counts the ranks' own time: from their start, less the time every rank spent
waiting for the parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from pathlib import Path

from tfbackend.errors import RunError
from tfbackend.parity.bisect import Divergence
from tfbackend.parity.workers import RankStats

# A rank's progress, in order; the parent is what it waits for in the ones in _WAITING.
ORDER = ("start", "ready", "init", "build", "wait load", "load", "wait forward", "forward", "done")
_WAITING = {"ready", "wait load", "wait forward"}
POLL_S = 0.05


def start_method(device: str) -> str:
    """TFBACKEND_START_METHOD, else spawn on CUDA (a process forked after CUDA was initialised
    cannot use it) and forkserver on CPU: one server imports torch and transformers once, beside
    this process's own work, and forks every rank from it, so N ranks cost one import, not N."""
    return os.environ.get("TFBACKEND_START_METHOD") or (
        "spawn" if device == "cuda" else "forkserver"
    )


class SpawnedRanks:
    """`with SpawnedRanks(options, progress) as ranks:` starts them; `send(job)`, `allow_load()`,
    `allow_forward()`, then `collect(...)`. Leaving the block stops every rank still alive and
    removes the run's folder, whatever raised (SIGTERM and SIGINT included)."""

    def __init__(self, options, progress):
        self.options, self.progress = options, progress
        self.world = options.tp * options.pp
        self.out: Path | None = None
        self.procs = None
        self.started = 0.0  # perf_counter at spawn
        self._signals = None
        self._hold = contextlib.nullcontext

    def __enter__(self) -> SpawnedRanks:
        import torch.multiprocessing as mp

        from tfbackend.parity.workers import PRELOAD

        self._signals = _signals_as_exceptions()
        self._hold = self._signals.__enter__()
        try:
            self.method = start_method(self.options.device)
            self.ctx = mp.get_context(self.method)
            self.queue, self.jobs = self.ctx.SimpleQueue(), self.ctx.SimpleQueue()
            self.may_load, self.may_forward = self.ctx.Event(), self.ctx.Event()
            self.progress(
                "spawn ranks",
                "running",
                f"{self.world} processes ({'nccl' if self.options.device == 'cuda' else 'gloo'})",
            )
            if self.method == "forkserver":
                # The server imports now, beside this process's work; the ranks are forked from
                # it with the job, already imported (a fork request would wait for the import).
                from multiprocessing import forkserver

                self.ctx.set_forkserver_preload(["torch", *PRELOAD, "tfbackend.parity.workers"])
                forkserver.ensure_running()
            else:
                self._start()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _start(self) -> None:
        import torch.multiprocessing as mp

        from tfbackend.parity.workers import RankStart, free_port, rank_main

        with self._hold():  # the folder exists and `out` names it, or neither
            self.out = Path(tempfile.mkdtemp(prefix="tfbackend-run-"))
        start = RankStart(
            world=self.world, device=self.options.device, port=free_port(),
            spawned_at=time.time(), jobs=self.jobs,
            may_load=self.may_load, may_forward=self.may_forward,
        )  # fmt: skip
        self.started = time.perf_counter()
        with self._hold():  # every rank started and `procs` holds them all, for the cleanup
            self.procs = mp.start_processes(
                rank_main, args=(start, self.queue), nprocs=self.world, join=False,
                start_method=self.method,
            )  # fmt: skip

    def __exit__(self, *exc) -> None:
        from tfbackend.errors import Terminated

        try:
            with self._hold():  # a second signal does not cut the cleanup short
                if self.procs is not None:
                    _stop(self.procs)
                if self.out is not None:
                    shutil.rmtree(self.out, ignore_errors=True)
                if exc[0] in (Terminated, KeyboardInterrupt):
                    _stop_forkserver()  # about to exit
        finally:
            self._signals.__exit__(*exc)

    def send(self, job) -> None:
        """The job, once per rank (pickled here, unpickled there: the plan is not recomputed),
        with the run's folder."""
        if self.procs is None:
            self._start()
        job.out_dir = str(self.out)
        for _ in range(self.world):
            self.jobs.put(job)

    def allow_load(self) -> None:
        self.may_load.set()

    def allow_forward(self) -> None:
        self.may_load.set()
        self.may_forward.set()

    def collect(self, report, progress, reference_captures):
        """(logits, captures) of the ranks, their stats into `report`; a model failure is a
        failing report, anything else raises RunError."""
        options, out = self.options, self.out
        t_tail = time.perf_counter()
        try:
            _wait(self, progress)
            report.ranks = [
                RankStats(**json.loads((out / f"rank{r}.json").read_text()))
                for r in range(self.world)
            ]
            logits = _load(out / "logits.pt")
            captures = None
            if options.bisect:
                captures = _captures(out, options.pp)
            return logits, captures
        except _ModelFailure as failure:
            report.verdict = "fail"
            report.model_error = failure.record["message"]
            captures = _captures(out, options.pp) if options.bisect else None
            report.divergence = Divergence(
                failure.record["module"] or "?", None, failure.record["message"]
            )
            if captures is not None:
                from tfbackend.parity.bisect import first_divergence

                report.divergence = first_divergence(
                    reference_captures, captures, options.dtype,
                    raised_in=failure.record["module"], error=failure.record["message"],
                ) or report.divergence  # fmt: skip
            return None, None
        finally:
            report.phases["ranks"] = time.perf_counter() - self.started
            report.phases["ranks after reference"] = time.perf_counter() - t_tail


def _captures(out: Path, pp: int) -> list:
    return [x for s in range(pp) for x in _load(out / f"capture{s}.pt") or []]


class _Clock:
    """Each rank's time less its waits for the parent, from the phases it reports."""

    def __init__(self, world: int, started_wall: float):
        self.phase: dict[int, str] = {}
        self.since = dict.fromkeys(range(world), started_wall)
        self.waited = dict.fromkeys(range(world), 0.0)

    def update(self, rank: int, phase: str, at: float) -> None:
        if self.phase.get(rank) in _WAITING:
            self.waited[rank] += at - self.since[rank]
        self.phase[rank], self.since[rank] = phase, at

    def busiest(self, now: float, started_wall: float) -> float:
        """The longest any rank has worked (waits left out), in seconds."""
        worked = []
        for rank, waited in self.waited.items():
            current = now - self.since[rank] if self.phase.get(rank) in _WAITING else 0.0
            worked.append(now - started_wall - waited - current)
        return max(worked)


def _wait(ranks: SpawnedRanks, progress) -> None:
    import torch.multiprocessing as mp

    world, timeout_s, out = ranks.world, ranks.options.timeout_s, ranks.out
    started_wall = time.time() - (time.perf_counter() - ranks.started)
    clock = _Clock(world, started_wall)
    shown: set[str] = set()
    while True:
        while not ranks.queue.empty():
            rank, phase, at = ranks.queue.get()
            clock.update(rank, phase, at)
            seen = clock.phase
            for ph, label in (("wait load", "spawn ranks"), ("wait forward", "load shards")):
                if label not in shown and len(seen) == world:
                    if all(_after(p, ph) for p in seen.values()):
                        shown.add(label)
                        progress(label, "done", "")
            if "forward" not in shown and len(seen) == world:
                if all(_after(p, "done") for p in seen.values()):
                    shown.add("forward")
                    progress("forward", "done", "")
            if "spawn ranks" in shown and "load shards" not in shown:
                loaded = sum(_after(p, "wait forward") for p in seen.values())
                progress("load shards", "running", f"{loaded}/{world} ranks loaded")
        if "forward" in shown:
            # Every rank has written its results; what is left (barrier, process-group and CUDA
            # teardown, interpreter exit) is no part of the run: leaving the block stops them.
            return
        try:
            if ranks.procs.join(timeout=POLL_S):
                return
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            record = _first_error(out)
            if record and record["kind"] == "model":
                raise _ModelFailure(record) from None
            if record:
                raise RunError(
                    f"rank {record['rank']} failed during {record['phase']}: {record['message']}"
                ) from None
            raise RunError(f"a rank died: {str(exc).strip().splitlines()[-1]}") from None
        if clock.busiest(time.time(), started_wall) > timeout_s:
            stuck = {r: p for r, p in clock.phase.items() if p != "done"}
            raise RunError(
                f"timed out after {timeout_s:.0f}s (--timeout); ranks still running: "
                + (", ".join(f"rank {r} in {p}" for r, p in sorted(stuck.items())) or "not started")
            )


def _after(phase: str, target: str) -> bool:
    return ORDER.index(phase) >= ORDER.index(target)


class _ModelFailure(Exception):
    def __init__(self, record: dict):
        super().__init__(record["message"])
        self.record = record


def _first_error(out: Path) -> dict | None:
    """The error that started it: the earliest, preferring a real error over the collective
    failures it causes on the other ranks."""
    records = [json.loads(p.read_text()) for p in out.glob("rank*.error.json")]
    if not records:
        return None
    records.sort(key=lambda r: (r["kind"] in ("collective", "interrupted"), r["time"]))
    return records[0]


def _stop(procs) -> None:
    """Terminate, then kill, every rank still alive: no orphans. Then remove the error files
    torch.multiprocessing named for them: start_processes reserves one per rank in the default
    temp dir (tempfile.NamedTemporaryFile, torch/multiprocessing/spawn.py) and a rank that raises
    writes its traceback there; nothing else deletes it."""
    for p in procs.processes:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + 5
    for p in procs.processes:
        p.join(timeout=max(0.1, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    for path in getattr(procs, "error_files", None) or []:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def one_run_per_process():
    """For a process that runs once and exits (the CLI): SIGTERM and Ctrl-C become exceptions for
    the whole command, not only while ranks exist, and multiprocessing's helpers this run started
    (the forkserver the ranks fork from, the resource tracker of its queues) are stopped and
    waited for before it exits. On their own they end just after this process, once they notice,
    so for a moment they outlived it. A script that runs many models in one process keeps its
    forkserver warm by not using this."""
    with _signals_as_exceptions() as hold:
        try:
            yield
        except BaseException as exc:
            # The traceback's frames hold the run's queues and events; freed, they unregister
            # their semaphores, so the tracker stops without a "leaked semaphore" warning.
            traceback.clear_frames(exc.__traceback__)
            with hold():
                _stop_helpers()
            raise
        with hold():
            _stop_helpers()


def _stop_helpers() -> None:
    _stop_forkserver()
    _stop_resource_tracker()


def _stop_resource_tracker() -> None:
    """Every queue and event of the run is gone by now (each unregistered itself), so the tracker
    has nothing left to warn of. `ResourceTracker._stop` is CPython's own (3.8+)."""
    import gc
    from multiprocessing import resource_tracker

    gc.collect()  # a SemLock still in a reference cycle unregisters when collected
    stop = getattr(getattr(resource_tracker, "_resource_tracker", None), "_stop", None)
    if stop is not None:
        with contextlib.suppress(OSError, ChildProcessError):
            stop()


def _stop_forkserver() -> None:
    """Stopped by a signal, this process is about to exit: end multiprocessing's forkserver now
    and wait for it, so it does not outlive this process (on its own it ends after it, once it
    notices, and a server still importing notices only when done). A later run in this process
    starts a new one. `ForkServer._stop` is CPython's own (3.8+), used by its tests."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        with contextlib.suppress(OSError, ChildProcessError):
            stop()


def _load(path: Path):
    import torch

    return torch.load(path, weights_only=True) if path.is_file() else None


@contextlib.contextmanager
def _signals_as_exceptions():
    """SIGTERM raises Terminated and SIGINT KeyboardInterrupt in the main thread, so `finally`
    stops the ranks and removes the run's folder, and the CLI exits 143 or 130 (without a
    handler, SIGTERM killed the process where it stood: folder left, semaphore leaked).

    Yields `hold`: inside `with hold():` a signal waits until the block ends, so creating the
    folder, starting the ranks and cleaning up are never cut in half; a second signal while one
    waits is raised at once (a stuck start can still be interrupted).
    """
    from tfbackend.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield contextlib.nullcontext  # signal handlers can only be set from the main thread
        return
    state = {"depth": 0, "pending": None}

    def raise_for(signum: int):
        if signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt

    def handler(signum, frame):
        if state["depth"] and state["pending"] is None:
            state["pending"] = signum
            return
        raise_for(signum)

    @contextlib.contextmanager
    def hold():
        state["depth"] += 1
        try:
            yield
        finally:
            state["depth"] -= 1
        if not state["depth"] and state["pending"] is not None:
            signum, state["pending"] = state["pending"], None
            raise_for(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield hold
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
