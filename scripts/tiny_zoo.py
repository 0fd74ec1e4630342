"""Generate reports/tiny-zoo.{json,md}: a tiny random-weight model of every causal-LM architecture.

For each model_type of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: shrink its default
config (`tfbackend.parity.tiny.tiny_config`), write it with spread random safetensors weights,
reload it with `AutoModelForCausalLM.from_pretrained(dir, dtype=float32)` and run a forward on
a 24-token prompt on CPU; then `tfbackend check DIR --tp 2` on the folder (the same call the
CLI makes, in-process). The tiny model is also compared with the default config's meta build:
module classes it lost or gained (what "keeps the architecture's character" means here).

    nice -n 10 python3 scripts/tiny_zoo.py [--only llama,qwen3_moe] [--timeout 90] [--keep DIR]

Models run one after another in a worker process; one that makes no progress within --timeout
(or kills its worker) is recorded as such and the run goes on in a fresh worker.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_LEN = 24
PROMPT_SEED = 0


def architectures() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def prompt_ids(config) -> list[int]:
    """24 fixed-seed ids that are no special token (no image placeholder without pixels)."""
    import torch

    from tfbackend.parity.tiny import special_token_ids

    vocab = config.get_text_config().vocab_size
    special = special_token_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    gen = torch.Generator().manual_seed(PROMPT_SEED)
    return allowed[torch.randint(0, len(allowed), (PROMPT_LEN,), generator=gen)].tolist()


def forward(folder: Path, config) -> dict:
    """Reload the saved model as a user would and run one forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from tfbackend.parity.reference import attn_implementation

    attn = attn_implementation(config)
    t0 = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn, output_loading_info=True
    )
    model.eval()
    if info.get("missing_keys") or info.get("mismatched_keys"):
        # Weights the reload initialises itself are not the saved ones: no comparison holds.
        missing = sorted(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
        raise ValueError(f"reload did not find {len(missing)} saved weight(s): {missing[:3]}")
    ids = torch.tensor([prompt_ids(config)])
    with torch.inference_mode():
        try:
            out = model(input_ids=ids, use_cache=False)
        except TypeError as exc:
            if "use_cache" not in str(exc):
                raise
            out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.shape[:2] != (1, PROMPT_LEN):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {PROMPT_LEN} tokens")
    if not torch.isfinite(logits).all():
        raise ValueError("non-finite logits")
    return {
        "attn": attn,
        "params": sum(p.numel() for p in model.parameters()),
        "forward_s": time.perf_counter() - t0,
        "logit_std": float(logits.float().std()),
    }


def zoo_one(model_type: str, root: str, fast: bool = False) -> dict:
    from transformers import AutoConfig

    from tfbackend.check import CheckOptions, check
    from tfbackend.inspect.meta import quiet
    from tfbackend.parity.tiny import (
        CANNOT_RUN,
        character_diff,
        geometry,
        make_tiny_model,
        tiny_config,
    )

    row: dict = {"model_type": model_type, "status": "fail", "reason": ""}
    if model_type in CANNOT_RUN:
        row["cannot_run"] = CANNOT_RUN[model_type]
    folder = Path(root) / model_type
    t0 = time.perf_counter()
    phase = "tiny_config"
    try:
        with quiet():
            tiny_config(model_type)  # its own phase: the shrink itself
            phase = "build + save"
            make_tiny_model(model_type, folder)
            config = AutoConfig.from_pretrained(folder)
            row["geometry"] = geometry(config)
            phase = "reload + forward"
            row.update(forward(folder, config))
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the zoo records every failure and goes on
        row["reason"] = f"{phase}: {_one_line(exc)}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    if fast:
        return row
    t0 = time.perf_counter()
    if row["status"] == "ok":
        try:
            with quiet():
                row["lost"], row["gained"] = character_diff(model_type, config)
        except Exception as exc:  # noqa: BLE001 - a default config that does not build itself
            row["character"] = f"default config does not build: {_one_line(exc)}"
    row["character_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    if (folder / "config.json").is_file():
        try:
            with quiet():
                report = check(str(folder), CheckOptions(tp=2))
            row["check"] = report.verdict.value
            row["check_errors"] = sorted(
                {f.rule_id for f in report.findings if f.severity.value == "error"}
            )
        except Exception as exc:  # noqa: BLE001 - check's own refusal (exit 2) is a verdict too
            row["check"] = f"exit 2: {_one_line(exc)}"
    row["check_s"] = round(time.perf_counter() - t0, 2)
    return row


def _worker(conn, root: str, fast: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.set_num_threads(1)
    while True:
        model_type = conn.recv()
        if model_type is None:
            return
        conn.send(zoo_one(model_type, root, fast))


class Worker:
    def __init__(self, root: str, fast: bool):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, root, fast), daemon=True)
        self.proc.start()

    def run(self, model_type: str, timeout: float) -> dict | None:
        self.conn.send(model_type)
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                return None
        return None

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model_types")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    parser.add_argument("--out", default=str(ROOT / "reports" / "tiny-zoo"))
    parser.add_argument("--keep", default=None, help="write the tiny models here, and keep them")
    parser.add_argument(
        "--fast", action="store_true", help="skip the parts comparison and check (run only)"
    )
    parser.add_argument(
        "--render", action="store_true", help="only re-render the Markdown from the JSON"
    )
    args = parser.parse_args()
    if args.render:
        data = json.loads(Path(args.out + ".json").read_text())
        Path(args.out + ".md").write_text(markdown(data["rows"], data["meta"]))
        return 0

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    archs = [(t, c) for t, c in architectures() if not only or t in only]
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tiny-zoo-") as tmp:
        root = args.keep or tmp
        worker = Worker(root, args.fast)
        try:
            for i, (model_type, cls) in enumerate(archs, 1):
                t0 = time.perf_counter()
                row = worker.run(model_type, args.timeout)
                if row is None:
                    alive = worker.proc.is_alive()
                    worker.stop()
                    why = f"timed out after {args.timeout:.0f} s" if alive else "worker died"
                    row = {"model_type": model_type, "status": "fail", "reason": why}
                    row["seconds"] = round(time.perf_counter() - t0, 2)
                    worker = Worker(root, args.fast)
                row["class"] = cls
                rows.append(row)
                print(
                    f"[{i}/{len(archs)}] {model_type}: {row['status']} {row['seconds']}s "
                    f"{row.get('check', '')} {row.get('reason', '')}"[:300],
                    file=sys.stderr,
                )
        finally:
            worker.stop()
    elapsed = time.perf_counter() - started
    if not only:
        write(rows, args.out, elapsed)
    else:
        print(json.dumps(rows, indent=1))
    return 0


def write(rows: list[dict], out: str, seconds: float) -> None:
    import torch
    import transformers

    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "prompt_tokens": PROMPT_LEN,
    }
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    Path(out + ".md").write_text(markdown(rows, meta))


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _run_cell(r: dict) -> tuple[str, str]:
    """(ok | cannot | fail, reason): a listed architecture that fails is "cannot" with its listed
    reason; one that runs after all says so."""
    if r["status"] == "ok":
        listed = r.get("cannot_run")
        return "ok", f"listed as cannot run ({listed}), but ran" if listed else ""
    if r.get("cannot_run"):
        return "cannot", f"{r['cannot_run']} ({r.get('reason', '')})"
    return "fail", r.get("reason", "")


