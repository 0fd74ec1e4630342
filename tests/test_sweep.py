"""Every causal-LM architecture in the installed transformers gets a verdict, never a crash."""

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tfbackend.check import CheckOptions, check_facts
from tfbackend.errors import UserError
from tfbackend.inspect import facts_from_config
from tfbackend.inspect.facts import SourceInfo


@pytest.mark.slow
def test_every_causal_lm_architecture_gets_a_verdict():
    verdicts, refused, no_default = {}, {}, []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # noqa: BLE001 - transformers' own default config is unusable
            no_default.append(model_type)
            continue
        source = SourceInfo(kind="local", location=model_type, config_path="")
        try:
            facts = facts_from_config(config, source)
            report = check_facts(facts, CheckOptions(tp=2, pp=2))
        except UserError as exc:  # a one-line, exit-2 answer is a handled verdict
            refused[model_type] = str(exc)
            continue
        verdicts[model_type] = report.verdict.value
    assert len(verdicts) > 0.85 * len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for model_type, message in refused.items():
        assert "\n" not in message and model_type, message
    # Spot-check well-known architectures by what vLLM really does with them.
    assert verdicts["llama"] != "FAIL"
    assert verdicts["qwen3_moe"] != "FAIL"
