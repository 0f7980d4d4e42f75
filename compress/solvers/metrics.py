"""Error measures shared by every pass and allocator.

The output error of replacing a weight W by Ŵ on calibration inputs X (rows are tokens) is
‖X(W − Ŵ)ᵀ‖²_F = tr(Δ H Δᵀ) with Δ = W − Ŵ and H = XᵀX the input Gram matrix, so it is computed from
the accumulated statistics without the activations.
"""

from __future__ import annotations

from typing import Any

import torch

from .linalg import SOLVE_DTYPE


def output_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H Dᵀ) = ‖X Dᵀ‖²_F for D (d_out × d_in) and H = XᵀX (d_in × d_in), in the inputs' dtype."""
    return float(((D @ H) * D).sum())


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> float:
    """‖X(W − Ŵ)ᵀ‖²_F / ‖XWᵀ‖²_F = tr(Δ H Δᵀ) / tr(W H Wᵀ) with H = XᵀX, or the relative squared
    weight error when ``H`` is None (computed in float64)."""
    W = W.to(SOLVE_DTYPE)
    D = W - W_hat.to(SOLVE_DTYPE)
    if H is None:
        return float(D.square().sum() / W.square().sum().clamp_min(1e-300))
    H = H.to(SOLVE_DTYPE)
    num = ((D @ H) * D).sum()
    den = ((W @ H) * W).sum().clamp_min(1e-300)
    return float(num / den)


def predicted_increase(W: torch.Tensor, W_hat: torch.Tensor, st: Any) -> float:
    """½·Σᵢ E[gᵢ²]·(ΔW H ΔWᵀ)ᵢᵢ: the calibration loss increase (nats per token) the statistics predict;
    ½·tr(E[g gᵀ] ΔW H ΔWᵀ) where the statistics hold the whole output-gradient covariance."""
    d = (W_hat.float() - W.float())
    if getattr(st, "grad_cov", None) is not None:
        return 0.5 * float(((st.grad_cov @ d @ st.gram) * d).sum())
    return 0.5 * float((st.grad_sq[:, None] * (d @ st.gram) * d).sum())
