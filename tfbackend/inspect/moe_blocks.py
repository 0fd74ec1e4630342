"""How vLLM ≥ 0.32's MoEBlockFuser reads an MoE block (transformers/fusers/moe.py: `match`).

vLLM moves routing (and a shared expert) into its MoERunner only when every step of
`MoEBlockFuser.match` succeeds on the block that owns `experts`:

1. the block's forward does not return a tuple (`_returns_tuple`, itself an AST reading);
2. a child is a router: its whole state (recursive parameters and buffers) is `weight` plus an
   optional `e_score_correction_bias`, and its forward is `topk(score(linear(x)))`
   (`fusables.router_scoring`);
3. if other children exist, the block's traced forward adds the experts' output to one other
   child's output (the shared expert), optionally scaled by `sigmoid(<one-logit linear>(x))`
   (`_match_shared_experts`);
4. no other child holds state (fail closed: the rewritten forward would drop it).

vLLM reads step 3 from an fx trace; we read the same dataflow from the forward's source,
position by position (a name means its latest assignment before the use), following only the
branch of an `if self.<flag>:` the instance takes, as tracing does. One reading per
(class, children): the answer is plain data, `None` fields meaning "not found".
"""

from __future__ import annotations

import ast
import operator
from typing import Any

from tfbackend.inspect.fusables import router_scoring
from tfbackend.inspect.rewrite import forward_source

_DTYPE_CASTS = frozenset({"to", "float", "double", "half", "bfloat16", "type_as"})

_cache: dict[tuple, dict[str, Any]] = {}


def moe_block_fact(block: Any, experts: str) -> dict[str, Any]:
    """What MoEBlockFuser.match decides for `block`: {"router", "scoring", "shared",
    "shared_gate", "reason", "block_state"}; `router` None means routing stays in Transformers,
    `reason` why; `block_state` names the block's own parameters and buffers."""
    children = dict(block.named_children())
    stateful = {n for n, c in children.items() if next(_state(c), None) is not None}
    # the block's own tensors: the forward vLLM substitutes never reads them
    own = sorted(
        {n for n, _ in block.named_parameters(recurse=False)}
        | {n for n, _ in block.named_buffers(recurse=False)}
    )
    key = (type(block), experts, tuple(children), tuple(sorted(stateful)), _scalar_gates(block))
    if key not in _cache:
        _cache[key] = _match(block, experts, children, stateful)
    return {**_cache[key], "block_state": own}


def _state(module: Any):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _scalar_gates(block: Any) -> tuple[str, ...]:
    """Children that project to a single logit (vLLM's `_is_scalar_gate`)."""
    import torch.nn as nn

    return tuple(
        n
        for n, c in block.named_children()
        if isinstance(c, nn.Linear) and c.weight is not None and c.weight.shape[0] == 1
    )


def _verdict(router=None, scoring=None, shared=None, shared_gate=None, reason=""):
    return {
        "router": router,
        "scoring": scoring,
        "shared": shared,
        "shared_gate": shared_gate,
        "reason": reason,
    }


def _match(block, experts: str, children: dict, stateful: set[str]) -> dict[str, Any]:
    if returns_tuple(type(block)):
        return _verdict(reason=f"{type(block).__name__}.forward returns a tuple")
    router = scoring = None
    for name, child in children.items():
        if name != experts and (scoring := router_scoring(child)) is not None:
            router = name
            break
    if router is None:
        return _verdict(reason=_no_router(children, experts))
    shared = shared_gate = None
    if set(children) - {experts, router}:
        try:
            shared, shared_gate = _shared_experts(block, experts)
        except Exception as exc:  # noqa: BLE001 - an unreadable forward: nothing found
            shared, shared_gate = None, None
            why = f"forward not readable ({exc})"
        else:
            why = ""
        if shared_gate is not None and shared_gate not in _scalar_gates(block):
            return _verdict(reason=f"shared-expert gate {shared_gate} is not a one-logit linear")
        accounted = {experts, router, shared, shared_gate}
        dropped = sorted(stateful - accounted)
        if dropped:
            detail = why or "not the shared expert its forward adds to the experts' output"
            return _verdict(reason=f"child {dropped[0]} holds state and is {detail}")
    return _verdict(router, scoring, shared, shared_gate)


