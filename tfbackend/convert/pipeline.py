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

from tfbackend.check import CheckOptions
from tfbackend.convert.layout import Layout
from tfbackend.convert.manifest import ConvertManifest

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
    report: object  # the CheckReport the conversion was decided on
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
    from tfbackend.report.findings import Verdict

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
    source_dir, revision = _local_weights(facts.source, options, progress)
    out = check_output(out, source_dir, options.overwrite)
    dtype = served_dtype(options.dtype, facts.config.dtype)
    progress.phase("layout")
    layout = _layout(facts, report.plan, source_dir, dtype)
    result.layout = layout
    if layout.blockers:
        result.blockers.extend(layout.blockers)
        return _done(result, started)
    result.manifest, result.bytes_read = _write(
        facts, report, layout, source_dir, revision, out, max_bytes, progress
    )
    result.bytes_written = sum(f["bytes"] for f in result.manifest.files.values())
    result.converted = True
    return _done(result, started)


def _done(result: ConvertResult, started: float) -> ConvertResult:
    result.seconds = time.perf_counter() - started
    return result


def _local_weights(source, options: ConvertOptions, progress: Progress) -> tuple[Path, str | None]:
    """The folder holding the safetensors (downloaded for a hub id, once `check` passed)."""
    if source.kind == "local":
        return Path(source.local_dir), None
    import os

    if options.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import snapshot_download

    from tfbackend.inspect.resolve import hub_errors

    progress.phase("download")
    token = options.token or os.environ.get("HF_TOKEN") or None
    with hub_errors(source.repo_id, source.revision, "safetensors weights"):
        path = snapshot_download(
            source.repo_id,
            revision=source.revision,
            token=token,
            allow_patterns=list(HUB_PATTERNS),
        )
    # snapshot folders are named by the commit they hold
    return Path(path), Path(path).name


def _layout(facts, plan, source_dir: Path, dtype: str) -> Layout:
    from tfbackend.convert.sources import index_sources
    from tfbackend.convert.state import build_layout
    from tfbackend.inspect.checkpoint import FORMAT_SAFETENSORS, read_local

    headers = read_local(source_dir)
    if headers.format != FORMAT_SAFETENSORS:
        what = ", ".join(headers.pickle_files) or "no weight files"
        layout = Layout(tp=plan.tp, pp=plan.pp, dtype=dtype)
        layout.blockers.append(
            f"{source_dir} has no safetensors checkpoint ({what}): convert reads safetensors only"
        )
        return layout
    return build_layout(facts, plan, index_sources(headers, facts), dtype)


def _write(
    facts,
    report,
    layout: Layout,
    source_dir: Path,
    revision,
    out: Path,
    max_bytes,
    progress: Progress,
) -> tuple[ConvertManifest, int]:
    from tfbackend.convert.files import copy_files, files_to_copy
    from tfbackend.convert.manifest import write_manifest
    from tfbackend.convert.reader import SourceReader
    from tfbackend.convert.shards import split_parts
    from tfbackend.convert.staging import staged
    from tfbackend.convert.writer import write_stage
    from tfbackend.inspect.checkpoint import read_local

    headers = read_local(source_dir)
    parts = {(r.pp_rank, r.tp_rank): split_parts(r, layout.pp, max_bytes) for r in layout.ranks}
    progress.phase("write")
    progress.start_writing(layout.nbytes)
    reader = SourceReader(source_dir, {n: t.file for n, t in headers.tensors.items()})
    written = []
    try:
        with staged(out) as stage:
            for pp_rank in range(layout.pp):
                ranks = [r for r in layout.ranks if r.pp_rank == pp_rank]
                stage_parts = {i: parts[(r.pp_rank, r.tp_rank)] for i, r in enumerate(ranks)}
                written += write_stage(ranks, stage_parts, stage, reader, progress.advance)
            written += copy_files(files_to_copy(source_dir), stage)
            manifest = _manifest(
                facts, report, layout, parts, written, source_dir, revision, headers
            )
            write_manifest(manifest, stage)
    finally:
        reader.close()
    return manifest, reader.bytes_read


def _manifest(facts, report, layout, parts, written, source_dir, revision, headers):
    from tfbackend import __version__
    from tfbackend.convert.manifest import ConvertManifest, RankRecord, SourceRecord
    from tfbackend.convert.shards import file_pattern
    from tfbackend.replace.profiles import PROFILES
    from tfbackend.report.findings import Severity

    profile = PROFILES.get(report.profile)
    versions = f">={profile.vllm_min}" if profile else "?"
    if profile and profile.vllm_max:
        versions += f",<{profile.vllm_max}"
    sizes: dict[str, int] = {}
    for t in headers.tensors.values():
        sizes.setdefault(t.file, (source_dir / t.file).stat().st_size)
    source = SourceRecord(
        location=facts.source.location,
        kind=facts.source.kind,
        local_dir=str(source_dir.resolve()),
        repo_id=facts.source.repo_id,
        revision=revision,
        checkpoint_files=sizes,
    )
    ranks = [
        RankRecord(
            pp_rank=r.pp_rank,
            tp_rank=r.tp_rank,
            files=[p.file_name for p in parts[(r.pp_rank, r.tp_rank)]],
            tensors=len(r.tensors),
            bytes=r.nbytes,
        )
        for r in layout.ranks
    ]
    return ConvertManifest(
        tfbackend_version=__version__,
        profile=report.profile,
        vllm_versions=versions,
        transformers_version=facts.versions.get("transformers"),
        tp=layout.tp,
        pp=layout.pp,
        dtype=layout.dtype,
        source=source,
        llm_kwargs={
            "load_format": "sharded_state",
            "model_impl": "transformers",
            "tensor_parallel_size": layout.tp,
            "pipeline_parallel_size": layout.pp,
            "dtype": layout.dtype,
        },
        file_pattern=file_pattern(layout.pp),
        ranks=ranks,
        files={f.name: {"bytes": f.bytes, "sha256": f.sha256} for f in written},
        warnings=[
            f"{f.rule_id}: {f.message}" for f in report.findings if f.severity is Severity.WARNING
        ],
        not_written=dict(layout.not_written),
    )
