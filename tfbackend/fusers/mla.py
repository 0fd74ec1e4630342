"""MLAFuser (vLLM fusers/mla.py) and the MLAAttention it makes.

vLLM tries MLAFuser before every other fuser, and takes it on any model whose text config has
`kv_lora_rank` (`validate`: `model_config.use_mla`). The matched module keeps its class and
gets: `q_a_proj` + `kv_a_proj_with_mqa` stacked into `fused_qkv_a_proj`, a
MergedColumnParallelLinear built with `disable_tp` (whole on every rank), or without a query
LoRA `kv_a_proj_with_mqa` replicated and `q_proj` column-split; `q_b_proj` and `kv_b_proj`
column-split, `o_proj` row-split, whatever the tp_plan says. Its attention layer becomes
MLAAttention over the compressed latent: one KV head of `kv_lora_rank + qk_rope_head_dim`,
holding `kv_b_proj` as its own child (`attn.kv_b_proj`). If the model has `kv_lora_rank` but no
layer fuses as MLA, vLLM falls back to Attention with head size `qk_nope + qk_rope`; if some
layers fuse and others do not, it raises.
"""

from __future__ import annotations

from tfbackend.fusers.base import Fuser, Outcome
from tfbackend.inspect.facts import LINEAR, ModelFacts, ModuleFact
from tfbackend.plan import K_LINEAR, NoteCode, PlanEntry, PlanNote, ReplacementPlan
from tfbackend.plan.shards import column_shards, row_shards, whole_shards

FUSER = "mla"
MERGED_NAME = "fused_qkv_a_proj"
LATENT_ATTN = "attn"  # VLLM_ATTN_ATTR: where MLAAttention (and its kv_b_proj alias) lives


class MLAFuser(Fuser):
    name = "MLAFuser"
    key = FUSER

    def fuse(self, facts, plan, m, stage) -> Outcome | None:
        """The module's MLA entries; a refused match is noted, and the next fuser is tried."""
        fact = m.attrs.get("mla")
        if not fact or facts.config.kv_lora_rank is None:
            return None  # validate: use_mla needs kv_lora_rank
        if not fact.get("fuser"):
            plan.notes.append(
                PlanNote(
                    NoteCode.MLA_NOT_FUSED, f"not fused as MLA: {fact['reason']}", m.qualname,
                    m.class_name,
                )
            )  # fmt: skip
            return None
        linears = {x: facts.module(f"{m.qualname}.{x}") for x in _role_names(fact)}
        made = _module_entries(m, fact, linears, plan.tp, stage)
        if made is None:
            plan.notes.append(
                PlanNote(
                    NoteCode.MLA_ROLES_MISSING, "MLA roles not nn.Linear facts", m.qualname,
                    m.class_name,
                )
            )  # fmt: skip
            return None
        return Outcome(made)

    def adjust_attention(self, facts: ModelFacts, plan: ReplacementPlan) -> None:
        """The attention layers' geometry under MLA (base.py: _create_attention_instances)."""
        cfg = facts.config
        if cfg.kv_lora_rank is None:
            return
        rope = int(cfg.raw.get("qk_rope_head_dim") or 0)
        nope = int(cfg.raw.get("qk_nope_head_dim") or 0)
        fused = {e.extra["module"] for e in plan.entries if e.extra.get("fuser") == FUSER}
        if not fused:
            # vLLM warns and serves full attention; the head size becomes qk_nope + qk_rope
            if nope + rope:
                for a in plan.attention:
                    a.head_size = nope + rope
            plan.notes.append(
                PlanNote(
                    NoteCode.MLA_FALLBACK,
                    f"kv_lora_rank={cfg.kv_lora_rank} but no layer fuses as MLA: vLLM falls back to "
                    f"Attention (head size {nope + rope}, value heads padded), without the latent "
                    "cache",
                )
            )
            return
        for a in plan.attention:
            if a.qualname in fused:
                a.mla = True
                a.num_kv_heads = a.kv_heads_per_rank = 1
                a.kv_replicated = plan.tp > 1  # the one latent head lives whole on every rank
                a.head_size = cfg.kv_lora_rank + rope
            else:
                text = (
                    f"layer {a.layer_idx} ({a.qualname}) does not fuse as MLA while others do: "
                    "vLLM raises ValueError (its latent KV cache cannot be allocated)"
                )
                plan.notes.append(PlanNote(NoteCode.MLA_MIXED, text, a.qualname, line=text))


def _role_names(fact: dict) -> list[str]:
    return [fact[r] for r in _ROLES if fact.get(r)]


def _module_entries(m: ModuleFact, fact: dict, linears: dict, tp: int, stage) -> list | None:
    role = {r: linears.get(fact[r]) for r in _ROLES if fact.get(r)}
    if any(v is None or v.kind != LINEAR for v in role.values()):
        return None

    def entry(qualname, sources, target, reason, params, **extra) -> PlanEntry:
        return PlanEntry(
            qualname=qualname,
            sources=[s.qualname for s in sources],
            source_class=sources[0].class_name,
            kind=K_LINEAR,
            target=target,
            reason=reason,
            params=params,
            stage=stage,
            extra={"fuser": FUSER, "module": m.qualname, **extra},
        )

    out = []
    if "q_a_proj" in role:
        q_a, kv_a = role["q_a_proj"], role["kv_a_proj"]
        sizes = [q_a.attrs["out_features"], kv_a.attrs["out_features"]]
        out.append(
            entry(
                f"{m.qualname}.{MERGED_NAME}",
                [q_a, kv_a],
                "MergedColumnParallelLinear",
                "q_a_proj + kv_a_proj stacked (vLLM MLAFuser, disable_tp: whole on every rank)",
                whole_shards(q_a, sum(sizes)),
                output_sizes=sizes,
            )
        )
        out.append(_column(entry, role["q_b_proj"], tp, "query up-projection (MLA): colwise"))
    else:
        kv_a = role["kv_a_proj"]
        out.append(
            entry(
                kv_a.qualname,
                [kv_a],
                "ReplicatedLinear",
                "latent down-projection (MLA, no query LoRA): replicated",
                whole_shards(kv_a),
            )
        )
        out.append(_column(entry, role["q_proj"], tp, "query projection (MLA): colwise"))
    kv_b = _column(entry, role["kv_b_proj"], tp, "latent up-projection (MLA): colwise")
    alias = entry(
        f"{m.qualname}.{LATENT_ATTN}.kv_b_proj",
        [role["kv_b_proj"]],
        kv_b.target,
        "MLAAttention holds kv_b_proj as its own child",
        kv_b.params,
        alias_of=kv_b.qualname,
    )
    out += [kv_b, alias]
    if "o_proj" in role:
        o = role["o_proj"]
        out.append(
            entry(
                o.qualname,
                [o],
                "RowParallelLinear",
                "output projection (MLA): rowwise",
                _row_params(o, tp),
            )
        )
    return out


_ROLES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj")


def _column(entry, fact: ModuleFact, tp: int, reason: str) -> PlanEntry:
    params = column_shards(fact, tp) if tp > 1 else whole_shards(fact)
    return entry(fact.qualname, [fact], "ColumnParallelLinear", reason, params)


def _row_params(fact: ModuleFact, tp: int) -> list:
    return row_shards(fact, tp) if tp > 1 else whole_shards(fact)
