"""Parity benchmark: `tfbackend run` on Llama shapes (8B = Llama-3.1-8B's dimensions, ~1B, a small
one for CPUs) and a small MoE, on whatever device it is given.

Writes random-weight models locally (fixed seed, spread scales), runs the CLI on each, and
measures a floor in the same run: reading the checkpoint bytes once + one reference forward + one
sharded forward (both taken from the run's own phase timings). Prints and saves (to
benchmarks/results/, markdown and JSON) the wall/floor ratio and the per-phase table: resolve,
reference load and forward, the ranks' start (interpreter + imports, overlapping resolve and the
reference), what was left after the reference, and per rank init, build, load, forward, peak and
shard.

    python3 benchmarks/run_parity.py --tp 1 --device cuda --only llama-8b llama-1b
    python3 benchmarks/run_parity.py --tp 2 --device cpu --dtype float32 --only llama-small
    python3 benchmarks/run_parity.py --tp 2 --launcher torchrun   # ranks started by torchrun
    python3 benchmarks/run_parity.py --reference streamed         # reference one layer at a time

Random checkpoints are written straight into safetensors (`write_random_checkpoint`: no model
materialised); the time it took and its MB/s are in the results. Needs only torch,
transformers and this repo (PYTHONPATH or `pip install -e . --no-deps`); no network.
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

    llama_8b = LlamaConfig(  # Llama-3.1-8B's dimensions (its rope scaling aside: no cost)
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        tie_word_embeddings=False, rope_theta=500000.0,
    )  # fmt: skip
    llama_small = LlamaConfig(  # fixed costs dominate: what a CPU can run in seconds
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
        tie_word_embeddings=False,
    )  # fmt: skip
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
    return {"llama-8b": llama_8b, "llama-1b": llama_1b, "qwen3moe-small": moe,
            "llama-small": llama_small}  # fmt: skip


DEFAULT = ("llama-1b", "qwen3moe-small")


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
    ap.add_argument(
        "--only", nargs="*", default=None, help=f"models (default: {' '.join(DEFAULT)})"
    )
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
    import transformers

    from tfbackend.parity.synthetic import write_random_checkpoint

    rows = []
    known = configs()
    unknown = [m for m in args.only or () if m not in known]
    if unknown:
        ap.error(f"unknown model(s) {unknown}: choose from {', '.join(known)}")
    for name in args.only or DEFAULT:
        config = known[name]
        folder = Path(args.models_dir) / name
        write_s = write_mb_s = None
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            write_random_checkpoint(config, folder, seed=0, dtype=torch.bfloat16)
            write_s = time.perf_counter() - t
            written = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            write_mb_s = written / 1e6 / write_s
            print(f"{name}: wrote random weights in {write_s:.1f}s ({write_mb_s:.0f} MB/s)",
                  file=sys.stderr)  # fmt: skip
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
            "write_mb_s": write_mb_s,
        })  # fmt: skip
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"tp": args.tp, "pp": args.pp, "device": args.device, "dtype": args.dtype,
            "launcher": args.launcher, "reference": args.reference,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cpus": os.cpu_count(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(to_markdown(meta, rows))
    print(to_markdown(meta, rows))
    return 0 if all(r.get("verdict") == "pass" for r in rows) else 1


def to_markdown(meta, rows) -> str:
    lines = [f"# tfbackend run parity — tp {meta['tp']} pp {meta['pp']} {meta['device']} {meta['dtype']}",
             f"torch {meta['torch']}, transformers {meta.get('transformers', '?')}, "
             f"{meta.get('cpus', '?')} CPUs; GPUs: {', '.join(meta['gpus']) or 'none'}", "",
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
    lines += ["", "Phases, seconds (the ranks start while resolve and the reference run; "
              "`after reference` is what the ranks still had to do once it was over):", "",
              "| model | wall | floor | read bytes | resolve | reference load | reference forward "
              "| ranks start | ranks after reference | compare |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            continue
        ph, ranks = r["phases"], r.get("ranks", [])
        start = max((k["phases"].get("start", 0.0) for k in ranks), default=0.0)
        cells = [r["wall_s"], r["floor_s"], r["floor_parts"]["read_bytes_s"],
                 ph.get("resolve"), ph.get("reference load"), ph.get("reference forward"), start,
                 ph.get("ranks after reference"), ph.get("compare")]  # fmt: skip
        lines.append(f"| {r['model']} | " + " | ".join(_s(c) for c in cells) + " |")
    lines += ["", f"launcher {meta.get('launcher', 'spawn')}, --reference {meta.get('reference', 'auto')}", "",
              "| model | reference | reference peak GiB | checkpoint written in s | MB/s |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" not in r:
            peak, write_s = r.get("reference_peak_bytes"), r.get("write_s")
            gpu = (r.get("reference_peak_kind") or "").startswith("cuda")
            peak_text = (
                "—" if peak is None else f"{peak / 2**30:.2f} ({'GPU' if gpu else 'RSS growth'})"
            )
            write_text = "— (existing)" if write_s is None else f"{write_s:.1f}"
            lines.append(
                f"| {r['model']} | {r.get('reference_mode') or '—'} | {peak_text} | {write_text} "
                f"| {_s(r.get('write_mb_s'), '.0f')} |"
            )
    lines += ["", "| model | rank | shard GiB | peak GiB | peak / shard | start s | wait s | init s "
              "| build s | load s | forward s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for k in r.get("ranks", []):
            lines.append(
                f"| {r['model']} | {k['rank']} | {k['shard_bytes'] / 2**30:.2f} | "
                f"{k['peak_bytes'] / 2**30:.2f} | {k['peak_bytes'] / max(k['shard_bytes'], 1):.2f} | "
                + " | ".join(
                    _s(k["phases"].get(x))
                    for x in ("start", "wait", "init", "build", "load", "forward")
                )
                + " |"
            )
    lines += ["", "Floor = reading the checkpoint bytes once + the reference forward + the slowest "
              "rank's sharded forward, all measured in the same run. Wall = the whole `tfbackend "
              "run` command (imports, reference load, spawn, NCCL init included). A rank's start = "
              "from spawn to its imports done; wait = time it spent waiting for the plan, for room "
              "to load beside the reference, and for the reference's forward to end. Peak: GPU "
              "max_memory_allocated on CUDA, the process's peak RSS on CPU."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _s(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


if __name__ == "__main__":
    raise SystemExit(main())
