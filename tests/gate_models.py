"""Tiny local models for the gate tests: configs only (check reads config.json, never weights)."""

from __future__ import annotations

from pathlib import Path

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256)


def make_models(root: Path) -> dict[str, Path]:
    """llama: passes everywhere. nemotron: no tp_plan, so tp=2 fails under the vllm-0.11 profile
    (an error there) and passes with a warning under vllm-0.32 (vLLM 0.32's real forward agrees at
    tp 2: reports/parity.md; OPT, used here before, crashes there: TFB214). mxfp4: refused by the
    backend."""
    from transformers import LlamaConfig, NemotronConfig

    llama = root / "tiny-llama"
    LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2).save_pretrained(llama)
    nemotron = root / "tiny-nemotron"
    NemotronConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2).save_pretrained(nemotron)
    mxfp4 = root / "tiny-mxfp4"
    cfg = LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2)
    cfg.quantization_config = {"quant_method": "mxfp4"}
    cfg.save_pretrained(mxfp4)
    return {"llama": llama, "nemotron": nemotron, "mxfp4": mxfp4}


MIXED_MANIFEST = """\
[[models]]
id = "tiny-llama"
tp = [1, 2]
expected = "pass"

[[models]]
id = "tiny-nemotron"         # no tp_plan: an error at tp=2 under vllm-0.11
tp = 2
vllm_version = "0.11"
expected = "pass"

[[models]]
id = "tiny-mxfp4"
expected = "fail"
run = true
"""
