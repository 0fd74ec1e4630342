"""One builder per target the planner emits: the table `apply` dispatches on.

A builder gets the plan entry and where it lands (`Site`) and returns the module to install
there, or `Kept` with the reason the HF module (or nothing) stands for the target; a target with
no builder, or one its builder cannot build, raises `NotBuildable` naming both. The key is the
target class the plan names (`target_key`); rebased embeddings key on the class they are
rebased onto, entries that name a module already planned under another path on `ALIAS`, and
modules the backend leaves as HF code on `UNCHANGED`.

Fused projections keep the HF module's forward: vLLM 0.32 rewrites that forward's source
(fusers/qkv.py, glu.py: `q, k, v = qkv_proj(x).split(...)`), which needs its AST machinery and
the class's globals; here each fused source becomes a `FusedPart` returning its slice of the one
fused GEMM (run once per input), which computes the same values in the same layout with the HF
forward untouched, for any forward vLLM's rewrite accepts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tfbackend.plan import K_UNCHANGED, AttentionSpec, PlanEntry, ReplacementPlan
from tfbackend.replace import layers as L

ALIAS = "alias"
UNCHANGED = "unchanged"


class NotBuildable(NotImplementedError):
    """A plan entry tfbackend's layers cannot build: the run would not prove the plan."""

    def __init__(self, entry: PlanEntry, why: str):
        super().__init__(
            f"cannot build target {target_key(entry)!r} ({entry.kind}) for {entry.qualname}: {why}"
        )
        self.entry = entry


@dataclass(frozen=True)
class Kept:
    """Nothing installed for this entry, and why that is what the target computes."""

    reason: str


@dataclass
class Site:
    """A plan entry and the place it lands in one rank's model."""

    entry: PlanEntry
    name: str  # the module name in the causal LM
    model: nn.Module
    ctx: L.ParallelContext
    dtype: torch.dtype
    plan: ReplacementPlan
    prefix: str  # the causal LM's base-model attribute
    attention: dict[int, AttentionSpec]

    @property
    def old(self) -> nn.Module | None:
        try:
            return self.model.get_submodule(self.name)
        except AttributeError:
            return None

    def require(self) -> nn.Module:
        old = self.old
        if old is None:
            raise NotBuildable(self.entry, f"the model has no module {self.name}")
        return old

    def module_name(self, plan_qualname: str) -> str:
        return module_name(plan_qualname, self.prefix)

    def kw(self) -> dict:
        return {"dtype": self.dtype, "device": "meta"}


Builder = Callable[[Site], "nn.Module | Kept"]


def module_name(plan_qualname: str, prefix: str) -> str:
    """Plan names are vLLM's (`model.` + base-model path); the causal LM's base may be named
    otherwise (`transformer.`)."""
    if plan_qualname.startswith("model."):
        return f"{prefix}.{plan_qualname.removeprefix('model.')}"
    return plan_qualname


def target_key(entry: PlanEntry) -> str:
    if "alias_of" in entry.extra:
        return ALIAS
    if entry.kind == K_UNCHANGED:
        return UNCHANGED
    return entry.extra.get("rebased_on") or entry.target


# ---- linears ----


_KV_PROJ = re.compile(r"\.(k_proj|v_proj|key|value|k|v)$")
_LAYER = re.compile(r"\.(\d+)\.")


