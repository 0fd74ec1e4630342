"""convert's per-rank layout against vLLM 0.32's own builds (reports/agreement-builds.tar.gz).

The checkpoint is the one transformers' own `save_pretrained` layout names (each module's
parameters and persistent buffers under its qualname, `lm_head.weight` unless tied), described
by headers only: no weights are made, so the default (full-size) configs the builds used work.
"""

from __future__ import annotations

from tfbackend.inspect.checkpoint import CheckpointHeaders, TensorHeader


def synthetic_headers(facts, dtype: str = "BF16") -> CheckpointHeaders:
    headers = CheckpointHeaders(location="synthetic", origin="local", format="safetensors")
    for m in facts.modules:
        for name, shape in {**m.params, **m.buffers}.items():
            key = f"{m.qualname}.{name}"
            headers.tensors[key] = TensorHeader(key, dtype, list(shape), "model.safetensors")
    cfg = facts.config
    if not cfg.tie_word_embeddings and cfg.vocab_size and cfg.hidden_size:
        headers.tensors["lm_head.weight"] = TensorHeader(
            "lm_head.weight", dtype, [cfg.vocab_size, cfg.hidden_size], "model.safetensors"
        )
    headers.files = ["model.safetensors"]
    return headers


def build_names(rank: dict) -> dict[str, list[int]]:
    """Every parameter name of one rank of vLLM's build (aliases included) and its shape."""
    out = {}
    for m in rank["modules"]:
        for p, shape in m["params"].items():
            out[f"{m['qualname']}.{p}" if m["qualname"] else p] = list(shape)
    return out


def compare(layout_rank, build_rank: dict, buffers: set[str]) -> list[str]:
    """Differences between what convert writes for a rank and vLLM's parameters on it.

    `buffers`: names convert writes that are buffers (vLLM's build lists parameters only)."""
    built = build_names(build_rank)
    problems = []
    reached: set[str] = set()
    for t in layout_rank.tensors:
        reached |= set(t.aliases)
        if t.name in buffers:
            continue
        if t.name not in built:
            problems.append(f"written but not a parameter of vLLM's build: {t.name} {t.shape}")
        elif built[t.name] != list(t.shape):
            problems.append(f"{t.name}: written {t.shape}, vLLM builds {built[t.name]}")
        if min(t.aliases) != t.name:
            problems.append(f"{t.name}: not the smallest of its names {sorted(t.aliases)}")
    for name, shape in built.items():
        if name not in reached and shape and all(shape):
            problems.append(f"vLLM parameter not written: {name} {shape}")
    return problems
