"""Load and validate a gate manifest (TOML, or YAML when PyYAML is installed).

    [defaults]                      # optional; any model key below except id/revision/run/gpus
    tp = [1, 2]

    [[models]]
    id = "examples/models/tiny-llama"   # a hub id, or a path (relative to the manifest)
    revision = "main"                   # hub branch, tag or commit
    tp = [1, 2]                         # an int or a list of ints; every tp × pp pair is checked
    pp = 1
    run = true                          # prove it on GPUs when the gate is given --run
    gpus = 2                            # GPUs the run may use (default: the largest tp × pp)
    ignore = ["TFB205"]                 # rule ids or prefixes
    expected = "pass"                   # pass | pass-with-warnings | fail
    vllm_version = "0.32"               # profile to check against (default: installed, else newest)
    strict = false                      # warnings fail the model too
    trust_remote_code = false           # allow this model's own code (auto_map); default false

Every error names the file, the line where one can be found, the model entry and the key, and exits 2.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from tfbackend.errors import UserError
from tfbackend.limits import MAX_WORLD_SIZE
from tfbackend.rules.findings import Verdict
from tfbackend.rules.registry import unknown_rule_ids


class ManifestError(UserError):
    """The gate manifest is unreadable or invalid."""


EXPECTED = {
    "pass": Verdict.PASS,
    "pass-with-warnings": Verdict.PASS_WITH_WARNINGS,
    "fail": Verdict.FAIL,
}
LABEL = {v: k for k, v in EXPECTED.items()}
TOP_KEYS = frozenset({"models", "defaults"})
DEFAULT_KEYS = frozenset(
    {"tp", "pp", "ignore", "expected", "vllm_version", "strict", "trust_remote_code"}
)
MODEL_KEYS = DEFAULT_KEYS | {"id", "revision", "run", "gpus"}
_RULE_ID = re.compile(r"^TFB\d{0,3}$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelEntry:
    id: str  # as written in the manifest: what reports show
    source: str  # what `check` resolves: a hub id, or the path made absolute
    revision: str | None
    tp: tuple[int, ...]
    pp: tuple[int, ...]
    expected: Verdict
    run: bool = False
    gpus: int | None = None
    ignore: tuple[str, ...] = ()
    vllm_version: str | None = None
    strict: bool = False
    trust_remote_code: bool = False  # the repo's own code may run (as --trust-remote-code)
    index: int = 0  # position among [[models]], from 1

    @property
    def name(self) -> str:
        """The model's key in every report and baseline (id, and revision when pinned)."""
        return f"{self.id}@{self.revision}" if self.revision else self.id

    @property
    def expected_label(self) -> str:
        """The verdict as the manifest spells it (pass, pass-with-warnings, fail)."""
        return LABEL[self.expected]

    @property
    def layouts(self) -> list[tuple[int, int]]:
        """Every (tp, pp) pair to check."""
        return list(product(self.tp, self.pp))

    @property
    def run_gpus(self) -> int:
        return self.gpus or max(tp * pp for tp, pp in self.layouts)


@dataclass
class Manifest:
    path: Path
    models: list[ModelEntry] = field(default_factory=list)


def load_manifest(path: str | Path) -> Manifest:
    from tfbackend.userfiles import read_text

    path = Path(path)
    if not path.exists():
        raise ManifestError(f"no such manifest: {path}")
    text = read_text(path, "manifest", error=ManifestError)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        data, locate = _parse_toml(path, text)
    elif suffix in (".yaml", ".yml"):
        data, locate = _parse_yaml(path, text)
    else:
        raise ManifestError(f"{path}: manifest must be a .toml, .yaml or .yml file")
    return _Validator(path, locate).manifest(data)


def select_models(manifest: Manifest, names: list[str]) -> Manifest:
    """Keep the named models (`--only`, e.g. the models a pull request changed)."""
    known = {m.name: m for m in manifest.models} | {m.id: m for m in manifest.models}
    missing = [n for n in names if n not in known]
    if missing:
        raise ManifestError(
            f"{manifest.path}: no model named {missing[0]!r} (names: "
            + ", ".join(m.name for m in manifest.models)
            + ")"
        )
    wanted = {known[n].name for n in names}
    return Manifest(manifest.path, [m for m in manifest.models if m.name in wanted])


