"""`tfbackend convert` against the floor of moving its bytes once, and its peak memory.

Writes a ~1B Llama-shaped bf16 checkpoint (Llama-3.2-1B shapes: 2.47 GB, its largest tensor the
525 MB tied embedding) quickly: the tensors' bytes come from one random block, repeated, since
values do not change how fast bytes move. Then, alternating so each sees the same page cache:
- floor: in this process, read every source byte once and write as many bytes as the conversion
  writes once (8 MiB reads and writes, convert's largest write), no fsync, like convert;
- convert: `tfbackend.convert.convert()` in this process (check, layout, write, manifest), and
  its write phase alone;
- cli: `tfbackend convert` in a fresh process (imports included), with its peak RSS, against a
  process that only imports what it imports (torch, transformers, safetensors).
Results go to benchmarks/results/convert.md and convert.json.

    python3 benchmarks/convert.py --tp 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BLOCK = 64 << 20  # the random block the checkpoint's bytes repeat
IO = 8 << 20  # the floor's read and write size, the largest write() convert makes


def llama_1b():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=500000.0, dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip


def write_checkpoint(config, folder: Path) -> tuple[int, int]:
    """config.json + model.safetensors with every tensor save_pretrained would write (bf16).
    Returns (total bytes, largest tensor bytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen, tensors = set(), []
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:  # a tied head is the embedding: saved once
            continue
        seen.add(id(p))
        tensors.append((name, list(p.shape), p.numel() * 2))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, size in tensors:
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = torch.randn(BLOCK // 2, dtype=torch.float32).to(torch.bfloat16).view(torch.uint8)
    block = block.numpy().tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            n = min(left, BLOCK)
            fh.write(block[:n])
            left -= n
    return offset, max(size for _, _, size in tensors)


def floor(source: Path, out_bytes: int, scratch: Path) -> float:
    buf = bytearray(IO)
    view = memoryview(buf)
    t = time.perf_counter()
    for f in sorted(source.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    with open(scratch, "wb", buffering=0) as fh:
        left = out_bytes
        while left:
            n = min(left, IO)
            fh.write(view[:n])
            left -= n
    seconds = time.perf_counter() - t
    scratch.unlink()
    return seconds


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _Timer:
    """Times the write phase and measures its own peak: the kernel's high-water mark is reset
    (clear_refs 5) when writing starts, so imports and the check do not count."""

    def __init__(self):
        self.write_started = None
        self.rss_at_write = 0

    def phase(self, name):
        if name == "write":
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.rss_at_write = _status("VmRSS")
            self.write_started = time.perf_counter()

    def start_writing(self, total):
        pass

    def advance(self, n):
        pass


def in_process(source: Path, out: Path, tp: int) -> tuple[float, float, int, int]:
    from tfbackend.convert import ConvertOptions, convert

    shutil.rmtree(out, ignore_errors=True)
    timer = _Timer()
    t = time.perf_counter()
    result = convert(str(source), ConvertOptions(out=str(out), tp=tp), timer)
    total = time.perf_counter() - t
    wrote = time.perf_counter() - timer.write_started
    grew = _status("VmHWM") - timer.rss_at_write
    assert result.converted, result.blockers
    # freed before the floor runs, as the floor frees its file before the next conversion:
    # each timed run starts with the same page cache
    shutil.rmtree(out)
    return total, wrote, result.bytes_written, grew


def child_peak(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, measured by GNU time: a child
    forked straight from this (large) process would start its high-water mark at ours."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    with tempfile.NamedTemporaryFile("r") as rss:
        proc = subprocess.run(
            ["/usr/bin/time", "-o", rss.name, "-f", "%M", *cmd],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return seconds, int(rss.read().split()[-1]) * 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/tfbackend-bench-convert")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = ap.parse_args()
    root = Path(args.dir)
    source, out = root / "llama-1b", root / "out"
    t = time.perf_counter()
    if not (source / "model.safetensors").is_file():
        shutil.rmtree(source, ignore_errors=True)
        write_checkpoint(llama_1b(), source)
    write_s = time.perf_counter() - t
    src_bytes = (source / "model.safetensors").stat().st_size
    from safetensors import safe_open

    with safe_open(str(source / "model.safetensors"), "pt") as fh:
        largest = max(
            _numel(fh.get_slice(k).get_shape()) * 2
            for k in fh.keys()  # noqa: SIM118
        )
    floors, totals, writes, grown = [], [], [], []
    out_bytes = 0
    for _ in range(args.repeats):
        total, wrote, out_bytes, grew = in_process(source, out, args.tp)
        totals.append(total)
        writes.append(wrote)
        grown.append(grew)
        floors.append(floor(source, out_bytes, root / "floor.bin"))
    imports = [sys.executable, "-c", "import torch, transformers, safetensors, tfbackend.cli.app"]
    base_s, base_rss = child_peak(imports)
    shutil.rmtree(out, ignore_errors=True)
    cli = [sys.executable, "-m", "tfbackend", "convert", str(source), "--tp", str(args.tp),
           "--out", str(out)]  # fmt: skip
    cli_s, cli_rss = child_peak(cli)
    shutil.rmtree(out, ignore_errors=True)
    row = {
        "model": "llama-1b (Llama-3.2-1B shapes, tied, bf16)",
        "tp": args.tp,
        "source_bytes": src_bytes,
        "output_bytes": out_bytes,
        "largest_tensor_bytes": largest,
        "floor_s": min(floors),
        "convert_s": min(totals),
        "write_phase_s": min(writes),
        "ratio_convert": min(totals) / min(floors),
        "ratio_write_phase": min(writes) / min(floors),
        "cli_s": cli_s,
        "imports_s": base_s,
        "cli_peak_rss": cli_rss,
        "imports_peak_rss": base_rss,
        "rss_over_imports": cli_rss - base_rss,
        "rss_over_imports_per_largest_tensor": (cli_rss - base_rss) / largest,
        "write_phase_peak_growth": max(grown),
        "write_phase_peak_per_largest_tensor": max(grown) / largest,
        "checkpoint_write_s": write_s,
        "repeats": args.repeats,
        "note": args.note,
        "cpus": os.cpu_count(),
    }
    write_results(row)
    print(json.dumps(row, indent=2))
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_results(row: dict) -> None:
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "convert.json").write_text(json.dumps(row, indent=2) + "\n")
    mb = 1e6
    lines = [
        "# `tfbackend convert`: time against moving the bytes once, and peak memory",
        "",
        f"Model: {row['model']}, tp {row['tp']}; source {row['source_bytes'] / mb:,.0f} MB, "
        f"output {row['output_bytes'] / mb:,.0f} MB (both ranks), largest tensor "
        f"{row['largest_tensor_bytes'] / mb:,.0f} MB. Best of {row['repeats']} alternating runs "
        f"on a {row['cpus']}-CPU machine shared with other jobs (page cache warm).",
        "",
        "| measure | seconds | × floor |",
        "|---|---:|---:|",
        f"| floor: read the source bytes once + write the output bytes once | "
        f"{row['floor_s']:.2f} | 1.00 |",
        f"| `convert()` in process: check, layout, write, manifest | {row['convert_s']:.2f} | "
        f"{row['ratio_convert']:.2f} |",
        f"| its write phase (read, slice, cast, write, sha256) | {row['write_phase_s']:.2f} | "
        f"{row['ratio_write_phase']:.2f} |",
        f"| `tfbackend convert` CLI, fresh process | {row['cli_s']:.2f} | — |",
        f"| a process importing torch + transformers + safetensors | {row['imports_s']:.2f} | — |",
        "",
        "| memory | MB |",
        "|---|---:|",
        f"| peak RSS, `tfbackend convert` (fresh process) | {row['cli_peak_rss'] / mb:,.0f} |",
        f"| peak RSS, a process only importing torch + transformers + safetensors | "
        f"{row['imports_peak_rss'] / mb:,.0f} |",
        f"| write phase: peak RSS over the RSS it started at | "
        f"{row['write_phase_peak_growth'] / mb:,.0f} "
        f"({row['write_phase_peak_per_largest_tensor']:.2f}× the largest tensor) |",
        f"| peak RSS, `tfbackend convert` over the imports-only process | "
        f"{row['rss_over_imports'] / mb:,.0f} "
        f"({row['rss_over_imports_per_largest_tensor']:.2f}× the largest tensor) |",
        "",
        f"Target ≤ 1.5× the floor: {'met' if row['ratio_convert'] <= 1.5 else 'missed'} "
        f"({row['ratio_convert']:.2f}×). Peak RSS of the whole CLI process "
        f"{row['cli_peak_rss'] / row['largest_tensor_bytes']:.2f}× the largest tensor; what the "
        "write phase adds (8 MiB chunk buffers, a rank's slice of a tensor when it is a column "
        "slice or a cast, the scratch rows it is cut from) "
        f"{row['write_phase_peak_per_largest_tensor']:.2f}×; the other "
        f"{max(0, row['rss_over_imports'] - row['write_phase_peak_growth']) / mb:,.0f} MB over "
        "an imports-only process are held before the write phase starts (check, layout).",
        *([f"Conditions: {row['note']}"] if row.get("note") else []),
        "",
        "Reproduce: `python3 benchmarks/convert.py --tp 2 --repeats 3`.",
    ]
    (res / "convert.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
