"""ARMOR (arXiv 2510.05528): Ŵ = A·(W′ ⊙ M)·B with block-diagonal A (d_out × d_out) and B
(d_in × d_in) around a 2:4 sparse core, found by block coordinate descent on a proxy loss.

Proxy (NoWag's): W̄ = W with rows, then columns, scaled to unit L2 norm (W = diag(r)·W̄·diag(c));
L = Σ_ij w_j (W̄ − A (W′⊙M) B)_ij² / Σ_ij w_j W̄_ij², with w_j = ‖X_j‖² = diag(XᵀX)_j. Our reading of the
notes: the importance w is the raw input energy, applied to the normalized weight.

Init (NoWag-P): M keeps the top 2 of every 4 of W̄²·w, W′ = W̄, A = B = I. Each iteration:
1. continuous step: one Adam step on A, B and the kept values; a step that raises L is undone and
   the learning rate halved (so L never rises);
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
    return torch.einsum("onk,nkj->onj", M.reshape(M.shape[0], n, b), B).reshape(M.shape)


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
    eps = 1e-12
    r = W.norm(dim=1).clamp_min(eps)
    Wn = W / r[:, None]
    c = Wn.norm(dim=0).clamp_min(eps)
    Wbar = Wn / c[None, :]
    w = hdiag.float().clamp_min(0)
    if float(w.sum()) == 0:
        w = torch.ones_like(w)
    L0 = float((Wbar.square() * w).sum().clamp_min(eps))
    keep = nm_mask(Wbar.square() * w, 2, 4)
    nA, nB = d_out // block, d_in // block
    eye = torch.eye(block)
    A = eye.repeat(nA, 1, 1).requires_grad_()
    B = eye.repeat(nB, 1, 1).requires_grad_()
    Wp = (Wbar * keep).clone().requires_grad_()
    gen = torch.Generator().manual_seed(seed)

    def loss_of(A_: torch.Tensor, C: torch.Tensor, B_: torch.Tensor) -> torch.Tensor:
        return ((Wbar - bd_right(bd_left(A_, C), B_)).square() * w).sum() / L0

    opt = torch.optim.Adam([A, B, Wp], lr=lr)
    with torch.no_grad():
        cur = float(loss_of(A, Wp * keep, B))
    losses = [cur]
    best, since, it = cur, 0, 0
    for it in range(1, iters + 1):
        # 1. continuous step, undone if it raises the loss
        saved = (A.detach().clone(), B.detach().clone(), Wp.detach().clone())
        opt.zero_grad()
        with torch.enable_grad():  # callers may run under no_grad (the calibration pipeline does)
            loss = loss_of(A, Wp * keep, B)
            loss.backward()
        opt.step()
        with torch.no_grad():
            Wp.mul_(keep)
            new = float(loss_of(A, Wp, B))
            if new > cur:
                A.copy_(saved[0])
                B.copy_(saved[1])
                Wp.copy_(saved[2])
                for g in opt.param_groups:
                    g["lr"] *= 0.5
            else:
                cur = new
        # 2. sparse-core step
        with torch.no_grad():
            saved_core = (Wp.detach().clone(), keep.clone())
            _sparse_core_step(A.detach(), B.detach(), Wp, keep, Wbar, w, block, gen)
            new = float(loss_of(A, Wp, B))
            if new > cur:  # only float rounding can do this; keep the guarantee exact
                Wp.copy_(saved_core[0])
                keep.copy_(saved_core[1])
            else:
                cur = new
        losses.append(cur)
        if best - cur <= atol + rtol * best:
            since += 1
            if since >= patience:
                break
        else:
            since = 0
        best = min(best, cur)
    with torch.no_grad():
        A_f = A.detach() * r.reshape(nA, block, 1)  # diag(r)·A
        B_f = B.detach() * c.reshape(nB, 1, block)  # B·diag(c)
        core = (Wp.detach() * keep).contiguous()
    return ArmorResult(A=A_f.contiguous(), B=B_f.contiguous(), core=core, keep=keep.clone(), losses=losses, iterations=it)


def _sparse_core_step(
    A: torch.Tensor, B: torch.Tensor, Wp: torch.Tensor, keep: torch.Tensor, Wbar: torch.Tensor, w: torch.Tensor,
    b: int, gen: torch.Generator,
) -> None:
    d_out, d_in = Wp.shape
    nA, nB, gpb = d_out // b, d_in // b, b // 4
    C = Wp * keep
    R = Wbar - bd_right(bd_left(A, C), B)  # residual (d_out, d_in)
    # gradient of the loss w.r.t. the core, up to a constant factor: Aᵀ (R ⊙ w) Bᵀ
    G = bd_right(bd_left(A.transpose(1, 2), R * w), B.transpose(1, 2))
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
    c_cur = C[rows[:, None], cols4].double()  # (nG, 4)
    Rreg = R.reshape(nA, b, nB, b).permute(0, 2, 1, 3)[ra, cb].double()  # (nG, b, b)
    R0 = Rreg + a[:, :, None] * torch.einsum("gt,gtj->gj", c_cur, Bsub)[:, None, :]  # group zeroed
    wj = w.reshape(nB, b)[cb].double()  # (nG, b)
    z = torch.einsum("gr,grj->gj", a, R0)  # (nG, b)
    a2 = a.square().sum(dim=1)  # (nG,)
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
    vals = v[torch.arange(len(best)), best].to(Wp.dtype)  # (nG, 2)
    Wp[rows[:, None], cols4] = 0.0
    keep[rows[:, None], cols4] = False
    Wp[rows, col0 + sel[:, 0]] = vals[:, 0]
    Wp[rows, col0 + sel[:, 1]] = vals[:, 1]
    keep[rows, col0 + sel[:, 0]] = True
    keep[rows, col0 + sel[:, 1]] = True
