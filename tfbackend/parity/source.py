"""Where a run's model comes from: the folder with its safetensors (downloaded for a hub id),
its facts and the plan of the profile `check` uses, refused before any weight is read when
the ranks could not run it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tfbackend.errors import UserError

if TYPE_CHECKING:
    from tfbackend.parity.runner import RunOptions


def plan_profile(options: RunOptions, facts):
    """The profile `check` would use: `--vllm-version` (a version or a profile name), else the
    installed vLLM's, else the newest. `run` executes that profile's plan, so it proves what
    `check` printed."""
    from tfbackend.replace.profiles import select_profile

    return select_profile(options.vllm_version, facts.versions.get("vllm"))


def resolve_run(model: str, options: RunOptions):
    source, local_dir = locate(model, options)
    return (local_dir, *analyse(source, local_dir, options))


def locate(model: str, options: RunOptions):
    """The model's source and a local folder with its safetensors (downloaded for a hub id)."""
    from tfbackend.inspect.resolve import resolve

    source = resolve(model, revision=options.revision, token=options.token, offline=options.offline)
    local_dir = source.local_dir
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        from tfbackend.inspect.resolve import hub_errors

        # Weights are needed to prove parity: safetensors only, never pickles.
        with hub_errors(source.repo_id, options.revision, "safetensors weights"):
            local_dir = snapshot_download(
                source.repo_id,
                revision=options.revision,
                token=options.token,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*"],
            )
    _require_safetensors(local_dir)
    return source, local_dir


def analyse(source, local_dir: str, options: RunOptions):
    """Facts (walked once, here) → the plan the ranks receive, and the config."""
    from transformers import AutoConfig

    from tfbackend.inspect import facts_from_source
    from tfbackend.replace.planner import build_plan

    facts = facts_from_source(source, trust_remote_code=options.trust_remote_code)
    plan = build_plan(facts, tp=options.tp, pp=options.pp, profile=plan_profile(options, facts))
    _check_runnable(facts, plan, options)
    config = AutoConfig.from_pretrained(local_dir, trust_remote_code=options.trust_remote_code)
    return facts, plan, config


def _require_safetensors(local_dir: str) -> None:
    """`run` loads weights, and only from safetensors: a pickle (.bin) is refused here, before
    the reference's from_pretrained could reach torch.load's unpickler. The headers are read
    too, so a damaged or truncated file is named now, not by a rank."""
    import stat

    from tfbackend.inspect.checkpoint import FORMAT_PICKLE, FORMAT_SAFETENSORS, read_local
    from tfbackend.userfiles import not_regular

    # transformers reads whatever it finds there (generation_config.json, tokenizer files): a
    # FIFO would block it, a link to /dev/zero would fill memory.
    for entry in sorted(Path(local_dir).iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue  # a dangling link: nothing reads it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise not_regular(entry, "model file")
    headers = read_local(local_dir)
    if headers.format == FORMAT_SAFETENSORS:
        return
    if headers.format == FORMAT_PICKLE:
        raise UserError(
            f"{local_dir} has only pickle weights ({', '.join(headers.pickle_files)}): `run` "
            "loads safetensors only and never unpickles; convert the checkpoint to safetensors"
        )
    raise UserError(f"{local_dir} has no .safetensors weights: `run` needs the checkpoint")


def check_devices(options: RunOptions) -> None:
    world = options.tp * options.pp
    if options.device == "cuda" and options.launcher == "spawn":  # torchrun: per node, launch.py
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < world:
            raise UserError(
                f"--tp {options.tp} --pp {options.pp} needs {world} GPUs, {have} visible: "
                "use fewer, or --device cpu"
            )


def _check_runnable(facts, plan, options: RunOptions) -> None:
    cfg = facts.config
    check_devices(options)
    if options.engine == "vllm":  # vLLM decides what it can split; what it refuses is the result
        return
    if options.pp > 1 and not plan.stages:
        raise UserError(f"--pp {options.pp}: no pipeline split ({'; '.join(plan.notes)})")
    heads, kv = cfg.num_attention_heads or 0, cfg.num_key_value_heads or 0
    if options.tp > 1 and heads and heads % options.tp:
        raise UserError(f"{heads} attention heads do not split over --tp {options.tp}")
    if options.tp > 1 and kv and kv % options.tp and options.tp % kv:
        raise UserError(f"{kv} kv heads neither split over nor replicate onto --tp {options.tp}")