def _geometry_cell(g: dict | None) -> str:
    if not g:
        return ""
    if not g.get("heads"):
        return "no attention"
    text = f"{g['head_dim']} / {g['heads']} / {g['kv_heads']}"
    if "mla_latent" in g:
        text += f" (MLA latent {g['mla_latent']})"
    if "layers" in g:
        text += " (per layer: " + ", ".join(str(x["head_dim"]) for x in g["layers"]) + ")"
    return text


def _check_cell(r: dict) -> str:
    check = r.get("check", "")
    if r.get("check_errors"):
        check += " (" + ", ".join(r["check_errors"]) + ")"
    return check


def _character_cell(r: dict) -> str:
    if r.get("character"):
        return r["character"]
    parts = []
    if r.get("lost"):
        parts.append("lost " + ", ".join(r["lost"]))
    if r.get("gained"):
        parts.append("gained " + ", ".join(r["gained"]))
    return "; ".join(parts) or ("same parts" if "lost" in r else "")


def markdown(rows: list[dict], meta: dict) -> str:
    runs = [_run_cell(r)[0] for r in rows]
    checks: dict[str, int] = {}
    for r in rows:
        verdict = r.get("check", "not checked").split(":")[0]
        checks[verdict] = checks.get(verdict, 0) + 1
    lines = [
        "# Tiny zoo: a tiny random-weight model of every causal-LM architecture",
        "",
        "Generated by `nice -n 10 python3 scripts/tiny_zoo.py`; do not edit by hand. Each "
        "architecture's default config (`CONFIG_MAPPING[model_type]()`) is shrunk by "
        "`tfbackend.parity.tiny.tiny_config` (hidden 128, 4 heads of 32, 2 kv heads, 2 layers "
        "or one per kind of layer, 4 experts top-2, vocab 512, float32; multimodal configs keep "
        "their outer config), written by `make_tiny_model` with spread random safetensors "
        "weights, reloaded with `AutoModelForCausalLM.from_pretrained(dir, dtype=float32)` "
        f"(every saved weight found) and run forward on {meta['prompt_tokens']} token ids "
        "(no special ids) on CPU.",
        "",
        "- *parts*: the module classes and per-layer kinds (`layer_types` and the like) of "
        "the default config's meta build against the tiny model's: *same parts*, or what the "
        "tiny model lost or gained (some default configs do not build at all: said so).",
        "- *s*: seconds to build, save, reload and run (the first model also pays the imports); "
        "*logit std*: the spread of its logits (a config's own logit scale, e.g. Cohere's "
        "1/16, keeps them narrower: near-ties are likelier there).",
        "- *head / heads / kv*: the attention geometry vLLM reads from the text config.",
        "- *check*: `tfbackend check DIR --tp 2` on the tiny folder (in-process, the CLI's own "
        "call), with its error rules; *exit 2* is check refusing the input.",
        "",
        f"transformers {meta['transformers']}, torch {meta['torch']}; {len(rows)} "
        f"architectures in {meta['seconds']} s: **{runs.count('ok')} run**, "
        f"{runs.count('cannot')} cannot run (reason given), {runs.count('fail')} failed. "
        "check at tp 2: " + ", ".join(f"{v} {n}" for v, n in sorted(checks.items())) + ".",
        "",
    ]
    cannot = [(r, _run_cell(r)[1]) for r in rows if _run_cell(r)[0] == "cannot"]
    if cannot:
        lines += ["## Cannot run", ""]
        lines += [f"- `{r['model_type']}` ({r['class']}): {why}" for r, why in cannot]
        lines.append("")
    failed = [(r, _run_cell(r)[1]) for r in rows if _run_cell(r)[0] == "fail"]
    if failed:
        lines += ["## Failed", ""]
        lines += [f"- `{r['model_type']}` ({r['class']}): {why}" for r, why in failed]
        lines.append("")
    lines += [
        "## Per architecture",
        "",
        "| model_type | class | run | params | s | logit std | head / heads / kv | check | parts |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for r, run in zip(rows, runs, strict=True):
        cells = (
            r["model_type"],
            r["class"],
            run,
            f"{r['params']:,}" if r.get("params") else "",
            r.get("seconds", ""),
            f"{r['logit_std']:.2f}" if r.get("logit_std") else "",
            _geometry_cell(r.get("geometry")),
            _check_cell(r),
            _character_cell(r),
        )
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
