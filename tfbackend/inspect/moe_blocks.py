"""What an MoE block's forward does, as plain data, for every vLLM's MoEBlockFuser to decide on.

vLLM moves routing (and a shared expert) into its MoERunner only when its `MoEBlockFuser.match`
succeeds on the block that owns `experts` (transformers/fusers/moe.py). Releases read the block
differently: 0.32 takes the first child whose forward is `topk(score(linear(x)))` and the first
addition with the experts' output on one side; 0.33 follows `experts(x, ids, weights)` back to
the gate that produced `ids` and `weights`, accepts a score after the top-k too, and reads only
the block's output for a shared expert. The walk records what both need, one FX trace of the
block and one of each child (`fxtrace.trace`, the trace vLLM's fusers take); the fusers
(fusers/moe.py, fusers/moe_v033.py) decide. Nothing here is one release's verdict.

- `returns_tuple`: the block's forward returns a tuple (`_returns_tuple`, an AST reading);
- `routers`: per child but the experts, its whole state (recursive parameters and buffers) and
  the scoring op that feeds its last top-k (`before`) or follows it (`after`);
- `first_add`: the first addition with the experts' output on exactly one side, and the one
  child (and sigmoid gate) on the other side;
- `experts_call`: the gate whose output `[2]` and `[1]` the experts are called with;
- `output`: the block's output as `experts(...) [* c] [+ shared(x) | sigmoid(g(x)) * shared(x)]`;
- `block_class`, `children`, `stateful`, `scalar_gates` (one-logit linears), `block_state` (its
  own tensors).
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

from tfbackend.inspect.rewrite import forward_source

_cache: dict[tuple, dict[str, Any]] = {}


def moe_block_fact(block: Any, experts: str) -> dict[str, Any]:
    """What `block`'s forward does around its `experts` child (the module docstring's keys)."""
    from tfbackend.inspect.fxtrace import branch_scalars

    children = dict(block.named_children())
    stateful = sorted(n for n, c in children.items() if next(_state(c), None) is not None)
    # the block's own tensors: the forward vLLM substitutes never reads them
    own = sorted(
        {n for n, _ in block.named_parameters(recurse=False)}
        | {n for n, _ in block.named_buffers(recurse=False)}
    )
    scalar = _scalar_gates(block)
    # vLLM matches every block anew; blocks of one class may still differ per layer (DeepSeek-V4's
    # first layers route by token hash: another gate class, `is_hash` branching the forward) or per
    # config (Cohere2-MoE's router branches on expert_selection_fn), so the key holds what the
    # block's and its children's traces can depend on beyond the class: child classes, state
    # names, and the scalar attributes of the block and of each child
    key = (
        type(block),
        experts,
        branch_scalars(block),
        tuple((n, type(c), branch_scalars(c)) for n, c in children.items()),
        tuple(n for n, _ in _state(block)),
        scalar,
    )
    if key not in _cache:
        _cache[key] = _observe(block, experts, children, scalar)
    return {
        **_cache[key],
        "children": list(children),
        "stateful": stateful,
        "scalar_gates": list(scalar),
        "block_state": own,
    }


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


def _observe(block, experts: str, children: dict, scalar: tuple[str, ...]) -> dict[str, Any]:
    from tfbackend.inspect.fxtrace import trace

    out: dict[str, Any] = {
        "block_class": type(block).__name__,
        "returns_tuple": returns_tuple(type(block)),
        "routers": {n: router_reading(c) for n, c in children.items() if n != experts},
        "traced": False,
        "first_add": None,
        "experts_call": None,
        "output": None,
    }
    try:
        graph = trace(block)
    except Exception:  # noqa: BLE001 - an untraceable block: no fuser moves its routing
        graph = None
    if graph is None:
        return out
    out["traced"] = True
    shared, gate = _shared_experts(graph, experts)
    out["first_add"] = {"shared": shared, "gate": gate}
    call = _experts_call(graph, experts, block)
    if call is not None:
        node, x, gate_node = call
        out["experts_call"] = {"gate": str(gate_node.target)}
        out["output"] = _output(graph, node, x, block, scalar)
    return out


def router_reading(module: Any) -> dict[str, Any]:
    """A child read as a router: its state, and the one scoring op (softmax or sigmoid) that
    feeds its last top-k (`before`) or is fed by it (`after`): {"op", "from_linear"}, "many" when
    more than one, None when none; `renormalizes` whether the top-k weights are divided by their
    own sum (None: the trace stopped before it could tell)."""
    from tfbackend.inspect.fxtrace import is_op, reaches, trace

    state = sorted({n for n, _ in _state(module)})
    reading: dict[str, Any] = {"state": state, "before": None, "after": None, "renormalizes": None}
    if "weight" not in state:
        return reading
    try:
        graph = trace(module)
    except Exception:  # noqa: BLE001
        graph = None
    if graph is None:
        return reading
    # the routing top-k is the last one; an earlier one scores expert groups
    topks = [n for n in graph.nodes if is_op(n, "topk")]
    if not topks:
        return reading

    def scorer(nodes) -> Any:
        found = [n for n in nodes if is_op(n, "softmax") or is_op(n, "sigmoid")]
        if len(found) != 1:
            return "many" if found else None
        cone = reaches(found[0], "all_input_nodes")
        return {
            "op": "softmax" if is_op(found[0], "softmax") else "sigmoid",
            "from_linear": any(is_op(n, "linear") for n in cone),
        }

    reading["before"] = scorer(reaches(topks[-1], "all_input_nodes"))
    reading["after"] = scorer(reaches(topks[-1], "users"))
    complete = any(n.op == "output" for n in graph.nodes)
    reading["renormalizes"] = True if _renormalizes(topks[-1]) else (False if complete else None)
    return reading


def _renormalizes(topk) -> bool:
    """Are the top-k weights divided by their own sum (vLLM 0.33's `_renormalizes`)?"""
    from torch import fx

    from tfbackend.inspect.fxtrace import is_op, reaches

    downstream = reaches(topk, "users")
    for node in downstream:
        if not (is_op(node, "div") or is_op(node, "truediv")) or len(node.args) < 2:
            continue
        denominator = node.args[1]
        if isinstance(denominator, fx.Node) and any(
            is_op(n, "sum") and n in downstream for n in reaches(denominator, "all_input_nodes")
        ):
            return True
    return False


def _unwrap(node: object, block) -> object:
    """`node` without reshapes, dtype casts and `nn.Identity` calls."""
    import torch.nn as nn
    from torch import fx

    from tfbackend.inspect.fxtrace import is_op, peel

    while True:
        node = peel(node)
        if (
            is_op(node, "reshape")
            or is_op(node, "view")
            or (
                isinstance(node, fx.Node)
                and node.op == "call_module"
                and isinstance(block.get_submodule(node.target), nn.Identity)
            )
        ):
            node = node.args[0]
        else:
            return node


def _reads_input(node: object, x, block) -> bool:
    """Is `node` a child of `block` called on just `x`?"""
    from torch import fx

    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and len(node.args) == 1
        and not node.kwargs
        and _unwrap(node.args[0], block) is x
    )


