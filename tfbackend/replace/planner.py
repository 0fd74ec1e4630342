"""facts → plan: the replacements vLLM's Transformers backend will make, under a profile.

Each `_plan_*` function mirrors one step of the backend (pipeline split, linear replacement by
first-matching tp_plan key, vocab embeddings, norms, experts, attention instances) and records
what it decided and why. Fallbacks the backend takes silently are written into `reason`.
"""

from __future__ import annotations

import re

from tfbackend.fusers import AttentionFuser, RMSNormFuser
from tfbackend.inspect.facts import (
    ATTENTION,
    CONV1D,
    EMBEDDING,
    EXPERTS,
    LAYERNORM,
    LINEAR,
    NORM,
    NORM_GATED,
    ModelFacts,
    ModuleFact,
)
from tfbackend.plan import (
    K_EMBEDDING,
    K_LAYERNORM,
    K_LINEAR,
    K_LM_HEAD,
    K_NORM,
    K_UNCHANGED,
    AttentionSpec,
    Fallback,
    NoteCode,
    ParamShard,
    PlanEntry,
    PlanNote,
    ReplacementPlan,
)
from tfbackend.plan.attention import layer_heads, own_params
from tfbackend.plan.experts import plan_experts
from tfbackend.plan.shards import SHARDERS, pad_vocab, replicated_shards, split
from tfbackend.replace.fusing import fuse
from tfbackend.replace.leaves import leave_unvisited, plan_convs
from tfbackend.replace.pipeline import stage_layout
from tfbackend.replace.profiles import Capability, Profile

_LAYER_INDEX = re.compile(r"^model\.(?P<list>.+?)\.(?P<idx>\d+)(\.|$)")


def match_tp_plan(tp_plan: dict[str, str], qualname: str) -> tuple[str | None, str | None]:
    """The first tp_plan key (prefixed `model.`) that `re.match`es the qualname, and its style."""
    for key, style in tp_plan.items():
        if re.match(f"model.{key}", qualname):
            return key, style
    return None, None


class _Stages:
    """Which stage holds a module, from the plan's stage layout."""

    def __init__(self, plan: ReplacementPlan):
        self.plan = plan

    def __call__(self, qualname: str) -> int | None:
        plan = self.plan
        if plan.pp <= 1 or not plan.stages or not plan.layers_module:
            return None
        m = _LAYER_INDEX.match(qualname)
        if m and m.group("list") == plan.layers_module:
            idx = int(m.group("idx"))
            for st in plan.stages:
                if st.layers[0] <= idx < st.layers[1]:
                    return st.rank
        top = qualname.removeprefix("model.")
        for st in plan.stages:
            if any(top == n or top.startswith(n + ".") for n in st.modules):
                if not any(top == n or top.startswith(n + ".") for n in st.missing):
                    # kept on more than one stage (tied embeddings): report the first
                    return st.rank
        return None


def build_plan(facts: ModelFacts, *, tp: int = 1, pp: int = 1, profile: Profile) -> ReplacementPlan:
    plan = ReplacementPlan(profile=profile.name, tp=tp, pp=pp)
    _plan_stages(facts, plan, profile)
    stage_of = _Stages(plan)
    fused: set[str] = set()
    for entry in fuse(facts, plan, profile, stage_of):  # the linears they cover are taken
        plan.entries.append(entry)
        fused.update(entry.sources)
    plan_experts(facts, plan, profile, stage_of, fused)
    _plan_linears(facts, plan, profile, stage_of, fused)
    _plan_embeddings(facts, plan, profile, stage_of)
    _plan_norms(facts, plan, profile, stage_of, fused)
    plan_convs(facts, plan, profile, stage_of)
    leave_unvisited(facts, plan, profile)
    _plan_attention(facts, plan, profile)
    for fuser in profile.fusers:
        fuser.adjust_attention(facts, plan)
    for fuser in profile.fusers:
        plan.entries.extend(fuser.aliases(facts, plan))
    return plan


