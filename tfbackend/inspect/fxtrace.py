"""An FX trace of one module's forward, taken the way vLLM 0.32's fusers take it.

vLLM decides which projections to fuse from a `torch.fx` trace of each module class
(vllm/model_executor/models/transformers/fx_utils.py: `trace`), and what that trace sees is
what decides: every child is a leaf (`call_module`), every op also runs on meta tensors so shape
unpacks trace through, `past_key_values` is the constant None, `**kwargs` iterates as empty, the
attention interface is one opaque call, and anything untraceable ends the trace with the graph
so far. A Python test on a proxy (`if output_attentions:`) is untraceable; `x is not None` on a
proxy is simply True. Reading the source instead gets the branches vLLM's trace takes wrong
(BioGPT's `current_states = key_value_states if is_cross_attention else hidden_states`), so we
take the same trace with the same torch and match on it (`fx_match.py`).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from itertools import chain
from typing import Any
from unittest import mock

import torch
from torch import fx, nn

_UNKNOWN: Any = object()
"""A proxy whose value could not be computed on meta (None is a real value)."""

_MODULE_CALL = nn.Module.__call__
"""fx patches `nn.Module.__call__` while tracing; running a child on meta needs the real one."""

_MODULE_GETATTR = nn.Module.__getattr__
"""fx patches `nn.Module.__getattr__` too, to record `get_attr` nodes: reading a parameter
through it while computing a `get_attr`'s own meta value records another `get_attr`, and so on
until the stack runs out; every level's error is swallowed, so the graph comes back with the
forward repeated and cut wherever the stack happened to end (a deeper caller, another cut).
vLLM 0.32's fx_utils has that recursion; 0.33 reads through the real `__getattr__`, as here."""


@contextlib.contextmanager
def _unpatched_modules():
    """The module hooks fx patches, restored: computing a meta value records nothing."""
    with (
        mock.patch.object(nn.Module, "__call__", _MODULE_CALL),
        mock.patch.object(nn.Module, "__getattr__", _MODULE_GETATTR),
    ):
        yield


class _MetaProxy(fx.Proxy):
    """A proxy that also carries its value computed on meta tensors, so `len`, iteration and
    `.shape` unpacks are answered by PyTorch's meta kernels instead of ending the trace."""

    meta: Any = _UNKNOWN

    def __len__(self) -> int:
        if self.meta is not _UNKNOWN:
            return len(self.meta)
        if _is_shape(self.node):
            # `f(*x.shape[:-1])` asks for a length hint first: TypeError says "none", and
            # Python then iterates (the tracer's `iter`); fx's own RuntimeError ends the trace
            raise TypeError("a traced shape's length is unknown")
        return super().__len__()  # type: ignore[misc]

    def __getattr__(self, k: str) -> _MetaAttribute:
        return _MetaAttribute(self, k)

    def __setitem__(self, key: object, value: object) -> None:
        # an in-place write into a container is recorded, not fatal
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _MetaAttribute(_MetaProxy, fx.proxy.Attribute):
    """`x.shape` and the like; fx builds attribute proxies itself, so the value is set here."""

    def __init__(self, root: fx.Proxy, attr: str):
        super().__init__(root, attr)
        root_meta = getattr(root, "meta", _UNKNOWN)
        if root_meta is not _UNKNOWN:
            with contextlib.suppress(Exception):
                self.meta = getattr(root_meta, attr)


def _reference_weight(module: nn.Module) -> torch.Tensor | None:
    """A weight whose last dim is the hidden size: the first linear's, else a 1-D/2-D param."""
    for child in module.modules():
        if isinstance(child, nn.Linear):
            return child.weight
    return next((p for p in module.parameters() if p.ndim in (1, 2)), None)


