"""Load a model's config the way vLLM would, without ever running a repo's code unless trusted."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from huggingface_hub.errors import StrictDataclassError

from tfbackend.errors import ConfigError, RemoteCodeError
from tfbackend.inspect.facts import SourceInfo


@dataclass
class LoadedConfig:
    config: Any  # transformers.PreTrainedConfig (the whole config)
    text_config: Any  # what the backend reads numbers from
    raw: dict[str, Any]
    custom_code_used: bool


def read_config_json(path: str) -> dict[str, Any]:
    from tfbackend.userfiles import read_text

    text = read_text(path, "config", error=ConfigError)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): fix the file"
        ) from exc
    except RecursionError:
        raise ConfigError(f"{path} nests JSON too deeply to be a config: fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return raw


# Sizes that every layer divides by or allocates with: 0 or less is no model (transformers'
# validators divide by some of them, e.g. `hidden_size % num_attention_heads`). GPT-2's names too.
_POSITIVE_SIZES = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
    "vocab_size", "head_dim", "n_embd", "n_head", "n_layer",
)  # fmt: skip


def check_sizes(raw: dict[str, Any], path: str) -> None:
    """Refuse sizes no model can have, and layer counts past MAX_LAYERS, before transformers
    builds anything (its validators would divide by zero; a huge model would take minutes)."""
    from tfbackend.limits import MAX_LAYERS

    text = raw.get("text_config")
    for where, cfg in (("", raw), ("text_config.", text if isinstance(text, dict) else {})):
        for key in _POSITIVE_SIZES:
            value = cfg.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                continue  # absent, null, or a type transformers' own validation reports
            if value < 1:
                raise ConfigError(
                    f"{path}: {where}{key} is {value}, but it must be a positive integer: fix the "
                    "config"
                )
            if key in ("num_hidden_layers", "n_layer") and value > MAX_LAYERS:
                raise ConfigError(
                    f"{path}: {where}{key} is {value}, more than the {MAX_LAYERS} layers "
                    "tfbackend checks (no real checkpoint has that many; see docs/limits.md)"
                )


def load_config(source: SourceInfo, *, trust_remote_code: bool = False) -> LoadedConfig:
    raw = read_config_json(source.config_path)
    check_sizes(raw, source.config_path)  # before transformers is even imported

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    auto_map = raw.get("auto_map") or {}
    source.has_custom_code = bool(auto_map)
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING

    if not model_type and not auto_map:
        raise ConfigError(
            f"{source.config_path} has no 'model_type': is this a transformers config.json?"
        )
    if auto_map and not known and not trust_remote_code:
        raise RemoteCodeError(
            f"{source.location} needs its own code ({', '.join(sorted(auto_map))} in auto_map) "
            "and model_type "
            f"{model_type!r} is not built into transformers: review the code, then pass "
            "--trust-remote-code"
        )
    if not known and not auto_map:
        import transformers

        raise ConfigError(
            f"unknown model_type {model_type!r} for the installed transformers "
            f"{transformers.__version__}: upgrade transformers, or check the config"
        )

    use_remote = bool(auto_map) and trust_remote_code
    where = source.config_path
    if use_remote:
        where = source.repo_id if source.kind == "hub" else source.local_dir
    try:
        if use_remote:
            config = AutoConfig.from_pretrained(
                where, trust_remote_code=True, revision=source.revision
            )
        else:
            # Built from the class transformers ships: a repo's auto_map is never imported.
            config = CONFIG_MAPPING[model_type].from_dict(_decoded(raw))
    except StrictDataclassError as exc:
        raise ConfigError(_validation_error(exc, raw, model_type, source.config_path)) from exc
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as exc:
        raise ConfigError(
            f"transformers cannot build a {model_type!r} config from {source.config_path}: "
            f"{_one_line(exc)}"
        ) from exc
    _check_built_layers(config, source.config_path)
    source.custom_code_used = use_remote
    return LoadedConfig(
        config=config,
        text_config=text_config_of(config),
        raw=raw,
        custom_code_used=use_remote,
    )


def _decoded(raw: dict[str, Any]) -> dict[str, Any]:
    """The dict as `from_pretrained` reads it: transformers saves inf/nan as
    `{"__float__": "Infinity"}` (Mamba-2's `time_step_limit`) and decodes them when it loads."""
    from transformers import PreTrainedConfig

    decode = getattr(PreTrainedConfig, "_decode_special_floats", None)
    return decode(dict(raw)) if decode else dict(raw)


def text_config_of(config: Any) -> Any:
    """The text config, as the backend reads it (`config.get_text_config()`).

    transformers raises when a composite config has several text configs (e.g. MusicGen's
    `text_encoder` and `decoder`); vLLM's backend makes the same call and fails the same way.
    """
    try:
        return config.get_text_config()
    except ValueError as exc:
        raise ConfigError(
            f"{getattr(config, 'model_type', '?')!r}: config.get_text_config() is ambiguous, so "
            f"vLLM's backend cannot pick the language model ({_one_line(exc)})"
        ) from exc


def _check_built_layers(config: Any, path: str) -> None:
    """The layer bound on the config as built (custom code, or a default the JSON left out)."""
    from tfbackend.limits import MAX_LAYERS

    layers = getattr(text_config_of(config), "num_hidden_layers", None)
    if isinstance(layers, int) and layers > MAX_LAYERS:
        raise ConfigError(
            f"{path}: num_hidden_layers is {layers}, more than the {MAX_LAYERS} layers "
            "tfbackend checks (no real checkpoint has that many; see docs/limits.md)"
        )


_FIELD = re.compile(r"field '([^']+)'")


def _validation_error(exc: Exception, raw: dict[str, Any], model_type: Any, path: str) -> str:
    """transformers' strict dataclass validation, in one line: field, value, reason, file.

    huggingface_hub's StrictDataclass*ValidationError puts the field (or validator) on the first
    line and `TypeError: reason` on the second (huggingface_hub/errors.py); the cause holds the
    reason alone."""
    reason = str(exc.__cause__ or "").strip() or " ".join(str(exc).split()[1:])
    reason = " ".join(reason.split())
    match = _FIELD.search(str(exc).splitlines()[0] if str(exc) else "")
    if match:
        key = match.group(1)
        # "Field 'hidden_size' expected int, got str (value: 'abc')": field and value are shown
        reason = re.sub(rf"^Field '{re.escape(key)}' ", "", reason)
        reason = re.sub(r" \(value: .*\)$", "", reason)
        text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
        value = raw.get(key, text.get(key, "<not set>"))
        return f"{path}: field {key!r} = {value!r} is invalid: {reason}"
    return f"{path}: transformers refuses this {model_type!r} config: {reason}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
