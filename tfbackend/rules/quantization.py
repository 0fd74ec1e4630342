"""TFB6xx: quantization methods."""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

from tfbackend.rules.findings import Severity
from tfbackend.rules.registry import rule

# vLLM 0.32.0's QUANTIZATION_METHODS, for when vLLM is not installed to read it from.
KNOWN_METHODS = frozenset(
    {
        "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4",
        "modelopt_mxfp8", "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin",
        "humming", "compressed-tensors", "experts_int8", "quark", "moe_wna16", "torchao", "inc",
        "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8", "online", "fp8_per_tensor",
        "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only", "nvfp4_per_token",
        "mxfp8",
    }
)  # fmt: skip


@functools.cache
def installed_methods() -> frozenset[str] | None:
    """QUANTIZATION_METHODS of the installed vLLM, read from its source text.

    Importing vLLM costs seconds and initialises its platform; the list is a `Literal[...]` in
    one file, so parsing that file answers in milliseconds. None when vLLM is not installed or
    the file no longer has that shape.
    """
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)))
    path = path / "model_executor" / "layers" / "quantization" / "__init__.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and node.targets else None
        if isinstance(target, ast.Name) and target.id == "QuantizationMethods":
            sub = node.value
            if isinstance(sub, ast.Subscript):
                elts = sub.slice.elts if isinstance(sub.slice, ast.Tuple) else [sub.slice]
                names = [e.value for e in elts if isinstance(e, ast.Constant)]
                return frozenset(n for n in names if isinstance(n, str)) or None
    return None


def known_methods() -> frozenset[str]:
    return installed_methods() or KNOWN_METHODS


def quant_method(ctx) -> str | None:
    q = ctx.facts.config.quantization
    if not q:
        return None
    method = q.get("quant_method") or q.get("quantization_method") or q.get("method")
    return str(method).lower() if method else "unknown"


@rule(
    "TFB601",
    "Quantization method refused by the backend",
    Severity.ERROR,
    rationale="""
The backend raises `NotImplementedError: Transformers modeling backend does not support MXFP4
quantization yet` for mxfp4 (and, in 0.32+, gpt_oss_mxfp4) checkpoints.
""",
    fix="use a bf16 or differently quantized checkpoint, or vLLM's native implementation",
)
def refused_quant(ctx, r):
    method = quant_method(ctx)
    if method and method in ctx.profile.refused_quant:
        yield r.finding(f"quant_method {method!r} is refused by {ctx.profile.name}", method=method)


def _modelopt(q: dict) -> bool:
    """A ModelOpt config, which vLLM names itself from `quant_algo` (model_arch_config_convertor)."""
    producer = q.get("producer")
    legacy = q.get("quantization")
    return (isinstance(producer, dict) and producer.get("name") == "modelopt") or (
        isinstance(legacy, dict) and "modelopt_quant_config" in legacy
    )


@rule(
    "TFB602",
    "Quantization method missing or unknown to vLLM",
    Severity.ERROR,
    rationale="""
vLLM reads the method from `quantization_config["quant_method"]` and passes the quant config to
every replaced layer by that name. A method vLLM does not list
(`vllm.model_executor.layers.quantization.QUANTIZATION_METHODS`) fails at start-up with
`ValueError: Unknown quantization method`. A config without `quant_method` is read as `""`:
unless one of vLLM's override detectors recognises the config, the model is built unquantized
and its quantized weights do not load (vllm/config/model.py `_verify_quantization`,
vllm/transformers_utils/model_arch_config_convertor.py).
""",
    fix="name the method in quantization_config's quant_method, or requantize with a supported "
    "method",
)
def unknown_quant(ctx, r):
    q = ctx.facts.config.quantization
    if q and not q.get("quant_method") and not _modelopt(q):
        yield r.finding(
            "quantization_config has no quant_method: vLLM does not know how to load it",
            method=None,
        )
        return
    method = quant_method(ctx)
    if not method or method in ctx.profile.refused_quant or method in ctx.profile.plugin_quant:
        return
    older_builtin = method in ("bitsandbytes", "gguf")  # built in before 0.32 made them plugins
    if method not in known_methods() and not older_builtin:
        yield r.finding(f"quant_method {method!r} is not a vLLM quantization method", method=method)


@rule(
    "TFB603",
    "Quantization method provided only by a plugin",
    Severity.WARNING,
    rationale="""
vLLM 0.32's QUANTIZATION_METHODS no longer lists bitsandbytes or gguf: an out-of-tree plugin
must register them (`register_quantization_config`) before vLLM can load the checkpoint.
""",
    fix="install the plugin that provides the method, or use a checkpoint quantized with a "
    "built-in method",
)
def plugin_quant(ctx, r):
    method = quant_method(ctx)
    if method and method in ctx.profile.plugin_quant:
        yield r.finding(
            f"quant_method {method!r} is not built into {ctx.profile.name}: it needs a plugin",
            method=method,
        )


