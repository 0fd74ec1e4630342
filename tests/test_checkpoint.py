"""Checkpoint headers against the model: real tiny checkpoints from save_pretrained, then damaged."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tfbackend.check import CheckOptions, check
from tfbackend.errors import CheckpointError
from tfbackend.inspect.checkpoint import FORMAT_UNAVAILABLE, read_headers, read_local
from tfbackend.inspect.facts import SourceInfo

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _llama(tmp: pathlib.Path, *, tied: bool = False, dtype=torch.bfloat16, **save) -> pathlib.Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(tmp, **save)
    return tmp


def _rewrite(folder: pathlib.Path, edit) -> None:
    """Load the single-file checkpoint, let `edit` change the state dict, save it back."""
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _ids(report) -> list[str]:
    return [f.rule_id for f in report.findings]


def _checkpoint(report):
    return report.sections["checkpoint"]


def test_intact_checkpoint_loads_every_tensor(tmp_path):
    report = check(str(_llama(tmp_path)), CheckOptions())
    cmp = _checkpoint(report)
    assert cmp.compared and cmp.loaded == len(cmp.headers.tensors)
    assert not (cmp.missing or cmp.unexpected or cmp.shape_mismatches)
    assert not [i for i in _ids(report) if i.startswith("TFB70")]


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    folder = _llama(tmp_path, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    headers = read_local(folder)
    assert headers.sharded and len(headers.files) > 1
    cmp = _checkpoint(check(str(folder), CheckOptions()))
    assert cmp.loaded == len(headers.tensors) and not cmp.missing


def test_removed_tensor_is_missing(tmp_path):
    folder = _llama(tmp_path)
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    report = check(str(folder), CheckOptions())
    assert _checkpoint(report).missing == ["model.layers.1.mlp.down_proj.weight"]
    assert "TFB701" in _ids(report) and report.exit_code == 1


def test_renamed_tensor_is_missing_and_unexpected(tmp_path):
    folder = _llama(tmp_path)

    def rename(t):
        t["model.layers.0.self_attn.query.weight"] = t.pop("model.layers.0.self_attn.q_proj.weight")

    _rewrite(folder, rename)
    report = check(str(folder), CheckOptions())
    cmp = _checkpoint(report)
    assert cmp.missing == ["model.layers.0.self_attn.q_proj.weight"]
    assert cmp.unexpected == ["model.layers.0.self_attn.query.weight"]
    assert {"TFB701", "TFB702"} <= set(_ids(report))


def test_reshaped_tensor_is_a_shape_mismatch_against_the_full_shape(tmp_path):
    folder = _llama(tmp_path)
    _rewrite(
        folder, lambda t: t.update({"model.norm.weight": torch.ones(48, dtype=torch.bfloat16)})
    )
    report = check(str(folder), CheckOptions(tp=2))
    (mismatch,) = _checkpoint(report).shape_mismatches
    assert (mismatch.checkpoint_shape, mismatch.expected_shape) == ([48], [32])
    assert "TFB703" in _ids(report)


def test_float32_checkpoint_served_in_bfloat16_is_a_dtype_surprise(tmp_path):
    folder = _llama(tmp_path)  # config dtype bfloat16
    _rewrite(folder, lambda t: t.update({k: v.float() for k, v in t.items()}))
    report = check(str(folder), CheckOptions())
    found = [f for f in report.findings if f.rule_id == "TFB704"]
    assert {f.severity.value for f in found} == {"warning", "info"}
    assert any("float32, served as bfloat16" in f.message for f in found)
    assert not [f for f in check(str(folder), CheckOptions(dtype="float32")).findings
                if f.rule_id == "TFB704" and f.severity.value == "warning"]  # fmt: skip


def test_truncated_header_is_a_checkpoint_error_and_exit_2_with_nothing_written(tmp_path):
    folder = _llama(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        check(str(folder), CheckOptions())
    proc = subprocess.run(
        [sys.executable, "-m", "tfbackend", "check", str(folder), "--json"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert "model.safetensors" in proc.stderr and "re-download" in proc.stderr


def test_no_checkpoint_skips_the_header_read(tmp_path):
    folder = _llama(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    report = check(str(folder), CheckOptions(no_checkpoint=True))
    assert "checkpoint" not in report.sections and "memory" in report.sections


def test_tied_model_without_lm_head_is_complete(tmp_path):
    folder = _llama(tmp_path, tied=True)
    assert "lm_head.weight" not in read_local(folder).tensors
    cmp = _checkpoint(check(str(folder), CheckOptions()))
    assert cmp.tied_lm_head and not cmp.missing and not cmp.unexpected


def test_untied_model_without_lm_head_is_missing_it(tmp_path):
    folder = _llama(tmp_path)
    _rewrite(folder, lambda t: t.pop("lm_head.weight"))
    assert _checkpoint(check(str(folder), CheckOptions())).missing == ["lm_head.weight"]


def test_rotary_cache_and_gptq_bias_are_ignored_not_unexpected(tmp_path):
    folder = _llama(tmp_path)

    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        t["model.layers.0.mlp.down_proj.bias"] = torch.zeros(32, dtype=torch.bfloat16)

    _rewrite(folder, add)
    report = check(str(folder), CheckOptions())
    cmp = _checkpoint(report)
    assert not cmp.unexpected
    assert {m.checkpoint_name for m in cmp.ignored} == {
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "model.layers.0.mlp.down_proj.bias",
    }
    assert "TFB707" in _ids(report)


def test_checkpoint_saved_without_base_model_prefix_maps_onto_it(tmp_path):
    folder = _llama(tmp_path)

    def strip(t):
        for k in [k for k in t if k.startswith("model.")]:
            t[k.removeprefix("model.")] = t.pop(k)

    _rewrite(folder, strip)
    cmp = _checkpoint(check(str(folder), CheckOptions()))
    assert not cmp.missing and not cmp.unexpected and cmp.renamed > 0


def _moe_config(model_type: str):
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        num_experts_per_tok=2,
    )
    if model_type == "mixtral":
        return MixtralConfig(intermediate_size=64, num_local_experts=4, **common)
    return Qwen3MoeConfig(moe_intermediate_size=16, intermediate_size=64, num_experts=4, **common)


def _save_moe(tmp: pathlib.Path, model_type: str) -> pathlib.Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_moe_config(model_type)).save_pretrained(tmp)
    return tmp


def test_mixtral_per_expert_checkpoint_maps_onto_3d_experts(tmp_path):
    folder = _save_moe(tmp_path, "mixtral")
    names = read_local(folder).tensors
    # transformers 5 saves the original per-expert layout under block_sparse_moe
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in names
    cmp = _checkpoint(check(str(folder), CheckOptions(tp=2)))
    assert not (cmp.missing or cmp.unexpected or cmp.shape_mismatches)
    assert cmp.experts_merged == 2 * 4 * 3  # layers × experts × (w1, w3, w2)


def test_qwen3_moe_fused_3d_checkpoint_loads_directly(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_moe_config("qwen3_moe"))
    _save_moe(tmp_path, "qwen3_moe")  # config.json
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 32, 32)
    for p in tmp_path.glob("*.safetensors"):
        p.unlink()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cmp = _checkpoint(check(str(tmp_path), CheckOptions()))
    assert not (cmp.missing or cmp.unexpected or cmp.shape_mismatches)
    assert cmp.experts_merged == 0


def test_missing_expert_and_misshapen_expert_are_reported(tmp_path):
    folder = _save_moe(tmp_path, "qwen3_moe")
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))

    def reshape(t):
        t["model.layers.0.mlp.experts.0.down_proj.weight"] = torch.zeros(32, 17)

    _rewrite(folder, reshape)
    report = check(str(folder), CheckOptions())
    cmp = _checkpoint(report)
    assert cmp.missing == ["model.layers.1.mlp.experts.gate_up_proj [expert 2 w3]"]
    (m,) = cmp.shape_mismatches
    assert (m.checkpoint_shape, m.expected_shape) == ([32, 17], [32, 16])


class _Tripwire:
    """Unpickling this touches a file: proof that a checkpoint was (or was not) unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_bin_only_folder_is_reported_and_never_unpickled(tmp_path):
    folder = _llama(tmp_path)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"tripwire": _Tripwire(marker)}, folder / "pytorch_model.bin")
    report = check(str(folder), CheckOptions())
    (finding,) = [f for f in report.findings if f.rule_id == "TFB705"]
    assert "pytorch_model.bin" in finding.message and "safetensors" in finding.fix
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the tripwire works
    assert marker.exists()