# -- parsing: data plus a way to find the line of models[i].key ---------------------------------

Locate = Callable[[int | None, str | None], int | None]


def _parse_toml(path: Path, text: str) -> tuple[Any, Locate]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ManifestError(
                "reading a TOML manifest on Python 3.10 needs tomli: pip install tomli"
            ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: invalid TOML: {exc}") from None
    return data, _toml_locator(text)


def _toml_locator(text: str) -> Locate:
    """tomllib keeps no positions: find `[[models]]` headers and `key =` lines by scanning."""
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\[\s*models\s*\]\]")
    starts = [n for n, line in enumerate(lines) if header.match(line)]

    def locate(index: int | None, key: str | None) -> int | None:
        if index is None or index >= len(starts):
            return None
        first = starts[index]
        last = starts[index + 1] if index + 1 < len(starts) else len(lines)
        if key is not None:
            assign = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
            for n in range(first + 1, last):
                if lines[n].lstrip().startswith("["):
                    break
                if assign.match(lines[n]):
                    return n + 1
        return first + 1

    return locate


def _parse_yaml(path: Path, text: str) -> tuple[Any, Locate]:
    try:
        import yaml
    except ModuleNotFoundError:
        raise ManifestError(
            f"{path}: reading a YAML manifest needs PyYAML (pip install pyyaml); "
            "or write the manifest as TOML"
        ) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    return data, _yaml_locator(node)


def _yaml_locator(root: Any) -> Locate:
    def child(node: Any, key: str) -> tuple[Any, Any] | None:
        for k, v in getattr(node, "value", None) or []:
            if getattr(k, "value", None) == key:
                return k, v
        return None

    def locate(index: int | None, key: str | None) -> int | None:
        models = child(root, "models") if root is not None else None
        if index is None or models is None or not isinstance(models[1].value, list):
            return None
        items = models[1].value
        if index >= len(items):
            return None
        found = child(items[index], key) if key else None
        return (found[0] if found else items[index]).start_mark.line + 1

    return locate


# -- validation ---------------------------------------------------------------------------------


