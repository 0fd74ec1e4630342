"""Checkpoint names → model parameters, the way vLLM's Transformers backend will load them.

Mirrors vLLM 0.32 `transformers/base.py::_create_hf_to_vllm_mapper` and `AutoWeightsLoader`:
transformers' own `WeightRenaming`s (its `WeightConverter`s are not applied by the backend: the
FusedMoE expert mapping takes per-expert tensors instead), `_keys_to_ignore_on_load_unexpected`,
base-model-prefix normalisation, a nested `lm_head`, rotary caches dropped, unexpected `.bias`
ignored (GPTQ), MTP layers beyond `num_hidden_layers` ignored, and the tied `lm_head` skipped.
Per-expert tensors (`gate_proj/up_proj/down_proj`, `w1/w3/w2`, `linear/linear_v/linear_1`) are
pieces of transformers 5's 3-D experts (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any

from tfbackend.inspect.checkpoint import FLOAT_DTYPES, FORMAT_SAFETENSORS, CheckpointHeaders
from tfbackend.inspect.facts import EXPERTS, MODULE_LIST, ModelFacts

# Loaded, or why not.
LOADED = "loaded"
IGNORED = "ignored"  # the loader drops it on purpose
UNEXPECTED = "unexpected"  # the loader raises "There is no module or parameter named …"

# vLLM's AutoWeightsLoader.REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER
ROTARY_SUBSTRINGS = (
    "rotary_pos_emb.inv_freq",
    "rotary_emb.inv_freq",
    "rotary_emb.cos_cached",
    "rotary_emb.sin_cached",
)
# TransformersRoutedExperts.get_expert_mapping (0.32) and the seed's Grok-1 names.
GATE_NAMES = ("gate_proj", "w1", "linear")
UP_NAMES = ("up_proj", "w3", "linear_v")
DOWN_NAMES = ("down_proj", "w2", "linear_1")
_PER_EXPERT = re.compile(
    r"^(?P<experts>.+\.experts)\.(?P<idx>\d+)\.(?P<proj>"
    + "|".join(GATE_NAMES + UP_NAMES + DOWN_NAMES)
    + r")\.weight$"
)
# Config attributes vLLM 0.32 reads for the number of MTP layers it skips.
MTP_ATTRS = ("n_predict", "num_nextn_predict_layers", "mtp_num_hidden_layers")

# safetensors dtype spelling ↔ torch/config spelling
TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
SAFETENSORS_DTYPE = {v: k for k, v in TORCH_DTYPE.items()}


@dataclass
class LoaderNaming:
    """What the backend's loader knows about names, for one model."""

    base_model_prefix: str
    direct_children: list[str]
    ignore_regexes: list[str] = field(default_factory=list)  # _keys_to_ignore_on_load_unexpected
    ignore_prefixes: list[str] = field(default_factory=list)  # MTP layers
    renamings: list[Any] = field(default_factory=list)  # transformers WeightRenaming objects
    tied_lm_head: bool = False
    notes: list[str] = field(default_factory=list)

    def regex_rules(self) -> list[tuple[re.Pattern, str | None, str]]:
        """(pattern, replacement or None to drop, why) in the order vLLM applies them."""
        rules: list[tuple[re.Pattern, str | None, str]] = [
            (re.compile(key), None, "in _keys_to_ignore_on_load_unexpected")
            for key in self.ignore_regexes
        ]
        bmp = self.base_model_prefix
        if bmp and bmp != "model":
            rules.append((re.compile(rf"^{bmp}\.(.+)"), r"model.\1", "base model prefix"))
        children = "|".join(self.direct_children)
        rules.append((re.compile(rf"^(?!model\.)(({children}).*)"), r"model.\1", "no prefix"))
        rules.append((re.compile(rf"^(model\.)((?!{children}).+)"), r"\2", "not in base model"))
        rules.append((re.compile(r"^model\.(.+\.)*(lm_head.+)"), r"\2", "nested lm_head"))
        return rules


@dataclass
class TensorMatch:
    """One checkpoint tensor and where the loader puts it."""

    checkpoint_name: str
    status: str
    target: str | None = None  # model parameter (names as in facts: "model.…", "lm_head.weight")
    reason: str = ""
    expert: int | None = None
    shard: str | None = None  # "w1" gate, "w3" up, "w2" down (a slice of a 3-D experts tensor)


@dataclass
class ShapeMismatch:
    checkpoint_name: str
    target: str
    checkpoint_shape: list[int]
    expected_shape: list[int]


