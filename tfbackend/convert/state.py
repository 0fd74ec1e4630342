"""plan → each rank's state dict, as vLLM's `ShardedStateLoader` will fill it.

`ShardedStateLoader.load_weights` (vLLM 0.32, model_loader/sharded_state_loader.py) copies each
file tensor into `state_dict[key]` of `_filter_subtensors(model.state_dict())`, raising on a key
it lacks (KeyError) and on any key left over ("Missing keys"). So a rank's files hold exactly:
- every parameter and persistent buffer of the modules its pipeline stage builds;
- one name per shared tensor: `_filter_subtensors` keeps the smallest key of tensors sharing
  storage (a tied `lm_head.weight` over `model.embed_tokens.weight`, the MoE runner's
  `experts.gate` alias over the router's own name);
- no empty tensor (`_filter_subtensors` skips them);
- each layer's vLLM `Attention` (attached as `<attention module>.attn`, transformers/base.py)
  with its `_k_scale`, `_v_scale`, `_q_scale`, `_prob_scale`: float32 scalars set to 1.0
  (layers/attention/attention.py `set_default_quant_scales(register_buffer=True)`).

Dtypes: parameters in the served dtype, except what vLLM's `keep_in_fp32` upcasts (the model's
`_keep_in_fp32_modules_strict`, on tensors without a `weight_loader`); buffers in the
checkpoint's own dtype, which is what the normal loader copies into them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

from tfbackend.convert import loaders
from tfbackend.convert.layout import (
    FLOAT32,
    TORCH_OF,
    Blocked,
    Layout,
    OutTensor,
    Piece,
    RankLayout,
    whole,
)
from tfbackend.convert.sources import SourceIndex
from tfbackend.inspect.checkpoint import FLOAT_DTYPES
from tfbackend.inspect.facts import EXPERTS, ModelFacts
from tfbackend.plan import (
    K_EMBEDDING,
    K_EXPERTS,
    K_LINEAR,
    K_LM_HEAD,
    ParamShard,
    PlanEntry,
    ReplacementPlan,
)
from tfbackend.replace.profiles import PROFILES, Capability

ATTENTION_SCALES = ("_k_scale", "_v_scale", "_q_scale", "_prob_scale")
ATTN_CHILD = "attn"  # base.py VLLM_ATTN_ATTR
ROUTER_BIAS = "e_score_correction_bias"
K_ROUTER = "router"
_LAYER = re.compile(r"^model\.(?P<list>.+?)\.(?P<idx>\d+)(\.|$)")
# Kinds whose parameters belong to vLLM layers (they carry a `weight_loader`): vLLM's
# `keep_in_fp32` upcasts only tensors without one (transformers/base.py)
_LOADER_KINDS = {K_LINEAR, K_EMBEDDING, K_LM_HEAD, K_EXPERTS, K_ROUTER, "conv"}


class _Checkpoint:
    """The checkpoint as the loaders see it; records which tensors were read."""

    def __init__(self, src: SourceIndex):
        self.src = src
        self.used: set[str] = set()

    def key(self, target: str, why: str) -> str:
        name = self.src.key(target)
        if name is None and (drop := self.src.dropped(target)):
            raise Blocked(
                f"{target}: vLLM's loader drops {drop.checkpoint_name} ({drop.reason}), so a "
                "normal load leaves this parameter uninitialised"
            )
        if name is None:
            raise Blocked(f"{target}: the checkpoint has no tensor for it ({why})")
        self.used.add(name)
        return name

    def shape(self, name: str) -> list[int]:
        return list(self.src.header(name).shape)

    def dtype(self, name: str) -> str:
        return self.src.header(name).dtype

    def expert(self, experts: str, index: int, role: str) -> str | None:
        name = self.src.expert(experts, index, role)
        if name is not None:
            self.used.add(name)
        return name

    def fused(self, target: str) -> str | None:
        name = self.src.key(target)
        if name is not None:
            self.used.add(name)
        return name


@dataclass
class _Slot:
    """One tensor of a rank's state dict, under every name that reaches it."""

    names: set[str]
    shape: list[int]
    pieces: list[Piece]
    dtype: str
    origin: str
    order: tuple
    buffer: bool = False


