"""The reference streamed from the checkpoint: never the whole model in memory.

The model is built on `meta` and runs transformers' own forward, so every layer gets exactly the
inputs transformers computes (rotary embeddings, causal and sliding-window masks, `layer_types`,
per-architecture extras). A forward pre-hook on each decoder layer materialises its weights just
before it runs and a forward hook frees them after; the input embedding and the head are
materialised and freed the same way (a tied head is the embedding table: read once, held from the
embedding until the head has run). What is in no layer (final norm, small extras) is read at the
start and held. Peak memory ≈ largest layer + embedding/head + the activations of every prompt.

Weights are read by transformers' own loader (`convert_and_load_state_dict_in_model`) handed one
layer's checkpoint tensors at a time, so names, conversions (per-expert MoE tensors stacked into
3-D experts), dtypes and `keep_in_fp32` modules are what `from_pretrained` does — read from
transformers 5.19 and 5.24 (`core_model_loading.py`, `modeling_utils.py`). Each checkpoint tensor
is read exactly once: all prompts go through the model together as one right-padded batch with an
attention mask, so a layer's weights serve every prompt before they are freed.

Why not accelerate's big-model hooks (`dispatch_model` with an `OffloadedWeightsLoader` index
into the safetensors): measured in benchmarks/results/reference_memory.md, they meet the memory
bound on a dense model, but an index entry maps one parameter to one stored tensor, so a
checkpoint that needs a conversion (every per-expert MoE checkpoint) must first be re-saved into
an offload folder (transformers does that for its `device_map="disk"`: the experts written and
read back, most of an MoE model's bytes twice plus as much free disk), a tied table is read twice,
and accelerate would become a dependency of `run`.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tfbackend.errors import CheckpointError, RunError


@dataclass
class _Unit:
    """Weights materialised together: one decoder layer, the embedding (with a tied head), the head,
    or everything in no layer (`resident`, held for the whole forward)."""

    name: str
    kind: str  # "layer" | "embedding" | "head" | "resident"
    prefixes: tuple[str, ...]  # module qualnames whose state it owns
    targets: list[str] = field(default_factory=list)  # state-dict names (model side)
    keys: list[str] = field(default_factory=list)  # checkpoint tensor names
    loaded: bool = False


@dataclass
class StreamStats:
    bytes_read: int = 0  # checkpoint bytes read (each tensor once: == checkpoint_bytes)
    checkpoint_bytes: int = 0  # bytes of the tensors the model uses
    peak_held_bytes: int = 0  # most parameter bytes materialised at once
    layer_bytes: int = 0  # checkpoint bytes of the decoder layers
    largest_layer_bytes: int = 0
    load_s: float = 0.0  # time inside the load hooks (reading and converting)
    loads: int = 0


class StreamedWeights:
    """Hooks that materialise each unit of a meta-built HF model from the safetensors just in
    time, and free it once it has run."""

    def __init__(self, model: nn.Module, model_dir: str | Path, *, dtype, device: torch.device):
        try:  # transformers' loader internals, read in 5.19 and 5.24
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import convert_and_load_state_dict_in_model  # noqa: F401
            from transformers.modeling_utils import LoadStateDictConfig
        except ImportError as exc:
            raise RunError(
                f"the streamed reference needs transformers' per-tensor loader ({exc}); "
                "use --reference memory, or transformers 5.19-5.24"
            ) from None

        from tfbackend.inspect.checkpoint import read_local

        self.model, self.device = model, device
        self.folder = Path(model_dir)
        headers = read_local(self.folder)
        if not headers.tensors:
            raise CheckpointError(
                f"{model_dir} has no .safetensors files: `run` reads safetensors only"
            )
        self.headers = headers.tensors
        weight_mapping = get_model_conversion_mapping(model)
        self.load_config = LoadStateDictConfig(
            device_map={"": device}, dtype=dtype, dtype_plan=model._get_dtype_plan(dtype),
            weight_mapping=weight_mapping,
        )  # fmt: skip
        self.stats = StreamStats()
        self._held: dict[str, int] = {}
        self.units = self._units()
        self._assign(weight_mapping)
        self._handles: list = []

    # -- layout -------------------------------------------------------------------------------
    def _units(self) -> list[_Unit]:
        model = self.model
        names = {id(m): n for n, m in model.named_modules()}
        units = [_Unit(name, "layer", (name,)) for name, _ in decoder_layers(model)]
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and getattr(head, "weight", None) is embed.weight
        if tied:
            units.append(_Unit("embedding+head", "embedding", (names[id(embed)], names[id(head)])))
        else:
            units.append(_Unit("embedding", "embedding", (names[id(embed)],)))
            if head is not None:
                units.append(_Unit("head", "head", (names[id(head)],)))
        resident = _Unit("resident", "resident", ("",))
        for target in model.state_dict():
            unit = next((u for u in units if any(_under(target, p) for p in u.prefixes)), resident)
            unit.targets.append(target)
        return [*units, resident]

    def _assign(self, weight_mapping) -> None:
        """Give each checkpoint tensor to the unit that owns its target parameter, by transformers'
        own renaming (a per-expert tensor names the 3-D expert it is stacked into)."""
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        renamings = [w for w in weight_mapping if isinstance(w, WeightRenaming)]
        converters = [w for w in weight_mapping if isinstance(w, WeightConverter)]
        prefix = self.model.base_model_prefix
        targets = dict.fromkeys(self.model.state_dict())
        owner = {t: u for u in self.units for t in u.targets}
        for key, header in self.headers.items():
            target, _ = rename_source_key(key, renamings, converters, prefix, targets)
            if target not in targets and key in targets:  # as transformers retries it
                target, _ = rename_source_key(key, [], [], prefix, targets)
            unit = owner.get(target)
            if unit is None:
                continue  # unexpected by the model: from_pretrained does not load it either
            unit.keys.append(key)
            self.stats.checkpoint_bytes += header.nbytes
        for u in self.units:
            if u.kind == "layer":
                size = sum(self.headers[k].nbytes for k in u.keys)
                self.stats.layer_bytes += size
                self.stats.largest_layer_bytes = max(self.stats.largest_layer_bytes, size)

    # -- hooks --------------------------------------------------------------------------------
    def attach(self) -> None:
        by_name = dict(self.model.named_modules())
        for unit in self.units:
            if unit.kind == "resident":
                continue
            first, last = by_name[unit.prefixes[0]], by_name[unit.prefixes[-1]]
            self._handles.append(first.register_forward_pre_hook(self._loader(unit)))
            self._handles.append(last.register_forward_hook(self._freer(unit)))

    def _loader(self, unit: _Unit):
        def hook(module, args):
            self.load(unit)

        return hook

    def _freer(self, unit: _Unit):
        def hook(module, args, output):
            self.free(unit)

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for unit in self.units:
            self.free(unit)

    # -- materialise / free -------------------------------------------------------------------
    def load(self, unit: _Unit) -> None:
        """Read the unit's checkpoint tensors (each once) through transformers' loader."""
        if unit.loaded:
            return
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model

        t = time.perf_counter()
        by_file: dict[str, list[str]] = {}
        for key in unit.keys:
            by_file.setdefault(self.headers[key].file, []).append(key)
        with contextlib.ExitStack() as stack:
            state = {}
            for file, keys in by_file.items():
                handle = stack.enter_context(safe_open(str(self.folder / file), "pt"))
                state.update({k: handle.get_slice(k) for k in keys})
            with _quiet_progress():
                info, _ = convert_and_load_state_dict_in_model(self.model, state, self.load_config)
        self._retie(unit)
        missing = [name for name in unit.targets if self._get(name).is_meta]
        if missing:
            bad = sorted(str(m[0]) for m in info.mismatched_keys)
            raise CheckpointError(
                f"streamed reference: the checkpoint has no usable tensor for {len(missing)} "
                f"parameter(s) of {unit.name}, e.g. {missing[:3]}"
                + (f" (shape mismatch: {bad[:3]})" if bad else "")
            )
        unit.loaded = True
        self.stats.bytes_read += sum(self.headers[k].nbytes for k in unit.keys)
        self.stats.loads += 1
        self.stats.load_s += time.perf_counter() - t
        seen: dict[int, int] = {}
        for name in unit.targets:
            x = self._get(name)
            seen[id(x)] = x.numel() * x.element_size()
        self._held[unit.name] = sum(seen.values())
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, sum(self._held.values()))

    def free(self, unit: _Unit) -> None:
        if not unit.loaded:
            return
        for name in unit.targets:
            path, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(path)
            if leaf in module._parameters:
                old = module._parameters[leaf]
                module._parameters[leaf] = nn.Parameter(
                    torch.empty_like(old, device="meta"), requires_grad=False
                )
            elif leaf in module._buffers:
                module._buffers[leaf] = torch.empty_like(module._buffers[leaf], device="meta")
        unit.loaded = False
        self._held.pop(unit.name, None)

    def _retie(self, unit: _Unit) -> None:
        """transformers loads a tied table once, under its source name; point the tied names at
        it (from_pretrained does that in tie_weights)."""
        for target, source in getattr(self.model, "all_tied_weights_keys", {}).items():
            if target in unit.targets and source in unit.targets:
                path, _, leaf = target.rpartition(".")
                setattr(self.model.get_submodule(path), leaf, self.model.get_parameter(source))

    def _get(self, name: str) -> torch.Tensor:
        return self.model.get_parameter_or_buffer(name)

    def resident(self) -> _Unit:
        return self.units[-1]


def materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq, embedding scales) are computed, not stored:
    allocate every buffer on the device and let the model's own `_init_weights` fill it, as
    `from_pretrained` does for keys the checkpoint lacks (parameters stay on meta)."""
    with torch.no_grad():
        for module in model.modules():
            buffers = dict(module.named_buffers(recurse=False))
            if not buffers:
                continue
            for name, buf in buffers.items():
                if buf is not None:
                    module._buffers[name] = torch.empty_like(buf, device=device)
            model._init_weights(module)


