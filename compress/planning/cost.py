"""A pass's estimated time on this model against GPTQ's, announced before the first layer when it is
far above (issue: every option that can take days should say so while the user can still choose).

Each per-linear pass estimates the multiply-adds of its solve per target (:meth:`Pass.work`); the
engine adds the layer forwards every pass gets (statistics and propagation: about two per layer,
each d_out·d_in multiply-adds per token and target). GPTQ's estimate on the same targets is the unit.
The constants are set against bench/results/layer_cost.md, which lists the estimate beside the
measured ratio at each width."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..passes.base import Pass
from ..solvers.gptq import gptq_work
from .targets import TargetPlan

logger = logging.getLogger(__name__)

#: a pass estimated above this multiple of GPTQ's time on the same model is announced
ANNOUNCE_RATIO = 10.0
#: layer forwards per pass: the statistics forward and the propagation forward
FORWARDS = 2


def estimate(p: Pass[Any], index: int, targets: Sequence[TargetPlan], tokens: int) -> tuple[float, float] | None:
    """(the pass's estimated work, GPTQ's on the same targets), or None if the pass gives no estimate."""
    ours = ref = 0.0
    for t in targets:
        shape = t.shape
        for step in t.steps:
            if step.pass_index == index:
                w = p.work(shape[0], shape[1], tokens)
                if w is None:
                    return None
                fwd = FORWARDS * shape[0] * shape[1] * tokens
                ours += w + fwd
                ref += gptq_work(shape[0], shape[1], tokens) + fwd
            shape = step.shape
    return (ours, ref) if ref else None


def announce(passes: Sequence[Pass[Any]], targets: Sequence[TargetPlan], tokens: int) -> list[str]:
    """One warning line per pass estimated above :data:`ANNOUNCE_RATIO` × GPTQ on this model."""
    lines = []
    for i, p in enumerate(passes):
        e = estimate(p, i, targets, tokens)
        if e is None or e[0] < ANNOUNCE_RATIO * e[1]:
            continue
        hint = p.faster()
        lines.append(f"{p.options}: estimated about {e[0] / e[1]:.0f}x GPTQ's time on this model"
                     + (f"; faster: {hint}" if hint else ""))
    for line in lines:
        logger.warning(line)
    return lines
