"""The config as the installed vLLM parses it.

For some model types vLLM does not use transformers' config class: its `_CONFIG_REGISTRY`
(vllm/transformers_utils/config.py) maps them to one of its own, and the backend builds whatever
`AutoModel` makes of that (deepseek_v32 read as DeepseekV3Config builds DeepSeek-V3 attention,
without the V3.2 indexer). With vLLM installed, tfbackend checks the model vLLM will build; the
class is imported only for those model types, so every other check pays nothing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

# vllm/transformers_utils/config.py (0.32): _CONFIG_REGISTRY, the model types transformers also
# has, and the class vLLM parses each with. A profile names the table its release uses.
VLLM_CONFIG_CLASSES: Mapping[str, str] = {
    "chatglm": "ChatGLMConfig",
    "deepseek_v32": "DeepseekV3Config",
    "deepseek_v4": "DeepseekV4Config",
    "hy_v4": "HYV4Config",
    "kimi_linear": "KimiLinearConfig",
    "kimi_k2": "DeepseekV3Config",
    "minimax_m3_vl": "MiniMaxM3Config",
    "step3_text": "Step3TextConfig",
    "step3_vl": "Step3VLConfig",
    "ovis": "OvisConfig",
    "inkling_mm_model": "InklingMMConfig",
    "inkling_model": "InklingModelConfig",
}
# vLLM 0.33.0: deepseek_v4 is read with transformers' own class again; step3p5 with vLLM's
# Step3p7TextConfig (its registry: "hub remote code fails validation")
VLLM_033_CONFIG_CLASSES: Mapping[str, str] = {
    **{k: v for k, v in VLLM_CONFIG_CLASSES.items() if k != "deepseek_v4"},
    "step3p5": "Step3p7TextConfig",
}


def as_vllm_parses(
    config: Any, classes: Mapping[str, str] = VLLM_CONFIG_CLASSES
) -> tuple[Any, str | None, str | None]:
    """(config, None, None); or the config re-read with the installed vLLM's class and that
    class's name; or, when that class rejects the config, (config, None, why): vLLM fails there."""
    name = classes.get(getattr(config, "model_type", ""))
    if name is None or importlib.util.find_spec("vllm") is None:
        return config, None, None
    try:
        import vllm.transformers_utils.configs as vllm_configs

        cls = getattr(vllm_configs, name)
    except Exception:  # noqa: BLE001 - a vLLM without that class: transformers' reading stands
        return config, None, None
    if type(config) is cls:
        return config, name, None
    try:
        return cls.from_dict(config.to_dict()), name, None
    except Exception as exc:  # noqa: BLE001 - vLLM's own class refuses this config
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return config, None, f"{name} rejects the config: {first}"
