"""The one FX trace every fuser reads (inspect/fxtrace.py) is the module's forward, once.

torch.fx patches `nn.Module.__getattr__` while tracing. Computing a `get_attr`'s meta value
through the patched one recorded another `get_attr`, recursively, until the stack ran out; each
level's RecursionError was swallowed, and the graph came back with the forward repeated and cut
wherever the stack ended, so what a router reading found depended on how deep the caller was
(`pytest` and `python -m pytest` read Cohere2-MoE's router differently). vLLM 0.33's fx_utils
reads through the real `__getattr__`; so does the trace here.
"""

from __future__ import annotations

import collections

import torch


def _cohere2_moe_router():
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING["cohere2_moe"](
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=256,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.model.layers[0].mlp.gate


def _ops(graph) -> collections.Counter:
    return collections.Counter(
        n.op if n.op != "call_function" else getattr(n.target, "__name__", str(n.target))
        for n in graph.nodes
    )


def _deep(depth: int, fn):
    return fn() if depth == 0 else _deep(depth - 1, fn)


def test_a_parameter_read_is_one_get_attr_and_the_forward_is_traced_once():
    from tfbackend.inspect.fxtrace import trace

    graph = trace(_cohere2_moe_router())
    ops = _ops(graph)
    assert ops["get_attr"] == 1  # the router's weight
    assert (ops["linear"], ops["topk"], ops["softmax"], ops["output"]) == (1, 1, 1, 1)


def test_the_graph_does_not_depend_on_how_deep_the_caller_is():
    from tfbackend.inspect.fxtrace import trace
    from tfbackend.inspect.moe_blocks import router_reading

    router = _cohere2_moe_router()
    top = _ops(trace(router))
    for depth in (200, 600):
        assert _ops(_deep(depth, lambda: trace(router))) == top, depth
    # topk(linear(x)) then softmax: the scorer follows the top-k
    reading = _deep(600, lambda: router_reading(router))
    assert reading["before"] is None
    assert reading["after"] == {"op": "softmax", "from_linear": True}
