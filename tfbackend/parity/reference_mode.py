"""Which reference `run` computes: the whole model in memory (`from_pretrained`, the fastest), or
streamed layer by layer from the checkpoint (`parity/streamed.py`) when the whole model does not
fit. `--reference auto` (the default) decides from the checkpoint's size in the reference dtype
against what is free where the reference runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfbackend.errors import UserError

MODES = ("auto", "memory", "streamed")
# The in-memory reference holds the weights plus what from_pretrained converts in passing and the
# activations: ask for this much more than the weights before choosing it.
HEADROOM = 1.2
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ReferenceChoice:
    mode: str  # "memory" | "streamed"
    reason: str
    weights_bytes: int = 0  # the model's weights in the reference dtype
    free_bytes: int | None = None  # where it would have to fit


def validate_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"--reference must be one of {', '.join(MODES)}, got {mode!r}")


def weights_bytes(model_dir: str, dtype: str) -> int:
    """The checkpoint's floating-point tensors at the reference dtype's width (others as stored),
    from the safetensors headers alone."""
    from math import prod

    from tfbackend.inspect.checkpoint import FLOAT_DTYPES, read_local

    tensors = read_local(model_dir).tensors.values()
    width = _DTYPE_BYTES[dtype]
    return sum(prod(t.shape) * width if t.dtype in FLOAT_DTYPES else t.nbytes for t in tensors)


def free_bytes(device: str) -> tuple[int | None, str]:
    """What the in-memory reference can use: host RAM on CPU; on CUDA the smaller of free GPU
    memory and host RAM (from_pretrained reads the model into host memory before `.to(cuda)`)."""
    host = _host_available()
    if device != "cuda":
        return host, "host RAM available"
    import torch

    gpu, _ = torch.cuda.mem_get_info(torch.cuda.current_device())
    if host is not None and host < gpu:
        return host, "host RAM available (from_pretrained loads there first)"
    return gpu, f"free on cuda:{torch.cuda.current_device()}"


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decide(need: int, free: int | None, where: str) -> ReferenceChoice:
    """memory when the weights fit with headroom; streamed otherwise (or when nothing says)."""
    gib = 2**30
    if free is not None and need * HEADROOM <= free:
        why = f"the model needs {need / gib:.1f} GiB, {free / gib:.1f} GiB {where}"
        return ReferenceChoice("memory", why, need, free)
    if free is None:
        why = f"the model needs {need / gib:.1f} GiB and free memory is unknown here"
    else:
        why = f"the model needs {need / gib:.1f} GiB (×{HEADROOM} headroom), {free / gib:.1f} GiB {where}"
    return ReferenceChoice("streamed", why, need, free)


def choose(model_dir: str, dtype: str, device: str, requested: str) -> ReferenceChoice:
    validate_mode(requested)
    if requested != "auto":
        return ReferenceChoice(requested, f"--reference {requested}")
    need = weights_bytes(model_dir, dtype)
    free, where = free_bytes(device)
    return decide(need, free, where)


def fits_beside(choice: ReferenceChoice, model_dir: str, options) -> bool:
    """Whether the ranks may load their shards while the in-memory reference is held: where the
    reference runs (host RAM on CPU, where every rank loads too; GPU 0 on CUDA, rank 0's) has room
    for both, with the same headroom. A streamed reference is chosen for want of memory: never."""
    if choice.mode != "memory":
        return False
    ref_dtype = options.reference_dtype or options.dtype
    need = choice.weights_bytes or weights_bytes(model_dir, ref_dtype)
    free = choice.free_bytes
    if free is None:
        free, _ = free_bytes(options.device)
    if free is None:
        return False
    # A rank holds at most the whole model; on CPU every rank's shard is in host RAM.
    ranks = weights_bytes(model_dir, options.dtype) * (
        1 if options.device == "cuda" else options.tp * options.pp
    )
    return (need + ranks) * HEADROOM <= free


def run_reference(local_dir: str, prompts, options, report, progress, choice=None):
    """Choose (unless chosen), compute, and record in the report what the reference was and what
    it cost."""
    ref_dtype = options.reference_dtype or options.dtype
    if choice is None:
        choice = choose(local_dir, ref_dtype, options.device, options.reference)
    progress(
        "reference",
        "running",
        f"plain transformers, {choice.mode}, {ref_dtype}, {len(prompts)} prompts",
    )
    if choice.mode == "streamed":
        from tfbackend.parity.streamed import compute_streamed_reference

        reference = compute_streamed_reference(
            local_dir, prompts, dtype=ref_dtype, device=options.device, capture=options.bisect,
            trust_remote_code=options.trust_remote_code,
        )  # fmt: skip
    else:
        from tfbackend.parity.reference import compute_reference

        reference = compute_reference(
            local_dir, prompts, dtype=ref_dtype, device=options.device, capture=options.bisect,
            trust_remote_code=options.trust_remote_code,
        )  # fmt: skip
    report.reference_mode = reference.mode
    report.reference_peak_bytes = reference.peak_bytes
    report.reference_peak_kind = reference.peak_kind
    report.reference_bytes_read = reference.bytes_read
    if options.reference == "auto" and choice.mode == "streamed":
        report.notes.append(f"reference streamed layer by layer: {choice.reason}")
    progress(
        "reference", "done", f"load {reference.load_s:.1f}s, forward {reference.forward_s:.2f}s"
    )
    return reference
