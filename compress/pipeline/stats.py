"""Calibration statistics of linear-layer inputs.

Statistics are plain sums (XᵀX, Σx, Σ|x|, Σx², token counts) held in one :class:`LayerStats` object
per decoder layer, never inside hook closures, so that a data-parallel calibration can all-reduce
them unchanged (see :meth:`LinearStats.tensors`).
"""

from __future__ import annotations

from typing import Any

import torch

#: dtype of the per-batch products; sums across batches are kept in ACCUM_DTYPE
BATCH_DTYPE = torch.float32
ACCUM_DTYPE = torch.float64

#: statistics a pass may declare
KINDS = frozenset({"gram", "mean", "abs_mean", "rms", "abs_max"})
#: a profile kind: the loss-gradient statistics of every target (see compress.pipeline.gradients),
#: in :attr:`LayerStats.sensitivity` during the profile
SENSITIVITY = "sensitivity"


class LinearStats:
    """Sums over the calibration tokens entering one linear layer."""

    def __init__(self, d_in: int, kinds: frozenset[str]) -> None:
        unknown = set(kinds) - KINDS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(KINDS)}")
        self.d_in = d_in
        self.kinds = frozenset(kinds)
        self.n_tokens = 0
        self.gram: torch.Tensor | None = None  # (d_in, d_in) Σ xᵀx
        self.x_sum: torch.Tensor | None = None  # (d_in,) Σ x
        self.abs_sum: torch.Tensor | None = None  # (d_in,) Σ |x|
        self.sq_sum: torch.Tensor | None = None  # (d_in,) Σ x²
        self.abs_max: torch.Tensor | None = None  # (d_in,) max |x|

    def update(self, x: torch.Tensor, gram: torch.Tensor | None = None) -> None:
        """Add a batch ``x`` of shape (..., d_in); ``gram`` may pass a precomputed xᵀx."""
        x = x.reshape(-1, x.shape[-1]).to(BATCH_DTYPE)
        self.n_tokens += x.shape[0]
        if "gram" in self.kinds:
            g = (x.T @ x if gram is None else gram).to("cpu")
            # accumulated in place (float32 into float64 promotes element by element: the same sums
            # without a float64 copy of each batch's product, 1.6 GB at a 14336-wide input)
            self.gram = g.to(ACCUM_DTYPE, copy=True) if self.gram is None else self.gram.add_(g)
        if "mean" in self.kinds:
            s = x.sum(0).to(device="cpu", dtype=ACCUM_DTYPE)
            self.x_sum = s if self.x_sum is None else self.x_sum.add_(s)
        if "abs_mean" in self.kinds:
            s = x.abs().sum(0).to(device="cpu", dtype=ACCUM_DTYPE)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum.add_(s)
        if "rms" in self.kinds:
            s = x.square().sum(0).to(device="cpu", dtype=ACCUM_DTYPE)
            self.sq_sum = s if self.sq_sum is None else self.sq_sum.add_(s)
        if "abs_max" in self.kinds:
            m = x.abs().amax(0).to(device="cpu", dtype=ACCUM_DTYPE)
            self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The sums as tensors (for all-reduce or caching); ``abs_max`` reduces with max."""
        out = {"n_tokens": torch.tensor(float(self.n_tokens), dtype=ACCUM_DTYPE)}
        for k in ("gram", "x_sum", "abs_sum", "sq_sum", "abs_max"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    @property
    def mean_abs(self) -> torch.Tensor:
        assert self.abs_sum is not None and self.n_tokens > 0
        return self.abs_sum / self.n_tokens

    @property
    def rms_value(self) -> torch.Tensor:
        assert self.sq_sum is not None and self.n_tokens > 0
        return (self.sq_sum / self.n_tokens).sqrt()


class LayerStats:
    """The statistics of every observed linear of one decoder layer.

    Linears that read the same input tensor (q/k/v, gate/up) share one XᵀX product per batch.
    """

    def __init__(self, kinds: frozenset[str]) -> None:
        self.kinds = kinds
        self.linears: dict[str, LinearStats] = {}
        #: with the ``sensitivity`` profile: each linear's loss-gradient statistics (names relative to the layer)
        self.sensitivity: dict[str, Any] = {}
        # (input tensor, its XᵀX): holding the tensor keeps its memory from being reused, so an
        # equal (data_ptr, shape, stride) means the same data
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, name: str, x: torch.Tensor) -> None:
        st = self.linears.get(name)
        if st is None:
            st = self.linears[name] = LinearStats(x.shape[-1], self.kinds)
        gram = None
        if "gram" in self.kinds:
            last = self._last
            if (
                last is not None
                and last[0].data_ptr() == x.data_ptr()
                and last[0].shape == x.shape
                and last[0].stride() == x.stride()
            ):
                gram = last[1]
            else:
                flat = x.reshape(-1, x.shape[-1]).to(BATCH_DTYPE)
                gram = flat.T @ flat
                self._last = (x, gram)
        st.update(x, gram)

    def reset_sharing(self) -> None:
        self._last = None

    def pop(self, name: str) -> LinearStats | None:
        return self.linears.pop(name, None)
