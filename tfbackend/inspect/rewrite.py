"""Would vLLM 0.32 manage to rewrite this forward for a fusion it matched?

A fuser joins `get_fusers`' list only when its `update_forward` rewrites the class's forward
source (vllm/model_executor/models/transformers/fusers/*.py, fx_utils.py); when the rewrite
raises, the fusion is skipped and every projection stays a separate linear. Each `check_*` here
runs the same source checks on a fresh parse and raises with vLLM's reason where vLLM would.
Nothing is compiled or bound: only the yes/no and the reason matter.

The check that decides most often is `_check_input_stable`: the merged GEMM reads the input once,
at the first projection, so nothing between the first and the last projection may rebind or
write any name that may alias the input. vLLM's aliasing is deliberately coarse: an assignment
whose value reads the input and is not provably fresh (a linear's output, views of it) taints
its target. `q = self.q_proj(x) * self.scaling` taints `q` (a product is not a linear's output),
so a later `q = q.view(...)` before `v_proj(x)` refuses the fusion (OPT, Falcon-H1).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Iterable
from typing import Any


def forward_source(cls: type) -> ast.FunctionDef:
    """`cls.forward`'s definition, parsed; raises for a closure or a forward that is no plain
    function (neither can be read, nor rewritten by vLLM)."""
    fn = inspect.unwrap(cls.forward)
    if fn.__code__.co_freevars:
        raise ValueError("forward is a closure")
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    funcdef = tree.body[0]
    if not isinstance(funcdef, ast.FunctionDef):
        raise ValueError("source is not a plain function definition")
    return funcdef


def forward_def(cls: type) -> ast.FunctionDef:
    """`cls.forward`'s source as vLLM's `recover_forward` accepts it."""
    funcdef = forward_source(cls)
    for node in ast.walk(funcdef):
        name = getattr(node, "attr", None) or getattr(node, "id", None)
        if isinstance(name, str) and name.startswith("__") and not name.endswith("__"):
            raise ValueError(f"{name} would be name mangled")
    return funcdef


# ---- per fuser (the checks of each update_forward, in its order) ----


def check_qkv(module: Any, q: str, k: str, v: str) -> None:
    funcdef = forward_def(type(module))
    names = (q, k, v)
    calls = _unguarded_calls(funcdef, names)
    arg_dumps = {ast.dump(c.args[0]) for c in calls}
    if len(arg_dumps) != 1:
        raise ValueError("projection inputs are written differently")
    # the trace may be partial: no other linear child may read the same input
    others = {n for n, c in module.named_children() if _is_linear(c)} - set(names)
    for node in ast.walk(funcdef):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in others
            and any(ast.dump(a) in arg_dumps for a in node.args)
        ):
            raise ValueError("another linear consumes the same input")
    chains = [_block_chain(funcdef.body, c) for c in calls]
    if any(not c for c in chains):
        raise ValueError("projection calls not found in the function body")
    depth = 0  # the innermost block common to all three
    for level in zip(*chains, strict=False):
        if len({id(block) for block, _ in level}) != 1:
            break
        depth += 1
    block = chains[0][depth - 1][0]
    indices = [c[depth - 1][1] for c in chains]
    _check_input_stable(funcdef, module, calls, block, indices)
    _check_temporaries(funcdef, len(calls))


def check_merged(module: Any, names: Iterable[str]) -> None:
    funcdef = forward_def(type(module))
    calls = _unguarded_calls(funcdef, names)
    if len({ast.dump(c.args[0]) for c in calls}) != 1:
        raise ValueError("parallel linears read different inputs")
    chains = [_block_chain(funcdef.body, c) for c in calls]
    if any(not c for c in chains):
        raise ValueError("parallel linear calls not found in the function body")
    blocks = [c[-1] for c in chains]
    if len({id(block) for block, _ in blocks}) != 1:
        raise ValueError("parallel linear calls are in different blocks")
    _check_input_stable(funcdef, module, calls, blocks[0][0], [i for _, i in blocks])
    _check_temporaries(funcdef, len(calls))


def check_glu(module: Any, act: str, gate: str, up: str) -> None:
    funcdef = forward_def(type(module))
    act_call, others = _self_call_and_refs(funcdef, act)
    if others:
        raise ValueError(f"{act} is referenced {len(others) + 1} times")
    gate_call, up_call = _unguarded_calls(funcdef, (gate, up))
    if act_call.args[0] is not gate_call:
        raise ValueError("activation does not directly wrap the gate")
    if ast.dump(gate_call.args[0]) != ast.dump(up_call.args[0]):
        raise ValueError("gate and up inputs are written differently")
    muls = [
        n
        for n in ast.walk(funcdef)
        if isinstance(n, ast.BinOp)
        and isinstance(n.op, ast.Mult)
        and {id(n.left), id(n.right)} == {id(act_call), id(up_call)}
    ]
    if len(muls) != 1:
        raise ValueError("no multiply of the activation and up projection")


def check_packed_qkv(module: Any, qkv: str) -> None:
    funcdef = forward_def(type(module))
    splits = [
        n
        for n in ast.walk(funcdef)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "split"
        and n.args
        and isinstance(n.args[0], (ast.Tuple, ast.List))
        and len(n.args[0].elts) == 3
        and any(isinstance(i, ast.Attribute) and i.attr == qkv for i in ast.walk(n.func.value))
    ]
    if len(splits) != 1:
        raise ValueError(f"{qkv} has {len(splits)} three-way splits")


# ---- shared source checks (fx_utils.py / fusers/base.py) ----


def _is_linear(module: Any) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear)


def _self_call_and_refs(funcdef: ast.FunctionDef, name: str):
    """The one `self.<name>(arg)` call and every other `self.<name>` reference."""
    uses = [
        n
        for n in ast.walk(funcdef)
        if isinstance(n, ast.Attribute)
        and n.attr == name
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
    ]
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
        raise ValueError(f"{name} is not called exactly once as self.{name}(arg)")
    return calls[0], [u for u in uses if u is not calls[0].func]


def _unguarded_calls(funcdef: ast.FunctionDef, names: Iterable[str]) -> list[ast.Call]:
    """One call per projection; each other reference must be an existence guard, folded to its
    constant in `funcdef` (as vLLM folds it: later checks see the folded source)."""
    calls = []
    for name in names:
        call, refs = _self_call_and_refs(funcdef, name)
        for ref in refs:
            _fold_existence_guard(funcdef, ref, name)
        calls.append(call)
    return calls


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _fold_existence_guard(funcdef: ast.FunctionDef, ref: ast.Attribute, name: str) -> None:
    for node in ast.walk(funcdef):
        if not (isinstance(node, ast.Compare) and len(node.ops) == 1):
            continue
        (op,), (right,) = node.ops, node.comparators
        if not isinstance(op, (ast.Is, ast.IsNot)):
            continue
        if (ref is node.left and _is_none(right)) or (ref is right and _is_none(node.left)):
            _replace(funcdef, node, ast.Constant(isinstance(op, ast.IsNot)))
            return
    for node in ast.walk(funcdef):  # a bare truthiness test: an nn.Linear is always truthy
        if (isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)) and node.test is ref) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and node.operand is ref
        ):
            _replace(funcdef, ref, ast.Constant(True))
            return
    raise ValueError(f"{name} is referenced outside an existence guard")


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    class _Replacer(ast.NodeTransformer):
        def visit(self, node: ast.AST) -> ast.AST:
            return new if node is old else super().generic_visit(node)

    _Replacer().visit(tree)


def _block_chain(block: list[ast.stmt], node: ast.AST) -> list[tuple[list[ast.stmt], int]]:
    """(statement list, index) from `block` down to the innermost block holding `node`."""
    for index, stmt in enumerate(block):
        if not any(child is node for child in ast.walk(stmt)):
            continue
        inner = [getattr(stmt, f, None) for f in ("body", "orelse", "finalbody")]
        inner += [h.body for h in getattr(stmt, "handlers", [])]
        inner += [c.body for c in getattr(stmt, "cases", [])]
        for child in inner:
            if isinstance(child, list) and child and (tail := _block_chain(child, node)):
                return [(block, index), *tail]
        return [(block, index)]
    return []


def _check_temporaries(funcdef: ast.FunctionDef, count: int) -> None:
    names = {n.id for n in ast.walk(funcdef) if isinstance(n, ast.Name)}
    if names & {f"_vllm_merged_{i}" for i in range(count)}:
        raise ValueError("fused temporaries would shadow existing names")


def _check_input_stable(funcdef, module, calls, block, indices) -> None:
    """Raise if anything between the first and last projection may change their input."""
    seed = {
        n.id
        for n in ast.walk(calls[0].args[0])
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }
    tracked = aliasing_names(funcdef, seed, module)
    if tracked & written_names(block[min(indices) : max(indices) + 1]):
        raise ValueError("projection input is rebound or mutated before all calls")


def _base_name(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _inplace_target(node: ast.AST) -> str | None:
    if isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(
        node.ctx, (ast.Store, ast.Del)
    ):
        return _base_name(node)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr.endswith("_")
        and not node.func.attr.endswith("__")
    ):
        return _base_name(node.func.value)
    return None


def _arg_names(call: ast.Call) -> set[str]:
    reads = [*call.args, *(kw.value for kw in call.keywords)]
    return {
        n.id
        for arg in reads
        for n in ast.walk(arg)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }


def _writes_through_args(call: ast.Call) -> bool:
    for kw in call.keywords:
        if kw.arg == "out":
            return True
        if kw.arg == "inplace" and not (
            isinstance(kw.value, ast.Constant) and kw.value.value is False
        ):
            return True
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name.endswith("_") and not name.endswith("__")


def written_names(region: list[ast.stmt]) -> set[str]:
    """Names `region` may rebind, write through, or hand to a call for its side effect."""
    written = set()
    for stmt in region:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                written.add(n.id)
            if (base := _inplace_target(n)) is not None:
                written.add(base)
            if isinstance(n, ast.Call) and _writes_through_args(n):
                written |= _arg_names(n)
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            written |= _arg_names(stmt.value)
    return written


_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "size", "dim", "numel", "item"})


def _aliasing_reads(node: ast.expr) -> set[str]:
    """Names `node` reads in a way that could yield a view of them (metadata reads cannot)."""
    names: set[str] = set()
    stack: list[ast.AST] = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.Attribute) and current.attr in _METADATA_ATTRS:
            continue
        if (
            isinstance(current, ast.Call)
            and isinstance(current.func, ast.Attribute)
            and current.func.attr in _METADATA_ATTRS
        ):
            stack.extend(current.args)
            stack.extend(kw.value for kw in current.keywords)
            continue
        if isinstance(current, ast.Name) and isinstance(current.ctx, ast.Load):
            names.add(current.id)
        stack.extend(ast.iter_child_nodes(current))
    return names


def _returns_fresh(node: ast.expr, module: Any) -> bool:
    """Provably new storage: a linear's output and views of it, literals, missing/None modules."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.IfExp):
        if isinstance(node.test, ast.Constant):
            return _returns_fresh(node.body if node.test.value else node.orelse, module)
        return _returns_fresh(node.body, module) and _returns_fresh(node.orelse, module)
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(_returns_fresh(e, module) for e in node.elts)
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        func = node.func
        if isinstance(func.value, ast.Name) and func.value.id == "self":
            attribute = getattr(module, func.attr, None)
            if attribute is None or _is_linear(attribute):
                return True
            return bool(node.args) and all(_returns_fresh(a, module) for a in node.args)
        node = func.value
    return False


def aliasing_names(funcdef: ast.FunctionDef, seed: set[str], module: Any) -> set[str]:
    """`seed` and every name an assignment may have made a view of one of them."""
    names = set(seed)
    assigns = [
        (n, n.value)
        for n in ast.walk(funcdef)
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        and n.value is not None
        and not _returns_fresh(n.value, module)
    ]
    changed = True
    while changed:
        changed = False
        for n, value in assigns:
            if not _aliasing_reads(value) & names:
                continue
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            stores = {
                c.id
                for t in targets
                for c in ast.walk(t)
                if isinstance(c, ast.Name) and isinstance(c.ctx, ast.Store)
            }
            if stores - names:
                names |= stores
                changed = True
    return names
