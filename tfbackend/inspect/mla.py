"""Which attention modules vLLM 0.32's MLAFuser takes, matched on the module's FX trace.

vLLM (`fusers/mla.py`, tried before every other fuser) traces the forward with torch.fx, every
child a leaf (`fxtrace.trace`, the trace the projection fusers read too), and looks for
`rms_norm(linear(x))` chains on a forward input: exactly one whose linear is wider than its
norm (`kv_a_proj_with_mqa` → `kv_a_layernorm`: the latent plus the rope key), at most one as
wide (`q_a_proj` → `q_a_layernorm`), each followed by the linear that expands it (`q_b_proj`,
`kv_b_proj`); with no query chain, the one other linear on an input is `q_proj`; the linear
producing the returned value is `o_proj`. Then it rewrites the forward's source: the two
down-projections must be called once each on one input, and the KV expansion
`self.<method>(kv, k_rot)` (two inputs, returns a pair, applies kv_b_proj) exactly once; if the
rewrite raises, MLA is skipped and the next fuser is tried. One analysis per (class, children
and their shapes).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from tfbackend.inspect.rewrite import aliasing_names, written_names

_cache: dict[tuple, dict[str, Any] | None] = {}


def mla_fact(module: Any, graph: Callable[[], Any] | None = None) -> dict[str, Any] | None:
    """The MLA fusion vLLM would make on this module's class, as plain data: the role of each
    child, or `{"fuser": None, "reason": ...}` when the latent chain is there but the match or
    the rewrite fails. None: no latent KV chain (not MLA). `graph` gives the module's FX trace
    when the caller took it already (the walk traces a module once for every match)."""
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
            _cache[key] = _analyse(module, graph)
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


def _function_def(fn: Any) -> ast.FunctionDef:
    fn = inspect.unwrap(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    funcdef = tree.body[0]
    if not isinstance(funcdef, ast.FunctionDef):
        raise ValueError(f"{getattr(fn, '__name__', fn)} is not a plain function")
    return funcdef


# --- vLLM's match on the graph (fusers/mla.py: MLAFuser.match) --------------------------------


def _consumes_placeholder(node) -> bool:
    return len(node.args) == 1 and getattr(node.args[0], "op", None) == "placeholder"


def _is_rms_norm(module: Any) -> bool:
    """vLLM asks its RMSNormFuser; we ask the same structural question tfbackend's norm
    planning does (norms.classify_norm: x̂·w, x̂·(1+w) or x̂)."""
    from tfbackend.inspect.facts import NORM_NO_WEIGHT, NORM_OFFSET, NORM_PLAIN
    from tfbackend.inspect.norms import classify_norm

    if next(module.children(), None) is not None:
        return False
    variant, is_rms = classify_norm(module)
    return variant in (NORM_PLAIN, NORM_OFFSET, NORM_NO_WEIGHT) and is_rms


def _match(graph, module: Any) -> dict[str, Any] | None:
    from tfbackend.inspect.fxtrace import (
        downstream_linear,
        is_linear,
        returned_linear,
        upstream_linear,
    )

    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or is_linear(node, module) or not node.args:
            continue
        source = upstream_linear(node.args[0], module)
        if source is None or not _consumes_placeholder(source):
            continue
        if not _is_rms_norm(module.get_submodule(str(node.target))):
            continue
        chains.append((source, node))

    def is_kv_a(chain) -> bool:
        source, norm = chain
        width = module.get_submodule(str(source.target)).out_features
        return width != _norm_size(module.get_submodule(str(norm.target)))

    kv_chains = [c for c in chains if is_kv_a(c)]
    q_chains = [c for c in chains if not is_kv_a(c)]
    if len(kv_chains) != 1 or len(q_chains) > 1:
        return None
    kv_a, kv_norm = kv_chains[0]
    claimed = {str(kv_a.target)}
    roles: dict[str, str | None] = dict.fromkeys(
        ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj"), None
    )
    if q_chains:
        q_a, q_norm = q_chains[0]
        q_b = downstream_linear(q_norm, module)
        if q_b is None:
            return {"fuser": None, "reason": f"no linear reads {q_norm.target}"}
        roles.update(
            q_a_proj=str(q_a.target), q_a_layernorm=str(q_norm.target), q_b_proj=str(q_b.target)
        )
        claimed |= {str(q_a.target), str(q_b.target)}
    else:
        on_input = {
            str(n.target) for n in graph.nodes if is_linear(n, module) and _consumes_placeholder(n)
        } - claimed
        if len(on_input) != 1:
            return {"fuser": None, "reason": f"{len(on_input)} query projections on an input"}
        roles["q_proj"] = next(iter(on_input))
        claimed.add(roles["q_proj"])
    kv_b = downstream_linear(kv_norm, module)
    if kv_b is None or str(kv_b.target) in claimed:
        return {"fuser": None, "reason": f"no unclaimed linear reads {kv_norm.target}"}
    claimed.add(str(kv_b.target))
    o = returned_linear(graph, module)
    return {
        "fuser": "mla",
        **roles,
        "kv_a_proj": str(kv_a.target),
        "kv_a_layernorm": str(kv_norm.target),
        "kv_b_proj": str(kv_b.target),
        "o_proj": o if o is not None and o not in claimed else None,
    }


def _analyse(module: Any, graph: Callable[[], Any] | None) -> dict[str, Any] | None:
    from tfbackend.inspect.fxtrace import trace

    traced = graph() if graph is not None else trace(module)
    if traced is None:
        return (
            {"fuser": None, "reason": "forward not traceable"} if _has_latent_norm(module) else None
        )
    fact = _match(traced, module)
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
