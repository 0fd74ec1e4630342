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

Steps 2 and 3 match on FX traces of the router and of the block (`fxtrace.trace`, the trace
vLLM's fusers take), step 1 reads the source as vLLM does. One reading per (class, children):
the answer is plain data, `None` fields meaning "not found".
"""

from __future__ import annotations

import ast
from typing import Any

from tfbackend.inspect.fusables import router_scoring
from tfbackend.inspect.rewrite import forward_source

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
        from tfbackend.inspect.fxtrace import trace

        graph = trace(block)
        if graph is None:  # vLLM gives up on the block: routing stays in Transformers
            return _verdict(reason=f"{type(block).__name__}.forward not traceable")
        shared, shared_gate = _shared_experts(graph, experts)
        if shared_gate is not None and shared_gate not in _scalar_gates(block):
            return _verdict(reason=f"shared-expert gate {shared_gate} is not a one-logit linear")
        accounted = {experts, router, shared, shared_gate}
        dropped = sorted(stateful - accounted)
        if dropped:
            return _verdict(
                reason=f"child {dropped[0]} holds state and is not the shared expert its "
                "forward adds to the experts' output"
            )
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


def _shared_experts(graph, experts: str) -> tuple[str | None, str | None]:
    """vLLM's `_match_shared_experts`: the first addition with the experts' output on exactly one
    side; the other side must run exactly one child besides an optional sigmoid gate."""
    from torch import fx

    from tfbackend.inspect.fxtrace import is_op, peel, reaches

    experts_node = next(
        (n for n in graph.nodes if n.op == "call_module" and n.target == experts), None
    )
    if experts_node is None:
        return None, None
    from_experts = reaches(experts_node, "users")
    for add in graph.nodes:
        if not is_op(add, "add"):
            continue
        operands = [a for a in add.args if isinstance(a, fx.Node)]
        sides = [a in from_experts for a in operands]
        if len(operands) != 2 or sides.count(True) != 1:
            continue
        cone = reaches(operands[sides.index(False)], "all_input_nodes")
        modules = [n for n in cone if n.op == "call_module" and n.target != experts]
        gate = next(
            (
                src
                for n in cone
                if is_op(n, "sigmoid")
                and isinstance(src := peel(n.args[0]), fx.Node)
                and src in modules
            ),
            None,
        )
        shared = [n for n in modules if n is not gate]
        if len(shared) != 1:
            return None, None
        return str(shared[0].target), (str(gate.target) if gate is not None else None)
    return None, None