class _LeafTracer(fx.Tracer):
    varkw: str | None = None  # the forward's `**kwargs` name, iterated as empty

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, *extra, **extra_kwargs):
        proxy = super().create_proxy(kind, target, args, kwargs, *extra, **extra_kwargs)
        if isinstance(proxy, _MetaProxy) and proxy.meta is _UNKNOWN:
            with contextlib.suppress(Exception):  # unknown is fatal only if a shape is asked
                proxy.meta = self._meta_value(kind, target, args, kwargs)
        if isinstance(proxy, _MetaProxy) and proxy.meta is not _UNKNOWN:
            proxy.node.meta["value"] = proxy.meta  # graph queries read shapes off the nodes
        return proxy

    def _meta_value(self, kind: str, target: object, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            # vLLM always feeds [1, seq, hidden] hidden states; other inputs stay unknown
            weight = _reference_weight(self.root)
            if str(target) == "hidden_states" and weight is not None:
                return torch.empty(1, 8, weight.shape[-1], dtype=weight.dtype, device="meta")
            return _UNKNOWN
        if kind == "get_attr":
            with _unpatched_modules():
                value = operator.attrgetter(str(target))(self.root)
            return torch.empty_like(value, device="meta") if torch.is_tensor(value) else value
        unknown = False

        def meta_of(arg: object) -> object:
            nonlocal unknown
            if isinstance(arg, fx.Proxy):
                meta = getattr(arg, "meta", _UNKNOWN)
                unknown = unknown or meta is _UNKNOWN
                return meta
            return arg

        margs = fx.node.map_aggregate(args, meta_of)
        mkwargs = fx.node.map_aggregate(kwargs, meta_of)
        if unknown:
            return _UNKNOWN
        if kind == "call_function":
            return target(*margs, **mkwargs)
        if kind == "call_method":
            receiver, *rest = margs
            return getattr(receiver, str(target))(*rest, **mkwargs)
        if kind == "call_module":
            child = self.root.get_submodule(str(target))
            state = {
                n: torch.empty_like(t, device="meta")
                for n, t in chain(child.named_parameters(), child.named_buffers())
            }
            with _unpatched_modules():
                return torch.func.functional_call(child, state, margs, mkwargs)
        return _UNKNOWN

    def _is_varkw(self, node: object) -> bool:
        return (
            isinstance(node, fx.Node)
            and node.op == "placeholder"
            and str(node.target).lstrip("*") == self.varkw
        )

    def iter(self, obj: fx.Proxy):
        node = obj.node
        if self._is_varkw(node) or (
            node.op == "call_method" and node.target == "keys" and self._is_varkw(node.args[0])
        ):
            return iter(())
        meta = getattr(obj, "meta", _UNKNOWN)
        if meta is _UNKNOWN and _is_shape(node):
            # `x.new_empty(*x.shape[:-1], d)` (DeepSeek-V3's attention in transformers 5.24): a
            # shape of unknown length spread into a call's arguments. Its pieces carry no data,
            # so one proxy for all of them keeps the graph's data flow whole; the trace would
            # otherwise stop there, before o_proj, and what fuses would depend on the release.
            return iter([obj])
        if meta is _UNKNOWN:
            return super().iter(obj)
        return iter([obj[i] for i in range(len(meta))])


def _is_shape(node: fx.Node) -> bool:
    """`x.shape`, `x.size()` or a slice or item of either."""
    while node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] == "shape"
    return node.op == "call_method" and node.target == "size"


def _leaf(fn):
    """`fn` recorded as one opaque node returning two values (an attention interface)."""

    def leaf(*args, **kwargs):
        proxies = tuple(a for a in args if isinstance(a, fx.Proxy))
        if not proxies:
            return fn(*args, **kwargs)
        proxy = proxies[0].tracer.create_proxy("call_function", fn, proxies, {})
        proxy.node.meta["leaf_call"] = True
        proxy.meta = (_UNKNOWN, _UNKNOWN)
        return proxy

    return leaf


def _leaf_attention_interfaces():
    from transformers.modeling_utils import AttentionInterface

    original = AttentionInterface.get_interface

    def get_interface(self, *args, **kwargs):
        return _leaf(original(self, *args, **kwargs))

    return mock.patch.object(AttentionInterface, "get_interface", get_interface)


def branch_scalars(module: nn.Module) -> tuple:
    """A module's public scalar attributes: what its forward can branch on, so what a trace of
    one instance may differ from another's by (a cache key beside the class)."""
    return tuple(
        (k, v)
        for k, v in sorted(vars(module).items())
        if not k.startswith("_") and isinstance(v, (bool, int, float, str))
    )


def forward_parameters(cls: type) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return {}


def trace(module: nn.Module) -> fx.Graph | None:
    """The graph of `module.forward` (partial if the trace stopped), None if none was begun."""
    params = forward_parameters(type(module))
    concrete = {"past_key_values": None} if "past_key_values" in params else None
    tracer = _LeafTracer()
    tracer.varkw = next(
        (p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )
    attributes = dict(module.__dict__)  # a forward that sets `self.x = ...` must not leave proxies
    cls = type(module)
    try:
        with _leaf_attention_interfaces(), _unwrapped_forward(module):
            return tracer.trace(module, concrete_args=concrete)
    except Exception:
        return getattr(tracer, "graph", None)
    finally:
        module.__class__ = cls
        module.__dict__.clear()
        module.__dict__.update(attributes)


@contextlib.contextmanager
def _unwrapped_forward(module: nn.Module):
    """Trace the forward transformers wrote, not a decorator around it.

    fx reads the placeholders from the unwrapped code but calls the wrapper, so a wrapper that
    handles `*args, **kwargs` (5.24's `deprecate_kwarg` on attention forwards) ends the trace
    before the first projection, and nothing fuses. vLLM reads sources through `inspect.unwrap`
    everywhere else (fx_utils.recover_forward, fusers/attention.py), and the transformers it
    supports adds no such wrapper: the plan must not depend on one.
    """
    cls = type(module)
    inner = inspect.unwrap(cls.forward)
    if inner is cls.forward:
        yield
        return
    # fx traces `type(root).forward`: a same-named subclass holding the inner function
    module.__class__ = type(cls.__name__, (cls,), {"forward": inner, "__module__": cls.__module__})
    try:
        yield
    finally:
        module.__class__ = cls


# ---- graph queries (fx_utils.py's, with the same walk order: the first linear found wins) ----


def is_linear(node: object, module: nn.Module) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and isinstance(module.get_submodule(str(node.target)), nn.Linear)
    )


