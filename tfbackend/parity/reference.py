"""Reference logits from plain transformers on one device, computed before the ranks start and
freed afterwards, so a model that fits TP-sharded need not fit twice."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from tfbackend.parity.bisect import Recorder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATION = "sdpa"  # the same kernel on both sides, where the model supports it


def attn_implementation(config) -> str:
    """sdpa, or eager for a model whose attention sdpa cannot compute (e.g. learned sinks)."""
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return ATTN_IMPLEMENTATION
    return ATTN_IMPLEMENTATION if getattr(cls, "_supports_sdpa", True) else "eager"


@dataclass
class Reference:
    logits: list[torch.Tensor]  # float32 on CPU, one [positions, vocab] per prompt
    load_s: float
    forward_s: float
    peak_bytes: int | None
    captures: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt 0, by module
    mode: str = "memory"  # "memory" (from_pretrained) | "streamed" (parity/streamed.py)
    peak_kind: str = "cuda_allocated"  # or "rss_growth": host RSS high-water mark - RSS before
    bytes_read: int | None = None  # checkpoint bytes read (streamed: counted)
    stream: object | None = None  # streamed.StreamStats


def compute_reference(
    model_dir: str,
    prompts,
    *,
    dtype: str,
    device: str,
    capture: bool = False,
    trust_remote_code: bool = False,
) -> Reference:
    from transformers import AutoModelForCausalLM

    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        # Memory stats need a live context ("Invalid device argument : did you call init?").
        torch.cuda.set_device(dev)
        torch.empty(0, device=dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    from transformers import AutoConfig

    from tfbackend.parity.peak import HostPeak

    with HostPeak() as host:
        # The user's choice, explicitly: transformers prompts when it is None. Safetensors only:
        # `run` refused a checkpoint without them already, and a .bin must never reach torch.load.
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation(config),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
        model = model.to(dev).eval()  # device_map would need accelerate
        load_s = time.perf_counter() - t0
        logits, captures = [], {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i, prompt in enumerate(prompts):
                recorder = Recorder(model) if capture and i == 0 else None
                ids = torch.tensor([prompt.ids], device=dev)
                out = model(input_ids=ids, use_cache=False).logits[0]
                logits.append(out.float().cpu())
                if recorder:
                    recorder.remove()
                    captures = {name: t for name, t, _ in recorder.outputs}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        forward_s = time.perf_counter() - t0
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_allocated"
    else:
        peak, kind = host.growth_bytes, "rss_growth"
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return Reference(logits, load_s, forward_s, peak, captures, peak_kind=kind)
