"""Generate reports/agreement.md: tfbackend's plan vs vLLM's own build, per causal-LM architecture.

For every causal-LM architecture of the installed transformers (default config from
CONFIG_MAPPING), build facts and the vllm-0.32 plan, let the installed vLLM build the model on meta
(one gloo process per rank, chunks of models per worker run), and diff the two at tp 1 and 2.

    python3 scripts/agreement_report.py [--tp 1 2] [--limit N] [--chunk 12] [--out reports/agreement.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def architectures() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        cls = cls[0] if isinstance(cls, (list, tuple)) else cls
        out.append((model_type, cls))
    return sorted(out)


def prepare(model_type: str, arch: str, root: str):
    from transformers import CONFIG_MAPPING

    from tfbackend.inspect import SourceInfo, facts_from_config

    config = CONFIG_MAPPING[model_type]()
    config.architectures = [arch]
    d = os.path.join(root, model_type)
    config.save_pretrained(d)
    facts = facts_from_config(config, SourceInfo("local", d, os.path.join(d, "config.json")))
    return d, facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default="reports/agreement.md")
    args = ap.parse_args()

    from tfbackend.replace.planner import build_plan
    from tfbackend.replace.profiles import PROFILES
    from tfbackend.vllm_bridge.diff import compare
    from tfbackend.vllm_bridge.run import build_with_vllm

    archs = architectures()[: args.limit or None]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as root:
        prepared = []
        for model_type, arch in archs:
            try:
                d, facts = prepare(model_type, arch, root)
                prepared.append((model_type, arch, d, facts))
            except Exception as exc:
                for tp in args.tp:
                    rows.append(
                        dict(
                            model_type=model_type,
                            arch=arch,
                            tp=tp,
                            status="no facts",
                            detail=f"{type(exc).__name__}: {str(exc)[:150]}",
                        )
                    )
        for tp in args.tp:
            for i in range(0, len(prepared), args.chunk):
                chunk = prepared[i : i + args.chunk]
                started = time.monotonic()
                builds = build_with_vllm([c[2] for c in chunk], tp=tp, timeout=args.timeout)
                print(f"tp={tp} chunk {i}: {time.monotonic() - started:.0f}s", flush=True)
                for (model_type, arch, _, facts), build in zip(chunk, builds, strict=True):
                    plan = build_plan(facts, tp=tp, pp=1, profile=PROFILES["vllm-0.32"])
                    a = compare(facts, plan, build)
                    if a.run_error or not build.ranks:
                        status, detail = "run failed", a.run_error or "no result"
                    elif a.vllm_error:
                        status, detail = "vLLM raised", a.vllm_error.splitlines()[0][:200]
                    elif a.full:
                        status, detail = "agree", f"{a.agreed}/{a.compared}"
                    else:
                        status = "disagree"
                        kinds = Counter(d.what for d in a.disagreements)
                        first = a.disagreements[0]
                        detail = (
                            f"{dict(kinds)}; e.g. {first.qualname}: tfbackend {first.ours}"
                            f" | vLLM {first.vllm}"
                        )[:300]
                    rows.append(
                        dict(model_type=model_type, arch=arch, tp=tp, status=status, detail=detail)
                    )
                    write(rows, args.out)
    write(rows, args.out)


def write(rows: list[dict], out: str) -> None:
    built = [r for r in rows if r["status"] in ("agree", "disagree")]
    agree = sum(r["status"] == "agree" for r in built)
    rate = f"{100 * agree / len(built):.1f}%" if built else "n/a"
    lines = [
        "# Agreement: tfbackend plan vs vLLM 0.32's own Transformers-backend build",
        "",
        f"**Full agreement: {agree}/{len(built)} ({rate})** of the (architecture, tp) pairs "
        "vLLM built on meta; every module class and per-rank parameter shape compared.",
        "",
        f"Status counts: {dict(Counter(r['status'] for r in rows))}",
        "",
        "Generated by `python3 scripts/agreement_report.py` (default configs from "
        "`CONFIG_MAPPING`, pp 1).",
        "",
        "| model_type | architecture | tp | status | detail |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["status"] == "agree", r["model_type"], r["tp"])):
        detail = r["detail"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['model_type']} | {r['arch']} | {r['tp']} | {r['status']} | {detail} |")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(out.replace(".md", ".json"), "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
