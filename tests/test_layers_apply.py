"""The wrapped model at tp 1 equals plain transformers; apply shards as the plan says (no processes)."""

from __future__ import annotations

import pytest
import torch

from tests._run_models import write_model
from tfbackend.parity.weights import CheckpointReader
from tfbackend.replace.layers import ColumnParallelLinear, ParallelContext, Shard


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    return {k: write_model(k, root / k) for k in ("llama", "gemma3", "qwen3moe")}


def _plan(folder, tp: int):
    from tfbackend.inspect import facts_from_source
    from tfbackend.inspect.resolve import resolve
    from tfbackend.parity.runner import run_profile
    from tfbackend.replace.planner import build_plan

    return build_plan(facts_from_source(resolve(str(folder))), tp=tp, pp=1, profile=run_profile())


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen3moe"])
def test_wrapped_model_at_tp1_matches_transformers(models, kind):
    from transformers import AutoModelForCausalLM

    from tfbackend.parity.workers import RankJob, RankStats, _build, _materialise

    folder = str(models[kind])
    job = RankJob(folder, _plan(folder, 1), 1, 1, "cpu", "float32", [], 0, "", 60)
    model, applied = _build(job, ParallelContext(), 0)
    assert "model.embed_tokens" in applied.installed and "lm_head" in applied.installed
    _materialise(model, job, torch.device("cpu"), RankStats(0, 0, 0))
    ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 300, (1, 21), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_kv_heads_fewer_than_tp_are_replicated(models):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tfbackend.replace.apply import apply

    plan = _plan(models["gemma3"], 2)
    for rank in (0, 1):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models["gemma3"]))
        apply(plan, model, ParallelContext(rank=rank, world=2))
        attn = model.model.layers[0].self_attn
        assert isinstance(attn.k_proj, ColumnParallelLinear)
        assert attn.k_proj.shards["weight"] == Shard(0, 0, 16)  # the one kv head, whole
        assert attn.q_proj.shards["weight"] == Shard(0, 32 * rank, 32)  # two of four q heads
        assert attn.num_key_value_groups == 2


def test_padded_vocab_rows_past_the_checkpoint_read_as_zeros(models):
    reader = CheckpointReader(models["llama"])
    try:
        shard = reader.read("model.embed_tokens.weight", Shard(0, 160, 160))  # rows 160..319 of 300
    finally:
        reader.close()
    assert shard.shape == (160, 64)
    assert shard[140:].abs().sum() == 0 and shard[:140].abs().sum() > 0
    assert reader.bytes_read == 160 * 64 * 4
