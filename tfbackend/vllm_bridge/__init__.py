"""Cross-check against the installed vLLM: build its Transformers-backend model on meta per rank
(`run.py` spawns `build.py` workers) and diff it with the plan (`diff.py`). vLLM is imported
only inside the worker processes."""

from __future__ import annotations


def cross_check(facts, plan, *, timeout: float = 300.0):
    """vLLM's construction of `facts`' model at the plan's tp/pp, compared with the plan."""
    from tfbackend.vllm_bridge.diff import compare
    from tfbackend.vllm_bridge.run import build_with_vllm, config_dir

    with config_dir(facts) as model_dir:
        (build,) = build_with_vllm([model_dir], tp=plan.tp, pp=plan.pp, timeout=timeout)
    return compare(facts, plan, build)
