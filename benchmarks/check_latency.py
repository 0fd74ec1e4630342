"""Cold `tfbackend check` wall time and peak RSS against a floor measured in the same run.

The floor is a fresh process that only imports torch + transformers and builds the same model on
the meta device: no tool can answer faster than that. Target: check ≤ 1.3× floor, RSS < 1 GB.

    python benchmarks/check_latency.py [--repeats 3] [--out benchmarks/results/check_latency.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_WRAPPER = """
import resource, runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_module({module!r}, run_name="__main__")
finally:
    sys.stderr.write("\\nMAXRSS_KB=%d\\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

FLOOR = """
import resource, sys, torch
from transformers import AutoConfig, AutoModel
config = AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    AutoModel.from_config(config)
sys.stderr.write("\\nMAXRSS_KB=%d\\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_configs(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    models = {
        "llama-70b-shaped": LlamaConfig(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=131072,
            architectures=["LlamaForCausalLM"],
            dtype="bfloat16",
        ),
        "deepseek-v3-default (671B)": CONFIG_MAPPING["deepseek_v3"](
            architectures=["DeepseekV3ForCausalLM"]
        ),
    }
    out = {}
    for name, config in models.items():
        folder = root / name.split(" ")[0]
        config.save_pretrained(folder)
        out[name] = folder
    return out


def timed(cmd: list[str]) -> tuple[float, int, int]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = 0
    for line in proc.stderr.splitlines():
        if line.startswith("MAXRSS_KB="):
            rss = int(line.split("=", 1)[1])
    return wall, rss, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/check_latency.md"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in make_configs(Path(tmp)).items():
            floor, check = [], []
            for _ in range(args.repeats):
                # Interleaved so that both see the same machine load.
                floor.append(timed([sys.executable, "-c", FLOOR, str(folder)]))
                argv = ["tfbackend", "check", str(folder), "--tp", str(args.tp), "--json"]
                wrapper = RSS_WRAPPER.format(argv=argv, module="tfbackend")
                check.append(timed([sys.executable, "-c", wrapper]))
            f_wall = statistics.median(w for w, _, _ in floor)
            c_wall = statistics.median(w for w, _, _ in check)
            rows.append(
                {
                    "model": name,
                    "floor_s": round(f_wall, 2),
                    "check_s": round(c_wall, 2),
                    "ratio": round(c_wall / f_wall, 2),
                    "floor_rss_mb": round(max(r for _, r, _ in floor) / 1024),
                    "check_rss_mb": round(max(r for _, r, _ in check) / 1024),
                    "check_exit_codes": sorted({c for _, _, c in check}),
                }
            )
    help_wall = statistics.median(
        timed([sys.executable, "-m", "tfbackend", "--help"])[0] for _ in range(args.repeats)
    )
    lines = [
        f"# check latency (cold process, median of {args.repeats})",
        "",
        "| model | floor s | check s | ratio | floor RSS MB | check RSS MB | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['floor_s']} | {r['check_s']} | {r['ratio']}× | "
            f"{r['floor_rss_mb']} | {r['check_rss_mb']} | {r['check_exit_codes']} |"
        )
    lines += ["", f"`tfbackend --help`: {help_wall:.2f} s", ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "help_s": help_wall}, indent=2)
    )


if __name__ == "__main__":
    main()
