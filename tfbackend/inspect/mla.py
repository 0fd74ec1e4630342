"""Which attention modules vLLM 0.32's MLAFuser takes, read from the forward source.

vLLM (`fusers/mla.py`, tried before every other fuser) traces the forward with torch.fx, every
child a leaf, and looks for `rms_norm(linear(x))` chains on a forward input: exactly one whose
linear is wider than its norm (`kv_a_proj_with_mqa` → `kv_a_layernorm`: the latent plus the rope
key), at most one as wide (`q_a_proj` → `q_a_layernorm`), each followed by the linear that
expands it (`q_b_proj`, `kv_b_proj`); with no query chain, the one other linear on an input is
`q_proj`; the linear producing the returned value is `o_proj`. Then it rewrites the forward's
source: the two down-projections must be called once each on one input, and the KV expansion
`self.<method>(kv, k_rot)` (two inputs, returns a pair, applies kv_b_proj) exactly once; if the
rewrite raises, MLA is skipped and the next fuser is tried.

We replay the trace on the AST: a small interpreter records the same dataflow graph fx would
(calls of children, functions and tensor methods; self-methods inlined; `if` folded on concrete
module attributes, the trace ending where fx would need a tensor's truth value), then match
and check the rewrite as vLLM does. One analysis per (class, children and their shapes).
"""

from __future__ import annotations

import ast
import inspect
import operator
import textwrap
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any

from tfbackend.inspect.rewrite import aliasing_names, written_names

_cache: dict[tuple, dict[str, Any] | None] = {}

# vLLM sets the text config's attention implementation to its own before it traces (base.py).
_TRACE_ATTN_IMPL = "vllm"
_INLINE_DEPTH = 4


def mla_fact(module: Any) -> dict[str, Any] | None:
    """The MLA fusion vLLM would make on this module's class, as plain data: the role of each
    child, or `{"fuser": None, "reason": ...}` when the latent chain is there but the match or
    the rewrite fails. None: no latent KV chain (not MLA)."""
    import torch.nn as nn

    children = list(module.named_children())
    if sum(isinstance(c, nn.Linear) for _, c in children) < 2:
        return None  # vLLM traces only modules with two linear children
    key = (
        type(module),
        tuple(
            (n, getattr(c, "in_features", None), getattr(c, "out_features", None), _norm_size(c))
            for n, c in children
        ),
    )
    if key not in _cache:
        try:
            _cache[key] = _analyse(module)
        except Exception as exc:  # noqa: BLE001 - an unreadable forward never fuses as MLA
            # worth a note only where a latent norm shows MLA was meant
            reason = {"fuser": None, "reason": f"forward not analysable: {exc}"}
            _cache[key] = reason if _has_latent_norm(module) else None
    return _cache[key]


def _norm_size(module: Any) -> int:
    weight = getattr(module, "weight", None)
    return int(weight.numel()) if weight is not None and weight.ndim == 1 else -1


def _has_latent_norm(module: Any) -> bool:
    return any(n.endswith("kv_a_layernorm") for n, _ in module.named_children())


# --- the replayed trace ----------------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    """One fx node: op is placeholder | call_module | call_function | call_method | leaf."""

    op: str
    target: str
    args: tuple  # positional operands as fx records them (nodes, constants, containers)
    users: list[_Node] = field(default_factory=list)


@dataclass(frozen=True)
class _Const:
    value: Any


@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _Child:
    name: str  # a child module (dotted for grandchildren)


@dataclass(frozen=True)
class _Method:
    name: str  # a method of the module's class: fx runs it, so we inline it
    after: type | None = None  # `super().name`: look it up past this class in the MRO


class _Self:
    pass


class _Interface:
    """`ALL_ATTENTION_FUNCTIONS.get_interface(...)`: vLLM patches it into one leaf call."""


_SELF, _INTERFACE, _UNKNOWN = _Self(), _Interface(), _Const(object())
_OWNER = "<owner>"  # env key (never an identifier) of the class whose method is running


class _Stop(Exception):
    """The trace ends here (fx needs a concrete value it does not have); the graph so far is
    what vLLM matches."""