def is_leaf_call(node: object) -> bool:
    return isinstance(node, fx.Node) and node.meta.get("leaf_call", False)


def upstream_linear(node: object, module: nn.Module) -> fx.Node | None:
    """The nearest linear producing `node`, back through ops and non-linear children (a
    dropout after the output projection), never through the attention call."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if not isinstance(current, fx.Node) or current in seen:
            continue
        seen.add(current)
        if is_linear(current, module):
            return current
        if current.op in ("call_function", "call_method", "call_module") and not is_leaf_call(
            current
        ):
            stack.extend(current.args)
    return None


def downstream_linear(node: fx.Node, module: nn.Module) -> fx.Node | None:
    """The nearest linear consuming `node`'s output, forward through function and method
    calls (casts, scalings), never through the attention call (fx_utils.downstream_linear)."""
    queue, seen = list(node.users), set()
    while queue:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if is_linear(current, module):
            return current
        if current.op in ("call_function", "call_method") and not is_leaf_call(current):
            queue.extend(current.users)
    return None


def downstream_linears(graph: fx.Graph, module: nn.Module, names: list[str]) -> list[str]:
    """The nearest linear children fed by the outputs of linears `names` (through ops, norms and
    the attention call): where a column-split projection's per-rank slices go next."""
    starts = [n for n in graph.nodes if is_linear(n, module) and str(n.target) in names]
    found: list[str] = []
    stack, seen = [u for n in starts for u in n.users], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_linear(node, module):
            if str(node.target) not in names and str(node.target) not in found:
                found.append(str(node.target))
            continue  # a linear re-forms the activation: stop there
        stack.extend(node.users)
    return found


def returned_linear(graph: fx.Graph, module: nn.Module) -> str | None:
    """The linear producing the forward's (first) returned value; None on a partial trace."""
    output = next((n for n in graph.nodes if n.op == "output"), None)
    if output is None or not output.args:
        return None
    value = output.args[0]
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    linear = upstream_linear(value, module)
    return None if linear is None else str(linear.target)


def reaches(node: fx.Node, key: str) -> set[fx.Node]:
    """Every node reachable from `node` along `key` edges ("users" or "all_input_nodes"),
    `node` included."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(getattr(current, key))
    return seen


def is_op(node: object, name: str) -> bool:
    """`torch.<name>`, `F.<name>`, `operator.<name>` called, or the tensor method `<name>`."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return any(
            getattr(owner, name, None) is not None and node.target is getattr(owner, name)
            for owner in (torch, torch.nn.functional, operator)
        )
    return node.op == "call_method" and node.target == name and hasattr(torch.Tensor, name)


_DTYPE_CASTS = frozenset({"to", "float", "double", "half", "bfloat16", "type_as"})


def peel(node: object) -> object:
    """`node` without dtype casts (`.to(...)`, `.float()`, ...)."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _DTYPE_CASTS:
        node = node.args[0]
    return node


_REDUCTIONS = frozenset({
    "mean", "std", "var", "sum", "norm", "amax", "amin", "softmax", "log_softmax", "topk",
    "sort", "logsumexp", "median", "quantile", "std_mean", "var_mean",
})  # fmt: skip


def _reduced_dim(node: fx.Node) -> object:
    dim = node.kwargs.get("dim")
    if dim is None and len(node.args) > 1:
        dim = node.args[1]
    return dim


def feature_reductions(graph: fx.Graph, module: nn.Module, names: list[str]) -> list[str]:
    """Reductions over the last (feature) dim of the outputs of linears `names`, on the way to
    the next linear: statistics a rank holding a column slice computes over its slice only
    (Gemma 3n's activation sparsity: `mean`/`std` of gate_proj over its features)."""
    starts = [n for n in graph.nodes if is_linear(n, module) and str(n.target) in names]
    widths = {module.get_submodule(str(n.target)).out_features for n in starts}
    found: list[str] = []
    stack, seen = [u for n in starts for u in n.users], set()
    while stack:
        node = stack.pop()
        if node in seen or is_linear(node, module):
            continue
        seen.add(node)
        if node.op in ("call_function", "call_method"):
            name = str(node.target) if node.op == "call_method" else node.target.__name__
            src = node.args[0] if node.args else None
            if (
                name in _REDUCTIONS
                and _reduced_dim(node) in (-1, None)
                and name not in found
                and _last_dim(src) in widths
            ):
                found.append(name)
        stack.extend(node.users)
    return found


def _last_dim(node: object) -> int | None:
    """The last dim of the value a traced node carries (None: not known)."""
    if not isinstance(node, fx.Node):
        return None
    shape = getattr(node.meta.get("value"), "shape", None)
    return int(shape[-1]) if shape else None