@dataclass
class CheckpointComparison:
    """The checkpoint's tensors against the parameters the wrapped model asks for."""

    headers: CheckpointHeaders
    compared: bool = True  # False: no safetensors headers to compare (pickle-only, none, offline)
    loaded: int = 0
    renamed: int = 0  # loaded under another name than the checkpoint's
    experts_merged: int = 0  # per-expert tensors that fill a 3-D experts parameter
    ignored: list[TensorMatch] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    # missing parameters whose tensor is in the checkpoint but dropped by the loader → why
    dropped_but_needed: dict[str, str] = field(default_factory=dict)
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)
    tied_lm_head: bool = False
    lm_head_in_checkpoint: bool = False
    checkpoint_dtype: str | None = None  # the float dtype holding most bytes (torch spelling)
    config_dtype: str | None = None
    served_dtype: str = "bfloat16"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "headers": self.headers.to_dict(),
            "compared": self.compared,
            "loaded": self.loaded,
            "renamed": self.renamed,
            "experts_merged": self.experts_merged,
            "ignored": [asdict(m) for m in self.ignored],
            "unexpected": list(self.unexpected),
            "missing": list(self.missing),
            "dropped_but_needed": dict(self.dropped_but_needed),
            "shape_mismatches": [asdict(m) for m in self.shape_mismatches],
            "tied_lm_head": self.tied_lm_head,
            "lm_head_in_checkpoint": self.lm_head_in_checkpoint,
            "checkpoint_dtype": self.checkpoint_dtype,
            "config_dtype": self.config_dtype,
            "served_dtype": self.served_dtype,
            "notes": list(self.notes),
        }


def _model_class(facts: ModelFacts):
    if facts.custom_code_modules or facts.source.custom_code_used:
        return None
    try:
        import transformers

        return getattr(transformers, facts.model_class, None)
    except ImportError:  # pragma: no cover
        return None


def raw_text_config(facts: ModelFacts) -> dict[str, Any]:
    from tfbackend.errors import UserError
    from tfbackend.inspect.config import read_config_json

    try:
        raw = read_config_json(facts.source.config_path)
    except UserError:  # an in-memory config (tests, the sweep): no file to read
        return {}
    text = raw.get("text_config")
    return {**raw, **text} if isinstance(text, dict) else raw


