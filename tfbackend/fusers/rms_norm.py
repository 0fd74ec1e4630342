"""RMSNormFuser (vLLM fusers/rms_norm.py): a leaf norm whose traced forward computes
`x * rsqrt(mean(x²) + eps)` times `w` or `(1 + w)` becomes vLLM's TP-aware RMSNorm or
GemmaRMSNorm; the class name does not decide. The walk ran each norm to tell the variants
apart (inspect/norms.py: attrs["variant"])."""

from __future__ import annotations

from tfbackend.fusers.base import Fuser
from tfbackend.inspect.facts import NORM_GATED, NORM_NO_WEIGHT, NORM_OFFSET, NORM_PLAIN, ModuleFact


class RMSNormFuser(Fuser):
    name = "RMSNormFuser"

    def target(self, m: ModuleFact) -> tuple[str | None, str]:
        """The class this norm becomes and why (None: it stays HF code)."""
        variant = m.attrs.get("variant")
        if variant == NORM_OFFSET:
            return "TPAwareGemmaRMSNorm", "computes x̂·(1+w)"
        if variant in (NORM_PLAIN, NORM_NO_WEIGHT) and m.attrs.get("is_rms", True):
            return "TPAwareRMSNorm", "computes x̂·w" if variant == NORM_PLAIN else "computes x̂"
        if variant == NORM_GATED:
            return None, "gated norm forward(x, gate): left as HF code"
        return None, "did not match the RMSNorm dataflow: left as HF code"
