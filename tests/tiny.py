"""Tiny real transformers configs for the plan and CLI tests.

Built on the factories in `_rules_support` (one place for tiny shapes), with 4 layers and a
512-token vocab so pipeline splits and vocab padding have something to split.
"""

from __future__ import annotations

from pathlib import Path

from tests import _rules_support as base
from tests._rules_support import facts  # noqa: F401  (re-exported for the tests)

WIDER = dict(num_hidden_layers=4, vocab_size=512, max_position_embeddings=256)


def llama(**kw):
    return base.llama(**{**WIDER, "architectures": ["LlamaForCausalLM"], **kw})


def gemma3_text(**kw):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **{
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            **WIDER,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "sliding_window": 16,
            "architectures": ["Gemma3ForCausalLM"],
            **kw,
        }
    )


def qwen3_moe(**kw):
    return base.qwen3_moe(**{"vocab_size": 512, "architectures": ["Qwen3MoeForCausalLM"], **kw})


def mixtral(**kw):
    from transformers import MixtralConfig

    return MixtralConfig(
        **{
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "vocab_size": 512,
            "architectures": ["MixtralForCausalLM"],
            **kw,
        }
    )


def gpt2(**kw):
    return base.gpt2(**{"vocab_size": 512, "architectures": ["GPT2LMHeadModel"], **kw})


def save(config, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    return folder
