"""Which sibling linears vLLM ≥ 0.32's fusers can merge in a module, as plain data.

vLLM matches each fuser on an FX trace of the module class (`fusers/glu.py`, `qkv.py`,
`packed_qkv.py`, `merged_column.py`) and keeps it only if rewriting the class's forward source
succeeds; both sides decide. We take the same trace (`fxtrace.py`), the same matches
(`fx_match.py`) and the same source checks (`rewrite.py`), without vLLM. One analysis per
(class, children, linear shapes), as vLLM caches per class; what does not fuse is recorded with
the reason. Which match wins is the profile's fuser order, and shape checks that depend on tp
(vLLM's `validate`) are the fusers' (fusers/): the facts only say what matched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_cache: dict[tuple, dict[str, Any] | None] = {}


def fusion_fact(module: Any, graph: Callable[[], Any] | None = None) -> dict[str, Any] | None:
    """The fusion vLLM would try on this module instance's class, as plain data (None: nothing
    to fuse: fewer than two linear children). `graph` gives the module's FX trace when the
    caller took it already (the walk traces a module once for every match)."""
    import torch.nn as nn

    linears = {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}
    if len(linears) < 2:
        return None
    from tfbackend.inspect.fxtrace import branch_scalars

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
        branch_scalars(module),
    )
    if key not in _cache:
        try:
            _cache[key] = _analyse(module, graph)
        except Exception as exc:  # any unreadable forward: vLLM's rewrite fails the same way
            _cache[key] = {"candidates": [], "reason": f"forward not analysable: {exc}"}
    return _cache[key]


def _analyse(module: Any, graph_of: Callable[[], Any] | None) -> dict[str, Any]:
    """vLLM's `get_fusers` for this class: each fuser's match on the FX trace, kept only when
    its forward rewrite would succeed (`fx_match`, `rewrite`), in vLLM's priority order."""
    from tfbackend.inspect import fx_match, rewrite  # torch.fx: imported when a module is read
    from tfbackend.inspect.fxtrace import trace

    graph = graph_of() if graph_of is not None else trace(module)
    if graph is None:
        return {"candidates": [], "reason": "forward not traceable"}
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
        return {"candidates": candidates}  # every match; the profile's order picks
    reason = "; ".join(refused) or "no q/k/v, packed qkv, gate/up or sibling linears"
    if not refused and (groups := fx_match.sibling_groups(graph, module)) > 1:
        reason = f"{groups} sibling-linear groups: which to merge is ambiguous"
    return {"candidates": [], "reason": reason}
