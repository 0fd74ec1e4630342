"""vLLM's own per-rank state dicts, as `ShardedStateLoader` sees them (tests run it as a script).

Builds vLLM 0.32's Transformers-backend model on the meta device in one gloo process per rank,
under the served dtype (as vLLM's loader does), and writes for each model and rank every
state-dict key that `_filter_subtensors` keeps (the smallest of the names sharing a tensor),
with its shape, dtype and the other names.

Usage: python tests/_vllm_state_dict.py TP OUT_DIR DTYPE MODEL_DIR...
"""

from __future__ import annotations

import json
import os
import socket
import sys


def rank_main(rank, world, tp, port, dirs, out, dtype):
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
    from vllm.model_executor.model_loader.utils import get_model_architecture
    from vllm.utils.torch_utils import set_default_torch_dtype

    from tfbackend.vllm_bridge.shm import name_segments

    name_segments(f"state-dict-{port}")  # vLLM's CPU communicator reads it (vllm_bridge/shm.py)
    ps.init_distributed_environment(world_size=world, rank=rank, local_rank=rank,
                                    distributed_init_method=f"tcp://127.0.0.1:{port}",
                                    backend="gloo")  # fmt: skip
    result = {}
    for d in dirs:
        mc = ModelConfig(model=d, model_impl="transformers", dtype=dtype,
                         skip_tokenizer_init=True, enforce_eager=True)  # fmt: skip
        vc = VllmConfig(model_config=mc, parallel_config=ParallelConfig(tensor_parallel_size=tp),
                        device_config=DeviceConfig(device="cpu"),
                        load_config=LoadConfig(load_format="dummy"),
                        compilation_config=CompilationConfig(mode=0))  # fmt: skip
        with set_current_vllm_config(vc), set_default_torch_dtype(mc.dtype):
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            ps.initialize_model_parallel(tp, 1, backend="gloo")
            cls, _ = get_model_architecture(mc)
            with torch.device("meta"):
                model = cls(vllm_config=vc, prefix="")
        # On meta every data_ptr is 0: group shared tensors by identity instead
        groups: dict[int, list[str]] = {}
        state = model.state_dict(keep_vars=True)
        for key, tensor in state.items():
            groups.setdefault(id(tensor), []).append(key)
        entries = {}
        for keys in groups.values():
            keys = sorted(keys)
            t = state[keys[0]]
            if t.numel():
                entries[keys[0]] = {"shape": list(t.shape), "dtype": str(t.dtype)[6:],
                                    "names": keys}  # fmt: skip
        result[d] = entries
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    import multiprocessing as mp

    tp, out, dtype, dirs = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, tp, tp, port, dirs, out, dtype))
             for r in range(tp)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    from tfbackend.vllm_bridge.shm import unlink_segments

    unlink_segments(f"state-dict-{port}")
    sys.exit(max(p.exitcode or 0 for p in procs))
