"""Which sibling linears vLLM ≥ 0.32's fusers can merge, read from the module's forward source.

vLLM matches an FX trace of each module class and then rewrites the same class's forward AST
(`fusers/qkv.py`, `glu.py`, `merged_column.py`); a fusion happens only when both succeed. We read
the AST side directly: calls `self.<linear>(x)` on a forward argument, the `act(gate(x)) * up(x)`
multiply, the linear that produces the returned value. One analysis per (class, children), as vLLM
caches it; anything we cannot read is recorded as unfused with the reason. Shape checks that
depend on tp (vLLM's `validate`) are left to the planner.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

# transformers activation names with a vLLM `...AndMul` kernel
# (vllm/model_executor/layers/activation.py: _ACTIVATION_AND_MUL_REGISTRY)
ACT_AND_MUL = {
    "gelu": "GeluAndMul",
    "gelu_pytorch_tanh": "GeluAndMul",
    "silu": "SiluAndMul",
    "swish": "SiluAndMul",
    "geglu": "GeluAndMul",
    "swigluoai": "SwigluOAIAndMul",
}

_cache: dict[tuple, dict[str, Any] | None] = {}


def fusion_fact(module: Any) -> dict[str, Any] | None:
    """The fusion vLLM would try on this module instance's class, as plain data (None: nothing
    to fuse: fewer than two linear children)."""
    import torch.nn as nn

    linears = {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}
    if len(linears) < 2:
        return None
    # Per class (as vLLM caches), but the q/k/v analysis also reads head_dim and linear shapes:
    # instances of one class built from different configs must not share a stale answer.
    head_dim = getattr(module, "head_dim", None)
    key = (
        type(module),
        tuple(n for n, _ in module.named_children()),
        tuple((n, c.in_features, c.out_features) for n, c in linears.items()),
        head_dim if isinstance(head_dim, int) else None,
    )
    if key not in _cache:
        try:
            _cache[key] = _analyse(module, set(linears))
        except Exception as exc:  # any unreadable forward: vLLM's rewrite fails the same way
            _cache[key] = {"fuser": None, "reason": f"forward not analysable: {exc}"}
    return _cache[key]


def act_and_mul_name(act: Any) -> str | None:
    """The `...AndMul` name for a transformers activation module (vLLM's GLUFuser rule)."""
    import torch.nn as nn
    from transformers.activations import ACT2CLS

    for name, cls in ACT2CLS.items():
        cls = cls[0] if isinstance(cls, tuple) else cls
        if type(act) is cls and name in ACT_AND_MUL:
            return name
    if type(act) is nn.GELU:
        return "gelu_pytorch_tanh" if act.approximate == "tanh" else "gelu"
    return None


def _forward_def(cls: type) -> ast.FunctionDef:
    fn = inspect.unwrap(cls.forward)
    if fn.__code__.co_freevars:
        raise ValueError("forward is a closure")
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    funcdef = tree.body[0]
    if not isinstance(funcdef, ast.FunctionDef):
        raise ValueError("forward is not a plain function")
    return funcdef


def _self_call(node: ast.AST) -> str | None:
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
    ):
        return node.func.attr
    return None