_GPTQ = ("gptq", "auto_gptq", "gptq_marlin")


@rule(
    "TFB604",
    "GPTQ checkpoint biases",
    Severity.INFO,
    rationale="""
GPTQ tools save a `.bias` tensor for every quantized linear, even linears that have none.
Seed-era vLLM told the backend's loader to ignore unexpected `.bias` weights for GPTQ
checkpoints; vLLM 0.32's backend no longer does, so a GPTQ checkpoint of a model whose linears
have no bias may carry weights the loader does not expect.
""",
    fix="if loading fails on unexpected '.bias' weights, strip them from the checkpoint",
)
def gptq_bias(ctx, r):
    method = quant_method(ctx)
    if method not in _GPTQ:
        return
    bias_free = not any(m.attrs.get("bias") for m in ctx.facts.modules if m.kind == "linear")
    if ctx.profile.gptq_bias_ignored:
        yield r.finding(f"{method}: {ctx.profile.name} ignores the checkpoint's .bias tensors")
    elif bias_free:
        yield r.finding(
            f"{method} checkpoint of a model whose linears have no bias: {ctx.profile.name} "
            "does not skip stray .bias tensors",
            severity=Severity.WARNING,
        )


_EXCLUDE_KEYS = ("modules_to_not_convert", "ignore", "ignored_layers", "exclude_modules")


def _excluded(q: dict) -> tuple[str | None, list[str]]:
    for key in _EXCLUDE_KEYS:
        value = q.get(key)
        if isinstance(value, list) and value:
            return key, [str(v) for v in value]
    return None, []


def _covers(pattern: str, qualname: str) -> bool:
    import re

    if pattern.startswith("re:"):
        return re.match(pattern[3:], qualname) is not None
    return pattern == qualname or qualname.startswith(pattern + ".") or pattern in qualname


@rule(
    "TFB605",
    "Modules excluded from quantization",
    Severity.INFO,
    rationale="""
A quantization config may keep modules in full precision (`modules_to_not_convert`, `ignore`,
`ignored_layers`, `exclude_modules`). vLLM passes each replaced layer its qualname so the method
can skip it. When vLLM fuses several projections into one layer (q/k/v, gate/up), all of them
must be skipped or none: otherwise vLLM raises "some but not all shards ... are quantized".
""",
    fix="exclude every projection of a fused group together",
)
def excluded_modules(ctx, r):
    q = ctx.facts.config.quantization
    if not q:
        return
    key, patterns = _excluded(q)
    if not patterns:
        return
    linears = [m.qualname for m in ctx.facts.modules if m.kind == "linear"]
    covered = [n for n in linears if any(_covers(p, n) for p in patterns)]
    for e in ctx.plan.entries:
        if len(e.sources) > 1:
            skipped = [s for s in e.sources if s in covered]
            if skipped and len(skipped) != len(e.sources):
                yield r.finding(
                    f"{key} skips {', '.join(skipped)} but not the rest of fused {e.qualname}: "
                    "vLLM raises at start-up",
                    severity=Severity.ERROR,
                    modules=e.sources,
                )
                return
    yield r.finding(
        f"{key} keeps {len(covered)} linear(s) in full precision "
        f"({len(patterns)} pattern(s): {', '.join(patterns[:4])}{' …' if len(patterns) > 4 else ''})",
        modules=covered[:16],
        patterns=patterns,
    )


@rule(
    "TFB606",
    "Quantized KV cache in the checkpoint",
    Severity.INFO,
    rationale="""
compressed-tensors (`kv_cache_scheme`) and ModelOpt (`kv_cache_quant_algo`) checkpoints can
carry KV-cache scales. vLLM uses them only when started with a matching `--kv-cache-dtype`
(e.g. fp8); otherwise the cache stays in the model dtype and the scales are ignored.
""",
    fix="serve with --kv-cache-dtype fp8 to use the checkpoint's KV-cache scales",
)
def kv_cache_dtype(ctx, r):
    q = ctx.facts.config.quantization or {}
    scheme = q.get("kv_cache_scheme") or q.get("kv_cache_quant_algo")
    if not scheme and isinstance(q.get("quantization"), dict):
        scheme = q["quantization"].get("kv_cache_quant_algo")
    if scheme:
        shown = scheme if isinstance(scheme, str) else "a kv_cache_scheme"
        yield r.finding(f"the checkpoint quantizes the KV cache ({shown})")
