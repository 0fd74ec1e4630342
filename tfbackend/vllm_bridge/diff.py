"""Compare what vLLM built, rank by rank, with tfbackend's plan.

Every plan entry that lives on a rank is looked up in that rank's build (class and per-rank
parameter shapes); every module vLLM built with parameters that the plan did not predict is
checked against the HF module it came from; modules the plan puts on another pipeline stage
must be PPMissingLayer (or absent) there. Pure data in, `Agreement` out.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from tfbackend.inspect.facts import ModelFacts
from tfbackend.plan import ReplacementPlan

_IGNORED_CLASSES = {"UnquantizedFusedMoEMethod", "LogitsProcessor"}


@dataclass
class Disagreement:
    rank: int
    qualname: str
    what: str  # "class" | "shape" | "missing" | "unexpected" | "stage" | "error"
    ours: str
    vllm: str


@dataclass
class Agreement:
    tp: int
    pp: int
    compared: int = 0
    agreed: int = 0
    disagreements: list[Disagreement] = field(default_factory=list)
    vllm_error: str | None = None
    run_error: str | None = None
    substitutions: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def full(self) -> bool:
        return not self.disagreements and self.run_error is None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["full"] = self.full
        return out


def _on_rank(stage: int | None, pp_rank: int, pp: int) -> bool:
    return pp <= 1 or stage is None or stage == pp_rank


def _kept_on(plan: ReplacementPlan, qualname: str, pp_rank: int) -> bool:
    """Modules outside the layer list a stage also keeps (tied embeddings live on the first and
    the last stage, while an entry records one stage)."""
    top = qualname.removeprefix("model.")
    for st in plan.stages:
        if st.rank == pp_rank:
            kept = any(top == n or top.startswith(n + ".") for n in st.modules)
            return kept and not any(top == n or top.startswith(n + ".") for n in st.missing)
    return False


def _fmt(params: dict[str, list[int]]) -> str:
    return ", ".join(f"{k}{list(v)}" for k, v in sorted(params.items())) or "-"


def compare(facts: ModelFacts, plan: ReplacementPlan, build) -> Agreement:
    """`build` is a `run.ParallelBuild`."""
    agreement = Agreement(tp=plan.tp, pp=plan.pp, run_error=build.error, seconds=build.seconds)
    hf = {m.qualname: m for m in facts.modules}
    for rank in build.ranks:
        agreement.substitutions = rank.get("substitutions", [])
        if rank.get("error"):
            agreement.vllm_error = rank["error"]
            continue
        _compare_rank(hf, plan, rank, agreement)
    return agreement


def _compare_rank(hf, plan: ReplacementPlan, rank: dict, agreement: Agreement) -> None:
    built = {m["qualname"]: m for m in rank["modules"]}
    r, pp_rank = rank["rank"], rank["pp_rank"]
    missing = {q for q, m in built.items() if m["class_name"] == "PPMissingLayer"}

    def gone(qualname: str) -> bool:
        return qualname not in built or any(
            qualname == q or qualname.startswith(q + ".") for q in missing
        )

    def differ(qualname, what, ours, theirs):
        agreement.disagreements.append(Disagreement(r, qualname, what, ours, theirs))

    claimed: set[str] = set()
    for e in plan.entries:
        agreement.compared += 1
        claimed.add(e.qualname)
        if not _on_rank(e.stage, pp_rank, plan.pp) and not _kept_on(plan, e.qualname, pp_rank):
            if gone(e.qualname):
                agreement.agreed += 1
            else:
                differ(e.qualname, "stage", f"on stage {e.stage}", built[e.qualname]["class_name"])
            continue
        if gone(e.qualname):
            differ(e.qualname, "missing", e.target, "absent or PPMissingLayer")
            continue
        m = built[e.qualname]
        ours = {p.name: p.rank_shape for p in e.params}
        if m["class_name"] != e.target:
            differ(e.qualname, "class", e.target, m["class_name"])
        elif ours != m["params"]:
            differ(e.qualname, "shape", _fmt(ours), _fmt(m["params"]))
        else:
            agreement.agreed += 1
    for a in plan.attention:
        if a.qualname is None or not _on_rank(a.stage, pp_rank, plan.pp):
            continue
        if a.params and a.qualname in built:
            # The dispatching module's own parameters (learned sinks split over tp).
            claimed.add(a.qualname)
            agreement.compared += 1
            ours = {p.name: p.rank_shape for p in a.params}
            if ours == built[a.qualname]["params"]:
                agreement.agreed += 1
            else:
                differ(a.qualname, "shape", _fmt(ours), _fmt(built[a.qualname]["params"]))
        qualname = f"{a.qualname}.attn"
        if qualname not in built:
            continue
        agreement.compared += 1
        got = built[qualname]["attrs"]
        ours = (a.heads_per_rank, a.kv_heads_per_rank, a.head_size)
        theirs = (got.get("num_heads"), got.get("num_kv_heads"), got.get("head_size"))
        if ours == theirs:
            agreement.agreed += 1
        else:
            differ(qualname, "attention", f"heads/kv/head_size {ours}", f"{theirs}")
    # Modules vLLM built with parameters that no plan entry names: must be HF modules kept as is.
    for q, m in built.items():
        if not m["params"] or q in claimed or m["class_name"] in _IGNORED_CLASSES:
            continue
        if any(q.startswith(c + ".") for c in claimed if c.endswith("routed_experts")):
            continue
        agreement.compared += 1
        source = hf.get(q)
        if source and source.class_name == m["class_name"] and source.params == m["params"]:
            agreement.agreed += 1
        else:
            ours = f"{source.class_name} {_fmt(source.params)}" if source else "no such module"
            differ(q, "unexpected", ours, f"{m['class_name']} {_fmt(m['params'])}")


def layer_of(qualname: str) -> int | None:
    m = re.search(r"\.(\d+)\.", qualname)
    return int(m.group(1)) if m else None