def test_offline_hub_model_without_cached_headers_is_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = SourceInfo(
        kind="hub",
        location="tfbackend-tests/absent",
        config_path="",
        repo_id="tfbackend-tests/absent",
    )
    headers = read_headers(source, offline=True)
    assert headers.format == FORMAT_UNAVAILABLE and "offline" in headers.unavailable_reason

    from tfbackend.check import check_facts
    from tfbackend.inspect import facts_from_config

    folder = _llama(tmp_path)
    from transformers import AutoConfig

    facts = facts_from_config(AutoConfig.from_pretrained(folder), source)
    report = check_facts(facts, CheckOptions(offline=True))
    (finding,) = [f for f in report.findings if f.rule_id == "TFB706"]
    assert finding.severity.value == "warning" and report.exit_code == 0


def test_check_json_has_checkpoint_and_memory_sections(tmp_path):
    folder = _llama(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "tfbackend", "check", str(folder), "--json", "--tp", "2",
         "--max-model-len", "128"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    ckpt, mem = data["sections"]["checkpoint"], data["sections"]["memory"]
    assert ckpt["compared"] and ckpt["headers"]["num_tensors"] == ckpt["loaded"]
    assert mem["max_model_len"] == 128 and [s["ranks"] for s in mem["stages"]] == [[0, 1]]


def test_gpt2_keys_to_ignore_pattern_drops_a_needed_bias(tmp_path):
    # vLLM 0.32 applies GPT2Model._keys_to_ignore_on_load_unexpected ("attn.bias") with re.search
    # to every key: "transformer.h.0.attn.c_attn.bias" matches and is dropped, then never loaded.
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    report = check(str(tmp_path), CheckOptions())
    cmp = _checkpoint(report)
    assert set(cmp.dropped_but_needed) == {
        "model.h.0.attn.c_attn.bias",
        "model.h.1.attn.c_attn.bias",
    }
    assert not cmp.unexpected and cmp.renamed > 0  # transformer.* → model.*
    (finding,) = [f for f in report.findings if f.rule_id == "TFB701"]
    assert "dropped by the backend's loader" in finding.message


@pytest.mark.parametrize("model_type", ["apertus", "axk1"])
def test_persistent_buffers_in_the_checkpoint_load_like_parameters(model_type, tmp_path):
    # Apertus' xIELU keeps beta/eps and AXK1's router its e_score_correction_bias as persistent
    # buffers; save_pretrained writes them and vLLM's AutoWeightsLoader loads them into the
    # buffers (vLLM serves both, reports/parity.md): they are not "unexpected" tensors.
    from tfbackend.parity.tiny import make_tiny_model

    folder = make_tiny_model(model_type, tmp_path / model_type)
    report = check(str(folder), CheckOptions(tp=2))
    assert "TFB702" not in {f.rule_id for f in report.findings}


def test_a_scalar_tensor_is_read_whole_by_the_rank_reader(tmp_path):
    from tfbackend.parity.weights import CheckpointReader

    save_file(
        {"beta": torch.tensor(0.5), "w": torch.ones(4, 2)}, str(tmp_path / "model.safetensors")
    )
    reader = CheckpointReader(tmp_path)
    try:
        assert reader.read("beta").item() == 0.5
        assert reader.read("w").shape == (4, 2)
    finally:
        reader.close()
