"""A profile's table of the config classes vLLM parses with (inspect/vllm_config.py) against the
installed vLLM's own `_CONFIG_REGISTRY`: a model type transformers has, read by vLLM with a class
that is not transformers' own for it, builds what that class makes of the config, so the plan
must follow it (vLLM 0.33's BeamConfig flattens Beam's per-layer-type rope parameters, and the
build raises)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm


def test_the_profile_names_every_config_class_the_installed_vllm_substitutes():
    pytest.importorskip("vllm")
    import vllm
    import vllm.transformers_utils.configs as vllm_configs
    from transformers import CONFIG_MAPPING
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from tfbackend.replace.profiles import select_profile

    profile = select_profile(None, vllm.__version__)
    substituted = {}
    for model_type, name in dict(_CONFIG_REGISTRY).items():
        name = name if isinstance(name, str) else name.__name__
        if (
            model_type in CONFIG_MAPPING
            and getattr(vllm_configs, name) is not CONFIG_MAPPING[model_type]
        ):
            substituted[model_type] = name
    assert substituted, "vLLM's registry substitutes no class: the test reads it wrong"
    missing = {k: v for k, v in substituted.items() if profile.config_overrides.get(k) != v}
    assert not missing, (profile.name, missing)
