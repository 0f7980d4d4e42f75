"""bench/dither_export.py: the grid step of a 32-block is recovered, and every weight moves within
half a step of where it was, off the grid."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parent.parent / "bench" / "dither_export.py"
_spec = importlib.util.spec_from_file_location("dither_export", _PATH)
assert _spec is not None and _spec.loader is not None
dither_export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dither_export)


def _gridded(d_out: int = 8, d_in: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    step = torch.rand(d_out, d_in // 32, generator=g) * 0.1 + 0.01
    lo = -8 * step
    q = torch.randint(0, 16, (d_out, d_in), generator=g).float()
    q[:, ::32] = 0  # every block uses its lowest and next level, so the smallest gap is the step
    q[:, 1::32] = 1
    full = step.repeat_interleave(32, dim=1)
    return q * full + lo.repeat_interleave(32, dim=1), step


def test_grid_step_is_recovered() -> None:
    W, step = _gridded()
    torch.testing.assert_close(dither_export.grid_step(W), step, rtol=1e-5, atol=0)


def test_a_constant_block_has_no_step_and_stays() -> None:
    W = torch.zeros(2, 64)
    W[1, 32:] = torch.arange(32).float() * 0.5
    step = dither_export.grid_step(W)
    assert step[0].tolist() == [0.0, 0.0] and step[1].tolist() == [0.0, 0.5]
    before = W.clone()
    dither_export.dither_(W, torch.Generator().manual_seed(1))
    assert torch.equal(W[0], before[0]) and torch.equal(W[1, :32], before[1, :32])


def test_dither_stays_within_half_a_step_and_leaves_the_grid() -> None:
    W, step = _gridded()
    before = W.clone()
    dither_export.dither_(W, torch.Generator().manual_seed(1))
    moved = (W - before).abs()
    assert bool((moved <= step.repeat_interleave(32, dim=1) / 2 + 1e-7).all())
    # off the grid: no weight is within 1 % of a step of a grid point any more, bar chance
    frac = ((W - before) / step.repeat_interleave(32, dim=1)).abs()
    assert float((frac < 0.01).float().mean()) < 0.05


def test_amplitude_scales_the_offset() -> None:
    W, step = _gridded()
    before = W.clone()
    dither_export.dither_(W, torch.Generator().manual_seed(1), amplitude=0.25)
    assert bool(((W - before).abs() <= step.repeat_interleave(32, dim=1) / 8 + 1e-7).all())
    assert float((W - before).abs().max()) > 0
