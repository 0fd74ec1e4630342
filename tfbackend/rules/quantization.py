"""TFB6xx: quantization methods."""

from __future__ import annotations

from tfbackend.report.findings import Severity
from tfbackend.rules.registry import rule

# vLLM's QUANTIZATION_METHODS (0.32), for when vLLM is not installed to ask.
KNOWN_METHODS = frozenset(
    {
        "awq",
        "awq_marlin",
        "bitblas",
        "bitsandbytes",
        "compressed-tensors",
        "compressed_tensors",
        "deepspeedfp",
        "experts_int8",
        "fbgemm_fp8",
        "fp8",
        "fp_quant",
        "gguf",
        "gptq",
        "gptq_bitblas",
        "gptq_marlin",
        "gptq_marlin_24",
        "hqq",
        "inc",
        "ipex",
        "marlin",
        "modelopt",
        "modelopt_fp4",
        "moe_wna16",
        "mxfp4",
        "gpt_oss_mxfp4",
        "petit_nvfp4",
        "ptpc_fp8",
        "quark",
        "rtn",
        "torchao",
        "tpu_int8",
        "auto-round",
        "auto_round",
        "awq_triton",
        "bitnet",
        "mxfp8",
        "petit",
        "fp8_pb_wo",
    }
)


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


@rule(
    "TFB602",
    "Quantization method unknown to vLLM",
    Severity.WARNING,
    rationale="""
vLLM passes the quant config to every replaced layer by method name. A method vLLM does not list
(`vllm.model_executor.layers.quantization.QUANTIZATION_METHODS`) fails at start-up.
""",
    fix="check the method name in quantization_config, or requantize with a supported method",
)
def unknown_quant(ctx, r):
    method = quant_method(ctx)
    if not method or method in ctx.profile.refused_quant:
        return
    known = KNOWN_METHODS
    if method not in known:
        yield r.finding(f"quant_method {method!r} is not a vLLM quantization method", method=method)