class _Return(Exception):
    def __init__(self, value: Any):
        self.value = value


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.MatMult: operator.matmul,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


def _nodes_in(value: Any) -> list[_Node]:
    if isinstance(value, _Node):
        return [value]
    if isinstance(value, (tuple, list)):
        return [n for v in value for n in _nodes_in(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _nodes_in(v)]
    return []


def _function_def(fn: Any) -> ast.FunctionDef:
    fn = inspect.unwrap(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    funcdef = tree.body[0]
    if not isinstance(funcdef, ast.FunctionDef):
        raise ValueError(f"{getattr(fn, '__name__', fn)} is not a plain function")
    return funcdef


class _Trace:
    """Interprets a forward's AST into the node graph vLLM's `_AllLeafTracer` records."""

    def __init__(self, module: Any):
        self.module = module
        self.nodes: list[_Node] = []
        self.output: Any = None
        self.complete = False

    def node(self, op: str, target: str, args: tuple, kwargs: dict | None = None) -> _Node:
        n = _Node(op, target, args)
        for used in _nodes_in(args) + _nodes_in(kwargs or {}):
            if n not in used.users:
                used.users.append(n)
        self.nodes.append(n)
        return n

    def run(self) -> None:
        funcdef = _function_def(type(self.module).forward)
        positional = funcdef.args.posonlyargs + funcdef.args.args
        env: dict[str, Any] = {positional[0].arg: _SELF, _OWNER: self.owner("forward")}
        inputs = positional[1:] + funcdef.args.kwonlyargs
        for a in inputs + list(filter(None, (funcdef.args.vararg, funcdef.args.kwarg))):
            env[a.arg] = self.node("placeholder", a.arg, ())
        if "past_key_values" in env:
            env["past_key_values"] = _Const(None)  # vLLM makes it concrete (fx_utils.trace)
        try:
            self.block(funcdef.body, env, 0)
        except _Return as ret:
            self.output, self.complete = ret.value, True
        except _Stop:
            pass

    # statements

    def block(self, body: list[ast.stmt], env: dict, depth: int) -> None:
        for stmt in body:
            self.stmt(stmt, env, depth)

    def stmt(self, s: ast.stmt, env: dict, depth: int) -> None:
        if isinstance(s, ast.Assign):
            value = self.expr(s.value, env, depth)
            for target in s.targets:
                self.bind(target, value, env, depth)
        elif isinstance(s, ast.AnnAssign):
            if s.value is not None:
                self.bind(s.target, self.expr(s.value, env, depth), env, depth)
        elif isinstance(s, ast.AugAssign):
            value = self.binop(
                s.op, self.expr(s.target, env, depth), self.expr(s.value, env, depth)
            )
            self.bind(s.target, value, env, depth)
        elif isinstance(s, ast.Expr):
            self.expr(s.value, env, depth)
        elif isinstance(s, ast.Return):
            raise _Return(self.expr(s.value, env, depth) if s.value else _Const(None))
        elif isinstance(s, ast.If):
            taken = s.body if self.truth(self.expr(s.test, env, depth)) else s.orelse
            self.block(taken, env, depth)
        elif isinstance(s, ast.Assert):
            if not self.truth(self.expr(s.test, env, depth)):
                raise _Stop
        elif isinstance(s, ast.With):
            self.block(s.body, env, depth)
        elif isinstance(s, (ast.Pass, ast.FunctionDef, ast.Import, ast.ImportFrom)):
            if isinstance(s, ast.FunctionDef):
                env[s.name] = _UNKNOWN
        else:
            raise _Stop  # loops, try, raise, del: not worth following

    def truth(self, value: Any) -> bool:
        if isinstance(value, _Const) and value is not _UNKNOWN:
            return bool(value.value)
        if isinstance(value, (_Child, _Method, _Global, _Self, _Interface)):
            return True
        if isinstance(value, (tuple, list)):
            return bool(value)
        raise _Stop  # a tensor's truth value: fx raises TraceError

    def bind(self, target: ast.expr, value: Any, env: dict, depth: int) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            n = len(target.elts)
            if any(isinstance(e, ast.Starred) for e in target.elts):
                items: list[Any] = [_UNKNOWN] * n
            elif isinstance(value, (tuple, list)) and len(value) == n:
                items = list(value)
            elif isinstance(value, _Node):  # fx unpacks a proxy into getitem nodes
                items = [self.node("call_function", "getitem", (value, i)) for i in range(n)]
            elif isinstance(value, _Const) and value is not _UNKNOWN:
                try:
                    items = [_Const(v) for v in value.value]
                except TypeError:
                    items = [_UNKNOWN] * n
            else:
                items = [_UNKNOWN] * n
            for t, v in zip(target.elts, items, strict=False):
                self.bind(t.value if isinstance(t, ast.Starred) else t, v, env, depth)
        elif isinstance(target, ast.Subscript):
            base = self.expr(target.value, env, depth)
            if isinstance(base, _Node):
                index = self.expr(target.slice, env, depth)
                self.node("call_function", "setitem", (base, index, value))

    # expressions

    def expr(self, e: ast.expr, env: dict, depth: int) -> Any:  # noqa: C901, PLR0911, PLR0912
        if isinstance(e, ast.Constant):
            return _Const(e.value)
        if isinstance(e, ast.Name):
            return env.get(e.id, _Global(e.id))
        if isinstance(e, ast.Attribute):
            return self.attribute(self.expr(e.value, env, depth), e.attr)
        if isinstance(e, ast.Subscript):
            return self.subscript(self.expr(e.value, env, depth), self.expr(e.slice, env, depth))
        if isinstance(e, (ast.Tuple, ast.List)):
            out: list[Any] = []
            for elt in e.elts:
                if isinstance(elt, ast.Starred):
                    inner = self.expr(elt.value, env, depth)
                    out.extend(inner if isinstance(inner, (tuple, list)) else [inner])
                else:
                    out.append(self.expr(elt, env, depth))
            return tuple(out)
        if isinstance(e, ast.Slice):
            parts = [
                self.expr(p, env, depth) if p else _Const(None) for p in (e.lower, e.upper, e.step)
            ]
            if all(isinstance(p, _Const) and p is not _UNKNOWN for p in parts):
                return _Const(slice(*(p.value for p in parts)))
            return tuple(parts)
        if isinstance(e, ast.BinOp):
            return self.binop(e.op, self.expr(e.left, env, depth), self.expr(e.right, env, depth))
        if isinstance(e, ast.UnaryOp):
            operand = self.expr(e.operand, env, depth)
            if isinstance(e.op, ast.Not):
                return _Const(not self.truth(operand))
            if isinstance(operand, _Node):
                return self.node("call_function", type(e.op).__name__.lower(), (operand,))
            return self.fold(_UNARY[type(e.op)], operand)
        if isinstance(e, ast.BoolOp):
            value: Any = _Const(isinstance(e.op, ast.And))
            for operand in e.values:
                value = self.expr(operand, env, depth)
                if self.truth(value) != isinstance(e.op, ast.And):
                    return value
            return value
        if isinstance(e, ast.Compare):
            return self.compare(e, env, depth)
        if isinstance(e, ast.IfExp):
            branch = e.body if self.truth(self.expr(e.test, env, depth)) else e.orelse
            return self.expr(branch, env, depth)
        if isinstance(e, ast.Call):
            return self.call(e, env, depth)
        if isinstance(e, ast.NamedExpr):
            value = self.expr(e.value, env, depth)
            env[e.target.id] = value
            return value
        return _UNKNOWN  # f-strings, lambdas, comprehensions: nothing a match reads

    def attribute(self, base: Any, attr: str) -> Any:
        import torch.nn as nn

        if base is _SELF:
            child = self.module._modules.get(attr)
            if isinstance(child, nn.Module):
                return _Child(attr)
            if isinstance(inspect.getattr_static(type(self.module), attr, None), FunctionType):
                return _Method(attr)  # a plain method: fx runs its body
            if not hasattr(self.module, attr):
                raise _Stop  # AttributeError ends the trace
            return _Const(getattr(self.module, attr))
        if isinstance(base, _Child):
            sub = self.module.get_submodule(base.name)
            if isinstance(getattr(sub, attr, None), nn.Module):
                return _Child(f"{base.name}.{attr}")
            return _Const(getattr(sub, attr, None))
        if isinstance(base, _Node):
            return self.node("call_function", "getattr", (base, attr))
        if isinstance(base, _Global):
            return _Global(f"{base.name}.{attr}")
        if isinstance(base, _Const) and base is not _UNKNOWN:
            if attr == "_attn_implementation":
                return _Const(_TRACE_ATTN_IMPL)
            if not hasattr(base.value, attr):
                raise _Stop
            return _Const(getattr(base.value, attr))
        return _UNKNOWN

    def subscript(self, base: Any, index: Any) -> Any:
        if isinstance(base, _Node) or _nodes_in(index):
            return self.node("call_function", "getitem", (base, index))
        if isinstance(base, (tuple, list)) and isinstance(index, _Const):
            try:
                return base[index.value]
            except (IndexError, TypeError):
                return _UNKNOWN
        if isinstance(base, _Const) and isinstance(index, _Const):
            return self.fold(operator.getitem, base, index)
        return _UNKNOWN

    def binop(self, op: ast.operator, left: Any, right: Any) -> Any:
        if _nodes_in(left) or _nodes_in(right):
            return self.node("call_function", type(op).__name__.lower(), (left, right))
        if type(op) in _BINOPS:
            return self.fold(_BINOPS[type(op)], left, right)
        return _UNKNOWN

    def compare(self, e: ast.Compare, env: dict, depth: int) -> Any:
        left = self.expr(e.left, env, depth)
        result: Any = _Const(True)
        for op, right_e in zip(e.ops, e.comparators, strict=True):
            right = self.expr(right_e, env, depth)
            if isinstance(op, (ast.Is, ast.IsNot)):
                # identity is never traced: a proxy is not None, whatever it holds
                same = self._identity(left) is self._identity(right)
                step = _Const(same if isinstance(op, ast.Is) else not same)
            elif _nodes_in(left) or _nodes_in(right):
                step = self.node("call_function", type(op).__name__.lower(), (left, right))
            else:
                step = self.fold(_COMPARE[type(op)], left, right)
            if not isinstance(step, _Const) or step is _UNKNOWN:
                return step
            if not step.value:
                return step
            result, left = step, right
        return result

    @staticmethod
    def _identity(value: Any) -> Any:
        if isinstance(value, _Const) and value is not _UNKNOWN:
            return value.value
        return value

    @staticmethod
    def fold(fn, *operands: Any) -> Any:
        if any(not isinstance(o, _Const) or o is _UNKNOWN for o in operands):
            return _UNKNOWN
        try:
            return _Const(fn(*(o.value for o in operands)))
        except Exception:  # noqa: BLE001 - folding is best effort
            return _UNKNOWN

    def call(self, e: ast.Call, env: dict, depth: int) -> Any:
        receiver = None
        if _is_super(e.func):
            return self.inline_call(_Method(e.func.attr, env.get(_OWNER)), e, env, depth)
        if isinstance(e.func, ast.Attribute):
            receiver = self.expr(e.func.value, env, depth)
            func = (
                self.attribute(receiver, e.func.attr) if not isinstance(receiver, _Node) else None
            )
        else:
            func = self.expr(e.func, env, depth)
        args: list[Any] = []
        for a in e.args:
            if isinstance(a, ast.Starred):
                inner = self.expr(a.value, env, depth)
                args.extend(inner if isinstance(inner, (tuple, list)) else [inner])
            else:
                args.append(self.expr(a, env, depth))
        kwargs = {k.arg: self.expr(k.value, env, depth) for k in e.keywords if k.arg}
        if isinstance(receiver, _Node):
            return self.node("call_method", e.func.attr, (receiver, *args), kwargs)
        if isinstance(func, _Child):
            return self.node("call_module", func.name, tuple(args), kwargs)
        if isinstance(func, _Method):
            return self.inline(func, args, kwargs, depth)
        if isinstance(func, _Global) and func.name.endswith("ATTENTION_FUNCTIONS.get_interface"):
            return _INTERFACE
        if func is _INTERFACE:
            # `_as_leaf_call`: only the proxy arguments feed the node
            return self.node("leaf", "attention", tuple(_nodes_in(args)))
        if _nodes_in(args) or _nodes_in(kwargs):
            name = func.name if isinstance(func, _Global) else "call"
            return self.node("call_function", name, tuple(args), kwargs)
        return _UNKNOWN

    def owner(self, name: str, after: type | None = None) -> type | None:
        """The class in the module's MRO whose `name` runs (past `after` for `super()`)."""
        mro = type(self.module).__mro__
        if after is not None and after in mro:
            mro = mro[mro.index(after) + 1 :]
        return next((c for c in mro if name in vars(c)), None)

    def inline_call(self, method: _Method, e: ast.Call, env: dict, depth: int) -> Any:
        args = [self.expr(a, env, depth) for a in e.args if not isinstance(a, ast.Starred)]
        kwargs = {k.arg: self.expr(k.value, env, depth) for k in e.keywords if k.arg}
        return self.inline(method, args, kwargs, depth)

    def inline(self, method: _Method, args: list, kwargs: dict, depth: int) -> Any:
        owner = self.owner(method.name, method.after)
        if depth >= _INLINE_DEPTH or owner is None:
            raise _Stop
        funcdef = _function_def(vars(owner)[method.name])
        params = funcdef.args
        positional = params.posonlyargs + params.args
        names = [a.arg for a in positional]
        defaults = dict(
            zip(names[len(names) - len(params.defaults) :], params.defaults, strict=True)
        )
        defaults.update(
            (a.arg, d)
            for a, d in zip(params.kwonlyargs, params.kw_defaults, strict=True)
            if d is not None
        )
        env: dict[str, Any] = {names[0]: _SELF, _OWNER: owner}
        env.update(zip(names[1:], args, strict=False))
        for param in names[1:] + [a.arg for a in params.kwonlyargs]:
            if param in kwargs:
                env[param] = kwargs[param]
            elif param not in env:
                default = defaults.get(param)
                env[param] = self.expr(default, {}, depth) if default else _Const(None)
        if params.kwarg:
            env[params.kwarg.arg] = _Const({})
        try:
            self.block(funcdef.body, env, depth + 1)
        except _Return as ret:
            return ret.value
        return _Const(None)


# --- vLLM's match on the graph (fusers/mla.py: MLAFuser.match) --------------------------------


def _is_super(func: ast.expr) -> bool:
    """`super().<method>`: fx runs the parent's method too."""
    return (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "super"
        and not func.value.args
    )


def _is_linear(node: Any, module: Any) -> bool:
    import torch.nn as nn

    return (
        isinstance(node, _Node)
        and node.op == "call_module"
        and isinstance(module.get_submodule(node.target), nn.Linear)
    )


def _consumes_placeholder(node: _Node) -> bool:
    return (
        len(node.args) == 1 and isinstance(node.args[0], _Node) and node.args[0].op == "placeholder"
    )


def _upstream_linear(value: Any, module: Any) -> _Node | None:
    """fx_utils.upstream_linear: back through any call but a leaf, positional operands only
    (a node inside a tuple operand is not followed, as fx's `node.args` holds the tuple)."""
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if not isinstance(current, _Node) or id(current) in seen:
            continue
        seen.add(id(current))
        if _is_linear(current, module):
            return current
        if current.op in ("call_function", "call_method", "call_module"):
            stack.extend(current.args)
    return None


def _downstream_linear(node: _Node, module: Any) -> _Node | None:
    """fx_utils.downstream_linear: forward through function and method calls only."""
    queue, seen = list(node.users), set()
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if _is_linear(current, module):
            return current
        if current.op in ("call_function", "call_method"):
            queue.extend(current.users)
    return None


def _is_rms_norm(module: Any) -> bool:
    """vLLM asks its RMSNormFuser; we ask the same structural question tfbackend's norm
    planning does (norms.classify_norm: x̂·w, x̂·(1+w) or x̂)."""
    from tfbackend.inspect.facts import NORM_NO_WEIGHT, NORM_OFFSET, NORM_PLAIN
    from tfbackend.inspect.norms import classify_norm

    if next(module.children(), None) is not None:
        return False
    variant, is_rms = classify_norm(module)
    return variant in (NORM_PLAIN, NORM_OFFSET, NORM_NO_WEIGHT) and is_rms


def _match(trace: _Trace, module: Any) -> dict[str, Any] | None:
    chains = []
    for node in trace.nodes:
        if node.op != "call_module" or _is_linear(node, module) or not node.args:
            continue
        source = _upstream_linear(node.args[0], module)
        if source is None or not _consumes_placeholder(source):
            continue
        if not _is_rms_norm(module.get_submodule(node.target)):
            continue
        chains.append((source, node))

    def is_kv_a(chain) -> bool:
        source, norm = chain
        width = module.get_submodule(source.target).out_features
        return width != _norm_size(module.get_submodule(norm.target))

    kv_chains = [c for c in chains if is_kv_a(c)]
    q_chains = [c for c in chains if not is_kv_a(c)]
    if len(kv_chains) != 1 or len(q_chains) > 1:
        return None
    kv_a, kv_norm = kv_chains[0]
    claimed = {kv_a.target}
    roles: dict[str, str | None] = dict.fromkeys(
        ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj"), None
    )
    if q_chains:
        q_a, q_norm = q_chains[0]
        q_b = _downstream_linear(q_norm, module)
        if q_b is None:
            return {"fuser": None, "reason": f"no linear reads {q_norm.target}"}
        roles.update(q_a_proj=q_a.target, q_a_layernorm=q_norm.target, q_b_proj=q_b.target)
        claimed |= {q_a.target, q_b.target}
    else:
        on_input = {
            n.target for n in trace.nodes if _is_linear(n, module) and _consumes_placeholder(n)
        } - claimed
        if len(on_input) != 1:
            return {"fuser": None, "reason": f"{len(on_input)} query projections on an input"}
        roles["q_proj"] = next(iter(on_input))
        claimed.add(roles["q_proj"])
    kv_b = _downstream_linear(kv_norm, module)
    if kv_b is None or kv_b.target in claimed:
        return {"fuser": None, "reason": f"no unclaimed linear reads {kv_norm.target}"}
    claimed.add(kv_b.target)
    output = (
        trace.output[0]
        if isinstance(trace.output, (tuple, list)) and trace.output
        else trace.output
    )
    o = _upstream_linear(output, module) if trace.complete else None
    return {
        "fuser": "mla",
        **roles,
        "kv_a_proj": kv_a.target,
        "kv_a_layernorm": kv_norm.target,
        "kv_b_proj": kv_b.target,
        "o_proj": o.target if o is not None and o.target not in claimed else None,
    }


def _analyse(module: Any) -> dict[str, Any] | None:
    trace = _Trace(module)
    trace.run()
    fact = _match(trace, module)
    if fact is None:
        return None
    if fact["fuser"] is not None:
        why_not = rewrite_refusal(module, fact)
        if why_not:
            return {"fuser": None, "reason": f"forward rewrite fails: {why_not}", "matched": fact}
    return fact


# --- vLLM's source rewrite (MLAFuser.update_forward), as the checks that can refuse it --------


def rewrite_refusal(module: Any, fact: dict[str, Any]) -> str | None:
    """Why vLLM's `update_forward` would raise for this match (None: the rewrite succeeds)."""
    fn = inspect.unwrap(type(module).forward)
    if fn.__code__.co_freevars:
        return "forward is a closure"
    funcdef = _function_def(fn)
    for node in ast.walk(funcdef):
        name = getattr(node, "attr", None) or getattr(node, "id", None)
        if name and name.startswith("__") and not name.endswith("__"):
            return f"{name} would be name mangled"
    if fact["q_a_proj"] is not None:
        calls = []
        for name in (fact["q_a_proj"], fact["kv_a_proj"]):
            call, why = _unguarded_call(funcdef, name)
            if call is None:
                return why
            calls.append(call)
        if ast.dump(calls[0].args[0]) != ast.dump(calls[1].args[0]):
            return "down-projections read different inputs"
        if why := _input_unstable(funcdef, module, calls):
            return why
        names = {n.id for n in ast.walk(funcdef) if isinstance(n, ast.Name)}
        if names & {"_vllm_merged_0", "_vllm_merged_1"}:
            return "fused temporaries would shadow existing names"
    return _expansion_refusal(funcdef, module, fact["kv_b_proj"])


def _self_attr(node: ast.AST, name: str) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == name
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _unguarded_call(funcdef: ast.FunctionDef, name: str) -> tuple[ast.Call | None, str]:
    """fx_utils.self_call_and_refs + bypass_existence_guard: one `self.<name>(x)` call; every
    other reference an `is (not) None` test or a bare truth test."""
    uses = [n for n in ast.walk(funcdef) if _self_attr(n, name)]
    calls = [
        n
        for n in ast.walk(funcdef)
        if isinstance(n, ast.Call)
        and any(n.func is u for u in uses)
        and len(n.args) == 1
        and not isinstance(n.args[0], ast.Starred)
        and not n.keywords
    ]
    if len(calls) != 1:
        return None, f"{name} is not called exactly once as self.{name}(arg)"
    for ref in uses:
        if ref is calls[0].func or _is_guard(funcdef, ref):
            continue
        return None, f"{name} is referenced outside an existence guard"
    return calls[0], ""


def _is_guard(funcdef: ast.FunctionDef, ref: ast.AST) -> bool:
    def is_none(n: ast.AST) -> bool:
        return isinstance(n, ast.Constant) and n.value is None

    for node in ast.walk(funcdef):
        if (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], (ast.Is, ast.IsNot))
            and (
                (node.left is ref and is_none(node.comparators[0]))
                or (node.comparators[0] is ref and is_none(node.left))
            )
        ):
            return True
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)) and node.test is ref:
            return True
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and node.operand is ref:
            return True
    return False