def _plan_stages(facts: ModelFacts, plan: ReplacementPlan, profile: Profile) -> None:
    if plan.pp <= 1:
        return
    num_layers = facts.config.num_hidden_layers or 0
    names = list(facts.pp_plan)
    lists = list(facts.pp_module_lists)
    if not names:
        if profile.pp_without_plan != "infer":
            plan.notes.append(
                PlanNote(
                    NoteCode.NO_PP_PLAN,
                    "no pp_plan: this vLLM refuses pipeline parallel for the model",
                )
            )
            return
        names, lists = _inferred_pp_names(facts)
        plan.notes.append(
            PlanNote(
                NoteCode.PP_INFERRED,
                "no pp_plan: vLLM infers the split from the decoder's children in declaration "
                "order",
            )
        )
    if len(lists) != 1:
        plan.notes.append(
            PlanNote(
                NoteCode.PP_SPLIT_IMPOSSIBLE,
                f"pipeline split impossible: {len(lists)} ModuleLists among the pp modules "
                f"({lists})",
            )
        )
        return
    plan.layers_module = lists[0]
    plan.stages = stage_layout(
        names, lists[0], num_layers, plan.pp, facts.config.tie_word_embeddings
    )


def _inferred_pp_names(facts: ModelFacts) -> tuple[list[str], list[str]]:
    """Direct children of the base model that hold parameters, as vLLM 0.32 infers them."""
    children: list[str] = []
    lists: list[str] = []
    for m in facts.modules:
        if m.qualname == "model":
            continue  # the base model's own parameters are no child of it
        name = m.qualname.removeprefix("model.")
        top = name.split(".", 1)[0]
        if top in children:
            continue
        holds = any(
            x.qualname == f"model.{top}" or x.qualname.startswith(f"model.{top}.")
            for x in facts.modules
            if x.params
        )
        if holds:
            children.append(top)
    for m in facts.modules:
        if m.kind == "module_list" and m.qualname.removeprefix("model.") in children:
            lists.append(m.qualname.removeprefix("model."))
    return children, lists


def _inside(qualname: str, prefixes: list[str]) -> bool:
    return any(qualname.startswith(p + ".") for p in prefixes)


def _plan_linears(facts, plan, profile: Profile, stage_of, fused: set[str]) -> None:
    experts = [m.qualname for m in facts.modules if m.kind == EXPERTS]
    for m in facts.modules:
        if m.qualname in fused or _inside(m.qualname, experts):
            continue
        if m.kind == CONV1D:
            plan.entries.append(
                PlanEntry(
                    qualname=m.qualname,
                    sources=[m.qualname],
                    source_class=m.class_name,
                    kind=K_UNCHANGED,
                    target=m.class_name,
                    reason="not an nn.Linear: the backend leaves it as HF code, full size on "
                    "every rank",
                    params=replicated_shards(m),
                    stage=stage_of(m.qualname),
                )
            )
            continue
        if m.kind != LINEAR:
            continue
        key, style = (None, None)
        if profile.honours_tp_plan:
            key, style = match_tp_plan(facts.tp_plan, m.qualname)
        extra = {}
        if not profile.honours_tp_plan:
            target, reason = "ReplicatedLinear", f"{profile.name} replicates every linear"
        elif style is None:
            target, reason = "ReplicatedLinear", "no tp_plan key matches: replicated"
            extra["fallback"] = Fallback.NO_TP_PLAN_KEY
        elif style in profile.linear_styles:
            target, reason = profile.linear_styles[style], f"tp_plan {style!r}"
        else:
            target = "ReplicatedLinear"
            reason = f"style {style!r} unknown to the backend: silently replicated"
            extra["fallback"] = Fallback.UNKNOWN_STYLE
        sharder = SHARDERS.get(target) if plan.tp > 1 else None
        if style == "colwise_gather_output":
            extra["gather_output"] = True
        if style == "rowwise_split_input":
            extra["input_is_parallel"] = False
        plan.entries.append(
            PlanEntry(
                qualname=m.qualname,
                sources=[m.qualname],
                source_class=m.class_name,
                kind=K_LINEAR,
                target=target,
                tp_style=style,
                tp_key=key,
                reason=reason,
                params=sharder(m, plan.tp) if sharder else replicated_shards(m),
                stage=stage_of(m.qualname),
                extra=extra,
            )
        )


