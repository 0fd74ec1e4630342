"""`run` on a folder `tfbackend convert` wrote: the engines serve its per-rank files, the reference
loads the original checkpoint its manifest records.

- vLLM loads the folder itself with `load_format="sharded_state"` (each worker its own files).
- The native engine's rank r reads only rank r's files: the layout `convert` wrote them from is
  rebuilt from the original's headers and the plan (and checked against the files' headers), so
  each piece of a converted tensor is known as `source[select]` of a checkpoint tensor, and a
  rank's read of a checkpoint slice is served from the pieces that hold it.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from tfbackend.convert.manifest import ConvertManifest, read_manifest
from tfbackend.errors import CheckpointError, UserError

LOAD_FORMAT = "sharded_state"
HELD = 2  # converted tensors a native rank keeps between reads


@dataclass
class Converted:
    """A converted folder, and the original checkpoint the reference loads."""

    folder: str
    manifest: ConvertManifest
    original: str  # a local folder, or a hub id read at `revision`
    revision: str | None = None

    def note(self) -> str:
        m = self.manifest
        origin = f"{self.original}@{self.revision}" if self.revision else self.original
        return (
            f"weights from the converted folder {self.folder} (tfbackend convert, tp {m.tp}, "
            f"pp {m.pp}, {m.dtype}); the reference from the original checkpoint {origin}"
        )


def find_converted(model: str, options) -> Converted | None:
    """The converted folder `model` names, with its original; None for any other model.

    Refused (UserError): a tp/pp other than the files are cut for, and an original that is not
    where the manifest says (or is not the checkpoint that was converted)."""
    folder = Path(model)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        if options.original:
            raise UserError(
                f"--original is for a folder `tfbackend convert` wrote; {model} has no manifest"
            )
        return None
    if (options.tp, options.pp) != (manifest.tp, manifest.pp):
        raise UserError(
            f"{model} is converted for --tp {manifest.tp} --pp {manifest.pp} (each file holds one "
            f"rank's slices), not --tp {options.tp} --pp {options.pp}: pass --tp {manifest.tp} "
            f"--pp {manifest.pp}, or convert it again"
        )
    if options.launcher != "spawn":
        raise UserError("a converted folder runs with --launcher spawn")
    src = manifest.source
    if options.original:
        problem = _differs(Path(options.original), src.checkpoint_files)
        if problem:
            raise UserError(
                f"--original {options.original} is not the checkpoint {model} was converted "
                f"from ({problem})"
            )
        return Converted(str(folder), manifest, options.original)
    problem = _differs(Path(src.local_dir), src.checkpoint_files)
    if problem is None:
        return Converted(str(folder), manifest, src.local_dir)
    if src.kind == "hub" and src.repo_id and src.revision:
        return Converted(str(folder), manifest, src.repo_id, src.revision)
    raise UserError(
        f"{model} was converted from {src.local_dir}, which is gone or changed ({problem}): "
        "pass --original DIR, the checkpoint it was converted from, for the reference"
    )


def _differs(folder: Path, files: dict[str, int]) -> str | None:
    """Why `folder` is not the checkpoint the manifest records (by its files' sizes), or None."""
    if not folder.is_dir():
        return f"{folder} is not a folder"
    for name, size in sorted(files.items()):
        if Path(name).name != name:
            return f"the manifest names a checkpoint file {name!r}"
        path = folder / name
        if not path.is_file():
            return f"no {name}"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, the manifest records {size:,}"
    return None


@dataclass
class PieceRef:
    """Where `source[select]` lies in a converted rank file: elements [offset, offset + numel)
    of the flattened tensor `tensor`."""

    file: str
    tensor: str
    offset: int
    select: list[list[int]]


@dataclass
class RankWeights:
    """What the native engine's rank reads from its own converted files."""

    folder: str
    shapes: dict[str, list[int]] = field(default_factory=dict)  # checkpoint tensor → full shape
    pieces: dict[str, list[PieceRef]] = field(default_factory=dict)  # checkpoint tensor → pieces


def rank_weights(converted: Converted, facts, original_dir: str) -> dict[int, RankWeights]:
    """Every global rank's pieces (pipeline-outer: rank = pp_rank * tp + tp_rank), from the
    layout rebuilt as `convert` built it; refused when the files hold something else."""
    from tfbackend.convert.layout import TORCH_OF
    from tfbackend.convert.sources import index_sources
    from tfbackend.convert.state import build_layout
    from tfbackend.inspect.checkpoint import read_file_header, read_local
    from tfbackend.replace.planner import build_plan
    from tfbackend.replace.profiles import PROFILES

    m = converted.manifest
    again = "convert it again with this tfbackend"
    if m.profile not in PROFILES:
        raise UserError(f"{converted.folder} was converted for profile {m.profile!r}: {again}")
    headers = read_local(original_dir)
    plan = build_plan(facts, tp=m.tp, pp=m.pp, profile=PROFILES[m.profile])
    layout = build_layout(facts, plan, index_sources(headers, facts), m.dtype)
    if layout.blockers:
        raise UserError(f"{converted.folder}: {layout.blockers[0]}: {again}")
    files = {(r.pp_rank, r.tp_rank): r.files for r in m.ranks}
    for name in (n for names in files.values() for n in names):
        if Path(name).name != name or name.startswith("."):
            raise UserError(f"{converted.folder}: the manifest names a file {name!r}: {again}")
    out: dict[int, RankWeights] = {}
    for rank in layout.ranks:
        where: dict[str, tuple[str, object]] = {}
        for name in files.get((rank.pp_rank, rank.tp_rank), []):
            for t in read_file_header(Path(converted.folder) / name).values():
                where[t.name] = (name, t)
        weights = RankWeights(folder=converted.folder)
        for t in rank.tensors:
            file, header = where.pop(t.name, (None, None))
            if header is None or header.shape != t.shape or TORCH_OF.get(header.dtype) != t.dtype:
                found = f"{header.dtype} {header.shape}" if header else "nothing"
                raise UserError(
                    f"{converted.folder}: rank {rank.pp_rank}/{rank.tp_rank} holds {found} for "
                    f"{t.name}, this tfbackend lays out {t.dtype} {t.shape}: {again}"
                )
            offset = 0
            for piece in t.pieces:
                if piece.source is not None:
                    weights.shapes[piece.source] = list(headers.tensors[piece.source].shape)
                    ref = PieceRef(file, t.name, offset, piece.select)
                    weights.pieces.setdefault(piece.source, []).append(ref)
                offset += piece.numel
        if where:
            raise UserError(
                f"{converted.folder}: rank {rank.pp_rank}/{rank.tp_rank} holds {sorted(where)[0]}, "
                f"which this tfbackend does not lay out: {again}"
            )
        out[rank.pp_rank * m.tp + rank.tp_rank] = weights
    return out


class ConvertedReader:
    """`parity.weights.CheckpointReader`'s reads (checkpoint names, row shards zero-padded past
    the end), served from one rank's converted files. The last two converted tensors read are
    held: q, k and v read one after another from `qkv_proj` read it once, and so do experts
    read gate, up, down in turn from `w13_weight` and `w2_weight`."""

    def __init__(self, weights: RankWeights):
        self.weights = weights
        self.bytes_read = 0
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}
        self._held: OrderedDict[str, object] = OrderedDict()

    def close(self) -> None:
        self._held.clear()
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self.weights.pieces

    def shape(self, name: str) -> list[int]:
        return list(self.weights.shapes[name])

    def read(self, name: str, shard=None):
        import torch

        shape = self.weights.shapes[name]
        box = [[0, d] for d in shape]
        if shard is not None and shape:
            full = shape[shard.dim]
            box[shard.dim] = [min(shard.start, full), min(shard.start + shard.size, full)]
        size = [b - a for a, b in box]
        out = covered = None
        for ref in self.weights.pieces[name]:
            inter = [[max(a, p), min(b, q)] for (a, b), (p, q) in zip(box, ref.select, strict=True)]
            if any(a >= b for a, b in inter):
                continue
            data = self._piece(ref)
            if out is None:
                out = torch.empty(size, dtype=data.dtype)
                covered = torch.zeros(size, dtype=torch.bool)
            src = tuple(
                slice(a - p, b - p) for (a, b), (p, _) in zip(inter, ref.select, strict=True)
            )
            dst = tuple(slice(a - p, b - p) for (a, b), (p, _) in zip(inter, box, strict=True))
            out[dst] = data[src]
            covered[dst] = True
        if out is None or not bool(covered.all()):
            raise CheckpointError(
                f"{self.weights.folder}: this rank's files do not hold all of {name}{list(size)} "
                "(the native engine splits it otherwise than vLLM)"
            )
        if shard is not None and shape and (missing := shard.size - out.shape[shard.dim]) > 0:
            pad = list(out.shape)
            pad[shard.dim] = missing
            out = torch.cat([out, out.new_zeros(pad)], dim=shard.dim)
        return out

    def _piece(self, ref: PieceRef):
        key = f"{ref.file}/{ref.tensor}"
        if key not in self._held:
            from safetensors import safe_open

            if ref.file not in self._handles:
                path = str(Path(self.weights.folder) / ref.file)
                self._handles[ref.file] = self._stack.enter_context(safe_open(path, "pt"))
            tensor = self._handles[ref.file].get_tensor(ref.tensor)
            self.bytes_read += tensor.numel() * tensor.element_size()
            self._held[key] = tensor.reshape(-1)
            while len(self._held) > HELD:
                self._held.popitem(last=False)
        self._held.move_to_end(key)
        numel = 1
        for a, b in ref.select:
            numel *= b - a
        flat = self._held[key]
        return flat[ref.offset : ref.offset + numel].view([b - a for a, b in ref.select])
