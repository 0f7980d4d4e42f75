"""What the search may choose per target: candidates, each a short recipe applied to one linear.

A candidate is one or more pass steps (``gptq:bits=3,group=64``; ``svd-llm:ratio=0.5`` then
``gptq:bits=4,group=32``), its stored bits on a target of a given shape (the passes' own
``stored_bits``, exactly what the plan will say), whether the passes accept that shape, and a cheap
estimate of the weight it leaves, from the target's weight and input Gram alone:

- GPTQ: its error per output row under a uniform-noise model (each code's rounding error uniform over
  its group's step, weighted by the loss GPTQ's sweep assigns to its column), with the group steps of
  GPTQ's own clipping search; RTN: round-to-nearest itself (validated in bench/budget_rho.py);
- low-rank (svd-llm): the whitened truncated SVD itself;
- 2:4 (sparsegpt): SparseGPT's own solve;
- a step followed by quantization (``A+gptq``): the quantizer's estimate applied to the first step's
  result. The pair must compose (a LowRankLinear cannot be quantized; a 2:4-compressed one neither):
  ``--search`` refuses one that does not, naming the rule.

``--search`` names families (``gptq``, ``rtn``, ``svd-llm``, ``sparsegpt``, ``A+gptq``); each family
expands to its grid below. Dense (the weight as it is) is always a candidate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..passes.base import LINEAR, Pass, Stored, dense_bits
from ..recipe import parse_shorthand
from ..solvers.gptq import sweep_factor
from ..solvers.linalg import cholesky_psd
from ..solvers.lowrank import factorize, rank_for_ratio
from ..solvers.metrics import predicted_increase
from ..solvers.quant import QuantSpec, dequantize, quantize_rtn
from ..solvers.sparse import sparsegpt_prune

#: a candidate's estimate of the weight it leaves: (W, H) → Ŵ
Estimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: a candidate's estimate of its error per output row, (ΔW H ΔWᵀ)ᵢᵢ, without forming Ŵ: (W, H) → (d_out,)
RowErrors = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

QUANT_BITS = (2, 3, 4, 8)
#: GPTQ's default damping (the pass's damp=)
GPTQ_DAMP = 0.01
#: group sizes along the input (0: the whole row); a target takes those that divide its input width
QUANT_GROUPS = (32, 64, 128, 256, 0)
LOWRANK_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_FAMILIES = ("gptq", "sparsegpt")
STRUCTURED_FAMILIES = ("svd-llm",)
FAMILIES = ("gptq", "rtn", "svd-llm", "sparsegpt")


@dataclass(frozen=True)
class Candidate:
    """One choice for one target: the pass steps (shorthand) and how to estimate their result."""

    family: str
    steps: tuple[str, ...]
    estimator: Estimator
    #: where set, the prediction uses these row errors instead of the estimated Ŵ
    rows: RowErrors | None = None

    @property
    def label(self) -> str:
        return " + ".join(self.steps) if self.steps else "dense"

    def predict(self, W: torch.Tensor, st: Any) -> float:
        """The predicted loss increase on a target with weight W and statistics ``st``."""
        if not self.steps:
            return 0.0
        if self.rows is not None:
            return 0.5 * float((st.grad_sq * self.rows(W, st.gram)).sum())
        return predicted_increase(W, self.estimator(W, st.gram), st)

    @functools.cached_property
    def passes(self) -> list[Pass[Any]]:
        return [parse_shorthand(s).build() for s in self.steps]

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype) -> int | None:
        """Bits the candidate stores for a d_out × d_in target (None: its passes refuse that shape)."""
        elt = torch.finfo(dtype).bits
        stored = Stored(dense_bits(d_out, d_in, dtype), None, elt, None, frozenset({LINEAR}))
        for p in self.passes:
            if p.check_target(d_out, d_in, stored) is not None:
                return None
            bits = p.stored_bits(d_out, d_in, dtype, before=stored)
            if bits is None:
                return None
            stored = Stored(bits, p.name, elt, None, p.produces(stored.kinds))
        return stored.bits


def _rtn(bits: int, group: int) -> Estimator:
    spec = QuantSpec(bits=bits, group_size=group, clip=True)

    def hat(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        q = quantize_rtn(W, spec, H.diagonal())
        return dequantize(q.q, q.scales, q.zeros, spec)
    return hat


#: the last Gram's GPTQ column weights (q/k/v and gate/up share one)
_OBS: dict[str, Any] = {}


def _obs_weights(H: torch.Tensor) -> torch.Tensor:
    """1/U_jj² per input column (original order), U the upper Cholesky factor of the damped H⁻¹ in
    GPTQ's activation order: the loss of an error e in column j, once the later columns absorb it."""
    key = (H.data_ptr(), tuple(H.shape))
    if _OBS.get("key") != key:
        perm, U = sweep_factor(H.double(), True, GPTQ_DAMP, "")
        w = torch.empty(H.shape[0], dtype=torch.float32)
        w[perm] = U.diagonal().double().square().reciprocal().float()
        _OBS.update(key=key, value=w)
    return _OBS["value"]