def _vocab_sizes(facts: ModelFacts) -> set[int]:
    sizes = {facts.config.vocab_size} if facts.config.vocab_size else set()
    return sizes | set(facts.config.vocab_sizes)


def _embedding_target(m: ModuleFact, profile: Profile) -> str:
    # vLLM ≥ 0.32 (utils.replace_embedding_class) rebases an nn.Embedding subclass onto
    # VocabParallelEmbedding in place, so the module keeps its class name.
    if profile.can(Capability.REBASES_EMBEDDINGS) and m.class_name != "Embedding":
        return m.class_name
    return "VocabParallelEmbedding"


def _plan_embeddings(facts, plan, profile: Profile, stage_of) -> None:
    sizes = _vocab_sizes(facts)
    input_qualname, input_dim = None, None
    for m in facts.modules:
        if m.kind != EMBEDDING:
            continue
        is_vocab = m.attrs.get("is_input") or (
            profile.vocab_embeddings == "by_vocab_size" and m.attrs["num_embeddings"] in sizes
        )
        if not is_vocab:
            continue
        if m.attrs.get("is_input"):
            input_qualname = m.qualname
            input_dim = m.attrs["embedding_dim"]
        vocab, dim = m.attrs["num_embeddings"], m.attrs["embedding_dim"]
        padded = pad_vocab(vocab, profile.vocab_padding)
        target = _embedding_target(m, profile)
        rebased = target != "VocabParallelEmbedding"
        reason = "vocab embedding, split over the vocab"
        if rebased:
            reason += f"; {target} rebased onto VocabParallelEmbedding in place (keeps its forward)"
        plan.entries.append(
            PlanEntry(
                qualname=m.qualname,
                sources=[m.qualname],
                source_class=m.class_name,
                kind=K_EMBEDDING,
                target=target,
                reason=reason,
                params=[ParamShard("weight", [vocab, dim], [split(padded, plan.tp), dim], 0)],
                stage=stage_of(m.qualname),
                extra={
                    "vocab_size": vocab,
                    "padded_vocab": padded,
                    "embed_scale": m.attrs.get("embed_scale"),
                    "has_embed_scale": m.attrs.get("has_embed_scale", False),
                    "rebased_on": "VocabParallelEmbedding" if rebased else None,
                },
            )
        )
    vocab, hidden = facts.config.vocab_size, facts.config.hidden_size
    if vocab and hidden:
        padded = pad_vocab(vocab, profile.vocab_padding)
        tied = facts.config.tie_word_embeddings
        if tied and input_dim:
            # ParallelLMHead.tie_weights returns the embedding itself: its width, not
            # hidden_size, is the head's (ELECTRA: embedding_size 128 under hidden 256).
            hidden = input_dim
        last = plan.pp - 1 if plan.pp > 1 and plan.stages else None
        plan.entries.append(
            PlanEntry(
                qualname="lm_head",
                sources=["lm_head"],
                source_class="Linear",
                kind=K_LM_HEAD,
                target="ParallelLMHead",
                reason="tied to the input embedding" if tied else "own weight",
                params=[ParamShard("weight", [vocab, hidden], [split(padded, plan.tp), hidden], 0)],
                stage=last,
                extra={
                    "tied": tied,
                    "tied_to": input_qualname if tied else None,
                    "padded_vocab": padded,
                    "final_logit_softcapping": facts.config.final_logit_softcapping,
                },
            )
        )


