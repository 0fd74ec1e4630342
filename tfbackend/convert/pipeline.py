"""`convert`: check → layout → staged write → manifest. Nothing is written unless all of it can be.

The model is checked first with the same pipeline as `tfbackend check` (a model `check` fails is
never converted, and nothing is downloaded for it), then every tensor of every rank is laid out
from the plan and the checkpoint's headers; any tensor that cannot be is a blocker, reported
before the output folder is touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tfbackend.check import CheckOptions
from tfbackend.convert.layout import Layout
from tfbackend.convert.manifest import ConvertManifest
from tfbackend.inspect.checkpoint import CheckpointHeaders

if TYPE_CHECKING:
    from tfbackend.report.model import CheckReport

# What a hub source downloads once `check` passed: weights, configs, tokenizers, code and
# licences; never pickles
HUB_PATTERNS = (
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.py",
    "*.md",
    "LICENSE*",
    "NOTICE*",
)


@dataclass
class ConvertOptions:
    out: str
    tp: int = 1
    pp: int = 1
    dtype: str | None = None  # default: the config's, float32 served as bfloat16 (as vLLM)
    max_shard_size: str = "5GB"
    overwrite: bool = False
    revision: str | None = None
    token: str | None = None
    offline: bool | None = None
    trust_remote_code: bool = False
    vllm_version: str | None = None

    def check_options(self) -> CheckOptions:
        return CheckOptions(
            tp=self.tp,
            pp=self.pp,
            revision=self.revision,
            token=self.token,
            offline=self.offline,
            trust_remote_code=self.trust_remote_code,
            vllm_version=self.vllm_version,
            dtype=self.dtype,
        )


@dataclass
class ConvertResult:
    model: str
    out: str
    report: CheckReport  # the check the conversion was decided on
    converted: bool = False
    blockers: list[str] = field(default_factory=list)  # why it cannot be converted
    layout: Layout | None = None
    manifest: ConvertManifest | None = None
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def exit_code(self) -> int:
        return 0 if self.converted else 1


class Progress:
    """What the pipeline reports while it works (the console renders it; tests ignore it)."""

    def phase(self, name: str) -> None: ...

    def start_writing(self, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


def convert(model: str, options: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    from tfbackend.check import check_facts
    from tfbackend.convert.shards import parse_size
    from tfbackend.convert.staging import check_output
    from tfbackend.inspect import gather_facts
    from tfbackend.memory import served_dtype
    from tfbackend.rules.findings import Verdict

    progress = progress or Progress()
    started = time.perf_counter()
    check_opts = options.check_options()
    check_opts.validate()
    max_bytes = parse_size(options.max_shard_size)
    out = check_output(Path(options.out), None, options.overwrite)  # before any slow step
    progress.phase("check")
    facts = gather_facts(
        model,
        revision=options.revision,
        token=options.token,
        offline=options.offline,
        trust_remote_code=options.trust_remote_code,
    )
    local = Path(facts.source.local_dir) if facts.source.kind == "local" else None
    out = check_output(out, local, options.overwrite)
    report = check_facts(facts, check_opts)
    result = ConvertResult(model=model, out=str(out), report=report)
    if report.verdict is Verdict.FAIL:
        result.blockers.append("`check` fails for this model at this tp/pp (findings above)")
        return _done(result, started)
    weights = _local_weights(facts.source, options, progress)
    out = check_output(out, weights.folder, options.overwrite)
    dtype = served_dtype(options.dtype, facts.config.dtype)
    progress.phase("layout")
    layout = _layout(facts, report.plan, weights, dtype)
    result.layout = layout
    if layout.blockers:
        result.blockers.extend(layout.blockers)
        return _done(result, started)
    result.manifest, result.bytes_read = _write(
        facts, report, layout, weights, out, max_bytes, progress
    )
    result.bytes_written = sum(f["bytes"] for f in result.manifest.files.values())
    result.converted = True
    return _done(result, started)


def _done(result: ConvertResult, started: float) -> ConvertResult:
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class SourceWeights:
    """The folder the safetensors are read from, its commit (hub snapshots) and headers."""

    folder: Path
    revision: str | None
    headers: CheckpointHeaders


def _local_weights(source, options: ConvertOptions, progress: Progress) -> SourceWeights:
    """The folder holding the safetensors (downloaded for a hub id, once `check` passed)."""
    from tfbackend.inspect.checkpoint import read_local

    if source.kind == "local":
        folder, revision = Path(source.local_dir), None
    else:
        folder = _download(source, options, progress)
        revision = folder.name  # snapshot folders are named by the commit they hold
    return SourceWeights(folder, revision, read_local(folder))


def _download(source, options: ConvertOptions, progress: Progress) -> Path:
    import os

    if options.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import snapshot_download

    from tfbackend.inspect.resolve import hub_errors

    progress.phase("download")
    token = options.token or os.environ.get("HF_TOKEN") or None
    with hub_errors(source.repo_id, source.revision, "safetensors weights"):
        path = snapshot_download(
            source.repo_id, revision=source.revision, token=token, allow_patterns=list(HUB_PATTERNS)
        )
    return Path(path)


def _layout(facts, plan, weights: SourceWeights, dtype: str) -> Layout:
    from tfbackend.convert.sources import index_sources
    from tfbackend.convert.state import build_layout
    from tfbackend.inspect.checkpoint import FORMAT_SAFETENSORS

    headers = weights.headers
    if headers.format != FORMAT_SAFETENSORS:
        what = ", ".join(headers.pickle_files) or "no weight files"
        layout = Layout(tp=plan.tp, pp=plan.pp, dtype=dtype)
        layout.blockers.append(
            f"{weights.folder} has no safetensors checkpoint ({what}): convert reads safetensors "
            "only"
        )
        return layout
    return build_layout(facts, plan, index_sources(headers, facts), dtype)


def _write(facts, report, layout: Layout, weights: SourceWeights, out: Path, max_bytes: int,
           progress: Progress) -> tuple[ConvertManifest, int]:  # fmt: skip
    from tfbackend.convert.files import copy_files, files_to_copy
    from tfbackend.convert.manifest import manifest_for, write_manifest
    from tfbackend.convert.reader import SourceReader
    from tfbackend.convert.shards import split_parts
    from tfbackend.convert.staging import staged
    from tfbackend.convert.writer import write_stage

    parts = {(r.pp_rank, r.tp_rank): split_parts(r, layout.pp, max_bytes) for r in layout.ranks}
    progress.phase("write")
    progress.start_writing(layout.nbytes)
    files = {n: t.file for n, t in weights.headers.tensors.items()}
    reader = SourceReader(weights.folder, files)
    written = []
    try:
        with staged(out) as stage:
            for pp_rank in range(layout.pp):
                ranks = [r for r in layout.ranks if r.pp_rank == pp_rank]
                stage_parts = {i: parts[(r.pp_rank, r.tp_rank)] for i, r in enumerate(ranks)}
                written += write_stage(ranks, stage_parts, stage, reader, progress.advance)
            written += copy_files(files_to_copy(weights.folder), stage)
            manifest = manifest_for(facts, report, layout, parts, written, weights)
            write_manifest(manifest, stage)
    finally:
        reader.close()
    return manifest, reader.bytes_read
