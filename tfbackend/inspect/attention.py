"""Does a module dispatch attention through transformers' attention interface?

The backend can only serve attention that a module hands to `ALL_ATTENTION_FUNCTIONS` (vLLM
0.32 checks the forward's source for exactly one call of a function looked up there).
We read the same source the same way, without vLLM.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class InterfaceCall:
    scaling: str | None  # source of the `scaling=` argument, if one is passed
    s_aux: str | None  # source of the `s_aux=` argument (attention sinks)
    keywords: tuple[str, ...] = ()  # every keyword the call names (`sliding_window`, ...)
    # vLLM's `vllm_attention_forward` never reads the mask: a mask the forward computes itself
    # (Doge's dynamic mask) is dropped. The source of the mask argument when it is more than the
    # forward's own `attention_mask` read, sliced or looked up (Zaya's `mask_mapping.get(...)`).
    own_mask: str | None = None
    # methods that widened key/value before the call (JetMoE's `key_states.repeat(1, top_k, ...)`):
    # vLLM then receives more kv heads than the config's num_key_value_heads it sized for
    kv_expanded: tuple[str, ...] = ()


def _reads_interface(node: ast.expr | None) -> bool:
    if isinstance(node, ast.Call):
        node = node.func
    if not isinstance(node, (ast.Attribute, ast.Subscript)):
        return False
    return isinstance(node.value, ast.Name) and node.value.id == "ALL_ATTENTION_FUNCTIONS"


@cache
def interface_call(cls: type) -> InterfaceCall | None:
    """The one attention-interface call in `cls.forward`, or None if there is not exactly one."""
    try:
        source = inspect.getsource(inspect.unwrap(cls.forward))
        tree = ast.parse(textwrap.dedent(source))
    except (AttributeError, OSError, SyntaxError, TypeError):
        return None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and _reads_interface(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names
    ]
    if len(calls) != 1:
        return None
    call = calls[0]
    kw = {k.arg: ast.unparse(k.value) for k in call.keywords if k.arg}
    return InterfaceCall(
        scaling=kw.get("scaling"),
        s_aux=kw.get("s_aux"),
        keywords=tuple(kw),
        own_mask=_own_mask(tree, call),
        kv_expanded=_kv_expanded(tree, call),
    )


def _argument(call: ast.Call, position: int, name: str) -> ast.expr | None:
    """The interface's (module, query, key, value, attention_mask) argument, by position or name."""
    by_name = next((k.value for k in call.keywords if k.arg == name), None)
    if by_name is not None:
        return by_name
    return call.args[position] if len(call.args) > position else None


def _assignments(tree: ast.AST, before: int) -> dict[str, list[ast.expr]]:
    """name -> the values assigned to it above line `before` (tuple targets: the whole value)."""
    out: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.lineno >= before:
            continue
        if node.value is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            for n in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(n, ast.Name):
                    out.setdefault(n.id, []).append(node.value)
    return out


# reading a mask out of what the model handed down: `m[...]`, `m.get("causal")`, `m or {}`
_MASK_READS = (
    ast.Subscript, ast.Slice, ast.BoolOp, ast.IfExp, ast.Compare, ast.Constant, ast.Dict, ast.Tuple,
    ast.operator, ast.boolop, ast.cmpop,
)  # fmt: skip


def _own_mask(tree: ast.AST, call: ast.Call) -> str | None:
    """The mask argument's source when the forward computes it (not a read of `attention_mask`)."""
    mask = _argument(call, 4, "attention_mask")
    if mask is None:
        return None
    assigned = _assignments(tree, call.lineno)
    seen: set[str] = set()

    def passed_down(node: ast.expr) -> bool:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                if sub.id in ("attention_mask", "None") or sub.id in seen:
                    continue
                if sub.id not in assigned:
                    return False
                seen.add(sub.id)
                if not all(passed_down(v) for v in assigned[sub.id]):
                    return False
            elif isinstance(sub, ast.Call):
                f = sub.func
                if not (isinstance(f, ast.Attribute) and f.attr == "get"):
                    return False
            elif not isinstance(sub, (*_MASK_READS, ast.Attribute, ast.Load, ast.expr_context)):
                if isinstance(sub, ast.expr):
                    return False
        return True

    if isinstance(mask, ast.Constant) and mask.value is None:
        return None
    return None if passed_down(mask) else ast.unparse(mask)


_WIDENING = frozenset({"repeat", "repeat_interleave", "expand", "tile", "repeat_kv"})


def _kv_expanded(tree: ast.AST, call: ast.Call) -> tuple[str, ...]:
    names = [
        a.id
        for a in (_argument(call, 2, "key"), _argument(call, 3, "value"))
        if isinstance(a, ast.Name)
    ]
    assigned = _assignments(tree, call.lineno)
    found: list[str] = []
    for name in names:
        for value in assigned.get(name, []):
            for sub in ast.walk(value):
                if not isinstance(sub, ast.Call):
                    continue
                f = sub.func
                fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if fname in _WIDENING and fname not in found:
                    found.append(fname)
    return tuple(found)


def builds_sliding_mask(model_cls: type) -> bool | None:
    """Does the model's modelling module apply a sliding window anywhere (a sliding-window causal
    mask, or `sliding_window=` passed to the attention interface)? None: source unreadable."""
    import sys

    module = sys.modules.get(model_cls.__module__)
    try:
        source = inspect.getsource(module) if module is not None else None
    except (OSError, TypeError):
        source = None
    if source is None:
        return None
    return "sliding_window_causal_mask" in source or "sliding_window=" in source