def padded_batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and their attention mask: every real position keeps the position
    id it has alone, and a causal model never lets it see the padding after it."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, : len(p)] = 1
    return ids, mask


def compute_streamed_reference(
    model_dir: str, prompts, *, dtype: str, device: str, capture: bool = False,
    trust_remote_code: bool = False,
):  # fmt: skip
    """Reference logits, one layer of the model in memory at a time (see the module docstring).
    With `capture` (bisect), prompt 0 runs a second time alone with every module's output recorded:
    the one case where the checkpoint is read twice."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tfbackend.parity.bisect import Recorder
    from tfbackend.parity.peak import HostPeak
    from tfbackend.parity.reference import DTYPES, Reference, attn_implementation

    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if device == "cuda"
        else torch.device("cpu")
    )
    if dev.type == "cuda":
        torch.empty(0, device=dev)  # a live context before reading memory stats
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    with HostPeak() as host:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[dtype], attn_implementation=attn_implementation(config),
                trust_remote_code=trust_remote_code,
            )  # fmt: skip
        model.eval()
        materialise_buffers(model, dev)
        weights = StreamedWeights(model, model_dir, dtype=DTYPES[dtype], device=dev)
        captures: dict[str, torch.Tensor] = {}
        try:
            with torch.inference_mode():
                weights.load(weights.resident())
                weights.attach()
                ids, mask = padded_batch([p.ids for p in prompts])
                out = model(
                    input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False
                ).logits
                logits = [out[i, : len(p.ids)].float().cpu() for i, p in enumerate(prompts)]
                del out
                if capture:
                    recorder = Recorder(model)
                    model(input_ids=torch.tensor([prompts[0].ids], device=dev), use_cache=False)
                    recorder.remove()
                    captures = {name: t for name, t, _ in recorder.outputs}
        finally:
            weights.detach()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    total_s = time.perf_counter() - t0
    stats = weights.stats
    del model, weights
    gc.collect()
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_allocated"
        torch.cuda.empty_cache()
    else:
        peak, kind = host.growth_bytes, "rss_growth"
    return Reference(
        logits, load_s=stats.load_s, forward_s=total_s - stats.load_s, peak_bytes=peak,
        captures=captures, mode="streamed", peak_kind=kind, bytes_read=stats.bytes_read,
        stream=stats,
    )  # fmt: skip


@contextlib.contextmanager
def _quiet_progress():
    """transformers draws a "Loading weights" bar per call: one per layer here."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks, outermost first: modules of the classes the model lists as never to be
    split (`_no_split_modules`, accelerate's unit too), else the ModuleList of
    `num_hidden_layers` blocks."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(_under(name, p) for p, _ in found):
            found.append((name, module))
    if found:
        return found
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return [(f"{name}.{i}", m) for i, m in enumerate(module)]
    raise RunError(
        "streamed reference: no repeated decoder layers found (_no_split_modules); "
        "use --reference memory"
    )
