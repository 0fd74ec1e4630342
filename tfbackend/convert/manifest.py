"""The manifest a converted folder carries: what it was made from, for which vLLM, and checksums.

Written last, so a folder with a manifest is complete. `read_manifest` is how other commands
(`tfbackend run` on a converted folder) find the tp/pp and dtype the files were cut for and the
source checkpoint the reference model must load.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tfbackend.errors import UserError

MANIFEST_NAME = "tfbackend-convert.json"
MANIFEST_FORMAT = "tfbackend-sharded-state"
MANIFEST_SCHEMA_VERSION = 1


@dataclass
class SourceRecord:
    location: str  # what the user typed
    kind: str  # "local" | "hub"
    local_dir: str  # the folder the weights were read from (a hub snapshot for hub sources)
    repo_id: str | None = None
    revision: str | None = None  # the commit of a hub snapshot; None for a local folder
    checkpoint_files: dict[str, int] = field(default_factory=dict)  # file → bytes


@dataclass
class RankRecord:
    pp_rank: int
    tp_rank: int
    files: list[str]
    tensors: int
    bytes: int


@dataclass
class ConvertManifest:
    tfbackend_version: str
    profile: str
    vllm_versions: str  # the vLLM releases the profile describes, e.g. ">=0.32.0"
    transformers_version: str | None  # the modelling code the plan was read from
    tp: int
    pp: int
    dtype: str
    source: SourceRecord
    # What `vllm.LLM` needs besides `model=<this folder>` to load these files
    llm_kwargs: dict[str, Any]
    file_pattern: str
    ranks: list[RankRecord] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → {bytes, sha256}
    warnings: list[str] = field(default_factory=list)  # `check` warnings, "ID: message"
    not_written: dict[str, str] = field(default_factory=dict)  # checkpoint tensor → why
    format: str = MANIFEST_FORMAT
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_manifest(manifest: ConvertManifest, folder: Path) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def read_manifest(folder: str | Path) -> ConvertManifest | None:
    """The manifest of a converted folder; None when the folder has none (not converted)."""
    from tfbackend.userfiles import read_text

    path = Path(folder) / MANIFEST_NAME
    if not os.path.lexists(path):
        return None
    text = read_text(path, "manifest")  # a FIFO or a huge file is refused, not read
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        if raw.get("schema_version") != MANIFEST_SCHEMA_VERSION:
            raise ValueError(f"schema_version {raw.get('schema_version')!r}")
        raw["source"] = SourceRecord(**raw["source"])
        raw["ranks"] = [RankRecord(**r) for r in raw["ranks"]]
        return ConvertManifest(**raw)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise UserError(
            f"{path} is not a manifest this tfbackend reads ({exc}): convert the model again"
        ) from None


def manifest_for(facts, report, layout, parts, written, weights) -> ConvertManifest:
    """The manifest of a finished conversion (`parts`: each rank's files; `written`: every file
    with its checksum)."""
    from tfbackend import __version__
    from tfbackend.convert.shards import file_pattern
    from tfbackend.replace.profiles import PROFILES
    from tfbackend.rules.findings import Severity

    profile = PROFILES.get(report.profile)
    versions = f">={profile.vllm_min}" if profile else "?"
    if profile and profile.vllm_max:
        versions += f",<{profile.vllm_max}"
    sizes: dict[str, int] = {}
    for t in weights.headers.tensors.values():
        sizes.setdefault(t.file, (weights.folder / t.file).stat().st_size)
    source = SourceRecord(
        location=facts.source.location,
        kind=facts.source.kind,
        local_dir=str(weights.folder.resolve()),
        repo_id=facts.source.repo_id,
        revision=weights.revision,
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