def _renamings(facts: ModelFacts, model_class) -> list[Any]:
    """transformers' WeightRenamings for the base model and its architectures (as vLLM 0.32)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    if model_class is None:  # custom code: transformers does not convert it either
        return []
    mappings = get_checkpoint_conversion_mapping(facts.model_class)
    if mappings is None:
        mappings = get_checkpoint_conversion_mapping(facts.config.model_type) or []
    for arch in facts.config.architectures or []:
        if arch != facts.model_class:
            mappings.extend(get_checkpoint_conversion_mapping(arch) or [])
    mappings.extend(get_checkpoint_conversion_mapping("legacy") or [])
    return [m for m in mappings if isinstance(m, WeightRenaming)]


def loader_naming(facts: ModelFacts) -> LoaderNaming:
    cls = _model_class(facts)
    notes = []
    if cls is None:
        notes.append(
            f"{facts.model_class} is not a transformers class: base prefix 'model' assumed"
        )
    children = []
    for m in facts.modules:
        if m.qualname == "model":
            # the base model's own tensors are direct children too (vLLM joins
            # named_children with named_parameters/named_buffers(recurse=False))
            children.extend(n for n in {**m.params, **m.buffers} if n not in children)
            continue
        name = m.qualname.removeprefix("model.")
        if "." not in name and name not in children:
            children.append(name)
    ignore_prefixes = []
    num_layers = facts.config.num_hidden_layers or 0
    raw = raw_text_config(facts)
    n_predict = next((int(raw[a]) for a in MTP_ATTRS if isinstance(raw.get(a), int)), 0)
    for m in facts.modules:
        if m.kind == MODULE_LIST and m.attrs.get("length") == num_layers:
            ignore_prefixes += [
                f"{m.qualname}.{i}." for i in range(num_layers, num_layers + n_predict)
            ]
    return LoaderNaming(
        base_model_prefix=getattr(cls, "base_model_prefix", "model") if cls else "model",
        direct_children=children,
        ignore_regexes=list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []),
        ignore_prefixes=ignore_prefixes,
        renamings=_renamings(facts, cls),
        tied_lm_head=facts.config.tie_word_embeddings,
        notes=notes,
    )


def backend_name(key: str, naming: LoaderNaming) -> tuple[str | None, str]:
    """The name the loader looks up for checkpoint `key` (None: dropped), and why it changed."""
    why = []
    for renaming in naming.renamings:
        new, matched = renaming.rename_source_key(key)
        if matched is not None and new != key:
            why.append("transformers rename")
            key = new
    for pattern, new, reason in naming.regex_rules():
        if pattern.search(key):
            if new is None:
                return None, reason
            renamed = pattern.sub(new, key)
            if renamed != key:
                why.append(reason)
            key = renamed
    for sub in ROTARY_SUBSTRINGS:
        if sub in key:
            return None, f"rotary cache ({sub}) is recomputed, never loaded"
    return key, ", ".join(why)


@dataclass
class _ExpertsParams:
    """A 3-D experts module: which parameter takes gate/up and which down, and the piece shapes."""

    qualname: str
    num_experts: int
    gate_up: str | None  # e.g. "gate_up_proj" (gated) …
    up: str | None  # … or "up_proj" (not gated)
    down: str | None
    piece_in: list[int]  # [I, H]: a per-expert gate or up weight
    piece_out: list[int]  # [H, I]: a per-expert down weight


def expected_parameters(facts: ModelFacts) -> dict[str, list[int]]:
    """Every parameter the wrapped model asks the checkpoint for, with its full shape."""
    out: dict[str, list[int]] = {}
    for m in facts.modules:
        if m.kind == EXPERTS and m.attrs.get("layout") == "module_list":
            for e in range(m.attrs.get("count") or 0):
                for n, s in m.params.items():
                    out[f"{m.qualname}.{e}.{n}"] = list(s)
            continue
        for n, s in m.params.items():
            out[f"{m.qualname}.{n}"] = list(s)
    cfg = facts.config
    if not cfg.tie_word_embeddings and cfg.vocab_size and cfg.hidden_size:
        out["lm_head.weight"] = [cfg.vocab_size, cfg.hidden_size]
    return out


def loadable_buffers(facts: ModelFacts) -> dict[str, list[int]]:
    """Persistent buffers a checkpoint tensor may fill (vLLM loads them; none is required)."""
    return {f"{m.qualname}.{n}": list(s) for m in facts.modules for n, s in m.buffers.items()}


def _experts_params(facts: ModelFacts) -> dict[str, _ExpertsParams]:
    hidden = facts.config.hidden_size or 0
    out = {}
    for m in facts.modules:
        if m.kind != EXPERTS or m.attrs.get("layout") != "fused_3d":
            continue
        names = [n for n, s in m.params.items() if len(s) == 3]
        gate_up = next((n for n in names if "gate_up" in n and "bias" not in n), None)
        up = None if gate_up else next((n for n in names if "up" in n and "bias" not in n), None)
        down = next((n for n in names if "down" in n and "bias" not in n), None)
        inter = facts.config.moe.intermediate_size
        if down and not inter:
            s = m.params[down]
            inter = s[2] if s[1] == hidden else s[1]
        inter = inter or 0
        out[m.qualname] = _ExpertsParams(
            qualname=m.qualname,
            num_experts=m.attrs.get("count") or 0,
            gate_up=gate_up,
            up=up,
            down=down,
            piece_in=[inter, hidden],
            piece_out=[hidden, inter],
        )
    return out


def _expert_piece(name: str, experts: dict[str, _ExpertsParams]):
    m = _PER_EXPERT.match(name)
    if not m or m.group("experts") not in experts:
        return None
    ex = experts[m.group("experts")]
    proj, idx = m.group("proj"), int(m.group("idx"))
    if proj in DOWN_NAMES and ex.down:
        return ex, f"{ex.qualname}.{ex.down}", idx, "w2", ex.piece_out
    if proj in GATE_NAMES and ex.gate_up:
        return ex, f"{ex.qualname}.{ex.gate_up}", idx, "w1", ex.piece_in
    if proj in UP_NAMES and (ex.gate_up or ex.up):
        target = f"{ex.qualname}.{ex.gate_up or ex.up}"
        return ex, target, idx, "w3" if ex.gate_up else "w1", ex.piece_in
    return None


def _dominant_float_dtype(headers: CheckpointHeaders) -> str | None:
    for dtype in headers.bytes_by_dtype():
        if dtype in FLOAT_DTYPES:
            return TORCH_DTYPE.get(dtype, dtype.lower())
    return None


def compare_checkpoint(
    headers: CheckpointHeaders, facts: ModelFacts, *, served_dtype: str = "bfloat16"
) -> CheckpointComparison:
    """Map every checkpoint tensor onto the model; list what is missing, extra or misshapen."""
    naming = loader_naming(facts)
    expected = expected_parameters(facts)
    buffers = loadable_buffers(facts)
    experts = _experts_params(facts)
    result = CheckpointComparison(
        headers=headers,
        tied_lm_head=facts.config.tie_word_embeddings,
        config_dtype=facts.config.dtype,
        served_dtype=served_dtype,
        checkpoint_dtype=_dominant_float_dtype(headers),
        notes=list(naming.notes),
    )
    if headers.format != FORMAT_SAFETENSORS:
        result.compared = False
        return result
    seen: set[str] = set()
    pieces: dict[str, set[tuple[int, str]]] = {}
    for name, tensor in headers.tensors.items():
        match = _match(name, naming, expected, experts, buffers)
        if match.status == IGNORED:
            result.ignored.append(match)
            continue
        if match.status == UNEXPECTED:
            result.unexpected.append(name)
            continue
        result.loaded += 1
        target = match.target or name
        if target == "lm_head.weight":
            result.lm_head_in_checkpoint = True
        if match.expert is not None:
            result.experts_merged += 1
            pieces.setdefault(target, set()).add((match.expert, match.shard or ""))
            want = _piece_shape(experts, target, match.shard)
        else:
            if target != name:
                result.renamed += 1
            seen.add(target)
            want = expected.get(target, buffers.get(target))
        if want is not None and list(tensor.shape) != list(want):
            result.shape_mismatches.append(ShapeMismatch(name, target, list(tensor.shape), want))
    dropped = {m.target: m for m in result.ignored if m.target}
    for target in expected:
        if target in seen:
            continue
        need = _needed_pieces(experts, target)
        if need is None:
            result.missing.append(target)
            if target in dropped:
                result.dropped_but_needed[target] = dropped[target].reason
            continue
        have = pieces.get(target, set())
        if not have:
            result.missing.append(target)
        elif need - have:
            gaps = sorted(need - have)
            shown = ", ".join(f"expert {e} {s}" for e, s in gaps[:4])
            more = f" (+{len(gaps) - 4} more)" if len(gaps) > 4 else ""
            result.missing.append(f"{target} [{shown}{more}]")
    return result


def match_tensors(headers: CheckpointHeaders, facts: ModelFacts) -> list[TensorMatch]:
    """Where the loader puts each checkpoint tensor (`convert` writes them under those names)."""
    naming = loader_naming(facts)
    expected = expected_parameters(facts)
    buffers = loadable_buffers(facts)
    experts = _experts_params(facts)
    return [_match(name, naming, expected, experts, buffers) for name in headers.tensors]


def _match(name, naming: LoaderNaming, expected, experts, buffers=None) -> TensorMatch:
    if naming.tied_lm_head and re.search(r"(^|\.)lm_head\.weight$", name):
        return TensorMatch(name, IGNORED, "lm_head.weight", "tied to the input embedding: skipped")
    target, why = backend_name(name, naming)
    if target is None:
        # Say which parameter it would have filled: vLLM applies the ignore patterns to every
        # key (transformers only to unexpected ones), so they can drop a needed tensor.
        unignored = LoaderNaming(**{**naming.__dict__, "ignore_regexes": []})
        would_be, _ = backend_name(name, unignored)
        return TensorMatch(name, IGNORED, would_be if would_be in expected else None, why)
    if target in expected or target == "lm_head.bias":
        return TensorMatch(name, LOADED, target, why)
    if buffers and target in buffers:
        return TensorMatch(name, LOADED, target, why or "persistent buffer")
    piece = _expert_piece(target, experts)
    if piece is not None:
        _, param, idx, shard, _ = piece
        return TensorMatch(name, LOADED, param, "per-expert tensor", expert=idx, shard=shard)
    for prefix in naming.ignore_prefixes:
        if target.startswith(prefix):
            return TensorMatch(name, IGNORED, target, "MTP layer beyond num_hidden_layers")
    if target.endswith(".bias"):
        return TensorMatch(name, IGNORED, target, "unexpected bias ignored (GPTQ checkpoints)")
    return TensorMatch(name, UNEXPECTED, target, why)


def _piece_shape(experts: dict[str, _ExpertsParams], target: str, shard: str | None):
    ex = experts.get(target.rsplit(".", 1)[0])
    if ex is None:
        return None
    return ex.piece_out if shard == "w2" else ex.piece_in


def _needed_pieces(experts: dict[str, _ExpertsParams], target: str) -> set[tuple[int, str]] | None:
    qualname, param = target.rsplit(".", 1)
    ex = experts.get(qualname)
    if ex is None or param not in (ex.gate_up, ex.up, ex.down):
        return None
    if param == ex.down:
        shards = ("w2",)
    elif param == ex.gate_up:
        shards = ("w1", "w3")
    else:
        shards = ("w1",)
    return set(chain.from_iterable(((e, s) for s in shards) for e in range(ex.num_experts)))
