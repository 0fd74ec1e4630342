"""The per-rank worker: build vLLM's own Transformers-backend model on meta, and record it.

Runs inside one spawned gloo process per rank (see `run.py`). `import vllm` happens only here and
in the other modules of this package, so the core stays importable without vLLM.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BuiltModule:
    qualname: str
    class_name: str
    params: dict[str, list[int]]  # direct parameters and buffers-as-weights, per rank
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RankBuild:
    """What vLLM built on one rank (or the exception it raised)."""

    rank: int
    tp_rank: int
    pp_rank: int
    modules: list[BuiltModule] = field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    substitutions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _module_attrs(module: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for name in (
        "num_heads",
        "num_kv_heads",
        "head_size",
        "output_sizes",
        "sliding_window",
        "logits_soft_cap",
        "org_vocab_size",
        "num_embeddings_padded",
        "global_num_experts",
        "local_num_experts",
        "top_k",
    ):
        value = getattr(module, name, None)
        if isinstance(value, (int, float, str, bool)) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value)
        ):
            attrs[name] = list(value) if isinstance(value, tuple) else value
    impl = getattr(module, "impl", None)
    if impl is not None and type(module).__name__ == "Attention":
        attrs["attn_type"] = str(getattr(module, "attn_type", ""))
    return attrs


def _record(model: Any) -> list[BuiltModule]:
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        params = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
        out.append(BuiltModule(name, type(module).__name__, params, _module_attrs(module)))
    return out


def build_rank(
    rank: int,
    world_size: int,
    tp: int,
    pp: int,
    port: int,
    model_dirs: list[str],
    result_dir: str,
) -> None:
    """Initialise vLLM's distributed state once, then build every model in `model_dirs`."""
    import json

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    import torch
    from vllm.config import (
        CompilationConfig,
        DeviceConfig,
        LoadConfig,
        ModelConfig,
        ParallelConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.distributed import parallel_state as ps

    from tfbackend.vllm_bridge.shm import name_segments

    subs = _install_stand_ins()
    name_segments(f"build-{port}")
    ps.init_distributed_environment(
        world_size=world_size,
        rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        local_rank=rank,
        backend="gloo",
    )
    environ = dict(os.environ)
    for i, model_dir in enumerate(model_dirs):
        # A build may set process-wide switches for the rest of the process: vLLM 0.33 sets
        # VLLM_MLA_DISABLE=1 when a model's MLA layers do not fuse, and every later MLA model
        # this worker built would then fall back to full attention. A server builds one model.
        os.environ.clear()
        os.environ.update(environ)
        build = RankBuild(rank=rank, tp_rank=rank % tp, pp_rank=rank // tp, substitutions=subs)
        try:
            model_config = ModelConfig(
                model=model_dir,
                model_impl="transformers",
                dtype="float32",
                skip_tokenizer_init=True,
                enforce_eager=True,
            )
            vllm_config = VllmConfig(
                model_config=model_config,
                parallel_config=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                device_config=DeviceConfig(device="cpu"),
                load_config=LoadConfig(load_format="dummy"),
                compilation_config=CompilationConfig(mode=0),
            )
            with set_current_vllm_config(vllm_config):
                # Groups depend on the model (the EP group exists only for MoE models), so
                # they are rebuilt for every model this worker builds.
                if ps.model_parallel_is_initialized():
                    ps.destroy_model_parallel()
                ps.initialize_model_parallel(tp, pp, backend="gloo")
                from vllm.model_executor.model_loader.utils import get_model_architecture

                model_cls, _ = get_model_architecture(model_config)
                with torch.device("meta"):
                    model = model_cls(vllm_config=vllm_config, prefix="")
            build.modules = _record(model)
        except Exception as exc:  # what vLLM raised is a result, not a crash of the worker
            build.error = f"{type(exc).__name__}: {exc}"
            build.error_type = type(exc).__name__
            build.warnings.append(traceback.format_exc(limit=6))
        # Written under a temporary name and renamed: a reader polling for results never
        # sees a half-written file.
        path = os.path.join(result_dir, f"{i}.rank{rank}.json")
        with open(path + ".part", "w") as fh:
            json.dump(build.to_dict(), fh)
        os.replace(path + ".part", path)


def _install_stand_ins() -> list[str]:
    """The narrowest stand-ins for what vLLM's CPU platform cannot select on meta."""
    return []