def _gptq_rows(bits: int, group: int) -> RowErrors:
    """GPTQ's error per row under the uniform-noise model: every code's rounding error is uniform over
    its group's step s (variance s²/12), weighted by :func:`_obs_weights`. The steps are those of
    GPTQ's own group parameters (clip search weighted by diag H, from the original weights)."""
    spec = QuantSpec(bits=bits, group_size=group, clip=True)

    def rows(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        q = quantize_rtn(W, spec, H.diagonal())
        g, _ = spec.groups(*W.shape)
        step = q.scales.float().repeat_interleave(g, dim=1)
        return (step.square() / 12.0 * _obs_weights(H)[None, :]).sum(1)
    return rows


#: the last target's whitened factorization at full rank (every ratio of a target truncates the same one)
_FACTORS: dict[str, Any] = {}


def _full_factors(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (W.data_ptr(), tuple(W.shape), H.data_ptr())
    if _FACTORS.get("key") != key:
        f = factorize(W, min(W.shape), chol=cholesky_psd(H.double())[0])
        _FACTORS.update(key=key, value=(f.B.float(), f.A.float()))
    return _FACTORS["value"]


def _svd(ratio: float) -> Estimator:
    def hat(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        d_out, d_in = W.shape
        r = rank_for_ratio(d_out, d_in, ratio)
        B, A = _full_factors(W, H)
        return B[:, :r] @ A[:r]
    return hat


def _sparse24(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    return sparsegpt_prune(W.float(), H.float(), nm=(2, 4))[0]


def family_candidates(family: str) -> list[Candidate]:
    """The grid one ``--search`` family stands for; ``A+gptq`` (or ``A+rtn``) is each candidate of A
    followed by 4-bit quantization of what it leaves."""
    first, plus, then = family.partition("+")
    if plus:
        if then not in ("gptq", "rtn"):
            raise ConfigError(f"--search: '{family}' must end in +gptq or +rtn (a quantizer after the first method), e.g. sparsegpt+gptq")
        return [Candidate(family, c.steps + (f"{then}:bits=4,group={g}",), _then(c.estimator, _rtn(4, g)))
                for c in family_candidates(first) for g in (32, 64)]
    if family in ("gptq", "rtn"):
        return [Candidate(family, (f"{family}:bits={b},group={g}",), _rtn(b, g), _gptq_rows(b, g) if family == "gptq" else None)
                for b in QUANT_BITS for g in QUANT_GROUPS]
    if family == "svd-llm":
        return [Candidate(family, (f"svd-llm:ratio={r}",), _svd(r)) for r in LOWRANK_RATIOS]
    if family == "sparsegpt":
        return [Candidate(family, ("sparsegpt:pattern=2:4",), _sparse24)]
    raise ConfigError(f"--search: unknown candidate '{family}'; known: {', '.join(FAMILIES)}, and A+gptq (comma-separated, e.g. --search gptq,sparsegpt)")


def _then(first: Estimator, quant: Estimator) -> Estimator:
    return lambda W, H: quant(first(W, H), H)


DENSE = Candidate("dense", (), lambda W, H: W)


def parse_search(text: str | None, structured: bool) -> list[Candidate]:
    """The candidates of ``--search`` (None: the defaults for the budget's kind), dense first."""
    names = [s.strip() for s in text.split(",") if s.strip()] if text is not None else list(STRUCTURED_FAMILIES if structured else DEFAULT_FAMILIES)
    if not names:
        raise ConfigError("--search is empty; name candidates, e.g. --search gptq,rtn,sparsegpt")
    out = [DENSE]
    for name in dict.fromkeys(names):
        if name == "dense":
            continue
        if structured and name not in STRUCTURED_FAMILIES:
            raise ConfigError(f"--search: '{name}' does not remove parameters, and a params= budget counts parameters; "
                              f"use {', '.join(STRUCTURED_FAMILIES)} with params=, or a bits=/size= budget")
        cands = family_candidates(name)
        for c in cands[:1]:  # a family's candidates share their passes
            _check_composes(name, c)
        out += cands
    return out


def _check_composes(family: str, c: Candidate) -> None:
    from ..planning.order import check_order

    try:
        check_order(c.passes)
    except ConfigError as e:
        raise ConfigError(f"--search: '{family}' does not compose: {str(e).split('; drop one')[0]}; drop it from --search") from None