class _Model:
    """What every rank shares: the plan's aliases, module order, dtype rules, stage membership."""

    def __init__(self, facts: ModelFacts, plan: ReplacementPlan, ckpt: _Checkpoint, dtype: str):
        self.facts, self.plan, self.ckpt, self.dtype = facts, plan, ckpt, dtype
        self.order = {m.qualname: i for i, m in enumerate(facts.modules)}
        self.aliases: dict[str, list[str]] = {}
        for e in plan.entries:
            if "alias_of" in e.extra:
                self.aliases.setdefault(e.extra["alias_of"], []).append(e.qualname)
        self.primary = [e for e in plan.entries if "alias_of" not in e.extra]
        self.attention = {s.qualname for s in plan.attention if s.qualname}
        self.keep_fp32 = _keep_in_fp32(facts) if dtype in ("bfloat16", "float16") else None

    def names(self, qualname: str, param: str) -> set[str]:
        return {f"{q}.{param}" for q in [qualname, *self.aliases.get(qualname, [])]}

    def upcast(self, names: set[str]) -> bool:
        pattern = self.keep_fp32
        return pattern is not None and any(pattern.search(n.removeprefix("model.")) for n in names)

    def param_dtype(self, read: list[str], names: set[str], has_loader: bool) -> str:
        dtypes = {self.ckpt.dtype(n) for n in read}
        if not dtypes <= FLOAT_DTYPES:
            if len(dtypes) != 1:
                raise Blocked(f"{min(names)}: built from tensors of dtypes {sorted(dtypes)}")
            return TORCH_OF[dtypes.pop()]
        if not has_loader and self.upcast(names):
            return FLOAT32
        return self.dtype

    def on_stage(self, qualname: str, pp_rank: int) -> bool:
        """Whether pipeline stage `pp_rank` builds the module (base.py `pipeline_parallel`)."""
        plan = self.plan
        if plan.pp <= 1:
            return True
        if qualname == "lm_head" or qualname.startswith("lm_head."):
            return pp_rank == plan.pp - 1
        stage = plan.stages[pp_rank]
        m = _LAYER.match(qualname)
        if m and m.group("list") == plan.layers_module:
            return stage.layers[0] <= int(m.group("idx")) < stage.layers[1]
        top = qualname.removeprefix("model.")
        return not any(top == n or top.startswith(n + ".") for n in stage.missing)


def _keep_in_fp32(facts: ModelFacts):
    try:
        import transformers

        cls = getattr(transformers, facts.model_class, None)
    except ImportError:  # pragma: no cover
        cls = None
    fragments = getattr(cls, "_keep_in_fp32_modules_strict", None) or []
    return re.compile("|".join(re.escape(f) for f in fragments)) if fragments else None


def build_layout(facts: ModelFacts, plan: ReplacementPlan, src: SourceIndex, dtype: str) -> Layout:
    layout = Layout(tp=plan.tp, pp=plan.pp, dtype=dtype)
    layout.blockers.extend(model_blockers(facts, plan, src))
    if layout.blockers:
        return layout
    ckpt = _Checkpoint(src)
    model = _Model(facts, plan, ckpt, dtype)
    for pp_rank in range(plan.pp):
        for tp_rank in range(plan.tp):
            rank = _RankState(model, pp_rank, tp_rank)
            rank.collect()
            layout.blockers.extend(b for b in rank.blockers if b not in layout.blockers)
            layout.ranks.append(RankLayout(pp_rank, tp_rank, rank.tensors()))
    for m in src.ignored:
        layout.not_written[m.checkpoint_name] = m.reason
    for name in src.headers.tensors:
        if name not in ckpt.used and name not in layout.not_written:
            layout.not_written[name] = "no tensor of vLLM's model takes it"
    return layout


def model_blockers(facts: ModelFacts, plan: ReplacementPlan, src: SourceIndex) -> list[str]:
    """Reasons that hold for the whole model, before any tensor is laid out."""
    out = []
    profile = PROFILES.get(plan.profile)
    if profile is None or not profile.can(Capability.SHARDED_STATE_CONVERT):
        out.append(
            f"convert writes the sharded state of vLLM ≥ 0.32's Transformers backend; the "
            f"{plan.profile} profile builds other modules (pass --vllm-version 0.32)"
        )
    if quant := facts.config.quantization:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        out.append(
            f"quantized checkpoint ({method}): its packed weights and scales follow the "
            "quantization method's own layouts, which convert does not write"
        )
    if src.key("lm_head.bias"):
        out.append(
            "lm_head.bias: vLLM registers it only while loading a checkpoint normally, so the "
            "sharded-state loader has no parameter to put it in"
        )
    if plan.pp > 1 and not plan.stages:
        out.append("no pipeline split: the plan has no stages for --pp")
    return out


