"""Which sibling linears vLLM ≥ 0.32's fusers can merge in a module, as plain data.

vLLM matches each fuser on an FX trace of the module class (`fusers/glu.py`, `qkv.py`,
`packed_qkv.py`, `merged_column.py`) and keeps it only if rewriting the class's forward source
succeeds; both sides decide. We take the same trace (`fxtrace.py`), the same matches
(`fx_match.py`) and the same source checks (`rewrite.py`), without vLLM. One analysis per
(class, children, linear shapes), as vLLM caches per class; what does not fuse is recorded with
the reason. Shape checks that depend on tp (vLLM's `validate`) are left to the planner.
"""

from __future__ import annotations

import ast
from typing import Any

from tfbackend.inspect.rewrite import forward_source

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
        # per-instance switches the forward branches on (Gemma 3n's activation_sparsity
        # differs by layer): one class, two traces
        tuple(
            (k, v)
            for k, v in sorted(vars(module).items())
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))
        ),
    )
    if key not in _cache:
        try:
            _cache[key] = _analyse(module)
        except Exception as exc:  # any unreadable forward: vLLM's rewrite fails the same way
            _cache[key] = {"fuser": None, "reason": f"forward not analysable: {exc}"}
    return _cache[key]


def _analyse(module: Any) -> dict[str, Any]:
    """vLLM's `get_fusers` for this class: each fuser's match on the FX trace, kept only when
    its forward rewrite would succeed (`fx_match`, `rewrite`), in vLLM's priority order."""
    from tfbackend.inspect import fx_match, rewrite  # torch.fx: imported when a module is read
    from tfbackend.inspect.fxtrace import trace

    graph = trace(module)
    if graph is None:
        return {"fuser": None, "reason": "forward not traceable"}
    rewrites = {
        "glu": lambda c: rewrite.check_glu(module, c["act"], c["gate"], c["up"]),
        "qkv": lambda c: rewrite.check_qkv(module, c["q"], c["k"], c["v"]),
        "packed_qkv": lambda c: rewrite.check_packed_qkv(module, c["qkv"]),
        "merged_column": lambda c: rewrite.check_merged(module, c["linears"]),
    }
    candidates, refused = [], []
    for name, match in fx_match.MATCHERS:
        if (cand := match(graph, module)) is None:
            continue
        try:
            rewrites[name](cand)
        except Exception as exc:  # vLLM skips a fuser whose rewrite raises
            refused.append(f"{name} matched but vLLM cannot rewrite the forward: {exc}")
            continue
        candidates.append(cand)
    if candidates:
        from tfbackend.inspect.fxtrace import downstream_linears, feature_reductions

        for cand in candidates:
            pieces = cand.get("linears") or [cand.get(k) for k in ("q", "k", "v", "gate", "up")]
            pieces = [p for p in pieces if p]
            cand["downstream"] = downstream_linears(graph, module, pieces)
            cand["reduced"] = feature_reductions(graph, module, pieces)
        return {"fuser": candidates[0]["fuser"], "candidates": candidates}
    reason = "; ".join(refused) or "no q/k/v, packed qkv, gate/up or sibling linears"
    if not refused and (groups := fx_match.sibling_groups(graph, module)) > 1:
        reason = f"{groups} sibling-linear groups: which to merge is ambiguous"
    return {"fuser": None, "reason": reason}


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
        funcdef = forward_source(type(module))
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
