"""MoDeGPT's three module solvers and its global sparsity allocation (arXiv 2408.09632).

A decoder layer is cut into three modules of two matrices each, and each module's inner width is
reduced so that the module's output on the calibration data changes least:

* **MLP (Nyström):** keep k intermediate channels of σ(x W_gateᵀ) ⊙ (x W_upᵀ) and refit W_down on the
  kept channels by least squares: W_down' = W_down C[:, S] (C[S, S] + εI)⁻¹, C their correlation.
  The paper ranks channels by ridge leverage scores of C alone (smallest diagonal of (C + λI)⁻¹,
  ``select="leverage"``). The default ranks them by what removing one channel alone costs the
  refitted output, ‖W_down[:, i]‖² / [(C + λI)⁻¹]_ii (``select="obs"``, the OBS saliency of a whole
  column). Leverage ignores W_down: on Qwen2.5-Coder-0.5B it drops layer 3's channel that writes
  the first token's massive activation (down-projection weight 2.09 of a column otherwise 0), whose
  value the other channels span on the calibration set only; that layer's relative output error at
  3.45 % removed is 0.944 on WikiText-2 with leverage and 0.0008 with obs.
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

from .linalg import SOLVE_DTYPE, cholesky_psd, inverse_diagonal_from_cholesky

#: ridge of the MLP leverage scores, times mean(diag C) (the unofficial implementation's 1e-2)
MLP_RIDGE = 1e-2
#: ridge of the down-projection refit, times mean(diag C[S, S])
REFIT_RIDGE = 1e-6


def _mean_diag(C: torch.Tensor) -> float:
    return max(float(C.diagonal().mean()), torch.finfo(SOLVE_DTYPE).tiny)


#: the MLP channel rankings: "obs" (default) and "leverage" (the paper's)
MLP_SELECT = ("obs", "leverage")


def mlp_order(C: torch.Tensor, W_down: torch.Tensor, ridge: float = MLP_RIDGE, select: str = "obs") -> torch.Tensor:
    """Intermediate channels, most important first (see the module's docstring), from their correlation
    ``C`` (float64) and the down projection."""
    n = C.shape[0]
    L, _ = cholesky_psd(C + (ridge * _mean_diag(C)) * torch.eye(n, dtype=SOLVE_DTYPE, device=C.device), "modegpt mlp")
    inv_diag = inverse_diagonal_from_cholesky(L)
    if select == "leverage":
        return torch.argsort(inv_diag)
    if select != "obs":
        raise ValueError(f"unknown MLP selection {select!r}; choose one of {', '.join(MLP_SELECT)}")
    return torch.argsort(W_down.to(SOLVE_DTYPE).square().sum(0) / inv_diag, descending=True)


def nystrom_mlp(
    C: torch.Tensor, W_down: torch.Tensor, keep: int, ridge: float = MLP_RIDGE, select: str = "obs",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept intermediate channels, sorted; refitted W_down of shape d × keep) from the intermediate
    activations' correlation ``C`` (d_int × d_int)."""
    C = C.to(SOLVE_DTYPE)
    kept = torch.sort(mlp_order(C, W_down, ridge, select)[:keep]).values
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
    new_v: list[torch.Tensor] = []
    new_o: list[torch.Tensor] = []
    trans: list[torch.Tensor] = []
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


def affine_system(
    C: torch.Tensor, x_sum: torch.Tensor | None, n: int, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(Gram, weights) of linears that read one input: ``C`` and the weights when none has a bias;
    otherwise the Gram of [x; 1], [[C, Σx], [Σxᵀ, n]], and each weight as [W | b] (a zero column
    where a linear has no bias), so that the solvers above see the affine maps x ↦ Wx + b."""
    if all(b is None for b in biases):
        return C, weights
    assert x_sum is not None, "a bias needs the inputs' sum (statistic 'mean')"
    d = C.shape[0]
    out = C.new_empty(d + 1, d + 1)
    out[:d, :d] = C
    out[:d, d] = out[d, :d] = x_sum.to(C.dtype)
    out[d, d] = float(n)
    cols = [W.new_zeros(W.shape[0]) if b is None else b.to(W.dtype) for W, b in zip(weights, biases)]
    return out, [torch.cat([W, b[:, None]], 1) for W, b in zip(weights, cols)]


def nystrom_errors(
    C: torch.Tensor, W_down: torch.Tensor, keeps: list[int], ridge: float = MLP_RIDGE, select: str = "obs",
) -> list[float]:
    """Relative output error of the down projection ‖W_down (C − C_{:,S} C_SS⁻¹ C_{S,:}) W_downᵀ‖_tr /
    tr(W_down C W_downᵀ) for each kept width (channels chosen by :func:`mlp_order`)."""
    C = C.to(SOLVE_DTYPE)
    order = mlp_order(C, W_down, ridge, select)
    Wd = W_down.to(SOLVE_DTYPE)
    B = Wd @ C  # (d, n)
    total = float((B * Wd).sum())
    out = []
    for k in keeps:
        S = torch.sort(order[:k]).values
        C_SS = C[S][:, S]
        L_S, _ = cholesky_psd(C_SS + (REFIT_RIDGE * _mean_diag(C_SS)) * torch.eye(k, dtype=SOLVE_DTYPE, device=C.device), "modegpt refit")
        X = B[:, S]  # W_down C_{:,S}
        explained = float((torch.cholesky_solve(X.T, L_S) * X.T).sum())  # tr(X C_SS⁻¹ Xᵀ)
        out.append(max(total - explained, 0.0) / max(total, 1e-300))
    return out


def qk_errors(W_q: torch.Tensor, W_k: torch.Tensor, C: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, pairs: list[int]) -> list[float]:
    """Share of the query–key score energy (the CR scores of :func:`cr_qk`) in the rotary pairs dropped,
    for each number of pairs kept per group."""
    half = head_dim // 2
    eq = qk_energy(W_q, C).view(n_kv, n_heads // n_kv, head_dim)
    ek = qk_energy(W_k, C).view(n_kv, 1, head_dim)
    prod = eq * ek
    score = torch.sort((prod[..., :half] + prod[..., half:]).sum(1), dim=1, descending=True).values  # (n_kv, half)
    total = float(score.sum())
    return [1.0 - float(score[:, :p].sum()) / max(total, 1e-300) for p in pairs]


def vo_errors(W_v: torch.Tensor, W_o: torch.Tensor, C: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, ranks: list[int]) -> list[float]:
    """Relative whitened error of :func:`svd_vo` for each rank: the dropped squared singular values."""
    rep = n_heads // n_kv
    L, _ = cholesky_psd(C, "modegpt value-output")
    Wv = W_v.to(SOLVE_DTYPE).view(n_kv, head_dim, -1)
    Wo = W_o.to(SOLVE_DTYPE)
    sq = []
    for g in range(n_kv):
        O_stack = torch.cat([Wo[:, h * head_dim : (h + 1) * head_dim] for h in range(g * rep, (g + 1) * rep)], dim=0)
        R = torch.linalg.qr(O_stack).R
        sq.append(torch.linalg.svdvals(R @ Wv[g] @ L) ** 2)
    s = torch.stack(sq)  # (n_kv, hd), descending per group
    total = float(s.sum())
    return [float(s[:, r:].sum()) / max(total, 1e-300) for r in ranks]
