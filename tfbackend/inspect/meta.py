"""Build the model on the `meta` device, as the backend does: no memory, no weights."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

from tfbackend.errors import ConfigError


@contextlib.contextmanager
def quiet():
    """transformers warns loudly while building random configs; none of it is for the user."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    root = logging.getLogger()
    old_root = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        root.setLevel(old_root)


def causal_lm_class_name(config: Any) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", ""))


def _named_class(name: str | None):
    import transformers

    def build(config, trust_remote_code=False):
        cls = getattr(transformers, name or "", None)
        if cls is None:
            raise ValueError(f"transformers has no class {name!r}")
        return cls._from_config(config)

    return build


def build_on_meta(
    config: Any,
    *,
    trust_remote_code: bool = False,
    causal_lm_class: str | None = None,
    origin: str | None = None,
) -> Any:
    """`AutoModel.from_config` on meta, the base model the backend wraps.

    A config with no base-model mapping falls back to the causal-LM class's base model: first
    through the auto mapping, then by the class the outer (e.g. multimodal) config names. The
    model then carries `_tfbackend_auto_model_error`: why AutoModel itself failed (vLLM calls
    nothing else), or None. `origin` (the config file) is named in the error.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    errors = []
    factories = [AutoModel.from_config, AutoModelForCausalLM.from_config]
    if causal_lm_class:
        factories.append(_named_class(causal_lm_class))
    with quiet(), torch.device("meta"):
        for i, factory in enumerate(factories):
            try:
                model = factory(config, trust_remote_code=trust_remote_code)
            except Exception as exc:  # noqa: BLE001 - any failure here is the model's, reported
                errors.append(exc)
                continue
            if i > 0:
                model = getattr(model, "base_model", model)
            first = errors[0] if errors else None
            model._tfbackend_auto_model_error = (
                f"{type(first).__name__}: {_first_line(first)}" if first else None
            )
            return model
    exc = errors[0]
    msg = _first_line(exc)
    where = origin or "its config"
    raise ConfigError(
        f"transformers could not build {getattr(config, 'model_type', '?')!r} from {where} "
        f"on the meta device: {type(exc).__name__}: {msg}"
    ) from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
