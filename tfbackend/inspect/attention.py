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
    kw = {k.arg: ast.unparse(k.value) for k in calls[0].keywords if k.arg}
    return InterfaceCall(scaling=kw.get("scaling"), s_aux=kw.get("s_aux"))


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
def head_count_reshapes(cls: type) -> tuple[str, ...]:
    """`self.<head count>` attributes `cls.forward` (or a helper method it owns) passes to
    `.view`/`.reshape`: a shape built from the whole model's head count, where a rank at tp > 1
    holds only heads / tp of them."""
    found: list[str] = []
    for name in ("forward", "_split_heads", "split_heads", "_shape", "_merge_heads"):
        fn = cls.__dict__.get(name) or getattr(cls, name, None)
        if fn is None:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
        except (OSError, SyntaxError, TypeError):
            continue
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("view", "reshape")
            ):
                continue
            args = [
                a for arg in node.args for a in (arg.elts if isinstance(arg, ast.Tuple) else [arg])
            ]
            for a in args:
                if (
                    isinstance(a, ast.Attribute)
                    and isinstance(a.value, ast.Name)
                    and a.value.id == "self"
                    and a.attr in HEAD_COUNT_ATTRS
                    and a.attr not in found
                ):
                    found.append(a.attr)
    return tuple(found)