def norm_target(m: ModuleFact, profile: Profile) -> tuple[str | None, str]:
    """What the profile's backend turns this norm into, and why (None: left as HF code)."""
    if (norms := profile.fuser(RMSNormFuser)) is not None:
        return norms.target(m)  # "structural": decided from what the norm computes
    if profile.norm_detection == "class_name":
        if not m.attrs.get("rms_named"):
            return None, "not named *RMSNorm"
        return "RMSNorm", "named *RMSNorm"
    if profile.norm_detection == "zero_init":
        if not m.attrs.get("rms_named"):
            return None, "not named *RMSNorm"
        if m.attrs.get("zero_init"):
            return "GemmaRMSNorm", "named *RMSNorm, weight initialised to zeros"
        return "RMSNorm", "named *RMSNorm"
    return None, f"norm detection {profile.norm_detection!r} needs the RMSNorm fuser"


def _plan_norms(facts, plan, profile: Profile, stage_of, fused: set[str]) -> None:
    for m in facts.modules:
        if m.qualname in fused:
            continue
        if m.kind == LAYERNORM:
            if (
                profile.replaces_layernorm
                and m.attrs.get("exact_layernorm")
                and m.attrs.get("bias")
            ):
                target, kind, reason = "LayerNorm", K_LAYERNORM, "plain nn.LayerNorm"
            else:
                continue
        elif m.kind == NORM:
            target, reason = norm_target(m, profile)
            kind = K_NORM
            if target is None:
                if m.attrs.get("rms_named") or m.attrs.get("variant") == NORM_GATED:
                    target, kind = m.class_name, K_UNCHANGED
                else:
                    continue
        else:
            continue
        plan.entries.append(
            PlanEntry(
                qualname=m.qualname,
                sources=[m.qualname],
                source_class=m.class_name,
                kind=kind,
                target=target,
                reason=reason,
                params=replicated_shards(m),
                stage=stage_of(m.qualname),
                extra={"variant": m.attrs.get("variant"), "eps": m.attrs.get("eps")},
            )
        )


def _attention_params(m: ModuleFact, tp: int, profile: Profile):
    if (fuser := profile.fuser(AttentionFuser)) is not None:
        return fuser.params(m, tp)  # sinks re-created per rank
    return own_params(m, tp, shards_sinks=False)


def _plan_attention(facts: ModelFacts, plan: ReplacementPlan, profile: Profile) -> None:
    cfg = facts.config
    n = cfg.num_hidden_layers or 0
    by_layer: dict[int, ModuleFact] = {}
    for m in facts.modules:
        if m.kind == ATTENTION and m.attrs.get("interface"):
            idx = m.attrs.get("layer_idx")
            if isinstance(idx, int) and idx not in by_layer:
                by_layer[idx] = m
    encoder = facts.has_non_causal_module and not cfg.is_multimodal
    tp = plan.tp
    for i in range(n):
        heads, kv, head_size = layer_heads(cfg, i)
        stage = 0
        for st in plan.stages:
            if st.layers[0] <= i < st.layers[1]:
                stage = st.rank
        m = by_layer.get(i)
        sliding = None
        if cfg.layer_types and i < len(cfg.layer_types):
            if cfg.layer_types[i] == "sliding_attention":
                sliding = cfg.sliding_window
        plan.attention.append(
            AttentionSpec(
                layer_idx=i,
                qualname=m.qualname if m else None,
                attn_type="encoder_only" if encoder else "decoder",
                num_heads=heads,
                num_kv_heads=kv,
                heads_per_rank=split(heads, tp) if heads else None,
                kv_heads_per_rank=max(1, kv // tp) if kv else None,
                kv_replicated=bool(kv and kv < tp),
                head_size=head_size,
                sliding_window=sliding,
                logits_soft_cap=cfg.attn_logit_softcapping,
                scaling=m.attrs.get("scaling") if m else None,
                sinks=bool(m and m.attrs.get("s_aux")),
                stage=stage,
                params=_attention_params(m, tp, profile) if m else [],
            )
        )