class _Validator:
    def __init__(self, path: Path, locate: Locate) -> None:
        self.path = path
        self.locate = locate

    def fail(self, message: str, index: int | None = None, id: Any = None, key: str | None = None):
        line = self.locate(index, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        entry = ""
        if index is not None:
            entry = f" models[{index + 1}]" + (f" (id {id!r})" if isinstance(id, str) else "")
        raise ManifestError(f"{where}:{entry} {message}")

    def manifest(self, data: Any) -> Manifest:
        if not isinstance(data, dict):
            self.fail("the manifest must be a table with a [[models]] list")
        unknown = sorted(set(data) - TOP_KEYS)
        if unknown:
            self.fail(f"unknown top-level key {unknown[0]!r} (allowed: defaults, models)")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            self.fail("'defaults' must be a table")
        bad = sorted(set(defaults) - DEFAULT_KEYS)
        if bad:
            self.fail(
                f"unknown key {bad[0]!r} in [defaults] (allowed: {', '.join(sorted(DEFAULT_KEYS))})"
            )
        models = data.get("models")
        if not isinstance(models, list) or not models:
            self.fail("no models: add at least one [[models]] entry with an id")
        entries = [self.model(i, m, defaults) for i, m in enumerate(models)]
        seen: dict[str, int] = {}
        for e in entries:
            if e.name in seen:
                self.fail(
                    f"duplicate model {e.name!r} (also models[{seen[e.name]}]): "
                    "give each entry its own id or revision",
                    e.index - 1,
                    e.id,
                    "id",
                )
            seen[e.name] = e.index
        return Manifest(path=self.path, models=entries)

    def model(self, i: int, raw: Any, defaults: dict[str, Any]) -> ModelEntry:
        if not isinstance(raw, dict):
            self.fail("each model must be a table with at least id and expected", i)
        id_ = raw.get("id")
        unknown = sorted(set(raw) - MODEL_KEYS)
        if unknown:
            self.fail(
                f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(MODEL_KEYS))})",
                i,
                id_,
                unknown[0],
            )
        if "id" not in raw:
            self.fail("missing required key 'id' (a hub id or a path to the model)", i)
        if not isinstance(id_, str) or not id_.strip():
            self.fail("key 'id' must be a non-empty string", i, None, "id")
        merged = {**defaults, **raw}

        def err(key: str, message: str):
            # a bad value inherited from [defaults] is reported where the model uses it
            self.fail(f"key {key!r}: {message}", i, id_, key if key in raw else None)

        if "expected" not in merged:
            self.fail(
                "missing required key 'expected' (pass, pass-with-warnings or fail; "
                "set it on the model or in [defaults])",
                i,
                id_,
            )
        expected = _expected(merged["expected"], err)
        revision = merged.get("revision")
        if revision is not None and (not isinstance(revision, str) or not revision):
            err("revision", "must be a branch, tag or commit string")
        tp = _sizes("tp", merged.get("tp", 1), err)
        pp = _sizes("pp", merged.get("pp", 1), err)
        if max(tp) * max(pp) > MAX_WORLD_SIZE:
            err(
                "pp" if "pp" in raw else "tp",
                f"tp {max(tp)} × pp {max(pp)} is more than {MAX_WORLD_SIZE} ranks "
                "(tfbackend's bound on the world size)",
            )
        run = merged.get("run", False)
        if not isinstance(run, bool):
            err("run", f"must be true or false, got {run!r}")
        gpus = merged.get("gpus")
        if gpus is not None:
            if not _positive_int(gpus):
                err("gpus", f"must be a positive integer, got {gpus!r}")
            need = min(t * p for t, p in product(tp, pp))
            if gpus < need:
                err("gpus", f"{gpus} is fewer than the smallest tp × pp to run ({need})")
        ignore = merged.get("ignore", [])
        if isinstance(ignore, str):
            ignore = [ignore]
        if not isinstance(ignore, list) or not all(
            isinstance(r, str) and _RULE_ID.match(r.strip()) for r in ignore
        ):
            err("ignore", f"must be a list of rule ids or prefixes like 'TFB205', got {ignore!r}")
        unknown = unknown_rule_ids(ignore)
        if unknown:
            err("ignore", f"{unknown[0]!r} names no rule (see `tfbackend rules`)")
        vllm_version = merged.get("vllm_version")
        if vllm_version is not None and not isinstance(vllm_version, str):
            err("vllm_version", f"must be a string such as '0.32', got {vllm_version!r}")
        strict = merged.get("strict", False)
        if not isinstance(strict, bool):
            err("strict", f"must be true or false, got {strict!r}")
        trust = merged.get("trust_remote_code", False)
        if not isinstance(trust, bool):
            err("trust_remote_code", f"must be true or false, got {trust!r}")
        return ModelEntry(
            id=id_,
            source=_source(id_, self.path.parent),
            revision=revision,
            tp=tp,
            pp=pp,
            expected=expected,
            run=run,
            gpus=gpus,
            ignore=tuple(r.strip().upper() for r in ignore),
            vllm_version=vllm_version,
            strict=strict,
            trust_remote_code=trust,
            index=i + 1,
        )


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _sizes(key: str, value: Any, err) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(_positive_int(v) for v in values):
        err(key, f"must be a positive integer or a list of them, got {value!r}")
    if max(values) > MAX_WORLD_SIZE:
        err(
            key,
            f"{max(values)} is more than {MAX_WORLD_SIZE} (tfbackend's bound on the world size)",
        )
    return tuple(dict.fromkeys(values))  # keep order, drop repeats


def _expected(value: Any, err) -> Verdict:
    norm = str(value).strip().lower().replace("_", "-").replace(" ", "-")
    if not isinstance(value, str) or norm not in EXPECTED:
        err("expected", f"must be one of {', '.join(EXPECTED)}, got {value!r}")
    return EXPECTED[norm]


def _source(id_: str, base: Path) -> str:
    """Paths in a manifest are relative to the manifest, so CI can run it from any folder."""
    p = Path(id_).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base / p
    if id_.startswith((".", "~")) or candidate.exists():
        return str(candidate.resolve())
    return id_
