"""`tfbackend convert`: the per-rank checkpoint vLLM loads with `load_format="sharded_state"`.

Written from the replacement plan on a CPU, without vLLM: `layout` says which checkpoint slices
make each rank's tensors, `writer` streams them into safetensors files, `manifest` records what
was made from what.
"""

from tfbackend.convert.manifest import MANIFEST_NAME, ConvertManifest, read_manifest
from tfbackend.convert.pipeline import ConvertOptions, ConvertResult, Progress, convert

__all__ = [
    "MANIFEST_NAME",
    "ConvertManifest",
    "ConvertOptions",
    "ConvertResult",
    "Progress",
    "convert",
    "read_manifest",
]
