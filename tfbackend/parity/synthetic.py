"""Random-weight models for tests and benchmarks: fixed seed, an init that spreads logits.

Default initialisers (std 0.02) give near-uniform logits whose top tokens are near-ties, so tiny
reduction-order differences flip the argmax. Scaling each matrix by 1/sqrt(fan_in) keeps
activations O(1) through the layers; a larger lm_head spreads the logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def spread_init_(model: torch.nn.Module, seed: int = 0, logit_scale: float = 4.0) -> None:
    gen = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float) -> None:
        p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))

    # A tied lm_head is the embedding table: give it the lm_head's scale, or a std-1 table makes
    # logits so peaked (std ~ sqrt(hidden)) that KL and containment measure nothing.
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if "bias" in name:
                    p.zero_()
                else:  # norm weights: keep each variant's neutral value, plus noise
                    p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype))
            elif "embed" in name:
                normal(p, logit_scale / math.sqrt(p.shape[-1]) if tied else 1.0)
            elif name.startswith("lm_head"):
                normal(p, logit_scale / math.sqrt(p.shape[-1]))
            elif p.dim() == 2 and name.endswith("gate.weight"):  # MoE router: spread its choices
                normal(p, 3.0 / math.sqrt(p.shape[-1]))
            else:
                normal(p, 1.0 / math.sqrt(p.shape[-1]))


def make_random_model(config, folder: str | Path, *, seed: int = 0, dtype=torch.float32) -> Path:
    """Write `config` with spread random weights (safetensors) into `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spread_init_(model, seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder


def write_random_checkpoint(
    config,
    folder: str | Path,
    *,
    seed: int = 0,
    dtype=torch.bfloat16,
    logit_scale: float = 4.0,
    shard_bytes: int = 2 << 30,
) -> Path:
    """Write `config` with random weights straight into safetensors shards, without building the
    model's weights: names and shapes come from a meta build, values from `_uniform` (seeded by
    tensor, drawn on threads, in `dtype` at the scales of `spread_init_`), and each shard is
    written, on a thread while the next is drawn, as soon as it is full. `make_random_model`
    materialises and initialises the whole model first (405 s for an 8B Llama on one H200 host);
    `normal_` is serial (~290 MB/s of bf16 on one core), `_uniform` ~1 GB/s per core and it
    scales with them. For benchmarks: tied heads, norms (each variant's neutral value, from the
    module's own `_init_weights`), biases and MoE routers follow `spread_init_`; names are those
    `save_pretrained` writes (transformers' `revert_weight_conversion`, one decoder layer at a
    time: per-expert tensors for an MoE, as on the hub)."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from tfbackend.parity.streamed import decoder_layers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    layers = [name for name, _ in decoder_layers(model)]
    gen = torch.Generator().manual_seed(seed)
    written: list[tuple[Path, list[str]]] = []  # (temporary file, its tensor names)
    shard: dict[str, torch.Tensor] = {}
    size = [0, 0]  # this shard's bytes, all bytes
    # One shard is written on a thread while the next is drawn (at most two in memory).
    writer = ThreadPoolExecutor(1)
    pending: list = []

    def write_shard() -> None:
        path = folder / f".part-{len(written):05d}.safetensors"
        if pending:
            pending.pop().result()
        pending.append(writer.submit(save_file, dict(shard), str(path), {"format": "pt"}))
        written.append((path, list(shard)))
        shard.clear()
        size[0] = 0

    def flush(group: dict[str, torch.Tensor]) -> None:
        for name, value in revert_weight_conversion(model, group).items():
            nbytes = value.numel() * value.element_size()
            if size[0] and size[0] + nbytes > shard_bytes:
                write_shard()
            shard[name] = value.contiguous()
            size[0] += nbytes
            size[1] += nbytes

    group: dict[str, torch.Tensor] = {}
    group_of = None
    for module_name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        owner = next((p for p in layers if module_name == p or module_name.startswith(p + ".")), "")
        if group and owner != group_of:
            flush(group)
            group = {}
        group_of = owner
        neutral = (
            _neutral_values(model, module) if all(p.dim() == 1 for p in params.values()) else {}
        )
        for p_name, p in params.items():
            name = f"{module_name}.{p_name}" if module_name else p_name
            if p is getattr(out_emb, "weight", None) and tied and module is out_emb:
                continue  # the tied head is the embedding table, stored once
            key = (seed, _stable_id(name))
            group[name] = _random_value(
                name, p, gen, tied, logit_scale, neutral.get(p_name), dtype, key
            )
    if group:
        flush(group)
    if shard:
        write_shard()
    for job in pending:
        job.result()
    writer.shutdown()
    weight_map = {}
    for i, (path, tensors) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size[1]}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(folder)
    return folder


def _neutral_values(model, module) -> dict[str, torch.Tensor]:
    """The values a norm-like module (1-D parameters only) is initialised to: 1 for x̂·w, 0 for
    Gemma's x̂·(1+w). Small, so materialising a copy of the module is cheap."""
    import copy

    clone = copy.deepcopy(module).to_empty(device="cpu")
    with torch.no_grad():
        model._init_weights(clone)
    return {n: p.detach().float() for n, p in clone.named_parameters(recurse=False)}


def _random_value(name, p, gen, tied, logit_scale, neutral, dtype, key) -> torch.Tensor:
    def spread(std: float) -> torch.Tensor:
        return _uniform(tuple(p.shape), std, dtype, key)

    if p.dim() == 1:
        if "bias" in name:
            return torch.zeros(p.shape, dtype=dtype)
        base = neutral if neutral is not None else torch.zeros(p.shape)
        return (base + torch.randn(p.shape, generator=gen) * 0.1).to(dtype)
    if "embed" in name:
        return spread(logit_scale / math.sqrt(p.shape[-1]) if tied else 1.0)
    if name.startswith("lm_head"):
        return spread(logit_scale / math.sqrt(p.shape[-1]))
    if p.dim() == 2 and name.endswith("gate.weight"):
        return spread(3.0 / math.sqrt(p.shape[-1]))
    return spread(1.0 / math.sqrt(p.shape[-1]))


_CHUNK = (
    1 << 20
)  # 64-bit words per generator call (4 values each): amortises Python, spreads on threads


def _stable_id(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def _uniform(shape: tuple[int, ...], std: float, dtype, key) -> torch.Tensor:
    """Uniform on [-a, a], a = std·√3 (so the std asked for), from 16 random bits per value:
    PCG64's raw 64-bit output (numpy; it releases the GIL, so chunks run on threads) read as
    int16, then torch casts and scales. Each chunk's generator is seeded by (key, chunk),
    so the values do not depend on the thread count. Per-tensor `normal_` in bf16 was the
    writer's bottleneck."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = math.prod(shape)
    words = np.empty(-(-n // 4), dtype=np.uint64)

    def fill(i: int) -> None:
        part = words[i * _CHUNK : (i + 1) * _CHUNK]
        part[:] = np.random.PCG64([*key, i]).random_raw(part.size)

    chunks = range(-(-words.size // _CHUNK))
    if len(chunks) > 1:
        with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
            list(pool.map(fill, chunks))
    else:
        for i in chunks:
            fill(i)
    bits = torch.from_numpy(words.view(np.int16)[:n]).view(shape)
    # cast, then scale in place: torch.mul(int16, float, out=bf16) promotes per element, ~20× slower
    return bits.to(dtype).mul_(std * math.sqrt(3) / (1 << 15))
