"""vLLM 0.32's projection-fusion matches, on the FX trace of a module (`fxtrace.trace`).

One function per fuser of vllm/model_executor/models/transformers/fusers/ (glu.py, qkv.py,
packed_qkv.py, merged_column.py `match`), each returning the fusion as plain data, or None. They
read the class's first instance, as vLLM's per-class cache does; per-instance shape checks
(`validate`) are the fusers' (`tfbackend/fusers/`), since some depend on tp.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx, nn

from tfbackend.inspect.fxtrace import is_linear, peel, returned_linear, upstream_linear
from tfbackend.inspect.vllm_names import act_and_mul_name, merged_name


def _out(module: nn.Module, name: str) -> int:
    return module.get_submodule(name).out_features


def _head_dim(module: nn.Module) -> int | None:
    head_dim = getattr(module, "head_dim", None)
    return head_dim if isinstance(head_dim, int) else None


def _by_placeholder(graph: fx.Graph, module: nn.Module) -> list[list[fx.Node]]:
    """Linears called with exactly one forward argument, grouped by it, in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if (
            is_linear(node, module)
            and len(node.args) == 1
            and not node.kwargs
            and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "placeholder"
        ):
            groups.setdefault(node.args[0], []).append(node)
    return list(groups.values())


def glu(graph: fx.Graph, module: nn.Module) -> dict[str, Any] | None:
    """`act(gate(x)) * up(x)`: the first such multiply; `down` reads the product."""

    def act_of_gate(node: object) -> bool:
        return (
            isinstance(node, fx.Node)
            and node.op == "call_module"
            and not is_linear(node, module)
            and len(node.args) == 1
            and isinstance(node.args[0], fx.Node)
            and is_linear(node.args[0], module)
        )

    for mul in graph.nodes:
        if not (
            mul.op == "call_function"
            and mul.target == operator.mul
            and len(mul.args) == 2
            and all(isinstance(a, fx.Node) for a in mul.args)
        ):
            continue
        a, b = mul.args
        if act_of_gate(a) and is_linear(b, module):
            act, up = a, b
        elif act_of_gate(b) and is_linear(a, module):
            act, up = b, a
        else:
            continue
        gate = act.args[0]
        if not (
            len(gate.args) == 1 == len(up.args)
            and isinstance(gate.args[0], fx.Node)
            and gate.args[0] is up.args[0]
        ):
            continue
        down = next(
            (n for n in graph.nodes if is_linear(n, module) and peel(n.args[0]) is mul), None
        )
        act_module = module.get_submodule(str(act.target))
        return {
            "fuser": "glu",
            "gate": str(gate.target),
            "up": str(up.target),
            "down": None if down is None else str(down.target),
            "act": str(act.target),
            "act_class": type(act_module).__name__,
            "act_and_mul": act_and_mul_name(act_module),
        }
    return None


def qkv(graph: fx.Graph, module: nn.Module) -> dict[str, Any] | None:
    """Three linears on one forward argument; q is the widest when two widths differ."""
    triples = [g for g in _by_placeholder(graph, module) if len(g) == 3]
    if len(triples) != 1:
        return None
    names = [str(n.target) for n in triples[0]]
    outs = [_out(module, n) for n in names]
    if len(set(outs)) == 2:
        (q,) = (n for n, o in zip(names, outs, strict=True) if outs.count(o) == 1)
        k, v = (n for n, o in zip(names, outs, strict=True) if outs.count(o) == 2)
        if _out(module, q) != max(outs):
            return None
    elif len(set(outs)) == 1:
        q, k, v = names
    else:
        return None
    o = returned_linear(graph, module)
    if o in names or (o is not None and module.get_submodule(o).in_features != _out(module, q)):
        o = None
    return {"fuser": "qkv", "q": q, "k": k, "v": v, "o": o, "head_dim": _head_dim(module)}


def _packed_sizes(node: fx.Node) -> tuple[int, int] | None:
    """(q, kv) of a `.split((q, kv, kv), ...)` with literal widths."""
    if not (node.op == "call_method" and node.target == "split" and len(node.args) >= 2):
        return None
    sizes = node.args[1]
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 3:
        return None
    if not all(isinstance(s, int) for s in sizes):
        return None
    q, k, v = sizes
    return (q, k) if k == v and q >= k else None


def packed_qkv(graph: fx.Graph, module: nn.Module) -> dict[str, Any] | None:
    """One linear whose whole output is split three ways (q, kv, kv): GPT-BigCode's c_attn."""
    for node in graph.nodes:
        if (sizes := _packed_sizes(node)) is None:
            continue
        q_size, kv_size = sizes
        producer = upstream_linear(node.args[0], module)
        if producer is None:
            continue
        name = str(producer.target)
        if _out(module, name) != q_size + 2 * kv_size:
            continue
        o = returned_linear(graph, module)
        if o == name or (o is not None and module.get_submodule(o).in_features != q_size):
            o = None
        return {
            "fuser": "packed_qkv",
            "qkv": name,
            "o": o,
            "q_size": q_size,
            "kv_size": kv_size,
            "head_dim": _head_dim(module),
        }
    return None


def merged_column(graph: fx.Graph, module: nn.Module) -> dict[str, Any] | None:
    """Sibling linears on one forward argument, when exactly one such group exists."""
    groups = []
    for group in _by_placeholder(graph, module):
        names = [str(n.target) for n in group]
        if len(group) >= 2 and len(set(names)) == len(names) and not any("." in n for n in names):
            groups.append(names)
    if len(groups) != 1:
        return None
    if hasattr(module, merged_name(groups[0])):
        return None
    return {"fuser": "merged_column", "linears": groups[0]}


def sibling_groups(graph: fx.Graph, module: nn.Module) -> int:
    """How many groups `merged_column` saw (more than one: which to merge is ambiguous)."""
    return sum(len(g) >= 2 for g in _by_placeholder(graph, module))


# vLLM's FUSERS priority among these (MLA, first there, is matched elsewhere)
MATCHERS = (
    ("glu", glu),
    ("qkv", qkv),
    ("packed_qkv", packed_qkv),
    ("merged_column", merged_column),
)