def _no_router(children: dict, experts: str) -> str:
    """Why no child passed as the router, told for the likeliest one (a child with a weight)."""
    for name, child in children.items():
        state = {n for n, _ in _state(child)}
        if name == experts or not any(n.rsplit(".", 1)[-1] == "weight" for n in state):
            continue
        extra = sorted(state - {"weight", "e_score_correction_bias"})
        if extra:
            return (
                f"router {name} holds {', '.join(extra)}: vLLM accepts only weight and "
                "e_score_correction_bias"
            )
        return f"router {name}'s forward is not topk(softmax|sigmoid(linear(x)))"
    return "no child holds a router weight"


def returns_tuple(cls: type) -> bool:
    """Does `cls.forward` return a tuple (vLLM's `_returns_tuple`: a tuple literal, a name bound
    to one, or either side of a conditional)? An unreadable forward counts as one, as there."""
    try:
        forward = forward_source(cls)
    except Exception:  # noqa: BLE001
        return True
    tuple_names = {
        target.id
        for node in ast.walk(forward)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple)
        for target in node.targets
        if isinstance(target, ast.Name)
    }

    def yields_tuple(value) -> bool:
        if isinstance(value, ast.Tuple):
            return True
        if isinstance(value, ast.Name):
            return value.id in tuple_names
        if isinstance(value, ast.IfExp):
            return yields_tuple(value.body) or yields_tuple(value.orelse)
        return False

    return any(yields_tuple(r.value) for r in _own_returns(forward))


def _own_returns(node: ast.AST):
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        if isinstance(child, ast.Return):
            yield child
        elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(child))


class _Flow:
    """The forward's live statements (untaken `if self.<flag>` branches pruned) and, for a name
    read at a position, the value it was last assigned before it."""

    def __init__(self, block: Any, funcdef: ast.FunctionDef):
        self.block = block
        self.params = {a.arg for a in funcdef.args.args[1:] + funcdef.args.kwonlyargs}
        self.statements: list[ast.stmt] = []
        self._live(funcdef.body)
        self.defs: dict[str, list[tuple[tuple[int, int], ast.AST]]] = {}
        for stmt in self.statements:
            if isinstance(stmt, ast.Assign):
                targets = stmt.targets
            elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) and stmt.value is not None:
                targets = [stmt.target]
            else:
                continue
            end = (stmt.end_lineno, stmt.end_col_offset)
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        self.defs.setdefault(name.id, []).append((end, stmt))

    def _live(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self.statements.append(stmt)
            if isinstance(stmt, ast.If):
                taken = self._decide(stmt.test)
                if taken is not False:
                    self._live(stmt.body)
                if taken is not True:
                    self._live(stmt.orelse)
            elif isinstance(stmt, (ast.For, ast.While, ast.With, ast.Try)):
                for field in ("body", "orelse", "finalbody"):
                    self._live(getattr(stmt, field, []) or [])
                for handler in getattr(stmt, "handlers", []):
                    self._live(handler.body)

    def _decide(self, test: ast.expr) -> bool | None:
        """The truth of `self.<attr>` / `not ...` / `... is None` when the instance says it
        (fx runs such Python conditions concretely), else None: both branches stay."""
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            inner = self._decide(test.operand)
            return None if inner is None else not inner
        if (
            isinstance(test, ast.Attribute)
            and isinstance(test.value, ast.Name)
            and test.value.id == "self"
        ):
            value = getattr(self.block, test.attr, _Unknown)
            if isinstance(value, (bool, int, float, str)) or value is None:
                return bool(value)
        return None

    def reaching(self, name: str, at: tuple[int, int]) -> ast.AST | None:
        before = [(end, stmt) for end, stmt in self.defs.get(name, []) if end <= at]
        return max(before, key=lambda d: d[0])[1] if before else None

    def cone(self, expr: ast.AST) -> list[ast.AST]:
        """Every expression node `expr`'s value is computed from, through assignments."""
        out: list[ast.AST] = []
        seen: set[int] = set()
        stack = [expr]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, ast.Assign | ast.AnnAssign):
                stack.append(node.value)
                continue
            if isinstance(node, ast.AugAssign):
                # `x += y` reads the previous x as well
                stack.append(node.value)
                if isinstance(node.target, ast.Name):
                    prev = self.reaching(node.target.id, (node.lineno, node.col_offset))
                    if prev is not None:
                        stack.append(prev)
                continue
            for sub in ast.walk(node):
                out.append(sub)
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                    d = self.reaching(sub.id, (sub.lineno, sub.col_offset))
                    if d is not None:
                        stack.append(d)
        return out

    def resolve(self, expr: ast.AST) -> ast.AST:
        """A name's assigned value (single-target assignments), a dtype cast's receiver."""
        while True:
            if isinstance(expr, ast.Name):
                d = self.reaching(expr.id, (expr.lineno, expr.col_offset))
                if (
                    isinstance(d, ast.Assign)
                    and len(d.targets) == 1
                    and isinstance(d.targets[0], ast.Name)
                ):
                    expr = d.value
                    continue
                return expr
            if (
                isinstance(expr, ast.Call)
                and isinstance(expr.func, ast.Attribute)
                and expr.func.attr in _DTYPE_CASTS
            ):
                expr = expr.func.value
                continue
            return expr