def _analyse(module: Any, linears: set[str]) -> dict[str, Any]:
    funcdef = _forward_def(type(module))
    params = {a.arg for a in funcdef.args.args[1:] + funcdef.args.kwonlyargs}
    rebound = {
        n.id for n in ast.walk(funcdef) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    calls: dict[str, list[ast.Call]] = {}
    for node in ast.walk(funcdef):
        name = _self_call(node)
        if name in linears:
            calls.setdefault(name, []).append(node)

    def on_argument(name: str) -> str | None:
        """The forward argument a linear reads directly (a trace placeholder), if any."""
        if len(calls.get(name, [])) != 1:
            return None
        call = calls[name][0]
        if len(call.args) != 1 or call.keywords:
            return None
        arg = call.args[0]
        if isinstance(arg, ast.Name) and arg.id in params and arg.id not in rebound:
            return arg.id
        return None

    glu = _glu(module, funcdef, calls, linears)
    by_input: dict[str, list[str]] = {}
    for name in sorted(calls, key=lambda n: calls[n][0].lineno * 1000 + calls[n][0].col_offset):
        if (x := on_argument(name)) is not None:
            by_input.setdefault(x, []).append(name)
    qkv = _qkv(module, funcdef, calls, by_input, linears)
    groups = [g for g in by_input.values() if len(g) >= 2]
    merged = {"fuser": "merged_column", "linears": groups[0]} if len(groups) == 1 else None
    candidates = [c for c in (glu, qkv, merged) if c]
    if not candidates:
        reason = "no q/k/v, gate/up or sibling linears on one forward argument"
        if len(groups) > 1:
            reason = f"{len(groups)} sibling-linear groups: which to merge is ambiguous"
        return {"fuser": None, "reason": reason}
    return {"fuser": candidates[0]["fuser"], "candidates": candidates}


def _glu(module, funcdef, calls, linears) -> dict[str, Any] | None:
    for node in ast.walk(funcdef):
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
            continue
        for act_side, up_side in ((node.left, node.right), (node.right, node.left)):
            act = _self_call(act_side)
            up = _self_call(up_side)
            if act is None or act in linears or up not in linears or len(act_side.args) != 1:
                continue
            gate = _self_call(act_side.args[0])
            if gate not in linears:
                continue
            gate_call, up_call = act_side.args[0], up_side
            if len(gate_call.args) != 1 or len(up_call.args) != 1:
                continue
            if ast.dump(gate_call.args[0]) != ast.dump(up_call.args[0]):
                continue
            if len(calls.get(gate, [])) != 1 or len(calls.get(up, [])) != 1:
                continue
            down = None
            for name in linears - {gate, up}:
                for call in calls.get(name, []):
                    if call.args and call.args[0] is node:
                        down = name
            try:
                act_module = module.get_submodule(act)
            except AttributeError:
                return None
            return {
                "fuser": "glu",
                "gate": gate,
                "up": up,
                "down": down,
                "act": act,
                "act_class": type(act_module).__name__,
                "act_and_mul": act_and_mul_name(act_module),
            }
    return None


def _returned_linear(funcdef, calls, linears) -> str | None:
    """The linear whose output is the forward's (first) returned value."""
    assigned: dict[str, str] = {}
    for node in ast.walk(funcdef):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            name = _self_call(node.value)
            if isinstance(target, ast.Name) and name in linears:
                assigned[target.id] = name
    for node in ast.walk(funcdef):
        if isinstance(node, ast.Return) and node.value is not None:
            value = node.value
            if isinstance(value, ast.Tuple) and value.elts:
                value = value.elts[0]
            if (name := _self_call(value)) in linears:
                return name
            if isinstance(value, ast.Name) and value.id in assigned:
                return assigned[value.id]
    return None


def _qkv(module, funcdef, calls, by_input, linears) -> dict[str, Any] | None:
    triples = [g for g in by_input.values() if len(g) == 3]
    if len(triples) != 1:
        return None
    names = triples[0]
    outs = [module.get_submodule(n).out_features for n in names]
    if len(set(outs)) == 2:
        (q,) = (n for n, o in zip(names, outs, strict=True) if outs.count(o) == 1)
        k, v = (n for n, o in zip(names, outs, strict=True) if outs.count(o) == 2)
        if module.get_submodule(q).out_features != max(outs):
            return None
    elif len(set(outs)) == 1:
        q, k, v = names
    else:
        return None
    # vLLM proves exclusivity in source: no other linear may read the same input
    x = next(i for i, g in by_input.items() if g is names)
    for name in linears - set(names):
        for call in calls.get(name, []):
            if any(isinstance(a, ast.Name) and a.id == x for a in call.args):
                return None
    o = _returned_linear(funcdef, calls, linears)
    if o in names or (
        o is not None
        and module.get_submodule(o).in_features != module.get_submodule(q).out_features
    ):
        o = None
    head_dim = getattr(module, "head_dim", None)
    return {
        "fuser": "qkv",
        "q": q,
        "k": k,
        "v": v,
        "o": o,
        "head_dim": head_dim if isinstance(head_dim, int) else None,
    }


def router_scoring(module: Any) -> str | None:
    """ "softmax" / "sigmoid" when the module's forward is `topk(score(linear(x)))`, the router
    vLLM's MoEBlockFuser._match_router accepts (the scorer must feed the top-k; a softmax applied
    after it does not count); None otherwise, and routing then stays in Transformers.

    vLLM first asks that the router's whole state, children's parameters and buffers included,
    be `weight` plus an optional `e_score_correction_bias` (Ernie 4.5 keeps that bias in a child,
    `moe_statics`: rejected)."""
    state = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    if "weight" not in state or state - {"weight", "e_score_correction_bias"}:
        return None
    try:
        funcdef = _forward_def(type(module))
    except Exception:
        return None
    import torch.nn as nn

    is_linear_module = isinstance(module, nn.Linear)
    values: dict[str, list[ast.AST]] = {}
    for node in ast.walk(funcdef):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        values.setdefault(name.id, []).append(node.value)

    def cone(exprs) -> list[ast.Call]:
        calls, seen, stack = [], set(), list(exprs)
        while stack:
            expr = stack.pop()
            for node in ast.walk(expr):
                if isinstance(node, ast.Call):
                    calls.append(node)
                elif isinstance(node, ast.Name) and node.id not in seen:
                    seen.add(node.id)
                    stack.extend(values.get(node.id, []))
        return calls

    def op(call: ast.Call) -> str | None:
        func = call.func
        return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)

    def inputs(call: ast.Call) -> list[ast.AST]:
        receiver = [call.func.value] if isinstance(call.func, ast.Attribute) else []
        return receiver + list(call.args) + [k.value for k in call.keywords]

    topks = [n for n in ast.walk(funcdef) if isinstance(n, ast.Call) and op(n) == "topk"]
    if not topks:
        return None
    topk = max(topks, key=lambda n: (n.lineno, n.col_offset))
    scorers = {id(c): c for c in cone(inputs(topk)) if op(c) in ("softmax", "sigmoid")}
    if len(scorers) != 1:
        return None
    (scorer,) = scorers.values()

    def is_linear(call: ast.Call) -> bool:
        # an nn.Linear subclass's `super().forward(x)` traces to F.linear
        func = call.func
        via_super = (
            is_linear_module
            and op(call) == "forward"
            and isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Call)
            and getattr(func.value.func, "id", None) == "super"
        )
        return op(call) == "linear" or via_super

    if not any(is_linear(c) for c in cone(inputs(scorer))):
        return None
    return op(scorer)
