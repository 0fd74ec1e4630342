"""GPU parity benchmark: `tfbackend run --tp 2` on a ~1B Llama-shaped and a small MoE model.

Writes random-weight models locally (fixed seed, spread init), runs the CLI on each, and measures
a floor in the same run: reading the checkpoint bytes once + one reference forward + one sharded
forward (both taken from the run's own phase timings). Results go to benchmarks/results/ as
markdown and JSON.

    python3 benchmarks/run_parity.py --tp 2 --device cuda --dtype bfloat16
    python3 benchmarks/run_parity.py --tp 2 --launcher torchrun   # ranks started by torchrun
    python3 benchmarks/run_parity.py --reference streamed         # reference one layer at a time

Random checkpoints are written straight into safetensors (`write_random_checkpoint`: no model
materialised), and the time it took is in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def configs():
    from transformers import LlamaConfig, Qwen3MoeConfig

    llama_1b = LlamaConfig(  # Llama-3.2-1B shapes, smaller vocab
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=500000.0,
    )  # fmt: skip
    moe = Qwen3MoeConfig(
        hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_experts=16,
        num_experts_per_tok=4, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, vocab_size=32000, max_position_embeddings=4096, norm_topk_prob=True,
    )  # fmt: skip
    return {"llama-1b": llama_1b, "qwen3moe-small": moe}


def read_bytes_once(folder: Path) -> tuple[float, int]:
    total, t = 0, time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return time.perf_counter() - t, total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--models-dir", default="/tmp/tfbackend-bench-models")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--timeout", type=int, default=540)
    ap.add_argument("--out-name", default=None, help="results file stem (default: by layout)")
    ap.add_argument("--launcher", default="spawn", choices=("spawn", "torchrun"))
    ap.add_argument("--reference", default="auto", choices=("auto", "memory", "streamed"))
    args = ap.parse_args()
    stem = args.out_name or f"run_parity_tp{args.tp}_pp{args.pp}_{args.device}"
    if args.out_name is None and args.launcher != "spawn":
        stem += f"_{args.launcher}"
    if args.out_name is None and args.reference != "auto":
        stem += f"_{args.reference}_reference"

    import torch

    from tfbackend.parity.synthetic import write_random_checkpoint

    rows = []
    for name, config in configs().items():
        if args.only and name not in args.only:
            continue
        folder = Path(args.models_dir) / name
        write_s = None
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            write_random_checkpoint(config, folder, seed=0, dtype=torch.bfloat16)
            write_s = time.perf_counter() - t
            print(f"{name}: wrote random weights in {write_s:.1f}s", file=sys.stderr)
        read_s, nbytes = read_bytes_once(folder)
        launch = [sys.executable, "-m", "tfbackend"]
        if args.launcher == "torchrun":
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc-per-node", str(args.tp * args.pp), "-m", "tfbackend"]  # fmt: skip
        cmd = [
            *launch, "run", str(folder), "--tp", str(args.tp),
            "--pp", str(args.pp), "--device", args.device, "--dtype", args.dtype, "--json",
            "--timeout", str(args.timeout), "--launcher", args.launcher,
            "--reference", args.reference,
        ]  # fmt: skip
        t = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        wall = time.perf_counter() - t
        if proc.returncode not in (0, 1):
            print(proc.stderr, file=sys.stderr)
            rows.append(
                {"model": name, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": wall}
            )
            continue
        rep = json.loads(proc.stdout)
        sharded_forward = max(r["phases"]["forward"] for r in rep["ranks"])
        floor = read_s + rep["phases"]["reference forward"] + sharded_forward
        params = sum(p for p in [nbytes // 2])  # bf16 checkpoint: 2 bytes per parameter
        rows.append({
            "model": name, "params": params, "checkpoint_bytes": nbytes, "verdict": rep["verdict"],
            "prompts": rep["prompts"], "wall_s": wall, "phases": rep["phases"],
            "floor_s": floor, "floor_parts": {"read_bytes_s": read_s,
                "reference_forward_s": rep["phases"]["reference forward"],
                "sharded_forward_s": sharded_forward},
            "ratio_to_floor": wall / floor, "ranks": rep["ranks"],
            "reference_peak_bytes": rep["reference_peak_bytes"],
            "reference_mode": rep.get("reference_mode"),
            "reference_peak_kind": rep.get("reference_peak_kind"), "write_s": write_s,
        })  # fmt: skip
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"tp": args.tp, "pp": args.pp, "device": args.device, "dtype": args.dtype,
            "launcher": args.launcher, "reference": args.reference,
            "torch": torch.__version__, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(to_markdown(meta, rows))
    print(to_markdown(meta, rows))
    return 0 if all(r.get("verdict") == "pass" for r in rows) else 1


def to_markdown(meta, rows) -> str:
    lines = [f"# tfbackend run parity — tp {meta['tp']} pp {meta['pp']} {meta['device']} {meta['dtype']}",
             f"torch {meta['torch']}; GPUs: {', '.join(meta['gpus']) or 'none'}", "",
             "| model | params | verdict | min top-1 | min top-k ⊂ | max KL | wall s | floor s | wall/floor |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | error: {r['error']} | | | | {r['wall_s']:.1f} | | |")
            continue
        p = r["prompts"]
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['verdict']} | "
            f"{min(x['top1_agreement'] for x in p):.3f} | {min(x['topk_containment'] for x in p):.3f} | "
            f"{max(x['kl_max'] for x in p):.2e} | {r['wall_s']:.1f} | {r['floor_s']:.2f} | "
            f"{r['ratio_to_floor']:.1f}× |"
        )
    lines += ["", f"launcher {meta.get('launcher', 'spawn')}, --reference {meta.get('reference', 'auto')}", "",
              "| model | reference | reference peak GiB | checkpoint written in s |", "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" not in r:
            peak, write_s = r.get("reference_peak_bytes"), r.get("write_s")
            gpu = (r.get("reference_peak_kind") or "").startswith("cuda")
            peak_text = (
                "—" if peak is None else f"{peak / 2**30:.2f} ({'GPU' if gpu else 'RSS growth'})"
            )
            write_text = "—" if write_s is None else f"{write_s:.1f}"
            lines.append(
                f"| {r['model']} | {r.get('reference_mode') or '—'} | {peak_text} | {write_text} |"
            )
    lines += ["", "| model | rank | shard GiB | peak GiB | peak / shard | init s | build s | load s | forward s |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for k in r.get("ranks", []):
            lines.append(
                f"| {r['model']} | {k['rank']} | {k['shard_bytes'] / 2**30:.2f} | "
                f"{k['peak_bytes'] / 2**30:.2f} | {k['peak_bytes'] / max(k['shard_bytes'], 1):.2f} | "
                + " | ".join(
                    f"{k['phases'].get(x, 0):.2f}" for x in ("init", "build", "load", "forward")
                )
                + " |"
            )
    lines += ["", "Floor = reading the checkpoint bytes once + the reference forward + the slowest "
              "rank's sharded forward, all measured in the same run. Wall = the whole `tfbackend "
              "run` command (imports, reference load, spawn, NCCL init included)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
