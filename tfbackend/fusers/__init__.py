"""vLLM's fusers, as the plan models them: one module per fuser class of vLLM's
`model_executor/models/transformers/fusers/`, each reading its match from the facts, applying
vLLM's per-instance validation with the plan's tp and returning the entries it builds. A profile
is the ordered tuple of them its vLLM release has (`replace/profiles.py`)."""

from tfbackend.fusers.attention import AttentionFuser
from tfbackend.fusers.base import Fuser, Outcome
from tfbackend.fusers.glu import GLUFuser
from tfbackend.fusers.merged_column import MergedColumnParallelFuser
from tfbackend.fusers.mla import MLAFuser
from tfbackend.fusers.moe import MoEBlockFuser
from tfbackend.fusers.moe_v033 import DataflowMoEBlockFuser
from tfbackend.fusers.packed_qkv import PackedQKVFuser
from tfbackend.fusers.qkv import QKVFuser
from tfbackend.fusers.rms_norm import RMSNormFuser

__all__ = [
    "AttentionFuser",
    "DataflowMoEBlockFuser",
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