def _top_level_index(funcdef: ast.FunctionDef, node: ast.AST) -> int:
    return next(i for i, s in enumerate(funcdef.body) if any(c is node for c in ast.walk(s)))


def _input_unstable(funcdef: ast.FunctionDef, module: Any, calls: list[ast.Call]) -> str | None:
    """StackedFuser._check_input_stable: the merged GEMM is hoisted to the first call, so
    nothing between the calls may rebind or write the input, or a view of it."""
    seed = {
        n.id
        for n in ast.walk(calls[0].args[0])
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }
    tracked = aliasing_names(funcdef, seed, module)
    indices = [_top_level_index(funcdef, c) for c in calls]
    region = funcdef.body[min(indices) : max(indices) + 1]
    if tracked & written_names(region):
        return "projection input is rebound or mutated before all calls"
    return None


def _expansion_refusal(funcdef: ast.FunctionDef, module: Any, kv_b_proj: str) -> str | None:
    """mla._single_expand_call: exactly one `self.<m>(a, b)` whose method takes two inputs,
    applies kv_b_proj and returns a pair on every path."""

    def is_expansion(name: str) -> bool:
        method = getattr(type(module), name, None)
        code = getattr(inspect.unwrap(method), "__code__", None) if method else None
        if code is None or code.co_argcount != 3 or kv_b_proj not in code.co_names:
            return False
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        except (OSError, TypeError):
            return False
        returns = [n for n in ast.walk(tree) if isinstance(n, ast.Return)]
        return bool(returns) and all(
            isinstance(r.value, ast.Tuple) and len(r.value.elts) == 2 for r in returns
        )

    calls = [
        n
        for n in ast.walk(funcdef)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "self"
        and len(n.args) == 2
        and not n.keywords
        and is_expansion(n.func.attr)
    ]
    if len(calls) != 1:
        return f"{len(calls)} KV expansion calls (exactly one `self.<m>(kv, k_rot)` needed)"
    return None
