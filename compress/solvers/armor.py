"""ARMOR (arXiv 2510.05528): Ŵ = A·(W′ ⊙ M)·B with block-diagonal A (d_out × d_out) and B
(d_in × d_in) around a 2:4 sparse core, found by block coordinate descent on a proxy loss.

Proxy (NoWag's): W̄ = W with rows, then columns, scaled to unit L2 norm (W = diag(r)·W̄·diag(c));
L = Σ_ij w_j (W̄ − A (W′⊙M) B)_ij² / Σ_ij w_j W̄_ij², with w_j = ‖X_j‖² = diag(XᵀX)_j. Our reading of the
notes: the importance w is the raw input energy, applied to the normalized weight.

Init (NoWag-P): M keeps the top 2 of every 4 of W̄²·w, W′ = W̄, A = B = I. Each iteration:
1. continuous step: one Adam step (torch's defaults, gradients written out, no autograd) on A, B
   and the kept values; a step that raises L is undone and the learning rate halved (so L never rises);
2. sparse-core step: in every (d_block × d_block) block of the core one group of 4 is drawn with
   probability ∝ the L1 norm of ∂L/∂(core) over the group; with the group zeroed, each of the six
   2-of-4 masks gets its least-squares values through A's column and B's rows (a 2×2 solve), and
   the best replaces the group. Groups of different blocks touch disjoint output regions, so all
   blocks update in parallel and L cannot rise.
Early stop when L improves by less than atol + rtol·L for ``patience`` iterations. At the end the
norms are folded in: A ← diag(r)·A, B ← B·diag(c).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sparse import nm_mask

PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def bd_left(A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """blockdiag(A) @ M; A (n, b, b), M (n·b, k)."""
    n, b, _ = A.shape
    return torch.bmm(A, M.reshape(n, b, -1)).reshape(M.shape)


def bd_right(M: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """M @ blockdiag(B); M (k, n·b), B (n, b, b)."""
    n, b, _ = B.shape
    return torch.bmm(M.reshape(M.shape[0], n, b).transpose(0, 1), B).transpose(0, 1).reshape(M.shape)


def blockdiag_dense(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks)


@dataclass
class ArmorResult:
    A: torch.Tensor  # (d_out/b, b, b), row norms folded in
    B: torch.Tensor  # (d_in/b, b, b), column norms folded in
    core: torch.Tensor  # (d_out, d_in), 2:4 (zeros outside the mask)
    keep: torch.Tensor  # bool (d_out, d_in)
    losses: list[float] = field(default_factory=list)  # proxy loss at init and after each iteration
    iterations: int = 0

    def weight(self) -> torch.Tensor:
        return bd_right(bd_left(self.A, self.core), self.B)


def _normalized(W: torch.Tensor, hdiag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """W = diag(r)·W̄·diag(c) with unit rows then unit columns; the input weights w (all ones when the
    calibration energy is zero) and the initial loss L0 = Σ w W̄²."""
    eps = 1e-12
    r = W.norm(dim=1).clamp_min(eps)
    Wn = W / r[:, None]
    c = Wn.norm(dim=0).clamp_min(eps)
    Wbar = Wn / c[None, :]
    w = hdiag.float().clamp_min(0)
    if float(w.sum()) == 0:
        w = torch.ones_like(w)
    L0 = float((Wbar.square() * w).sum().clamp_min(eps))
    return r, c, Wbar, w, L0


def armor(
    W: torch.Tensor,
    hdiag: torch.Tensor,
    *,
    block: int = 64,
    iters: int = 2000,
    lr: float = 1e-4,
    patience: int = 100,
    atol: float = 1e-8,
    rtol: float = 1e-6,
    seed: int = 0,
) -> ArmorResult:
    W = W.float()
    d_out, d_in = W.shape
    r, c, Wbar, w, L0 = _normalized(W, hdiag)
    keep = nm_mask(Wbar.square() * w, 2, 4)
    nA, nB = d_out // block, d_in // block
    eye = torch.eye(block)
    A = eye.repeat(nA, 1, 1)
    B = eye.repeat(nB, 1, 1)
    Wp = Wbar * keep
    gen = torch.Generator().manual_seed(seed)
    # Adam (torch's defaults) on A, B and the kept values, with the gradients written out:
    # P = A·C·B, R = W̄ − P, L = Σ w R² / L0, ∂L/∂P = −2 R⊙w / L0;
    # ∂L/∂C = Aᵀ (∂L/∂P) Bᵀ (on the mask), ∂L/∂A_i = (∂L/∂P)_i (C B)_iᵀ, ∂L/∂B_j = (A C)_jᵀ (∂L/∂P)_j.
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    params = [A, B, Wp]
    m1 = [torch.zeros_like(t) for t in params]
    m2 = [torch.zeros_like(t) for t in params]
    AC = bd_left(A, Wp)
    R = Wbar - bd_right(AC, B)
    cur = float((R.square() * w).sum()) / L0
    losses = [cur]
    best, since, it = cur, 0, 0
    for it in range(1, iters + 1):
        # 1. continuous step, undone if it raises the loss
        dP = R * (w * (-2.0 / L0))
        GC = bd_right(bd_left(A.transpose(1, 2), dP), B.transpose(1, 2))
        CB = bd_right(Wp, B)
        GA = torch.bmm(dP.reshape(nA, block, d_in), CB.reshape(nA, block, d_in).transpose(1, 2))
        GB = torch.bmm(AC.reshape(d_out, nB, block).permute(1, 2, 0), dP.reshape(d_out, nB, block).transpose(0, 1))
        trial = []
        for k, (t, g) in enumerate(zip(params, (GA, GB, GC * keep))):
            m1[k].mul_(beta1).add_(g, alpha=1 - beta1)
            m2[k].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step = m1[k] / (1 - beta1**it) / ((m2[k] / (1 - beta2**it)).sqrt() + adam_eps)
            trial.append(t - lr * step)
        trial[2].mul_(keep)
        AC_t = bd_left(trial[0], trial[2])
        R_t = Wbar - bd_right(AC_t, trial[1])
        new = float((R_t.square() * w).sum()) / L0
        if new > cur:
            lr *= 0.5
        else:
            A, B, Wp = params[0], params[1], params[2] = trial
            AC, R, cur = AC_t, R_t, new
            GC = bd_right(bd_left(A.transpose(1, 2), R * w), B.transpose(1, 2))
        # 2. sparse-core step (its loss change is computed on the blocks it touches)
        delta = _sparse_core_step(A, B, Wp, keep, R, GC, w, block, gen, L0)
        if delta <= 0.0:
            cur += delta
            AC = bd_left(A, Wp)
        losses.append(cur)
        if best - cur <= atol + rtol * best:
            since += 1
            if since >= patience:
                break
        else:
            since = 0
        best = min(best, cur)
    A_f = A * r.reshape(nA, block, 1)  # diag(r)·A
    B_f = B * c.reshape(nB, 1, block)  # B·diag(c)
    core = (Wp * keep).contiguous()
    return ArmorResult(A=A_f.contiguous(), B=B_f.contiguous(), core=core, keep=keep.clone(), losses=losses, iterations=it)


def _sparse_core_step(
    A: torch.Tensor, B: torch.Tensor, Wp: torch.Tensor, keep: torch.Tensor, R: torch.Tensor, G: torch.Tensor, w: torch.Tensor,
    b: int, gen: torch.Generator, L0: float,
) -> float:
    """One group of 4 per (block × block) region of the core, drawn ∝ the L1 norm of the gradient ``G``
    over the group, re-solved over the six 2-of-4 masks. Updates Wp, keep and the residual R in place
    and returns the change of the loss. A group's change alters its region of R by a rank-1 term
    a·dᵀ (a: A's column for the group's row; d: the change of the group's contribution through B), so
    the loss change is Σ_j w_j (2 d_j (aᵀR)_j + ‖a‖² d_j²) per region. If rounding made it positive,
    nothing is written (the proxy loss never rises)."""
    d_out, d_in = Wp.shape
    nA, nB, gpb = d_out // b, d_in // b, b // 4
    score = G.abs().reshape(d_out, d_in // 4, 4).sum(dim=2)  # (d_out, d_in/4)
    score = score.reshape(nA, b, nB, gpb).permute(0, 2, 1, 3).reshape(nA * nB, b * gpb)
    pick = torch.multinomial(score + 1e-30, 1, generator=gen)[:, 0]  # one group per block
    ra = torch.arange(nA).repeat_interleave(nB)
    cb = torch.arange(nB).repeat(nA)
    rr, gg = pick // gpb, pick % gpb
    rows = ra * b + rr  # core row of each chosen group
    col0 = cb * b + gg * 4  # first core column of each group
    a = A[ra, :, rr].double()  # (nG, b): A's column for that core row, within its block
    Bsub = torch.stack([B[cb, gg * 4 + t, :] for t in range(4)], dim=1).double()  # (nG, 4, b)
    cols4 = col0[:, None] + torch.arange(4)
    c_cur = (Wp * keep)[rows[:, None], cols4].double()  # (nG, 4)
    Rview = R.reshape(nA, b, nB, b).permute(0, 2, 1, 3)
    y = torch.einsum("gr,grj->gj", a.float(), Rview[ra, cb]).double()  # aᵀ R per region (nG, b)
    wj = w.reshape(nB, b)[cb].double()  # (nG, b)
    a2 = a.square().sum(dim=1)  # (nG,)
    old = torch.einsum("gt,gtj->gj", c_cur, Bsub)  # the group's current contribution through B (nG, b)
    z = y + a2[:, None] * old  # aᵀ R with the group zeroed
    P = torch.tensor(PAIRS)
    U = Bsub[:, P]  # (nG, 6, 2, b)
    Uw = U * wj[:, None, None, :]
    M = a2[:, None, None, None] * (Uw @ U.transpose(2, 3))  # (nG, 6, 2, 2)
    M = M + 1e-9 * (M.diagonal(dim1=2, dim2=3).mean(dim=2)[..., None, None] + 1e-30) * torch.eye(2, dtype=M.dtype)
    rhs = (Uw @ z[:, None, :, None]).squeeze(-1)  # (nG, 6, 2)
    v = torch.linalg.solve(M, rhs)  # (nG, 6, 2)
    gain = (rhs * v).sum(dim=2)  # (nG, 6)
    best = gain.argmax(dim=1)
    sel = P[best]  # (nG, 2)
    idx = torch.arange(len(best))
    vals = v[idx, best]  # (nG, 2) float64
    d = old - torch.einsum("gt,gtj->gj", vals, Bsub[idx[:, None], sel])  # R_region += a dᵀ
    delta = float((wj * (2 * d * y + a2[:, None] * d.square())).sum()) / L0
    if delta > 0.0:
        return delta
    vals = vals.to(Wp.dtype)
    Wp[rows[:, None], cols4] = 0.0
    keep[rows[:, None], cols4] = False
    Wp[rows, col0 + sel[:, 0]] = vals[:, 0]
    Wp[rows, col0 + sel[:, 1]] = vals[:, 1]
    keep[rows, col0 + sel[:, 0]] = True
    keep[rows, col0 + sel[:, 1]] = True
    Rview[ra, cb] += (a[:, :, None] * d[:, None, :]).to(R.dtype)
    return delta
