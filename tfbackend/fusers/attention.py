"""AttentionFuser (vLLM fusers/attention.py): leaves the module's forward alone, but re-creates
its learned sinks (`s_aux=self.<attr>`) as a parameter of `numel // tp` elements loaded with
`sharded_weight_loader(0)`: each rank holds its own heads' sinks."""

from __future__ import annotations

from tfbackend.fusers.base import Fuser
from tfbackend.inspect.facts import ModuleFact
from tfbackend.plan import ParamShard
from tfbackend.plan.attention import own_params


class AttentionFuser(Fuser):
    name = "AttentionFuser"
    redefines_forward = False

    def params(self, m: ModuleFact, tp: int) -> list[ParamShard]:
        """The dispatching module's own parameters per rank, its sinks split over tp."""
        return own_params(m, tp, shards_sinks=True)
