"""Tiny local models for the gate tests: configs only (check reads config.json, never weights)."""

from __future__ import annotations

from pathlib import Path

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256)


def make_models(root: Path) -> dict[str, Path]:
    """llama: passes everywhere. gpt2: no tp_plan, so tp=2 fails under the vllm-0.11 profile (an
    error there) and passes with a warning under vllm-0.32. mxfp4: refused by the backend."""
    from transformers import GPT2Config, LlamaConfig

    llama = root / "tiny-llama"
    LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2).save_pretrained(llama)
    gpt2 = root / "tiny-gpt2"
    GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=256,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    ).save_pretrained(gpt2)
    mxfp4 = root / "tiny-mxfp4"
    cfg = LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2)
    cfg.quantization_config = {"quant_method": "mxfp4"}
    cfg.save_pretrained(mxfp4)
    return {"llama": llama, "gpt2": gpt2, "mxfp4": mxfp4}


MIXED_MANIFEST = """\
[[models]]
id = "tiny-llama"
tp = [1, 2]
expected = "pass"

[[models]]
id = "tiny-gpt2"              # no tp_plan: an error at tp=2 under vllm-0.11
tp = 2
vllm_version = "0.11"
expected = "pass"

[[models]]
id = "tiny-mxfp4"
expected = "fail"
run = true
"""
