"""source → facts: resolve the model, load its config, build it on meta, walk it."""

from __future__ import annotations

from tfbackend.inspect.facts import ModelFacts, SourceInfo


def gather_facts(
    model: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    offline: bool | None = None,
    trust_remote_code: bool = False,
) -> ModelFacts:
    from tfbackend.inspect.resolve import resolve

    return facts_from_source(
        resolve(model, revision=revision, token=token, offline=offline),
        trust_remote_code=trust_remote_code,
    )


def facts_from_source(source: SourceInfo, *, trust_remote_code: bool = False) -> ModelFacts:
    from tfbackend.inspect.config import load_config

    loaded = load_config(source, trust_remote_code=trust_remote_code)
    return facts_from_config(loaded.config, source, trust_remote_code=loaded.custom_code_used)


def facts_from_config(config, source: SourceInfo, *, trust_remote_code: bool = False) -> ModelFacts:
    """Facts for an in-memory config (the sweep uses this with transformers' default configs)."""
    from tfbackend.errors import ConfigError
    from tfbackend.inspect.config import text_config_of
    from tfbackend.inspect.entry import architecture_compatible, decoder_signature
    from tfbackend.inspect.meta import build_on_meta, causal_lm_class_name, quiet
    from tfbackend.inspect.vllm_config import as_vllm_parses
    from tfbackend.inspect.walk import walk

    def build(config):
        text = text_config_of(config)
        # The backend builds the whole model; for a multimodal config, check its language model.
        model = build_on_meta(
            text if text is not config else config,
            trust_remote_code=trust_remote_code,
            causal_lm_class=causal_lm_class_name(config),
            origin=source.config_path or None,
        )
        return model, text

    vllm_config, vllm_config_class, vllm_config_error = as_vllm_parses(config)
    try:
        model, text = build(vllm_config)
        config = vllm_config
    except ConfigError as exc:
        if vllm_config_class is None:
            raise
        # vLLM fails here too; check transformers' reading so the rest is still reported
        vllm_config_error, vllm_config_class = str(exc), None
        model, text = build(config)
    with quiet():
        facts = walk(model, config, text, source)
    facts.causal_lm_class = causal_lm_class_name(config)
    facts.vllm_config_class = vllm_config_class
    facts.vllm_config_error = vllm_config_error
    # A multimodal config was built from its text config: vLLM's AutoModel gets the whole one.
    if text is config:
        facts.auto_model_error = getattr(model, "_tfbackend_auto_model_error", None)
    (
        facts.decoder_class,
        facts.decoder_forward_args,
        facts.decoder_forward_var_kwargs,
    ) = decoder_signature(model)
    facts.architecture_compatible = architecture_compatible(facts.causal_lm_class)
    return facts


__all__ = ["ModelFacts", "SourceInfo", "gather_facts", "facts_from_source", "facts_from_config"]
