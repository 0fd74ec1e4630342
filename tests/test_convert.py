"""`tfbackend convert` without vLLM: names, shapes and bytes of the per-rank files, refusals,
the output folder's safety, parts and the manifest. Real tiny checkpoints, real safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests._convert_models import write
from tfbackend.convert import ConvertOptions, Progress, convert, read_manifest
from tfbackend.convert.manifest import MANIFEST_NAME
from tfbackend.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert-src")
    return {k: write(k, root / k) for k in ("llama", "qwen3moe-tied", "mixtral")}


def _convert(src, out, **kw):
    return convert(str(src), ConvertOptions(out=str(out), **{"dtype": "float32", **kw}))


def _rank_tensors(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob(pattern)):
        out.update(load_file(f))
    return out


def _source(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_every_plan_parameter_is_written_with_its_per_rank_shape(models, tmp_path):
    for kind, src in models.items():
        result = _convert(src, tmp_path / kind, tp=2)
        assert result.converted, result.blockers
        plan = result.report.plan
        for rank in (0, 1):
            written = {
                k: list(v.shape)
                for k, v in _rank_tensors(tmp_path / kind, f"model-rank-{rank}-part-*").items()
            }
            aliases = {}
            for e in plan.entries:
                if "alias_of" in e.extra:
                    aliases.setdefault(e.extra["alias_of"], []).append(e.qualname)
            head = next(e for e in plan.entries if e.kind == "lm_head")
            tied = head.extra["tied_to"] if head.extra.get("tied") else None
            for e in plan.entries:
                if "alias_of" in e.extra or (tied and e is head):
                    continue
                for p in e.params:
                    names = [f"{q}.{p.name}" for q in [e.qualname, *aliases.get(e.qualname, [])]]
                    if e.qualname == tied:  # one tensor for both: vLLM keeps the smaller name
                        names.append("lm_head.weight")
                    assert sum(n in written for n in names) == 1, (kind, names)
                    assert written[min(names)] == p.rank_shape
            for spec in plan.attention:
                for scale in ("_k_scale", "_v_scale", "_q_scale", "_prob_scale"):
                    assert written[f"{spec.qualname}.attn.{scale}"] == []


def test_kv_heads_fewer_than_tp_are_replicated_and_vocab_rows_past_the_end_are_zero(
    models, tmp_path
):
    _convert(models["llama"], tmp_path / "out", tp=2)
    src = _source(models["llama"])
    for rank in (0, 1):
        got = _rank_tensors(tmp_path / "out", f"model-rank-{rank}-part-*")
        q, k, v = (src[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
        # 2 heads over 2 ranks; the one kv head on both ranks
        want = torch.cat([q[rank * 64 : (rank + 1) * 64], k, v])
        assert torch.equal(got["model.layers.0.self_attn.qkv_proj.weight"], want)
        gate, up = (src[f"model.layers.0.mlp.{x}_proj.weight"] for x in ("gate", "up"))
        want = torch.cat([gate[rank * 128 : (rank + 1) * 128], up[rank * 128 : (rank + 1) * 128]])
        assert torch.equal(got["model.layers.0.mlp.gate_up_proj.weight"], want)
        down = src["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(
            got["model.layers.0.mlp.down_proj.weight"], down[:, rank * 128 : (rank + 1) * 128]
        )
        # vocab 300 padded to 320: rank 1 holds rows 160..299, then 20 zero rows
        emb = got["model.embed_tokens.weight"]
        real = src["model.embed_tokens.weight"][rank * 160 : (rank + 1) * 160]
        assert emb.shape == (160, 128)
        assert torch.equal(emb[: len(real)], real)
        assert torch.count_nonzero(emb[len(real) :]) == 0
        head = src["lm_head.weight"][rank * 160 : (rank + 1) * 160]
        assert torch.equal(got["lm_head.weight"][: len(head)], head)


def test_experts_are_stacked_gate_then_up_and_a_tied_head_is_written_once(models, tmp_path):
    _convert(models["qwen3moe-tied"], tmp_path / "out", tp=2)
    src = _source(models["qwen3moe-tied"])
    per = 32  # moe_intermediate_size 64 over 2 ranks
    for rank in (0, 1):
        got = _rank_tensors(tmp_path / "out", f"model-rank-{rank}-part-*")
        rows = slice(rank * per, (rank + 1) * per)
        w13 = got["model.layers.1.mlp.experts.routed_experts.w13_weight"]
        w2 = got["model.layers.1.mlp.experts.routed_experts.w2_weight"]
        assert w13.shape == (4, 2 * per, 128) and w2.shape == (4, 128, per)
        for e in range(4):
            ex = f"model.layers.1.mlp.experts.{e}"
            assert torch.equal(w13[e, :per], src[f"{ex}.gate_proj.weight"][rows])
            assert torch.equal(w13[e, per:], src[f"{ex}.up_proj.weight"][rows])
            assert torch.equal(w2[e], src[f"{ex}.down_proj.weight"][:, rows])
        # the router under the runner's alias, the smaller of its two names (vLLM keeps one)
        assert "model.layers.1.mlp.experts.gate.weight" in got
        assert "model.layers.1.mlp.gate.weight" not in got
        # tied: lm_head.weight is the embedding, written once under the smaller name
        assert "lm_head.weight" in got and "model.embed_tokens.weight" not in got
        real = src["model.embed_tokens.weight"][rank * 160 : (rank + 1) * 160]
        assert torch.equal(got["lm_head.weight"][: len(real)], real)


def test_mixtral_w1_w3_w2_experts_and_a_bfloat16_cast(models, tmp_path):
    _convert(models["mixtral"], tmp_path / "out", tp=2, dtype="bfloat16")
    src = _source(models["mixtral"])
    got = _rank_tensors(tmp_path / "out", "model-rank-1-part-*")
    w13 = got["model.layers.0.mlp.experts.routed_experts.w13_weight"]
    assert w13.dtype == torch.bfloat16
    # transformers saves Mixtral as block_sparse_moe.experts.N.w1/w3/w2; vLLM renames it to mlp
    gate = src["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
    up = src["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    assert torch.equal(w13[2, :48], gate[48:].to(torch.bfloat16))
    assert torch.equal(w13[2, 48:], up[48:].to(torch.bfloat16))
    assert got["model.layers.0.self_attn.attn._k_scale"].dtype == torch.float32


def test_pipeline_stages_hold_their_layers_and_a_tied_head_rides_the_last(models, tmp_path):
    result = _convert(models["qwen3moe-tied"], tmp_path / "out", tp=1, pp=2)
    assert result.converted, result.blockers
    first = _rank_tensors(tmp_path / "out", "model-pp-0-tp-0-part-*")
    last = _rank_tensors(tmp_path / "out", "model-pp-1-tp-0-part-*")
    assert any(k.startswith("model.layers.0.") for k in first)
    assert not any(k.startswith("model.layers.1.") for k in first)
    assert not any(k.startswith("model.layers.0.") for k in last)
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    # vLLM keeps the embedding on the last stage too, tied to the head: one tensor, two names
    assert "lm_head.weight" in last and "model.embed_tokens.weight" not in last
    assert "model.norm.weight" in last and "model.norm.weight" not in first


def test_max_shard_size_cuts_parts_and_the_manifest_holds_every_checksum(models, tmp_path):
    out = tmp_path / "out"
    result = _convert(models["llama"], out, tp=2, max_shard_size="100KB")
    manifest = read_manifest(out)
    assert manifest == result.manifest
    for rank in manifest.ranks:
        assert len(rank.files) > 1
        for name in rank.files:
            with open(out / name, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            sizes = [
                e[1] - e[0]
                for k, v in header.items()
                if k != "__metadata__"
                for e in [v["data_offsets"]]
            ]
            assert sum(sizes) <= 100_000 or len(sizes) == 1
    on_disk = {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    assert on_disk == set(manifest.files)
    for name, entry in manifest.files.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    assert manifest.source.local_dir == str(models["llama"].resolve())
    assert manifest.llm_kwargs == {
        "load_format": "sharded_state",
        "model_impl": "transformers",
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "dtype": "float32",
    }
    # config and generation config travel; the source's own weights do not
    assert {"config.json", "generation_config.json"} <= on_disk
    assert "model.safetensors" not in on_disk


def test_a_model_check_fails_is_refused_and_nothing_is_written(models, tmp_path):
    out = tmp_path / "out"
    result = _convert(models["llama"], out, tp=3)  # 2 heads do not split over 3 ranks
    assert not result.converted and result.exit_code == 1
    assert any(f.rule_id == "TFB203" for f in result.report.findings)
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no staging folder either


def test_a_tensor_the_sharded_loader_cannot_take_is_refused_before_writing(models, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in models["llama"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tensors = _source(src)
    tensors["lm_head.bias"] = torch.zeros(300)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    result = _convert(src, tmp_path / "out", tp=2)
    assert not result.converted
    assert any(b.startswith("lm_head.bias") for b in result.blockers)
    assert not (tmp_path / "out").exists()


def test_out_must_be_empty_unless_overwrite_and_never_inside_the_source(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        _convert(models["llama"], out, tp=2)
    assert (out / "keep.txt").exists()
    result = _convert(models["llama"], out, tp=2, overwrite=True)
    assert result.converted and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # old folder and staging removed
    with pytest.raises(UserError, match="source"):
        _convert(models["llama"], models["llama"] / "converted", tp=2)
    with pytest.raises(UserError, match="source"):
        _convert(models["llama"], models["llama"], tp=2, overwrite=True)


class _StopAfter(Progress):
    """Interrupts the conversion part-way through writing, as a Ctrl-C would."""

    def __init__(self, nbytes: int):
        self.left = nbytes

    def advance(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise KeyboardInterrupt


def test_an_interrupted_conversion_leaves_no_output_folder(models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(str(models["llama"]), ConvertOptions(out=str(out), tp=2), _StopAfter(50_000))
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_manifest_as_json_and_refusals_exit_1(models, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tfbackend", "convert", str(models["llama"]), "--tp", "2"]
    ok = subprocess.run(
        [*cmd, "--out", str(tmp_path / "a"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["converted"] and data["manifest"]["tp"] == 2
    bad = subprocess.run(
        [*cmd[:-1], "3", "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert bad.returncode == 1
    assert "TFB203" in bad.stderr and "nothing was written" in bad.stdout
    again = subprocess.run(
        [*cmd, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: --out")


def test_rank_files_open_with_safetensors_and_carry_pt_metadata(models, tmp_path):
    _convert(models["llama"], tmp_path / "out", tp=2)
    for f in (tmp_path / "out").glob("model-rank-*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            assert len(list(fh.keys())) > 0


def test_a_hub_id_converts_from_the_offline_cache_and_the_manifest_names_its_commit(
    models, tmp_path
):
    # A real hub cache layout, as huggingface_hub writes it
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for f in models["llama"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tfbackend", "convert", "acme/tiny", "--tp", "2", "--out", str(out),
         "--dtype", "float32"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(out)
    assert manifest.source.kind == "hub" and manifest.source.repo_id == "acme/tiny"
    assert manifest.source.revision == "a" * 40
    assert manifest.source.local_dir == str(snap.resolve())
