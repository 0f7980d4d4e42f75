"""``ria``: RIA, relative importance and activation pruning (Zhang et al., "Plug-and-Play: An Efficient
Post-training Pruning Method for Large Language Models", ICLR 2024).

A weight's score is its share of both ℓ1 norms it belongs to, the row of its output and the column of
its input, times the input channel's activation norm to the power ``a``:
(|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · ‖X_j‖₂^a (:func:`compress.solvers.sparse.ria_score`).
Weights are removed by lowest score, in N:M groups (``pattern``) or unstructured (``sparsity``, over the
whole layer as the paper does, or per output row with ``per_row``); no weight is updated. The paper's
channel permutation for N:M is not implemented. Storage as for the other pruning passes: 2:4 packed,
other patterns dense with their zeros.

Lifecycle: observe Σx² of each target's inputs; apply: score, mask, store.

Example::

    compress run MODEL --pass ria:pattern=2:4 --out out/ria24
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.sparse import nm_mask, ria_score, unstructured_mask
from .base import Capabilities
from .sparse import PruneOptions, PrunePass


@dataclass
class RIAConfig(PruneOptions):
    a: float = option(0.5, "exponent of the input channel's activation norm ‖X_j‖₂^a (the paper's 0.5)", min=0.0)
    per_row: bool = option(False, "unstructured: compare scores within each output row instead of the whole layer (the paper's)")
    sequential: bool = option(False, "observe each sub-group's inputs after the sub-groups before it in the layer were pruned "
                              "(one forward per sub-group); false: every sub-group's from one forward of the layer as the pass finds it")


@register_pass
class RIAPass(PrunePass[RIAConfig]):
    """RIA: keep the weights of highest relative importance × activation^a (no weight update)."""

    name = "ria"

    def capabilities(self) -> Capabilities:
        return Capabilities(requires_calibration=True, statistics=frozenset({"rms"}), observe_once=not self.config.sequential)

    def prune(self, name: str, W: torch.Tensor, stats: LinearStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        assert stats is not None and stats.sq_sum is not None
        c = self.config
        score = ria_score(W, stats.sq_sum, c.a)
        keep = nm_mask(score, *nm) if nm else unstructured_mask(score, c.sparsity or 0.0, per_row=c.per_row)
        return W * keep