class _RankState:
    def __init__(self, model: _Model, pp_rank: int, tp_rank: int):
        self.model, self.pp_rank, self.r = model, pp_rank, tp_rank
        self.slots: dict[tuple, _Slot] = {}
        self.blockers: list[str] = []
        self.covered: set[str] = set()  # modules replaced (or served) by vLLM's own layers

    def add(self, identity, names, shape, pieces, dtype, origin, *, buffer=False) -> None:
        if identity in self.slots:
            self.slots[identity].names |= names
            return
        numel = sum(p.numel for p in pieces)
        if numel != prod(shape):
            raise Blocked(f"{min(names)}: {numel} elements read for shape {shape}")
        order = (self.model.order.get(origin, len(self.model.order)), min(names))
        self.slots[identity] = _Slot(set(names), list(shape), pieces, dtype, origin, order, buffer)

    def collect(self) -> None:
        m = self.model
        for entry in m.primary:
            if entry.params and m.on_stage(entry.qualname, self.pp_rank):
                self.covered.add(entry.qualname)
                self.covered.update(entry.sources)
                for shard in entry.params:
                    self._guard(self._entry_param, entry, shard)
                if entry.kind == K_ROUTER:
                    self._guard(self._router_bias, entry)
        for spec in m.plan.attention:
            if m.plan.pp > 1 and spec.stage != self.pp_rank:
                continue
            if spec.qualname is None:
                self.blockers.append(f"layer {spec.layer_idx}: no module dispatches its attention")
                continue
            self.covered.add(spec.qualname)
            self._guard(self._attention, spec)
        for fact in m.facts.modules:
            if m.on_stage(fact.qualname, self.pp_rank):
                self._guard(self._hf_module, fact)

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Blocked as exc:
            self.blockers.append(str(exc))

    def tensors(self) -> list[OutTensor]:
        out = []
        for s in sorted(self.slots.values(), key=lambda s: s.order):
            if prod(s.shape) == 0:
                continue  # _filter_subtensors drops empty tensors: a file key for one would raise
            out.append(
                OutTensor(
                    name=min(s.names),
                    shape=s.shape,
                    dtype=s.dtype,
                    pieces=s.pieces,
                    origin=s.origin,
                    aliases=sorted(s.names),
                    buffer=s.buffer,
                )
            )
        return out

    def _entry_param(self, entry: PlanEntry, shard: ParamShard) -> None:
        m, ckpt, r = self.model, self.model.ckpt, self.r
        names = m.names(entry.qualname, shard.name)
        identity: tuple = (entry.qualname, shard.name)
        if entry.kind == K_LM_HEAD and entry.extra.get("tied"):
            # ParallelLMHead.tie_weights shares the embedding's parameter: one tensor
            tied_to = entry.extra.get("tied_to")
            if not tied_to:
                raise Blocked("lm_head: tied, but no input embedding to tie it to")
            identity = (tied_to, shard.name)
            pieces, read = loaders.vocab(ckpt, tied_to, shard, r)
        elif entry.kind in (K_EMBEDDING, K_LM_HEAD):
            pieces, read = loaders.vocab(ckpt, entry.qualname, shard, r)
        elif entry.target == "QKVParallelLinear":
            pieces, read = loaders.qkv(ckpt, entry, shard, r)
        elif entry.target == "MergedColumnParallelLinear":
            pieces, read = loaders.merged(ckpt, entry, shard, r, m.plan.tp)
        elif entry.target == "TransformersRoutedExperts" and shard.name == ROUTER_BIAS:
            # the router's nn.Parameter, handed to FusedMoE: the same tensor as GateLinear's
            return self._router_bias(self._router_of(entry), names)
        elif entry.target == "TransformersRoutedExperts":
            fact = m.facts.module(entry.sources[0])
            if fact is None:
                raise Blocked(f"{entry.qualname}: no facts for {entry.sources[0]}")
            pieces, read = loaders.experts(ckpt, fact, shard, r)
        elif len(entry.sources) == 1:
            pieces, read = loaders.sharded(ckpt, entry.sources[0], shard, r)
        else:
            raise Blocked(f"{entry.qualname}: {entry.target} from {len(entry.sources)} modules")
        dtype = m.param_dtype(read, names, entry.kind in _LOADER_KINDS)
        self.add(identity, names, shard.rank_shape, pieces, dtype, entry.sources[0])

    def _router_of(self, routed: PlanEntry) -> PlanEntry:
        block = routed.sources[0].rsplit(".", 1)[0]
        for e in self.model.primary:
            if e.kind == K_ROUTER and e.qualname.rsplit(".", 1)[0] == block:
                return e
        raise Blocked(f"{routed.qualname}: {ROUTER_BIAS} without a router")

    def _router_bias(self, router: PlanEntry, more: set[str] | None = None) -> None:
        """GateLinear re-registers the HF router's `e_score_correction_bias` as its own buffer
        (fusers/moe.py `MoEBlockFuser.gate`); the routed experts may hold the same tensor."""
        m = self.model
        fact = m.facts.module(router.qualname)
        shape = fact and (fact.params.get(ROUTER_BIAS) or fact.buffers.get(ROUTER_BIAS))
        if not shape:
            return
        name = m.ckpt.key(f"{router.qualname}.{ROUTER_BIAS}", "the router's score correction")
        names = m.names(router.qualname, ROUTER_BIAS) | (more or set())
        block = router.qualname.rsplit(".", 1)[0]
        for e in m.primary:  # FusedMoE keeps the same tensor (routed_experts.py)
            if e.target == "TransformersRoutedExperts" and e.sources[0].startswith(block + "."):
                names.add(f"{e.qualname}.{ROUTER_BIAS}")
        piece = Piece(name, whole(list(shape)))
        dtype = m.param_dtype([name], names, False)
        self.add((router.qualname, ROUTER_BIAS), names, shape, [piece], dtype, router.qualname,
                 buffer=True)  # fmt: skip

    def _attention(self, spec) -> None:
        """The dispatching module's own parameters (sinks split over tp by vLLM's
        AttentionFuser, `sharded_weight_loader(0)`) and its vLLM Attention's scales."""
        m, q = self.model, spec.qualname
        for shard in spec.params:
            name = m.ckpt.key(f"{q}.{shard.name}", "the attention module's own parameter")
            shape = m.ckpt.shape(name)
            names = m.names(q, shard.name)
            if shard.shard_dim is None:
                pieces, loader = [Piece(name, whole(shape))], False
            elif len(shape) == 1:
                per = shard.rank_shape[0]
                pieces, loader = [Piece(name, [[self.r * per, (self.r + 1) * per]])], True
            else:
                raise Blocked(f"{q}.{shard.name}: sinks of shape {shape} (only 1-D are split)")
            dtype = m.param_dtype([name], names, loader)
            self.add((q, shard.name), names, shard.rank_shape, pieces, dtype, q)
        for scale in ATTENTION_SCALES:
            key = f"{q}.{ATTN_CHILD}.{scale}"
            one = Piece(None, fill=1.0, fill_numel=1)
            self.add((key,), {key}, [], [one], FLOAT32, q, buffer=True)

    def _hf_module(self, fact) -> None:
        """A module vLLM leaves as HF code keeps its parameters (`init_parameters`) and its
        persistent buffers, filled from the checkpoint; a replaced one keeps neither."""
        m, q = self.model, fact.qualname
        kept = q not in self.covered and fact.kind != EXPERTS
        if kept:
            for p, shape in fact.params.items():
                name = m.ckpt.key(f"{q}.{p}", "a parameter vLLM keeps as HF code")
                names = m.names(q, p)
                dtype = m.param_dtype([name], names, False)
                self.add((q, p), names, shape, [Piece(name, whole(shape))], dtype, q)
        if kept or q in m.attention:
            for b, shape in fact.buffers.items():
                self._buffer(q, b, shape)

    def _buffer(self, qualname: str, buffer: str, shape) -> None:
        m, target = self.model, f"{qualname}.{buffer}"
        name = m.ckpt.src.key(target)
        if name is None:
            raise Blocked(
                f"{target}: a persistent buffer vLLM keeps at the value the model's code "
                "computes; the checkpoint has no tensor for it and convert does not run the code"
            )
        m.ckpt.used.add(name)
        names = m.names(qualname, buffer)
        st_dtype = m.ckpt.dtype(name)
        dtype = TORCH_OF.get(st_dtype)
        if dtype is None:
            raise Blocked(f"{target}: checkpoint dtype {st_dtype} is not one convert writes")
        if st_dtype in FLOAT_DTYPES and m.upcast(names):
            dtype = FLOAT32
        pieces = [Piece(name, whole(m.ckpt.shape(name)))]
        self.add((qualname, buffer), names, shape, pieces, dtype, qualname, buffer=True)
