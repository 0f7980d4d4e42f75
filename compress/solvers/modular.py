"""MoDeGPT's three module solvers and its global sparsity allocation (arXiv 2408.09632).

A decoder layer is cut into three modules of two matrices each, and each module's inner width is
reduced so that the module's output on the calibration data changes least:

* **MLP (Nyström):** keep k intermediate channels of σ(x W_gateᵀ) ⊙ (x W_upᵀ), chosen by ridge
  leverage scores of their correlation C (smallest diagonal of (C + λI)⁻¹), and refit W_down on the
  kept channels by least squares: W_down' = W_down C[:, S] (C[S, S] + εI)⁻¹.
* **Query–key (CR decomposition):** keep, per key-value group, the head dimensions whose query and
  key energies (diagonals of W_q C W_qᵀ and W_k C W_kᵀ, C the attention input's correlation) have
  the largest product summed over the group's query heads, in whole rotary pairs (j, j + d_h/2).
* **Value–output (SVD):** per key-value group, the best rank-r approximation of the stacked
  products O_h W_v (one per query head h of the group) in the input-whitened norm ‖(·) C^{1/2}‖.
  With O_stack = Q R (thin QR), the optimum is V' = U_rᵀ R W_v and O'_stack = Q U_r, U_r the top-r
  left singular vectors of R W_v L (C = L Lᵀ); no inverse of C is formed.

All solves run in float64. The Gram matrices are sums over the calibration tokens (their scale
cancels: ridges are relative to the mean diagonal).
"""

from __future__ import annotations

import torch

from .linalg import SOLVE_DTYPE, cholesky_psd

#: ridge of the MLP leverage scores, times mean(diag C) (the unofficial implementation's 1e-2)
MLP_RIDGE = 1e-2
#: ridge of the down-projection refit, times mean(diag C[S, S])
REFIT_RIDGE = 1e-6


def _mean_diag(C: torch.Tensor) -> float:
    return max(float(C.diagonal().mean()), torch.finfo(SOLVE_DTYPE).tiny)


def nystrom_mlp(C: torch.Tensor, W_down: torch.Tensor, keep: int, ridge: float = MLP_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept intermediate channels, sorted; refitted W_down of shape d × keep) from the intermediate
    activations' correlation ``C`` (d_int × d_int)."""
    C = C.to(SOLVE_DTYPE)
    n = C.shape[0]
    eye = torch.eye(n, dtype=SOLVE_DTYPE, device=C.device)
    L, _ = cholesky_psd(C + (ridge * _mean_diag(C)) * eye, "modegpt mlp")
    scores = torch.cholesky_inverse(L).diagonal()
    kept = torch.sort(torch.topk(scores, keep, largest=False).indices).values
    C_SS = C[kept][:, kept]
    L_S, _ = cholesky_psd(C_SS + (REFIT_RIDGE * _mean_diag(C_SS)) * torch.eye(keep, dtype=SOLVE_DTYPE, device=C.device), "modegpt refit")
    Wd = W_down.to(SOLVE_DTYPE)
    # W' = W_down C[:, S] C_SS⁻¹  ⇔  W'ᵀ = C_SS⁻¹ C[S, :] W_downᵀ
    W_new = torch.cholesky_solve(C[kept] @ Wd.T, L_S).T
    return kept, W_new


def qk_energy(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """diag(W C Wᵀ): each output dimension's energy over the calibration set."""
    W = W.to(SOLVE_DTYPE)
    return ((W @ C.to(SOLVE_DTYPE)) * W).sum(1)


def cr_qk(
    W_q: torch.Tensor, W_k: torch.Tensor, C: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, pairs: int,
) -> torch.Tensor:
    """(n_kv × 2·pairs) original head dimensions kept per key-value group: the first halves of the
    kept rotary pairs (ascending), then their partners j + head_dim/2."""
    half = head_dim // 2
    eq = qk_energy(W_q, C).view(n_heads, head_dim)
    ek = qk_energy(W_k, C).view(n_kv, head_dim)
    rep = n_heads // n_kv
    # per query head and dimension: query energy × key energy of its group; a pair's score sums its two halves
    prod = eq.view(n_kv, rep, head_dim) * ek.view(n_kv, 1, head_dim)
    score = (prod[..., :half] + prod[..., half:]).sum(1)  # (n_kv, half)
    first = torch.sort(torch.topk(score, pairs, dim=1).indices, dim=1).values
    return torch.cat([first, first + half], dim=1)


def svd_vo(
    W_v: torch.Tensor, W_o: torch.Tensor, C: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(new W_v: n_kv·rank × d, new W_o: d_out × n_heads·rank, T: n_kv × rank × head_dim with
    W_v'[g] = T[g] W_v[g], for the value bias) of the whitened rank-``rank`` value–output factorization."""
    rep = n_heads // n_kv
    L, _ = cholesky_psd(C, "modegpt value-output")
    Wv = W_v.to(SOLVE_DTYPE).view(n_kv, head_dim, -1)
    Wo = W_o.to(SOLVE_DTYPE)
    d_out = Wo.shape[0]
    new_v, new_o, trans = [], [], []
    for g in range(n_kv):
        heads = range(g * rep, (g + 1) * rep)
        O_stack = torch.cat([Wo[:, h * head_dim : (h + 1) * head_dim] for h in heads], dim=0)  # (rep·d_out, hd)
        Q, R = torch.linalg.qr(O_stack)
        U, _, _ = torch.linalg.svd(R @ Wv[g] @ L, full_matrices=False)
        U_r = U[:, :rank]
        T = U_r.T @ R  # (rank, hd)
        new_v.append(T @ Wv[g])
        trans.append(T)
        O_new = Q @ U_r  # (rep·d_out, rank)
        new_o.extend(O_new[j * d_out : (j + 1) * d_out] for j in range(rep))
    return torch.cat(new_v, 0), torch.cat(new_o, 1), torch.stack(trans)


def allocate_sparsity(influence: list[float], ratio: float, temperature: float, cap: float) -> list[float]:
    """Per-layer sparsity φ = L·ratio·softmax(−s/ε) (a layer that changes its input less loses more),
    capped at ``cap`` with the excess handed to the uncapped layers in proportion to their weights.
    The mean of the result is ``ratio`` unless every layer is capped (then ``cap``)."""
    s = torch.tensor(influence, dtype=SOLVE_DTYPE)
    w = torch.softmax(-s / temperature, dim=0)
    phi = w * len(influence) * ratio
    capped = torch.zeros_like(phi, dtype=torch.bool)
    while True:
        over = (phi > cap + 1e-12) & ~capped
        if not over.any():
            break
        capped |= over
        excess = float((phi[capped] - cap).sum())
        phi[capped] = cap
        free = ~capped
        if not free.any():
            break
        phi[free] += excess * w[free] / w[free].sum()
    return [float(x) for x in phi.clamp(0.0, cap)]
