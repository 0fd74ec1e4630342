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


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "spiece.model",
)  # fmt: skip


def load_tokenizer(model_dir: str, *, trust_remote_code: bool = False):
    """(the model's own tokenizer, None) when the folder has one; else (None, why not) — why is
    None when the folder has no tokenizer at all. Never downloaded, and the repo's tokenizer code
    (an `auto_map`) is never imported unless trusted: transformers prompts "Do you wish to run
    the custom code?" only when trust_remote_code is None (dynamic_module_utils.py), so it is
    always passed."""
    folder = Path(model_dir)
    present = [n for n in TOKENIZER_FILES if (folder / n).exists()]
    if not any(n in present for n in TOKENIZER_FILES[:4]):
        return None, None
    odd = [n for n in present if not (folder / n).is_file()]
    if odd:
        return None, f"tokenizer not loaded: {odd[0]} is not a regular file"
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer falls back to token ids, said
        if not trust_remote_code and _tokenizer_needs_code(folder):
            return None, (
                "tokenizer not loaded: it needs the repo's own code (auto_map in "
                "tokenizer_config.json), which runs only with --trust-remote-code"
            )
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"tokenizer not loaded ({type(exc).__name__}: {first})"
    return tokenizer, None


def _tokenizer_needs_code(folder: Path) -> bool:
    from tfbackend.errors import UserError
    from tfbackend.userfiles import read_text

    for name in ("tokenizer_config.json", "config.json"):
        try:
            data = json.loads(read_text(folder / name, name))
        except (UserError, ValueError, RecursionError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if name == "tokenizer_config.json" and auto_map:
            return True
        if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
            return True
    return False


def build_prompts(
    model_dir: str,
    config,
    *,
    prompts_file: str | None = None,
    lengths: tuple[int, ...] | None = None,
    limit: int | None = None,
    trust_remote_code: bool = False,
) -> tuple[list[Prompt], str, list[str]]:
    """The prompts, a one-line description of where they came from, and notes for the report
    (why the model's tokenizer was not used)."""
    text_config = config.get_text_config()
    vocab = text_config.vocab_size
    max_len = getattr(text_config, "max_position_embeddings", None) or 4096
    tokenizer, why_not = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    notes = [why_not] if why_not else []
    if prompts_file:
        prompts = _from_file(prompts_file, tokenizer, vocab, why_not)
        source = f"{len(prompts)} prompt(s) from {prompts_file}"
    elif tokenizer is not None and lengths is None:
        prompts = [
            Prompt(f"p{i}", tokenizer(t)["input_ids"], t) for i, t in enumerate(BUILTIN_PROMPTS)
        ]
        source = "built-in prompts, model tokenizer"
    else:
        prompts = random_prompts(vocab, lengths or RANDOM_LENGTHS, avoid=_special_ids(config))
        source = f"fixed-seed token ids (seed {SEED})"
    window = _sliding_window(text_config)
    if window and not prompts_file and all(len(p.ids) <= window for p in prompts):
        # At least one input must cross the window, or sliding layers are never exercised.
        prompts += random_prompts(
            vocab, (window + 5,), name="past-window", avoid=_special_ids(config)
        )
        source += f"; one past the sliding window ({window})"
    if limit:
        prompts = prompts[:limit]
    for p in prompts:
        p.ids = p.ids[:max_len]
    return prompts, source, notes


def random_prompts(vocab: int, lengths, name: str = "ids", avoid=()) -> list[Prompt]:
    """Fixed-seed token ids, none of them in `avoid` (with nothing to avoid, the ids are those
    of a plain `randint(0, vocab)`)."""
    gen = torch.Generator().manual_seed(SEED + sum(lengths))
    allowed = torch.tensor([i for i in range(vocab) if i not in set(avoid)])
    return [
        Prompt(f"{name}{n}", allowed[torch.randint(0, len(allowed), (n,), generator=gen)].tolist())
        for n in lengths
    ]


def _special_ids(config) -> set[int]:
    """Ids a random prompt must not hold: a multimodal model reads an image or audio placeholder
    as a request for features it was not given, and raises."""
    from tfbackend.parity.tiny import special_token_ids

    return special_token_ids(config)


def _sliding_window(text_config) -> int | None:
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None) or []
    if window and (not types or "sliding_attention" in types):
        return int(window)
    return None


def _from_file(
    path: str, tokenizer, vocab: int, why_no_tokenizer: str | None = None
) -> list[Prompt]:
    """A .json file holds a list of strings or of token-id lists; any other file holds one prompt
    per non-empty line."""
    from tfbackend.userfiles import read_text

    file = Path(path)
    if not file.exists():
        raise UserError(f"--prompts {path}: no such file")
    text = read_text(file, "--prompts")
    if file.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"--prompts {path} is not valid JSON (line {exc.lineno}, column {exc.colno}): "
                "give a JSON list of strings or of token-id lists"
            ) from None
        except RecursionError:
            raise UserError(f"--prompts {path} nests JSON too deeply") from None
        if not isinstance(items, list) or not items:
            raise UserError(f"--prompts {path}: expected a non-empty JSON list")
    else:
        items = [line for line in text.splitlines() if line.strip()]
        if not items:
            raise UserError(f"--prompts {path} holds no prompt (no non-empty line)")
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, list):
            if not all(isinstance(t, int) and 0 <= t < vocab for t in item) or not item:
                raise UserError(f"--prompts {path}: item {i} must be token ids in [0, {vocab})")
            prompts.append(Prompt(f"p{i}", item))
        else:
            if tokenizer is None:
                why = f" ({why_no_tokenizer})" if why_no_tokenizer else ""
                raise UserError(
                    f"--prompts {path} holds text but the model has no usable tokenizer{why}: "
                    "give token ids as a JSON list of lists"
                )
            prompts.append(Prompt(f"p{i}", tokenizer(str(item))["input_ids"], str(item)))
    return prompts
