"""What each rank must hold: weights from the plan's per-rank shapes, and the KV cache.

Weights: every plan entry's `rank_shape` on the stages that keep the module (replicated modules
count in full on every rank; modules the plan does not replace are HF code, full size too).
KV cache: per attention layer of the stage, K and V of `kv_heads_per_rank × head_size` per token
(MLA: one latent of `kv_lora_rank + qk_rope_head_dim`, not split); sliding layers hold at most
their window. A rank fits when weights plus one `max_model_len` sequence fit in
`gpu_memory × gpu_memory_utilization`, which is what vLLM checks at start-up.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from math import prod
from typing import Any

from tfbackend.inspect.facts import EXPERTS, ModelFacts
from tfbackend.plan import K_EXPERTS, K_LM_HEAD, ReplacementPlan

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
DEFAULT_DTYPE = "bfloat16"
DEFAULT_GPU_MEMORY_GIB = 80.0
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default
# A default --max-model-len above this is capped: configs carry 1M-10M "max positions" nobody
# serves by default on one node. The cap is said in the report; --max-model-len overrides it.
MAX_LEN_CAP = 131072
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32"}  # fmt: skip


@dataclass
class StageMemory:
    """One pipeline stage; its tp ranks hold the same bytes."""

    stage: int
    ranks: list[int]  # global ranks (stage * tp + tp_rank)
    layers: list[int]  # [start, end)
    weight_bytes: int
    largest_tensor: str | None
    largest_tensor_bytes: int
    kv_bytes_per_token: int
    kv_bytes_max_len: int
    budget_bytes: int
    max_kv_tokens: int | None  # tokens of KV that fit beside the weights (full-attention rate)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes_max_len

    @property
    def weights_fit(self) -> bool:
        return self.weight_bytes <= self.budget_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes


@dataclass
class MemoryEstimate:
    dtype: str
    dtype_bytes: int
    max_model_len: int
    max_model_len_note: str
    gpu_memory_gib: float
    gpu_memory_utilization: float
    tp: int
    pp: int
    model_weight_bytes: int  # the whole model once, unsharded
    stages: list[StageMemory] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for st, d in zip(self.stages, out["stages"], strict=True):
            d.update(total_bytes=st.total_bytes, fits=st.fits, weights_fit=st.weights_fit)
        return out


def normalise_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    d = str(dtype).lower().removeprefix("torch.")
    return DTYPE_ALIASES.get(d, d)


def served_dtype(requested: str | None, config_dtype: str | None) -> str:
    """--dtype, else the config's dtype (float32 downcast to bfloat16, as vLLM's "auto" does),
    else bfloat16."""
    if requested:
        return normalise_dtype(requested) or DEFAULT_DTYPE
    cfg = normalise_dtype(config_dtype)
    if cfg in (None, "float32", "float64") or cfg not in DTYPE_BYTES:
        return DEFAULT_DTYPE
    return cfg


def default_max_model_len(facts: ModelFacts, requested: int | None) -> tuple[int, str]:
    if requested:
        return requested, "from --max-model-len"
    mpe = facts.config.max_position_embeddings
    if not mpe:
        return 4096, "config has no max_position_embeddings: 4096 assumed (set --max-model-len)"
    if mpe > MAX_LEN_CAP:
        return MAX_LEN_CAP, (
            f"config max_position_embeddings {mpe:,} capped at {MAX_LEN_CAP:,}; vLLM would use "
            f"{mpe:,} unless --max-model-len is given"
        )
    return mpe, "config max_position_embeddings (vLLM's default)"


def stages_holding(qualname: str, plan: ReplacementPlan) -> list[int]:
    """The pipeline stages that keep a module (every stage when it is not split)."""
    if plan.pp <= 1 or not plan.stages:
        return [0]
    name = qualname.removeprefix("model.")
    if plan.layers_module:
        m = re.match(rf"^{re.escape(plan.layers_module)}\.(\d+)(\.|$)", name)
        if m:
            idx = int(m.group(1))
            return [s.rank for s in plan.stages if s.layers[0] <= idx < s.layers[1]]

    def under(names: list[str]) -> bool:
        return any(name == n or name.startswith(n + ".") for n in names)

    return [s.rank for s in plan.stages if under(s.modules) or not under(s.missing)]


def estimate_memory(
    facts: ModelFacts,
    plan: ReplacementPlan,
    *,
    dtype: str | None = None,
    max_model_len: int | None = None,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
    raw_config: dict[str, Any] | None = None,
) -> MemoryEstimate:
    served = served_dtype(dtype, facts.config.dtype)
    nbytes = DTYPE_BYTES.get(served, 2)
    max_len, len_note = default_max_model_len(facts, max_model_len)
    n_stages = max(1, len(plan.stages)) if plan.pp > 1 else 1
    weights = [0] * n_stages
    largest: list[tuple[int, str | None]] = [(0, None)] * n_stages
    notes: list[str] = []

    def add(stages: list[int], name: str, elements: int) -> None:
        b = elements * nbytes
        for s in stages:
            if s < n_stages:
                weights[s] += b
                if b > largest[s][0]:
                    largest[s] = (b, name)

    covered: set[str] = set()
    experts_prefixes = [m.qualname + "." for m in facts.modules if m.kind == EXPERTS]
    facts_by_name = {m.qualname: m for m in facts.modules}
    # A source's tensors are counted once: vLLM 0.32 aliases the router into the MoE runner
    # (`experts.gate`), and a runner entry holds nothing the routed-experts entry does not.
    counted: set[tuple[tuple[str, ...], str]] = set()
    sourced = {s for e in plan.entries if e.params for s in e.sources}
    for e in plan.entries:
        covered.update(e.sources)
        if e.kind == K_LM_HEAD:
            if e.extra.get("tied"):
                continue  # ParallelLMHead.tie_weights returns the embedding: no bytes of its own
            stages = [n_stages - 1]
        else:
            stages = stages_holding(e.qualname, plan)
        for p in e.params:
            key = (tuple(e.sources), p.name)
            if key in counted:
                continue
            counted.add(key)
            add(stages, f"{e.qualname}.{p.name}", prod(p.rank_shape))
        if e.kind == K_EXPERTS and not (not e.params and set(e.sources) <= sourced):
            fact = facts_by_name.get(e.qualname)
            own = (fact.params if fact else {}).items()
            kept = {p.name for p in e.params}
            for n, s in own:
                if (not e.params or "bias" in n) and n not in kept:
                    add(stages, f"{e.qualname}.{n}", prod(s))
    for m in facts.modules:
        if m.qualname in covered or any(m.qualname.startswith(p) for p in experts_prefixes):
            continue
        stages = stages_holding(m.qualname, plan)
        for n, s in m.params.items():
            add(stages, f"{m.qualname}.{n}", prod(s))

    kv_token = [0] * n_stages
    kv_full = [0] * n_stages
    full_rate = [0] * n_stages  # per-token bytes of layers without a window
    # The latent cache only where vLLM serves the layer with MLAAttention (the plan says which);
    # an MLA config that does not fuse falls back to full attention and its full-size KV.
    mla = _mla_latent(facts, raw_config or {}) if any(a.mla for a in plan.attention) else None
    if mla:
        notes.append(f"MLA: one latent of {mla} values per token per layer, on every tp rank")
    encoder_only = any(a.attn_type == "encoder_only" for a in plan.attention)
    if encoder_only:
        notes.append("encoder-only attention: no KV cache")
    for a in plan.attention:
        if encoder_only or a.stage >= n_stages:
            continue
        head = a.head_size or _head_size(facts)
        if mla and a.mla:
            per_token = mla * nbytes
        elif a.kv_heads_per_rank and head:
            per_token = 2 * a.kv_heads_per_rank * head * nbytes
        else:
            continue
        kv_token[a.stage] += per_token
        tokens = min(max_len, a.sliding_window) if a.sliding_window else max_len
        kv_full[a.stage] += per_token * tokens
        if not a.sliding_window:
            full_rate[a.stage] += per_token
    if facts.config.quantization:
        notes.append(f"weights counted at {served}: a quantized checkpoint holds fewer bytes")

    budget = int(gpu_memory_gib * GIB * GPU_MEMORY_UTILIZATION)
    stages = []
    for s in range(n_stages):
        layers = [0, facts.config.num_hidden_layers or 0]
        if plan.pp > 1 and plan.stages:
            layers = plan.stages[s].layers
        rate = full_rate[s] or kv_token[s]
        free = budget - weights[s]
        stages.append(
            StageMemory(
                stage=s,
                ranks=[s * plan.tp + r for r in range(plan.tp)],
                layers=list(layers),
                weight_bytes=weights[s],
                largest_tensor=largest[s][1],
                largest_tensor_bytes=largest[s][0],
                kv_bytes_per_token=kv_token[s],
                kv_bytes_max_len=kv_full[s],
                budget_bytes=budget,
                max_kv_tokens=(max(0, free) // rate) if rate else None,
            )
        )
    if plan.pp > 1 and not plan.stages:
        notes.append("no pipeline layout could be planned: the whole model counted on one stage")
    return MemoryEstimate(
        dtype=served,
        dtype_bytes=nbytes,
        max_model_len=max_len,
        max_model_len_note=len_note,
        gpu_memory_gib=gpu_memory_gib,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
        tp=plan.tp,
        pp=plan.pp,
        model_weight_bytes=(facts.num_parameters + _untied_lm_head(facts)) * nbytes,
        stages=stages,
        notes=notes,
    )


def _untied_lm_head(facts: ModelFacts) -> int:
    cfg = facts.config
    if cfg.tie_word_embeddings or not (cfg.vocab_size and cfg.hidden_size):
        return 0
    return cfg.vocab_size * cfg.hidden_size


def _head_size(facts: ModelFacts) -> int | None:
    cfg = facts.config
    if cfg.head_dim:
        return cfg.head_dim
    if cfg.hidden_size and cfg.num_attention_heads:
        return cfg.hidden_size // cfg.num_attention_heads
    return None


def _mla_latent(facts: ModelFacts, raw: dict[str, Any]) -> int | None:
    rank = facts.config.kv_lora_rank
    if not rank:
        return None
    return rank + int(raw.get("qk_rope_head_dim") or 0)
