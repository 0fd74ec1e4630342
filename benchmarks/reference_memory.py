"""The reference's peak memory and wall time: in memory (`from_pretrained`) vs streamed one layer at
a time (`parity/streamed.py`), and accelerate's big-model hooks measured beside them.

Each variant runs in its own child process and reports its host RSS growth (the kernel's
high-water mark reset after the imports, minus the RSS before: `tfbackend.parity.peak`), the
checkpoint bytes it read, its wall time, and its logits (compared with the in-memory reference in
the parent). Random-weight checkpoints are written straight into safetensors
(`write_random_checkpoint`), timed against `make_random_model` with `--writer-baseline`.

    python3 benchmarks/reference_memory.py                   # 1B Llama + small MoE, fp32, CPU
    python3 benchmarks/reference_memory.py --writer-baseline  # also time the old writer

accelerate variants (skipped when accelerate is not installed; it is not a tfbackend dependency):
- `accelerate`: meta model + `dispatch_model` with every block on "disk" and an offload index
  pointing into the safetensors (`OffloadedWeightsLoader` reads each tensor just in time), all
  prompts in one padded batch. Needs checkpoint names equal to parameter names (dense models).
- `accelerate-disk`: transformers' own route to it, `from_pretrained(device_map=..."disk",
  offload_folder=...)`: measures what it writes into the offload folder (converted MoE experts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def configs():
    from transformers import LlamaConfig, Qwen3MoeConfig

    llama_1b = LlamaConfig(  # Llama-3.2-1B shapes, smaller vocab (as run_parity.py)
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=500000.0,
    )  # fmt: skip
    moe = Qwen3MoeConfig(  # as run_parity.py's qwen3moe-small
        hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_experts=16,
        num_experts_per_tok=4, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, vocab_size=32000, max_position_embeddings=4096, norm_topk_prob=True,
    )  # fmt: skip
    return {"llama-1b": llama_1b, "qwen3moe-small": moe}


# -- children -----------------------------------------------------------------------------------
def child(variant: str, folder: str, dtype: str, out: str) -> None:
    import torch
    import transformers

    from tfbackend.parity.peak import HostPeak
    from tfbackend.parity.prompts import build_prompts

    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(folder)
    prompts, _ = build_prompts(folder, config)
    result: dict = {"variant": variant}
    t = time.perf_counter()
    with HostPeak() as peak:
        if variant == "memory":
            from tfbackend.parity.reference import compute_reference

            ref = compute_reference(folder, prompts, dtype=dtype, device="cpu")
            logits, result["load_s"], result["forward_s"] = ref.logits, ref.load_s, ref.forward_s
        elif variant == "streamed":
            from tfbackend.parity.streamed import compute_streamed_reference

            ref = compute_streamed_reference(folder, prompts, dtype=dtype, device="cpu")
            logits, result["load_s"], result["forward_s"] = ref.logits, ref.load_s, ref.forward_s
            result["bytes_read"] = ref.bytes_read
            result["peak_held_bytes"] = ref.stream.peak_held_bytes
        elif variant == "accelerate":
            logits, result["bytes_read"], result["reads"] = _accelerate(folder, prompts, dtype)
        elif variant == "accelerate-disk":
            logits, result["offload_bytes_written"] = _accelerate_disk(folder, prompts, dtype)
        else:
            raise SystemExit(f"unknown variant {variant}")
    result["wall_s"] = time.perf_counter() - t
    result["peak_rss_growth_bytes"] = peak.growth_bytes
    torch.save([x.float() for x in logits], out + ".pt")
    Path(out + ".json").write_text(json.dumps(result))


def _accelerate(folder: str, prompts, dtype: str):
    """Meta model + dispatch_model, every block offloaded to "disk" = an index into the
    safetensors; counts each tensor the loader hands out."""
    import accelerate.utils.offload as offload
    import torch
    from accelerate import dispatch_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tfbackend.inspect.checkpoint import read_local
    from tfbackend.parity.reference import DTYPES, attn_implementation
    from tfbackend.parity.streamed import decoder_layers, materialise_buffers, padded_batch

    reads: dict[str, int] = {}
    nbytes = [0]
    original = offload.OffloadedWeightsLoader.__getitem__

    def counting(self, key):  # instrumentation only: the loader itself is accelerate's
        tensor = original(self, key)
        reads[key] = reads.get(key, 0) + 1
        nbytes[0] += headers[self.index[key]["weight_name"]].nbytes
        return tensor

    offload.OffloadedWeightsLoader.__getitem__ = counting
    headers = read_local(folder).tensors
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[dtype], attn_implementation=attn_implementation(config)
        )
    model.eval()
    materialise_buffers(model, torch.device("cpu"))
    state = model.state_dict()
    missing = [k for k in state if k not in headers and k != "lm_head.weight"]
    if missing:
        raise SystemExit(f"checkpoint names differ from parameter names (e.g. {missing[:2]})")
    index = {
        k: {"safetensors_file": str(Path(folder) / h.file), "weight_name": k, "dtype": dtype}
        for k, h in headers.items()
    }
    if "lm_head.weight" not in index:  # tied: accelerate reads the table under both names
        index["lm_head.weight"] = index["model.embed_tokens.weight"]
    device_map = {name: "disk" for name, _ in decoder_layers(model)}
    device_map.update({"model.embed_tokens": "disk", "model.norm": "disk", "lm_head": "disk"})
    device_map["model.rotary_emb"] = "cpu"
    model = dispatch_model(model, device_map, main_device="cpu", offload_index=index)
    ids, mask = padded_batch([p.ids for p in prompts])
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logits = [out[i, : len(p.ids)] for i, p in enumerate(prompts)]
    return logits, nbytes[0], {"tensors": len(reads), "max_per_tensor": max(reads.values())}


def _accelerate_disk(folder: str, prompts, dtype: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tfbackend.parity.reference import DTYPES, attn_implementation
    from tfbackend.parity.streamed import padded_batch

    config = AutoConfig.from_pretrained(folder)
    device_map = {f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)}
    device_map.update({"model.embed_tokens": "disk", "model.norm": "disk", "lm_head": "disk"})
    device_map["model.rotary_emb"] = "cpu"
    with tempfile.TemporaryDirectory(prefix="offload-") as offload_dir:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[dtype], device_map=device_map, offload_folder=offload_dir,
            attn_implementation=attn_implementation(config),
        )  # fmt: skip
        written = sum(f.stat().st_size for f in Path(offload_dir).rglob("*") if f.is_file())
        ids, mask = padded_batch([p.ids for p in prompts])
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return [out[i, : len(p.ids)] for i, p in enumerate(prompts)], written


# -- parent -------------------------------------------------------------------------------------
def write_models(names, models_dir: Path, writer_baseline: bool) -> dict:
    import torch

    from tfbackend.parity.synthetic import make_random_model, write_random_checkpoint

    out = {}
    for name, config in configs().items():
        if name not in names:
            continue
        folder = models_dir / name
        row: dict = {}
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            write_random_checkpoint(config, folder, seed=0, dtype=torch.bfloat16)
            row["write_s"] = time.perf_counter() - t
        if writer_baseline:
            with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
                t = time.perf_counter()
                make_random_model(config, tmp, seed=0, dtype=torch.bfloat16)
                row["make_random_model_s"] = time.perf_counter() - t
            if "write_s" not in row:  # time the fast writer too, in the same run
                with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
                    t = time.perf_counter()
                    write_random_checkpoint(config, tmp, seed=0, dtype=torch.bfloat16)
                    row["write_s"] = time.perf_counter() - t
        out[name] = row
    return out


def measure(folder: Path, variant: str, dtype: str, tmp: Path) -> dict:
    out = tmp / f"{folder.name}-{variant}"
    cmd = [sys.executable, __file__, "--child", variant, str(folder), dtype, str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"variant": variant, "error": last, "process_s": time.perf_counter() - t}
    result = json.loads(Path(str(out) + ".json").read_text())
    result["process_s"] = time.perf_counter() - t
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "FOLDER", "DTYPE", "OUT"))
    ap.add_argument("--models-dir", default="/tmp/tfbackend-bench-models")
    ap.add_argument("--only", nargs="*", default=list(configs()))
    ap.add_argument("--dtype", default="float32", help="reference dtype (checkpoints are bf16)")
    ap.add_argument("--writer-baseline", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0

    import torch

    from tfbackend.inspect.checkpoint import read_local

    try:
        import accelerate

        accel = accelerate.__version__
    except ImportError:
        accel = None
    models_dir = Path(args.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    writers = write_models(args.only, models_dir, args.writer_baseline)
    rows = []
    with tempfile.TemporaryDirectory(prefix="refmem-") as tmp:
        for name in args.only:
            folder = models_dir / name
            checkpoint = read_local(folder).total_bytes
            variants = ["memory", "streamed"] + (["accelerate", "accelerate-disk"] if accel else [])
            results = [measure(folder, v, args.dtype, Path(tmp)) for v in variants]
            base = torch.load(Path(tmp) / f"{name}-memory.pt", weights_only=True)
            for r in results:
                path = Path(tmp) / f"{name}-{r['variant']}.pt"
                if "error" not in r and path.is_file():
                    other = torch.load(path, weights_only=True)
                    r["max_dlogit_vs_memory"] = max(
                        float((a - b).abs().max()) for a, b in zip(base, other, strict=True)
                    )
                    r["max_abs_logit"] = max(float(a.abs().max()) for a in base)
            rows.append({"model": name, "checkpoint_bytes": checkpoint, "writer": writers.get(name),
                         "results": results})  # fmt: skip
    meta = {"dtype": args.dtype, "torch": torch.__version__, "accelerate": accel,
            "transformers": __import__("transformers").__version__, "cpus": os.cpu_count()}  # fmt: skip
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "reference_memory.md").write_text(to_markdown(meta, rows))
    print(to_markdown(meta, rows))
    return 0


def to_markdown(meta, rows) -> str:
    gib = 2**30
    lines = [
        f"# Reference memory: in memory vs streamed (CPU, reference {meta['dtype']})",
        f"torch {meta['torch']}, transformers {meta['transformers']}, accelerate "
        f"{meta['accelerate'] or 'not installed'}; {meta['cpus']} CPUs. Checkpoints: random bf16.",
        "",
        "| model | reference | peak RSS growth GiB | peak / weights | read / checkpoint | wall s "
        "| max \\|Δlogit\\| vs memory | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ck = row["checkpoint_bytes"]
        weights = ck * (2 if meta["dtype"] == "float32" else 1)  # bf16 checkpoint
        for r in row["results"]:
            if "error" in r:
                lines.append(f"| {row['model']} | {r['variant']} | | | | | | {r['error']} |")
                continue
            peak = r.get("peak_rss_growth_bytes")
            read = r.get("bytes_read")
            notes = []
            if "reads" in r:
                notes.append(
                    f"{r['reads']['tensors']} loads, ≤{r['reads']['max_per_tensor']}× each"
                )
            if "offload_bytes_written" in r:
                notes.append(
                    f"wrote {r['offload_bytes_written'] / gib:.2f} GiB to the offload folder"
                )
            if "peak_held_bytes" in r:
                notes.append(f"weights held at once ≤ {r['peak_held_bytes'] / gib:.2f} GiB")
            rel = r.get("max_dlogit_vs_memory")
            ratio = "—" if read is None else f"{read / ck:.2f}"
            diff = "—" if rel is None else f"{rel:.1e} (of {r['max_abs_logit']:.0f})"
            lines.append(
                f"| {row['model']} | {r['variant']} | {peak / gib:.2f} | {peak / weights:.2f} | "
                f"{ratio} | {r['wall_s']:.1f} | {diff} | {'; '.join(notes)} |"
            )
    lines += ["", "| model | checkpoint GiB | write_random_checkpoint s | make_random_model s |",
              "|---|---|---|---|"]  # fmt: skip
    for row in rows:
        w = row["writer"] or {}
        times = [f"{w[k]:.1f}" if k in w else "—" for k in ("write_s", "make_random_model_s")]
        lines.append(
            f"| {row['model']} | {row['checkpoint_bytes'] / gib:.2f} | {' | '.join(times)} |"
        )
    lines += [
        "",
        "Peak RSS growth: the child's resident-set high-water mark, reset after its imports, minus "
        "the RSS it started from (mapped checkpoint pages count). Weights = the model at the "
        "reference dtype. Read / checkpoint: bytes handed out by the loader over the checkpoint's "
        "size (streamed: counted by tfbackend; accelerate: by wrapping `OffloadedWeightsLoader`). "
        "The streamed and accelerate variants run all prompts as one padded batch (that is what "
        "lets a layer serve every prompt before it is freed); memory runs them one by one.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
