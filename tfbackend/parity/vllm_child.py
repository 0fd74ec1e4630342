"""One rank of `run --engine vllm`: vLLM's own `LLM(model_impl="transformers")` on the prompts.

Started by `engine_vllm.py` as `python -m tfbackend.parity.vllm_child JOB_DIR RANK`, in a process
group of its own so the parent can stop it (and anything vLLM starts) as one tree. This module and
its process are the only places tfbackend imports vLLM for `run`.

Everything goes through files in JOB_DIR, each written whole (temporary name, then renamed):
- `job.json` (read): the model, parallel sizes, dtype, prompts and what to ask vLLM for;
- `rank{R}.step` (written): the step this rank has reached (import, engine, generate), so a
  timeout can say where vLLM was;
- `rank{R}.error.json` (written when vLLM raised): the step, the phase read from where it was
  raised, the exception's type and its message on one line;
- `scores.pt` (rank 0, on success): per prompt, either vLLM's full [positions, vocab] scores,
  or its top-k token ids and log-probabilities per position.

The engine always runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`); the executor is
the parent's choice (`engine_vllm.executor_for`): `uni` for one rank, `external_launcher` with
one such process per tensor-parallel rank (joined through torch.distributed: `RANK`,
`WORLD_SIZE`, `MASTER_ADDR/PORT`), `mp` (vLLM's own workers under this process) for pipelines.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

# Where a frame's function sits in vLLM 0.32 says which phase raised (innermost match wins).
# Read in vllm/engine/arg_utils.py (create_engine_config), model_executor/model_loader/
# base_loader.py (load_model: initialize_model, then load_weights), v1/worker/gpu_worker.py
# and cpu_worker.py (determine_available_memory, initialize_from_config) and
# v1/worker/gpu_model_runner.py (execute_model, _dummy_run).
PHASE_OF_FRAME = {
    "create_engine_config": "config validation",
    "initialize_model": "construction",
    "load_weights": "weight loading",
    "process_weights_after_loading": "weight loading",
    "determine_available_memory": "KV cache setup",
    "initialize_from_config": "KV cache setup",
    "initialize_kv_cache": "KV cache setup",
    "_dummy_run": "forward",
    "profile_run": "forward",
    "execute_model": "forward",
}
# The phase when no known frame was crossed: the step tfbackend had reached.
PHASE_OF_STEP = {"engine": "construction", "generate": "forward"}
MESSAGE_CHARS = 600
# vllm/v1/executor/multiproc_executor.py: where the engine learns that a worker failed to start,
# and the prefix vLLM's logger puts on every line a worker logs ("(Worker_PP1 pid=7) ERROR
# 12-01 21:28:20 [multiproc_executor.py:953] ...").
WORKER_START_FRAME = "wait_for_ready"
_WORKER_LINE = re.compile(r"^\(Worker\S* pid=\d+\) ERROR \S+ \S+ \[[\w.]+:\d+\] ?(.*)$")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)): ?(.*)$")
_FRAME_LINE = re.compile(r'^\s*File "([^"]+)", line \d+, in (\S+)$')


def _write(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def phase_of(exc: BaseException, step: str) -> str:
    """The phase vLLM was in when it raised, from the frames the exception passed through."""
    phase = None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if "vllm" in code.co_filename:
            phase = PHASE_OF_FRAME.get(code.co_name, phase)
        tb = tb.tb_next
    return phase or PHASE_OF_STEP.get(step, step)


def _raised_in(exc: BaseException, function: str) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def worker_failure(log: str) -> tuple[str, str, str] | None:
    """(type, message, phase) of the last traceback a vLLM worker logged, or None."""
    lines = [m.group(1) for m in map(_WORKER_LINE.match, log.splitlines()) if m]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if not starts:
        return None
    block = lines[starts[-1] :]
    raised = [m for m in map(_EXCEPTION_LINE.match, block) if m]
    if not raised:
        return None
    phase = None
    for m in map(_FRAME_LINE.match, block):
        if m and "vllm" in m.group(1):
            phase = PHASE_OF_FRAME.get(m.group(2), phase)
    kind, text = raised[-1].group(1).rsplit(".", 1)[-1], _clip(raised[-1].group(2))
    return kind, text or kind, phase or "construction"


def describe(exc: BaseException) -> tuple[str, str]:
    """(type, message) as vLLM meant them, the message on one line.

    vLLM's configs are pydantic dataclasses: a `ValueError` raised by one of their validators
    arrives wrapped in a `ValidationError` ("1 validation error for ModelConfig ... Value error,
    <message> [type=value_error, ...]"); the error that was raised is in each entry's context.
    """
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        try:
            entries = errors()
        except Exception:  # noqa: BLE001 - fall back to the plain text
            entries = []
        raised = [e.get("ctx", {}).get("error") for e in entries]
        if entries and all(isinstance(r, BaseException) for r in raised):
            return type(raised[0]).__name__, "; ".join(one_line(r) for r in raised)
        if entries:
            return type(exc).__name__, _clip("; ".join(str(e.get("msg", "")) for e in entries))
    return type(exc).__name__, one_line(exc)


def one_line(exc: BaseException) -> str:
    """The exception's text collapsed onto one line, or for a bare `assert` the statement that
    failed and where."""
    text = " ".join(str(exc).split())
    if not text and exc.__traceback__ is not None:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        text = f"{(frame.line or '').strip()} ({Path(frame.filename).name}:{frame.lineno})"
    return _clip(text or type(exc).__name__)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


def die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if the parent is killed outright, the kernel ends this rank too.
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(job_dir: str, rank: int) -> int:
    die_with_parent()
    out = Path(job_dir)
    job = json.loads((out / "job.json").read_text())
    step = "import"

    def enter(name: str) -> None:
        nonlocal step
        step = name
        _write(out / f"rank{rank}.step", f"{name} {time.time():.3f}\n")
        print(f"[tfbackend] rank {rank}: {name}", flush=True)

    try:
        enter("import")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        if current_platform.device_type != job["device"]:
            raise _Environment(
                f"this vLLM build runs on {current_platform.device_type!r}, not on "
                f"--device {job['device']}"
            )
        if job["device"] == "cpu":
            name_cpu_shared_memory(out.name)
        enter("engine")
        llm = LLM(**job["engine_args"])
        enter("generate")
        if job["engine_args"]["pipeline_parallel_size"] > 1 and job["device"] == "cpu":
            llm.collective_rpc(warm_pipeline)
        params = SamplingParams(**job["sampling_params"])
        scores = []
        for batch in job["batches"]:
            prompts = [TokensPrompt(prompt_token_ids=job["prompts"][i]) for i in batch]
            outputs = llm.generate(prompts, params, use_tqdm=False)
            # Turned into tensors batch by batch: vLLM's Python objects are the memory peak.
            scores += [_rows(o, job["full"], llm.model_config.get_vocab_size()) for o in outputs]
        if rank == 0:
            _save(out / "scores.pt", {"full": job["full"], "prompts": scores})
        enter("done")
    except BaseException as exc:  # noqa: BLE001 - what vLLM raised is the result
        traceback.print_exc()
        sys.stdout.flush()
        record = _record(exc, rank, step, out / f"rank{rank}.log")
        _write(out / f"rank{rank}.error.json", json.dumps(record))
        return 1
    return 0


def name_cpu_shared_memory(run_id: str) -> None:
    """Give this run's CPU shared-memory segments a name of their own (vllm_bridge/shm.py).

    Under the external launcher vLLM's CPU worker sets VLLM_DIST_IDENT from the init method,
    "env://", so every run of every user gets the same "/dev/shm/-tp:0-[0-1]-cpushm_0": a run
    killed before it unlinks them (a timeout, Ctrl-C, a crash) made the next one fail with
    "create shm in SHMManager failed. errno: 17", and two runs at once collide. The worker
    overwrites the variable, so the name is set where vLLM makes it; `engine_vllm` unlinks what
    is left at the end."""
    from vllm.distributed.device_communicators import cpu_communicator

    from tfbackend.vllm_bridge.shm import ident

    shm = getattr(cpu_communicator, "_CPUSHMDistributed", None)
    if shm is None:  # another vLLM release: its own naming stands
        return
    vllm_name = shm.make_group_name

    # shm_open takes one name with no "/" inside: vLLM's starts with "//" under env://
    shm.make_group_name = staticmethod(
        lambda c: f"{ident(run_id)}-" + vllm_name(c).replace("/", "").lstrip("-")
    )


def warm_pipeline(worker) -> None:
    """vLLM's dummy forward of one token, once, on every rank (a `collective_rpc` callable).

    A pipeline rank after the first receives hidden states into a buffer that only the dummy run
    allocates (gpu_model_runner.py `_dummy_run`: `make_empty_intermediate_tensors`); vLLM 0.32's
    CPU runner skips that run in eager mode (cpu_model_runner.py `warming_up_model` returns for
    CompilationMode.NONE), so its first real step fails `assert self.intermediate_tensors is
    not None`. On GPUs the memory profile runs it anyway.
    """
    worker.model_runner._dummy_run(1)


class _Environment(Exception):
    """This machine cannot run the job at all (not a property of the model)."""


def _record(exc: BaseException, rank: int, step: str, log: Path) -> dict:
    torch = sys.modules.get("torch")
    out_of_memory = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
    environment = step == "import" or isinstance(exc, (_Environment, *out_of_memory))
    (kind, message), phase = describe(exc), phase_of(exc, step)
    if _raised_in(exc, WORKER_START_FRAME):
        # The `mp` executor's "WorkerProc initialization failed ... See stack trace for root
        # cause": the cause is in the worker's traceback, which it logged to our output.
        from_worker = worker_failure(log.read_text(errors="replace"))
        if from_worker:
            kind, message, phase = from_worker
    return {
        "rank": rank,
        "step": step,
        "phase": phase,
        "type": kind,
        "message": message,
        "kind": "environment" if environment else "model",
        "interrupted": isinstance(exc, KeyboardInterrupt | SystemExit),
        "time": time.time(),
    }


def _save(path: Path, obj) -> None:
    import torch

    part = path.with_name(path.name + ".part")
    torch.save(obj, part)
    os.replace(part, path)


def _rows(output, full: bool, vocab: int):
    """One prompt's rows, aligned with the reference: row i is the distribution after tokens
    0..i. vLLM's prompt_logprobs[i] scores token i given tokens < i (prompt_logprobs[0] is
    None), so it is row i-1; the last row is the first generated token's logprobs."""
    import torch

    prompt, sample = output.prompt_logprobs, output.outputs[0].logprobs
    ids, values, row_of = [], [], []
    for row, (flat, pos) in enumerate([(prompt, i) for i in range(1, len(prompt))] + [(sample, 0)]):
        # FlatLogprobs (flat_logprobs=True): one list per field, sliced per position.
        start, end = flat.start_indices[pos], flat.end_indices[pos]
        ids.append(torch.tensor(flat.token_ids[start:end], dtype=torch.long))
        values.append(torch.tensor(flat.logprobs[start:end], dtype=torch.float32))
        row_of.append(torch.full((end - start,), row, dtype=torch.long))
    ids, values, row_of = torch.cat(ids), torch.cat(values), torch.cat(row_of)
    rows = len(prompt)  # prompt rows 1..n-1 plus the generated one
    if full:
        # Every token's score at every row; the target token appears twice (same value).
        dense = torch.full((rows, max(vocab, int(ids.max()) + 1)), float("nan"))
        dense[row_of, ids] = values
        return dense
    k = int(torch.bincount(row_of, minlength=rows).max())
    top_ids = torch.full((rows, k), -1, dtype=torch.long)
    top_lp = torch.full((rows, k), float("-inf"))
    col = torch.arange(len(ids)) - torch.searchsorted(row_of, row_of, right=False)
    top_ids[row_of, col] = ids
    top_lp[row_of, col] = values
    return {"ids": top_ids, "logprobs": top_lp}


if __name__ == "__main__":
    code = main(sys.argv[1], int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip vLLM's exit handlers: the result is on disk, and a rank whose peers are gone can
    # wait in a collective teardown until the parent kills it.
    os._exit(code)
