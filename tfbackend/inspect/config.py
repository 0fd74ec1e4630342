"""Load a model's config the way vLLM would, without ever running a repo's code unless trusted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfbackend.errors import ConfigError, RemoteCodeError
from tfbackend.inspect.facts import SourceInfo


@dataclass
class LoadedConfig:
    config: Any  # transformers.PreTrainedConfig (the whole config)
    text_config: Any  # what the backend reads numbers from
    raw: dict[str, Any]
    custom_code_used: bool


def read_config_json(path: str) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}): fix the file"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return raw


def load_config(source: SourceInfo, *, trust_remote_code: bool = False) -> LoadedConfig:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = read_config_json(source.config_path)
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
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(
            f"transformers cannot build a {model_type!r} config from {source.config_path}: "
            f"{_one_line(exc)}"
        ) from exc
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