def looks_like_attention(cls: type) -> bool:
    """A class named like attention, for modules that compute it without the interface."""
    name = cls.__name__
    return name.endswith(("Attention", "Attn", "SelfAttention")) or name.endswith("Attention2")


# Attributes holding the config's (whole-model) head counts. vLLM never rescales them per rank.
HEAD_COUNT_ATTRS = frozenset({
    "num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads", "n_head",
    "n_heads", "n_kv_heads", "num_attention_groups",
})  # fmt: skip


@cache
def _helper_trees(cls: type) -> tuple[ast.AST, ...]:
    trees = []
    for name in ("forward", "_split_heads", "split_heads", "_shape", "_merge_heads"):
        fn = cls.__dict__.get(name) or getattr(cls, name, None)
        if fn is None:
            continue
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))))
        except (OSError, SyntaxError, TypeError):
            continue
    return tuple(trees)


def _branch(test: ast.expr, module) -> bool | None:
    """The value of `if self.flag` / `if not self.flag` / `if self.x is None` on this instance
    (None: not decidable here, both branches are read)."""
    negate = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    node = test.operand if negate else test
    is_none = None
    if (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.comparators[0], ast.Constant)
        and node.comparators[0].value is None
        and isinstance(node.ops[0], (ast.Is, ast.IsNot))
    ):
        is_none, node = isinstance(node.ops[0], ast.Is), node.left
    if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
        return None
    if node.value.id != "self" or not hasattr(module, node.attr):
        return None
    value = getattr(module, node.attr)
    if is_none is not None:
        result = (value is None) == is_none
    elif isinstance(value, (bool, int, type(None))):
        result = bool(value)
    else:
        return None
    return not result if negate else result


def head_count_reshapes(module) -> tuple[str, ...]:
    """`self.<head count>` attributes the module's forward (or a helper method its class owns)
    passes to `.view`/`.reshape` on the branches this instance takes: a shape built from the whole
    model's head count, where a rank at tp > 1 holds only heads / tp of them."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and (taken := _branch(node.test, module)) is not None:
            for child in node.body if taken else node.orelse:
                visit(child)
            return
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("view", "reshape")
        ):
            for arg in node.args:
                for a in arg.elts if isinstance(arg, ast.Tuple) else [arg]:
                    if (
                        isinstance(a, ast.Attribute)
                        and isinstance(a.value, ast.Name)
                        and a.value.id == "self"
                        and a.attr in HEAD_COUNT_ATTRS
                        and a.attr not in found
                    ):
                        found.append(a.attr)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for tree in _helper_trees(type(module)):
        visit(tree)
    return tuple(found)


MASK = "attention_mask"


def _mask_test(test: ast.expr) -> bool | None:
    """The value of `attention_mask is (not) None` (alone or and-ed with other tests) when the
    mask is None, as it is under vLLM; None when the test does not say."""
    tests = test.values if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else [test]
    for t in tests:
        if (
            isinstance(t, ast.Compare)
            and isinstance(t.left, ast.Name)
            and t.left.id == MASK
            and len(t.ops) == 1
            and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value is None
        ):
            if isinstance(t.ops[0], ast.IsNot):
                return False  # an and-chain holding `mask is not None` is False
            if isinstance(t.ops[0], ast.Is) and len(tests) == 1:
                return True
        if isinstance(t, ast.Name) and t.id == MASK:
            return False
    return None


def _implementation_test(test: ast.expr) -> bool | None:
    """`self.config._attn_implementation == "eager"` (or `in (...)`) evaluated for vLLM's "vllm"."""
    if not (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and ast.unparse(test.left).endswith("_attn_implementation")
    ):
        return None
    try:
        right = ast.literal_eval(test.comparators[0])
    except ValueError:
        return None
    op = test.ops[0]
    if isinstance(op, (ast.Eq, ast.NotEq)):
        hit = right == "vllm"
    elif isinstance(op, (ast.In, ast.NotIn)) and isinstance(right, (tuple, list, set)):
        hit = "vllm" in right
    else:
        return None
    return hit if isinstance(op, (ast.Eq, ast.In)) else not hit


def tensor_mask_reads(module) -> tuple[str, ...]:
    """Where the module's forward uses `attention_mask` as a tensor (`attention_mask[...]`,
    `attention_mask.dtype`) on the branches this instance takes under vLLM, outside any
    `attention_mask is not None` guard, before anything reassigns it. vLLM passes no mask: the
    model's masking_utils calls return None for its "vllm" attention implementation."""
    fn = type(module).__dict__.get("forward") or getattr(type(module), "forward", None)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    except (OSError, SyntaxError, TypeError):
        return ()
    func = tree.body[0] if tree.body else None
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return ()
    if MASK not in {a.arg for a in [*func.args.args, *func.args.kwonlyargs]}:
        return ()
    assigned = [
        t.lineno
        for n in ast.walk(func)
        if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Name) and t.id == MASK
    ]
    until = min(assigned, default=10**9)
    found: list[str] = []

    def branch(test: ast.expr) -> bool | None:
        for decide in (_mask_test, _implementation_test):
            if (value := decide(test)) is not None:
                return value
        return _branch(test, module)

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.If, ast.IfExp)) and (taken := branch(node.test)) is not None:
            for child in _as_list(node.body if taken else node.orelse):
                visit(child)
            return
        if (
            isinstance(node, (ast.Subscript, ast.Attribute))
            and isinstance(node.value, ast.Name)
            and node.value.id == MASK
            and node.lineno < until
        ):
            text = ast.unparse(node)
            if text not in found:
                found.append(text)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    for stmt in func.body:
        visit(stmt)
    return tuple(found)


def _as_list(body) -> list:
    return body if isinstance(body, list) else [body]