class _Unknown:
    pass


def _self_path(expr: ast.AST) -> str | None:
    """`self.a.b` → "a.b"."""
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if isinstance(expr, ast.Name) and expr.id == "self" and parts:
        return ".".join(reversed(parts))
    return None


def _module_call(block: Any, node: ast.AST) -> str | None:
    """The submodule a `self.<path>(...)` call runs (an fx call_module), if any."""
    import torch.nn as nn

    if not isinstance(node, ast.Call):
        return None
    path = _self_path(node.func)
    if path is None:
        return None
    try:
        return path if isinstance(block.get_submodule(path), nn.Module) else None
    except AttributeError:
        return None


def _op(node: ast.AST) -> str | None:
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _adds(flow: _Flow) -> list[tuple[ast.AST, list[ast.AST]]]:
    """Additions in execution order with their operands: `a + b`, `x += y` (traced as an add),
    `torch.add(a, b)`, `a.add(b)`."""
    found = []
    for stmt in flow.statements:
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
            found.append((stmt, [stmt.target, stmt.value]))
        for node in _own_expressions(stmt):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
                found.append((node, [node.left, node.right]))
            elif _op(node) == "add":
                func = node.func
                receiver = func.value if isinstance(func, ast.Attribute) else None
                is_torch = isinstance(receiver, ast.Name) and receiver.id in ("torch", "operator")
                args = list(node.args) if is_torch or receiver is None else [receiver, *node.args]
                found.append((node, args))
    return sorted(found, key=lambda f: (f[0].end_lineno, f[0].end_col_offset))


def _own_expressions(stmt: ast.stmt):
    """Expression nodes of `stmt` itself, not of the statements nested in it."""
    stack = [c for c in ast.iter_child_nodes(stmt) if not isinstance(c, ast.stmt)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.stmt))


def _is_traced(block: Any, flow: _Flow, expr: ast.AST) -> bool:
    """Would fx hold this operand as a graph node (not a Python constant)?"""
    import torch

    expr = flow.resolve(expr) if isinstance(expr, ast.Name) else expr
    if isinstance(expr, ast.Constant):
        return False
    if (path := _self_path(expr)) is not None:
        # a tensor attribute is a get_attr node; a Python number stays a constant
        try:
            value = operator.attrgetter(path)(block)
        except AttributeError:
            return False
        return isinstance(value, torch.Tensor | torch.nn.Module)
    return True


def _shared_experts(block: Any, experts: str) -> tuple[str | None, str | None]:
    """vLLM's `_match_shared_experts`: the first addition with the experts' output on exactly one
    side; the other side must run exactly one child besides an optional sigmoid gate."""
    flow = _Flow(block, forward_source(type(block)))

    def from_experts(expr: ast.AST) -> bool:
        return any(_module_call(block, n) == experts for n in flow.cone(expr))

    if not any(
        _module_call(block, n) == experts for s in flow.statements for n in _own_expressions(s)
    ):
        return None, None
    for _, operands in _adds(flow):
        operands = [o for o in operands if _is_traced(block, flow, o)]
        sides = [from_experts(o) for o in operands]
        if len(operands) != 2 or sides.count(True) != 1:
            continue
        cone = flow.cone(operands[sides.index(False)])
        modules = []
        for n in cone:
            if (target := _module_call(block, n)) is not None and target != experts:
                if target not in modules:
                    modules.append(target)
        gate = None
        for n in cone:
            if _op(n) != "sigmoid":
                continue
            func = n.func
            arg = n.args[0] if n.args else func.value if isinstance(func, ast.Attribute) else None
            if arg is not None and (target := _module_call(block, flow.resolve(arg))) in modules:
                gate = target
                break
        shared = [m for m in modules if m != gate]
        if len(shared) != 1:
            return None, None
        return shared[0], gate
    return None, None
