"""vLLM's fusers, as the plan models them: one module per fuser class of vLLM's
`model_executor/models/transformers/fusers/`, each reading its match from the facts, applying
vLLM's per-instance validation with the plan's tp and returning the entries it builds. A profile
is the ordered tuple of them its vLLM release has (`replace/profiles.py`)."""

from tfbackend.replace.fusers.attention import AttentionFuser
from tfbackend.replace.fusers.base import Fuser, Outcome
from tfbackend.replace.fusers.glu import GLUFuser
from tfbackend.replace.fusers.merged_column import MergedColumnParallelFuser
from tfbackend.replace.fusers.mla import MLAFuser
from tfbackend.replace.fusers.moe import MoEBlockFuser
from tfbackend.replace.fusers.packed_qkv import PackedQKVFuser
from tfbackend.replace.fusers.qkv import QKVFuser
from tfbackend.replace.fusers.rms_norm import RMSNormFuser

__all__ = [
    "AttentionFuser",
    "Fuser",
    "GLUFuser",
    "MLAFuser",
    "MergedColumnParallelFuser",
    "MoEBlockFuser",
    "Outcome",
    "PackedQKVFuser",
    "QKVFuser",
    "RMSNormFuser",
]