def _column(site: Site) -> nn.Module:
    old, entry, ctx = site.require(), site.entry, site.ctx
    kv = None
    m = _LAYER.search(site.name)
    attn = site.attention.get(int(m.group(1))) if m else None
    if attn is not None and attn.kv_replicated and _KV_PROJ.search(entry.qualname):
        # kv heads fewer than tp (per-linear profiles): whole kv heads, replicated across ranks
        per_group = ctx.world // attn.num_kv_heads
        kv = (ctx.rank // per_group) * attn.head_size, attn.head_size
    start, size = kv if kv else ctx.split(old.out_features)
    return L.ColumnParallelLinear(
        old.in_features, old.out_features, old.bias is not None, ctx, start=start, size=size,
        gather_output=bool(entry.extra.get("gather_output")), **site.kw(),
    )  # fmt: skip


def _row(site: Site) -> nn.Module:
    old = site.require()
    return L.RowParallelLinear(
        old.in_features, old.out_features, old.bias is not None, site.ctx,
        input_is_parallel=site.entry.extra.get("input_is_parallel", True), **site.kw(),
    )  # fmt: skip


def _replicated(site: Site) -> nn.Module:
    old = site.require()
    return L.ReplicatedLinear(old.in_features, old.out_features, old.bias is not None, **site.kw())


def _fused(site: Site, spans: list[tuple[int, int]]) -> nn.Module:
    """One FusedColumnLinear from the entry's sources, rows `spans[i]` of source i; each source
    replaced by its FusedPart."""
    entry = site.entry
    names = [site.module_name(s) for s in entry.sources]
    parts = []
    for name in names:
        try:
            parts.append(site.model.get_submodule(name))
        except AttributeError:
            raise NotBuildable(entry, f"the model has no source module {name}") from None
    if len(parts) != len(spans) or not all(isinstance(p, nn.Linear) for p in parts):
        raise NotBuildable(entry, f"sources {names} are not {len(spans)} nn.Linear modules")
    bias = parts[0].bias is not None
    fused = L.FusedColumnLinear(
        parts[0].in_features, [size for _, size in spans], bias, **site.kw()
    )
    for param in ("weight", "bias") if bias else ("weight",):
        fused.pieces[param] = [
            (f"{name}.{param}", L.Shard(0, start, size))
            for name, (start, size) in zip(names, spans, strict=True)
        ]
    for i, (name, span) in enumerate(zip(names, spans, strict=True)):
        install(site.model, name, L.FusedPart(fused, i, span))
    return fused


def _qkv(site: Site) -> nn.Module:
    """QKVParallelLinear: this rank's `[q | k | v]` heads (linear.py QKVParallelLinear): q heads
    `rank * heads`, kv heads at `rank // kv_replicas` (whole heads replicated when kv < tp)."""
    x, r = site.entry.extra, site.ctx.rank
    if x.get("fuser") != "qkv":
        # PackedQKVFuser rewrites the forward's split((q, kv, kv)) to per-rank widths: that
        # split is in the HF forward's source, which a FusedPart cannot change
        raise NotBuildable(site.entry, f"fuser {x.get('fuser')!r}: only separate q/k/v is built")
    hd, heads, kv, replicas = x["head_size"], x["num_heads"], x["num_kv_heads"], x["kv_replicas"]
    q_rank, kv_rank, kv_at = heads * hd, kv * hd, r // replicas
    return _fused(
        site, [(r * q_rank, q_rank), (kv_at * kv_rank, kv_rank), (kv_at * kv_rank, kv_rank)]
    )


def _merged(site: Site) -> nn.Module:
    """MergedColumnParallelLinear: each source's rows of this rank, in source order (gate, up);
    whole on every rank where the plan keeps it undivided (MLA's disable_tp)."""
    entry, ctx = site.entry, site.ctx
    sizes = entry.extra.get("output_sizes") or []
    weight = next((p for p in entry.params if p.name == "weight"), None)
    if weight is None or len(sizes) != len(entry.sources):
        raise NotBuildable(entry, f"{len(entry.sources)} sources, output sizes {sizes}")
    undivided = weight.rank_shape[0] == weight.full_shape[0]
    spans = []
    for size in sizes:
        per = size if undivided else size // ctx.world
        spans.append((0 if undivided else ctx.rank * per, per))
    return _fused(site, spans)


def _and_mul(site: Site) -> nn.Module:
    name = site.entry.extra.get("activation")
    if name not in L.AND_MUL:
        raise NotBuildable(site.entry, f"no ...AndMul activation for {name!r}")
    site.require()
    return L.AndMulActivation(name)


# ---- embeddings, head ----


def _vocab_embedding(site: Site) -> nn.Module:
    old, entry = site.require(), site.entry
    padded = entry.extra["padded_vocab"]
    if type(old) is not nn.Embedding and isinstance(old, nn.Embedding):
        return L.rebase_on_vocab_parallel(old, padded, site.ctx, **site.kw())
    scale = getattr(old, "scalar_embed_scale", None) or entry.extra.get("embed_scale")
    if scale is None and entry.extra.get("has_embed_scale"):
        raise NotBuildable(entry, f"{site.name} scales its output but the scale is unknown")
    return L.VocabParallelEmbedding(
        old.num_embeddings, padded, old.embedding_dim, site.ctx, embed_scale=scale, **site.kw()
    )


def _lm_head(site: Site) -> nn.Module:
    old = site.require()
    if not isinstance(old, nn.Linear):
        raise NotBuildable(site.entry, f"{site.name} is a {type(old).__name__}, not an nn.Linear")
    padded = site.entry.extra["padded_vocab"]
    return L.ParallelLMHead(old.out_features, padded, old.in_features, site.ctx, **site.kw())


# ---- norms ----


def _norm(cls: type[L.RMSNorm], tp_aware: bool) -> Builder:
    def build(site: Site) -> nn.Module:
        old, entry = site.require(), site.entry
        weight = getattr(old, "weight", None)
        if weight is not None and weight.dim() != 1:
            raise NotBuildable(entry, f"norm weight of shape {list(weight.shape)}")
        if weight is None and cls is L.OffsetRMSNorm:
            raise NotBuildable(entry, "an offset norm without a weight")
        eps = entry.extra.get("eps")
        for attr in ("eps", "variance_epsilon"):
            eps = eps if eps is not None else getattr(old, attr, None)
        if eps is None:
            # vLLM's RMSNormFuser: no eps found → torch's default, finfo(dtype).eps
            eps = torch.finfo(weight.dtype if weight is not None else site.dtype).eps
        return cls(
            weight.shape[0] if weight is not None else 0, float(eps),
            site.ctx if tp_aware else None, has_weight=weight is not None, **site.kw(),
        )  # fmt: skip

    return build


# ---- MoE ----


def _moe_spec(site: Site, experts: str):
    spec = next((m for m in site.plan.moe if m.qualname == experts), None)
    if spec is None:
        raise NotBuildable(site.entry, f"the plan has no MoE spec for {experts}")
    return spec


_MOE_ACT = {"silu": nn.SiLU, "gelu": nn.GELU}


def _fused_moe(site: Site, experts: str, reduce_results: bool) -> L.FusedMoE:
    entry = site.entry
    spec = _moe_spec(site, experts)
    if spec.has_bias:
        raise NotBuildable(entry, "experts with biases (w13_bias / w2_bias)")
    if spec.activation not in _MOE_ACT:
        raise NotBuildable(entry, f"expert activation {spec.activation!r}")
    shapes = {p.name: p.full_shape for p in entry.params}
    if "w13_weight" not in shapes:
        raise NotBuildable(entry, "the plan has no w13_weight shape")
    num, two_inter, hidden = shapes["w13_weight"]
    moe = L.FusedMoE(
        num, hidden, two_inter // 2, site.ctx, act_fn=_MOE_ACT[spec.activation](),
        reduce_results=reduce_results, **site.kw(),
    )  # fmt: skip
    moe.checkpoint_prefix = site.module_name(experts)
    return moe


def _experts_0_11(site: Site) -> nn.Module:
    """FusedMoE where the HF experts were (per-linear profiles)."""
    site.require()
    return _fused_moe(site, site.entry.qualname, reduce_results=True)


def _runner(site: Site) -> nn.Module:
    site.require()
    return L.MoERunner()


def _routed_experts(site: Site) -> nn.Module:
    """TransformersRoutedExperts inside the runner: w13 [E, 2I/tp, H], w2 [E, H, I/tp].

    Its partial down projections are all-reduced here, not after the shared expert as vLLM's
    runner does: the HF block forward adds the shared expert itself, whose row-parallel down
    projection reduces on its own; the sum is the same."""
    parent = site.name.rpartition(".")[0]
    if not isinstance(site.model.get_submodule(parent), L.MoERunner):
        raise NotBuildable(site.entry, f"{parent} is no MoE runner (its entry comes first)")
    return _fused_moe(site, site.entry.sources[0], reduce_results=True)


def _hf_router(site: Site) -> Kept:
    site.require()
    # GateLinear is the router's linear, replicated; vLLM then routes with its own top-k
    # (select_experts). The HF router stays and routes: same weight on every rank, routing as
    # the HF code computes it.
    return Kept("the HF router routes (replicated, as GateLinear is)")


def _shared_expert(site: Site) -> Kept:
    for source in site.entry.sources:
        try:
            site.model.get_submodule(site.module_name(source))
        except AttributeError:
            raise NotBuildable(site.entry, f"the model has no shared expert {source}") from None
    return Kept("the HF block adds its shared expert (and gate), whose layers the plan lists")


# ---- the rest ----


def _alias(site: Site) -> Kept:
    primary = site.entry.extra["alias_of"]
    if not any(e.qualname == primary for e in site.plan.entries):
        raise NotBuildable(site.entry, f"alias of {primary}, which the plan does not list")
    return Kept(f"the module planned as {primary}, reached under a second name")


def _keep(why: str) -> Builder:
    def build(site: Site) -> Kept:
        site.require()
        return Kept(why)

    return build


BUILDERS: dict[str, Builder] = {
    "ColumnParallelLinear": _column,
    "RowParallelLinear": _row,
    "ReplicatedLinear": _replicated,
    "QKVParallelLinear": _qkv,
    "MergedColumnParallelLinear": _merged,
    "SiluAndMul": _and_mul,
    "GeluAndMul": _and_mul,
    "VocabParallelEmbedding": _vocab_embedding,
    "ParallelLMHead": _lm_head,
    "RMSNorm": _norm(L.RMSNorm, tp_aware=False),
    "GemmaRMSNorm": _norm(L.OffsetRMSNorm, tp_aware=False),
    "TPAwareRMSNorm": _norm(L.RMSNorm, tp_aware=True),
    "TPAwareGemmaRMSNorm": _norm(L.OffsetRMSNorm, tp_aware=True),
    "FusedMoE": _experts_0_11,
    "MoERunner": _runner,
    "TransformersMoERunner": _runner,
    "TransformersRoutedExperts": _routed_experts,
    "GateLinear": _hf_router,
    "SharedExperts": _shared_expert,
    "SharedExpertMLP": _shared_expert,
    # vLLM's LayerNorm and Conv2d/3dLayer compute what the exact torch modules they replace
    # compute, whole on every rank
    "LayerNorm": _keep("nn.LayerNorm computes what vLLM's LayerNorm does, replicated"),
    "Conv2dLayer": _keep("nn.Conv2d computes what vLLM's Conv2dLayer does, replicated"),
    "Conv3dLayer": _keep("nn.Conv3d computes what vLLM's Conv3dLayer does, replicated"),
    UNCHANGED: _keep("the backend leaves it as HF code"),
    ALIAS: _alias,
}


def build(site: Site) -> nn.Module | Kept:
    builder = BUILDERS.get(target_key(site.entry))
    if builder is None:
        raise NotBuildable(site.entry, "no builder for this target")
    return builder(site)


def install(model: nn.Module, name: str, module: nn.Module) -> None:
    """`module` at `name`, which may be new (a fused `qkv_proj` beside the HF projections)."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
