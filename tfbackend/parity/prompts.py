"""Parity inputs: the built-in prompt set, a user's prompt file, or fixed-seed token ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tfbackend.errors import UserError

BUILTIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1905, Albert Einstein published four papers that changed physics. The first explained",
    "Tensor parallelism splits each weight matrix across devices, so that every device holds "
    "only a slice of the model and the partial results are summed by an all-reduce. Pipeline "
    "parallelism instead gives each device a contiguous block of layers, and",
]
RANDOM_LENGTHS = (7, 19, 40)
SEED = 1234


@dataclass
class Prompt:
    name: str
    ids: list[int]
    text: str | None = None


def load_tokenizer(model_dir: str):
    """The model's own tokenizer when the folder has one, else None (never downloaded)."""
    folder = Path(model_dir)
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - a broken tokenizer falls back to token ids, said in the report
        return None


def build_prompts(
    model_dir: str,
    config,
    *,
    prompts_file: str | None = None,
    lengths: tuple[int, ...] | None = None,
    limit: int | None = None,
) -> tuple[list[Prompt], str]:
    """The prompts and a one-line description of where they came from."""
    text_config = config.get_text_config()
    vocab = text_config.vocab_size
    max_len = getattr(text_config, "max_position_embeddings", None) or 4096
    tokenizer = load_tokenizer(model_dir)
    if prompts_file:
        prompts = _from_file(prompts_file, tokenizer, vocab)
        source = f"{len(prompts)} prompt(s) from {prompts_file}"
    elif tokenizer is not None and lengths is None:
        prompts = [
            Prompt(f"p{i}", tokenizer(t)["input_ids"], t) for i, t in enumerate(BUILTIN_PROMPTS)
        ]
        source = "built-in prompts, model tokenizer"
    else:
        prompts = random_prompts(vocab, lengths or RANDOM_LENGTHS)
        source = f"fixed-seed token ids (seed {SEED})"
    window = _sliding_window(text_config)
    if window and not prompts_file and all(len(p.ids) <= window for p in prompts):
        # At least one input must cross the window, or sliding layers are never exercised.
        prompts += random_prompts(vocab, (window + 5,), name="past-window")
        source += f"; one past the sliding window ({window})"
    if limit:
        prompts = prompts[:limit]
    for p in prompts:
        p.ids = p.ids[:max_len]
    return prompts, source


def random_prompts(vocab: int, lengths, name: str = "ids") -> list[Prompt]:
    gen = torch.Generator().manual_seed(SEED + sum(lengths))
    return [
        Prompt(f"{name}{n}", torch.randint(0, vocab, (n,), generator=gen).tolist()) for n in lengths
    ]


def _sliding_window(text_config) -> int | None:
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None) or []
    if window and (not types or "sliding_attention" in types):
        return int(window)
    return None


def _from_file(path: str, tokenizer, vocab: int) -> list[Prompt]:
    """A .json file holds a list of strings or of token-id lists; any other file holds one prompt
    per non-empty line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts {path}: no such file")
    if file.suffix == ".json":
        items = json.loads(file.read_text())
        if not isinstance(items, list) or not items:
            raise UserError(f"--prompts {path}: expected a non-empty JSON list")
    else:
        items = [line for line in file.read_text().splitlines() if line.strip()]
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, list):
            if not all(isinstance(t, int) and 0 <= t < vocab for t in item) or not item:
                raise UserError(f"--prompts {path}: item {i} must be token ids in [0, {vocab})")
            prompts.append(Prompt(f"p{i}", item))
        else:
            if tokenizer is None:
                raise UserError(
                    f"--prompts {path} holds text but the model has no tokenizer: give token "
                    "ids as a JSON list of lists"
                )
            prompts.append(Prompt(f"p{i}", tokenizer(str(item))["input_ids"], str(item)))
    return prompts