def _experts_call(graph, experts: str, block):
    """(experts call, x, gate call) when the block calls `experts(x, ids, weights)` with
    `_, weights, ids = gate(x)` and `x` its input (vLLM 0.33's `_match_experts`), else None."""
    from tfbackend.inspect.fxtrace import is_op

    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == experts), None)
    if node is None:
        return None
    # bound by signature so keyword calls match too; any other argument fails closed
    try:
        bound = inspect.signature(block.get_submodule(experts).forward).bind(
            *node.args, **node.kwargs
        )
    except (TypeError, ValueError):
        return None
    if len(bound.arguments) != 3:
        return None
    x, ids, weights = (_unwrap(a, block) for a in bound.arguments.values())
    if not (getattr(x, "op", None) == "placeholder"):
        return None
    if not (is_op(ids, "getitem") and is_op(weights, "getitem")):
        return None
    gate = ids.args[0]
    if not (_reads_input(gate, x, block) and ids.args == (gate, 2) and weights.args == (gate, 1)):
        return None
    return node, x, gate


def _output(graph, experts_node, x, block, scalar: tuple[str, ...]) -> dict[str, Any] | None:
    """The block's output as `experts(...) [* c] [+ shared]`: {"routed_scaled", "shared",
    "shared_gate"}; None when it is anything else (vLLM 0.33's `match`)."""
    from torch import fx

    from tfbackend.inspect.fxtrace import is_op, peel

    output = next((n for n in graph.nodes if n.op == "output"), None)
    if output is None or not output.args:
        return None

    def is_routed(n: object) -> bool:
        return n is experts_node or (
            is_op(n, "mul")
            and not isinstance(n.args[1], fx.Node)
            and _unwrap(n.args[0], block) is experts_node
        )

    routed = out = _unwrap(output.args[0], block)
    shared = None
    if not is_routed(out):
        if not (is_op(out, "add") and len(out.args) == 2):
            return None
        routed, shared = (_unwrap(a, block) for a in out.args)
        if is_routed(shared):
            routed, shared = shared, routed
        if not is_routed(routed):
            return None
    reading = {"routed_scaled": routed is not experts_node, "shared": None, "shared_gate": None}
    if shared is None:
        return reading
    if _reads_input(shared, x, block):
        return {**reading, "shared": str(shared.target)}
    if is_op(shared, "mul") and len(shared.args) == 2:
        for gated, expert in (shared.args, shared.args[::-1]):
            gated, expert = peel(gated), peel(expert)
            if not (is_op(gated, "sigmoid") and _reads_input(expert, x, block)):
                continue
            gate = peel(gated.args[0])
            if _reads_input(gate, x, block) and str(gate.target) in scalar:
                return {**reading, "shared": str(expert.target), "shared_gate": str(gate.target)}
    return {**reading, "added_other": True}  # what is added is no shared expert vLLM knows


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
