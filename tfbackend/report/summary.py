"""Facts → the model summary a report shows."""

from __future__ import annotations

from tfbackend.inspect.facts import ModelFacts
from tfbackend.report.model import ModelSummary


def summarize(facts: ModelFacts) -> ModelSummary:
    cfg = facts.config
    q = cfg.quantization or {}
    layer_types = cfg.layer_types or []
    return ModelSummary(
        source=facts.source.location,
        source_kind=facts.source.kind,
        revision=facts.source.revision,
        model_type=cfg.model_type,
        architecture=facts.causal_lm_class,
        model_class=facts.model_class,
        parameters=facts.num_parameters,
        layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_word_embeddings,
        dtype=cfg.dtype,
        quantization=(q.get("quant_method") or "unknown") if q else None,
        num_experts=cfg.moe.num_experts,
        experts_per_token=cfg.moe.top_k,
        moe_intermediate_size=cfg.moe.intermediate_size if cfg.moe.num_experts else None,
        shared_experts=cfg.moe.num_shared_experts,
        sliding_window=cfg.sliding_window,
        sliding_layers=sum(1 for t in layer_types if t == "sliding_attention"),
        multimodal=cfg.is_multimodal,
        custom_code=facts.source.has_custom_code,
    )
