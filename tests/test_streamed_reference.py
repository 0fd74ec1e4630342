"""The streamed reference (one decoder layer in memory at a time) against plain from_pretrained,
on real tiny checkpoints: fp32 logits, each checkpoint byte read once, the memory bound."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._run_models import tiny_config, write_model
from tfbackend.parity.prompts import build_prompts
from tfbackend.parity.reference import attn_implementation, compute_reference
from tfbackend.parity.reference_mode import decide
from tfbackend.parity.streamed import compute_streamed_reference, padded_batch

KINDS = ("llama", "qwen3moe", "gemma3", "gptoss")  # dense; per-expert MoE; sliding + offset norms
# + tied head; learned sinks (eager attention) + 3-D experts with biases


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    return {k: write_model(k, root / k) for k in KINDS}


def _prompts(folder):
    from transformers import AutoConfig

    return build_prompts(str(folder), AutoConfig.from_pretrained(folder))[0]


def _checkpoint_bytes(folder: Path) -> int:
    from tfbackend.inspect.checkpoint import read_local

    return read_local(folder).total_bytes


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_logits_equal_the_in_memory_reference_at_fp32(models, kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = models[kind]
    prompts = _prompts(folder)
    streamed = compute_streamed_reference(str(folder), prompts, dtype="float32", device="cpu")

    # Bit for bit what the whole model computes on the same batch: materialising one layer at a
    # time (conversions, tied head, computed buffers) changes nothing.
    config = AutoConfig.from_pretrained(folder)
    whole = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn_implementation(config)
    ).eval()
    ids, mask = padded_batch([p.ids for p in prompts])
    with torch.inference_mode():
        batch = whole(input_ids=ids, attention_mask=mask, use_cache=False).logits
    for i, p in enumerate(prompts):
        assert torch.equal(streamed.logits[i], batch[i, : len(p.ids)]), p.name

    # Against the per-prompt reference `run` uses in memory: padding changes only the GEMM
    # blocking of the shorter prompts, fp32 rounding.
    memory = compute_reference(str(folder), prompts, dtype="float32", device="cpu")
    for p, a, b in zip(prompts, memory.logits, streamed.logits, strict=True):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()), p.name


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_reads_each_checkpoint_byte_once_and_holds_one_layer(models, kind):
    folder = models[kind]
    ref = compute_streamed_reference(str(folder), _prompts(folder), dtype="float32", device="cpu")
    stats = ref.stream
    assert ref.mode == "streamed" and ref.peak_kind == "rss_growth"
    assert stats.bytes_read == stats.checkpoint_bytes == _checkpoint_bytes(folder)
    # Never more than the largest unit (a layer, or embedding + tied head) plus what is in no
    # layer; well under the whole model for these 2-layer models.
    outside_layers = stats.checkpoint_bytes - stats.layer_bytes
    assert stats.peak_held_bytes <= stats.largest_layer_bytes + outside_layers
    assert stats.peak_held_bytes < 0.8 * stats.checkpoint_bytes


@pytest.mark.parametrize("kind", ["llama", "qwen3moe"])
def test_a_sharded_checkpoint_written_directly_streams_like_from_pretrained(tmp_path, kind):
    """The benchmark's fast writer (no model materialised) writes what save_pretrained writes
    (per-expert MoE tensors), loads without missing keys, and the streamed reference reads its
    several shards once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tfbackend.parity.synthetic import write_random_checkpoint

    config = tiny_config(kind)
    config.tie_word_embeddings = kind == "llama"
    folder = write_random_checkpoint(
        config, tmp_path / "m", dtype=torch.float32, shard_bytes=60_000
    )
    files = list(folder.glob("*.safetensors"))
    assert len(files) > 2
    if kind == "qwen3moe":
        keys = {k for f in files for k in safe_open(str(f), "pt").keys()}
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in keys
    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    prompts = _prompts(folder)
    memory = compute_reference(str(folder), prompts, dtype="float32", device="cpu")
    streamed = compute_streamed_reference(str(folder), prompts, dtype="float32", device="cpu")
    assert streamed.bytes_read == _checkpoint_bytes(folder)
    for a, b in zip(memory.logits, streamed.logits, strict=True):
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())


def test_a_missing_tensor_is_an_error_not_a_random_weight(models, tmp_path):
    from safetensors.torch import load_file, save_file

    from tfbackend.errors import CheckpointError

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(models["llama"]).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj"):
        compute_streamed_reference(str(broken), _prompts(broken), dtype="float32", device="cpu")


def test_auto_streams_only_when_the_weights_do_not_fit():
    gib = 2**30
    assert decide(10 * gib, 64 * gib, "host RAM available").mode == "memory"
    choice = decide(141 * gib, 128 * gib, "host RAM available")
    assert choice.mode == "streamed" and "141.0 GiB" in choice.reason
    assert decide(10 * gib, 11 * gib, "free on cuda:0").mode == "streamed"  # headroom
    assert decide(10 * gib, None, "").mode == "streamed"


def test_unknown_reference_or_launcher_is_a_user_error():
    from tfbackend.errors import UserError
    from tfbackend.parity.runner import RunOptions

    with pytest.raises(UserError, match="--reference must be one of auto, memory, streamed"):
        RunOptions(device="cpu", reference="disk").validate()
    with pytest.raises(UserError, match="--launcher must be spawn or torchrun"):
        RunOptions(device="cpu", launcher="slurm").validate()
    with pytest.raises(UserError, match="native engine only"):
        RunOptions(device="cpu", launcher="torchrun", engine="vllm").validate()
