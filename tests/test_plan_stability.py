"""The plan does not depend on which transformers release read the model code.

The golden plans under tests/data/plans were written under transformers 5.19 (what vLLM 0.32
serves with). CI's third leg runs this file under the newest transformers that installs
(constraints/newest.txt): there 5.24 wraps attention `forward` in `deprecate_kwarg`, which once
made the Llama plan lose its q/k/v fusion. Regenerate the goldens only under 5.19:

    python -m tests.test_plan_stability --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import _rules_support as base
from tests import tiny

GOLDEN = Path(__file__).parent / "data" / "plans"
GOLDEN_TRANSFORMERS = "5.19."  # the release series the goldens must be written under


def qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        architectures=["Qwen3ForCausalLM"],
    )


CASES = {
    "llama": tiny.llama,
    "qwen3": qwen3,
    "mixtral": tiny.mixtral,
    "gemma3": base.gemma3,
    "gpt_oss": base.gpt_oss,
}
LAYOUTS = ((1, 1), (2, 1), (1, 2))


def plan_of(case: str, tp: int, pp: int) -> dict:
    from tfbackend.replace.planner import build_plan
    from tfbackend.replace.profiles import PROFILES

    facts = base.facts(CASES[case]())
    return build_plan(facts, tp=tp, pp=pp, profile=PROFILES["vllm-0.32"]).to_dict()


def golden_path(case: str, tp: int, pp: int) -> Path:
    return GOLDEN / f"{case}-tp{tp}-pp{pp}.json"


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_equals_the_one_read_under_transformers_5_19(case, tp, pp):
    golden = json.loads(golden_path(case, tp, pp).read_text())
    assert golden["transformers"].startswith(GOLDEN_TRANSFORMERS)
    assert plan_of(case, tp, pp) == golden["plan"]


def test_llama_q_k_v_fuse_whatever_wraps_the_attention_forward():
    """The defect this file guards: a wrapped forward must still fuse."""
    plan = plan_of("llama", 2, 1)
    assert any(e["target"] == "QKVParallelLinear" for e in plan["entries"])
    assert any(e["target"] == "MergedColumnParallelLinear" for e in plan["entries"])


def write() -> None:
    import transformers

    if not transformers.__version__.startswith(GOLDEN_TRANSFORMERS):
        sys.exit(
            f"write the goldens under transformers {GOLDEN_TRANSFORMERS}x, not {transformers.__version__}"
        )
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for case in sorted(CASES):
        for tp, pp in LAYOUTS:
            doc = {"transformers": transformers.__version__, "plan": plan_of(case, tp, pp)}
            golden_path(case, tp, pp).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            print(f"wrote {golden_path(case, tp, pp)}")


if __name__ == "__main__" and "--write" in sys.argv:
    write()
