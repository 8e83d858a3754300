"""What the working precision's rounding can do to a global retrieval (docs/design.md §13).

Every backend computes the logit of a candidate, ℓ_j = −coef·‖x − y_j‖², in the working dtype T (unit roundoff
u). This module states, per backend, how far a computed logit may be from the exact one and how many roundings a
weight goes through in the softmax sums; :mod:`analytic_diffusion.ops.pruning` turns that into a bound on the
posterior mean (its certificate), and the torch reference uses it to decide which rows it recomputes in the
direct form. The statement, for a row with true max logit magnitude M = coef·min_j ‖x − y_j‖²:

* every candidate whose computed weight is kept has |ℓ̃_j − ℓ_j| ≤ γ·(|ℓ_j| + K·M) + β·√|ℓ_j| + κ, with
  γ = γ_{D+16} (D-term sum of squares, the subtraction, the square, coef and its product, base-2 conversions),
  β = 2·√coef·η (η bounds ‖x̃ − x‖ + ‖ỹ_j − y_j‖, the rounding of the inputs to T), K = 0 for the direct-form
  kernels (C++, CUDA, Triton split-N) and EXPANDED_SLACK for the torch reference, κ = LOGIT_FLOOR (plus the
  precision policy's tolerance on the Triton GEMM rows);
* a candidate whose computed logit lies within KEPT_NATS of the row's max is kept and satisfies the bound above;
  any other may be dropped or carry a less accurate logit (``kept_nats``);
* a weight goes through at most ``chain`` roundings (additions, rescaling products) on its way into l and o, and
  at most ``chain`` rescaling factors, each an exp with relative error ≤ 4u (``generic_chain`` for any order; the
  C++ and torch backends state their own, ``accumulation_chain``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import overload

import torch

# Extra roundings of one direct-form logit beyond the D − 1 additions of its sum of squares: the subtraction and
# the square of each term (both relative to the term), the lane reduction's extra levels, coef in T and its product,
# and the base-2 conversions of the Triton and CUDA kernels (log2 e in the coefficient, ln 2 back).
LOGIT_EXTRA_ROUNDINGS = 16
# The torch reference keeps its expanded-form logits on a row only where their error bound is within this many
# multiples of the direct form's γ·M (plus LOGIT_FLOOR); elsewhere it recomputes the row's leading candidates in the
# direct form. At high σ the expanded form's error is a few times γ·M (both scale like ‖x − c‖²), at low σ near
# the data it is ‖x − c‖² / ‖x − y‖² times larger.
EXPANDED_SLACK = 8.0
_LN2 = math.log(2.0)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2.0


@overload
def gamma(k: torch.Tensor, u: float) -> torch.Tensor: ...
@overload
def gamma(k: float, u: float) -> float: ...
def gamma(k: float | torch.Tensor, u: float) -> float | torch.Tensor:
    """γ_k = k·u / (1 − k·u): the relative error of k roundings (Higham); +inf where k·u ≥ 1."""
    if isinstance(k, torch.Tensor):
        kut = k.to(torch.float64) * u
        return torch.where(kut < 1.0, kut / (1.0 - kut).clamp_min(1e-300), torch.full_like(kut, math.inf))
    ku = float(k) * u
    return ku / (1.0 - ku) if ku < 1.0 else math.inf


def logit_gamma(dim: int, dtype: torch.dtype) -> float:
    """γ of a direct-form logit over ``dim`` features (its relative error, beyond the inputs' rounding)."""
    return gamma(dim + LOGIT_EXTRA_ROUNDINGS, unit_roundoff(dtype))


def kept_nats(dtype: torch.dtype) -> float:
    """Every backend computes the weight of a candidate whose computed logit lies within this many nats of the
    row's max from a logit within the model's error; beyond it a backend may drop the weight (the C++ kernels drop
    under 2^-63 of the max in float, 2^-511 in double) or keep a less accurate logit (the torch reference rescores
    in the direct form only candidates within 2^-63 (float) or 2^-100 (double) of the max, plus its error bound).
    Such a candidate's exact weight is then below e^{−(this − 2·the model's error)} of the max's."""
    if dtype == torch.float64:
        return 100.0 * _LN2
    if dtype == torch.float32:
        return 63.0 * _LN2
    return 0.5 * -math.log(torch.finfo(dtype).tiny)


def moment_nats(dtype: torch.dtype) -> float:
    """The torch reference's direct-form window when it accumulates the second moment: a narrow posterior's
    variance comes from candidates tens of nats below the max, so in float32 every weight that does not underflow
    (2^-150) gets a direct-form logit; float64's expanded form is accurate enough beyond 2^-100."""
    return 150.0 * _LN2 if dtype == torch.float32 else kept_nats(dtype)


def logit_floor(dtype: torch.dtype) -> float:
    """The absolute part κ of every backend's logit error (nats): rows of the torch reference whose expanded-form
    error bound is below it keep their expanded-form logits."""
    return 2.0**-46 if dtype == torch.float64 else 2.0**-20


def expanded_error(coef: torch.Tensor, q2: torch.Tensor, y2_max: float, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,) float64 bound (nats) on the error of the torch reference's expanded-form logit
    −coef·(‖q − c‖² − 2⟨q − c, y − c⟩ + ‖y − c‖²) against the exact −coef·‖q̃ − ỹ‖², from the computed ‖q − c‖²
    (``q2``) and max ‖y − c‖² (``y2_max``).

    Each of the three terms is a D-term sum in T (|error| ≤ γ_D of its absolute terms, ⟨q, y⟩'s by Cauchy–Schwarz
    below ‖q‖‖y‖ ≤ (‖q‖² + ‖y‖²)/2), three more roundings add them, and centring q and y in T moves the distance
    by at most 2√d·u·(‖q − c‖ + ‖y − c‖) ≤ 4u·(‖q − c‖² + ‖y − c‖²): in all (2γ_{D+3} + 4u)·(‖q − c‖² + ‖y − c‖²),
    times 1.01 for the rounding of the computed norms themselves.
    """
    u = unit_roundoff(dtype)
    factor = 2.0 * gamma(dim + 3, u) + 4.0 * u
    return coef.to(torch.float64) * factor * (q2.to(torch.float64) + float(y2_max)) * 1.01


def needs_direct(m: torch.Tensor, err: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,) bool: rows whose expanded-form logits (max ``m`` in nats, error bound ``err``) may be off by more than
    EXPANDED_SLACK·γ·M + LOGIT_FLOOR, M the true max logit's magnitude (bounded below from m and err)."""
    m64 = m.to(torch.float64)
    M_low = ((-m64).clamp_min(0.0) - err).clamp_min(0.0) * (1.0 - 4.0 * unit_roundoff(dtype))
    allowed = EXPANDED_SLACK * logit_gamma(dim, dtype) * M_low + logit_floor(dtype)
    return torch.isfinite(m64) & (err > allowed)


def generic_chain(n: int) -> int:
    """Roundings a weight can go through in l and o (and rescaling factors it can be multiplied by) in a softmax
    over ``n`` candidates summed in any order with any number of rescales: a tree of n terms has paths of at most
    n − 1 sums, each with up to two products (the backends with a fixed order state tighter counts:
    ``cpu_backend.accumulation_chain``, ``torch_backend.accumulation_chain``)."""
    return 4 * max(1, int(n)) + 16


def backend_terms(backend: str, precision: str = "exact", dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(K, κ) of ``backend``'s logits: the slack multiple of γ·M and the absolute floor (nats) of the statement
    above. The Triton kernels' GEMM rows are within the precision policy's tolerance of the exact logits (its
    accumulation term is a random-walk model, :mod:`analytic_diffusion.ops.precision`), the other rows direct."""
    floor = logit_floor(dtype)
    if backend == "torch":
        return EXPANDED_SLACK, floor
    if backend == "triton":
        from . import precision as policy

        return 0.0, floor + policy.tolerance(precision)
    return 0.0, floor


@dataclass
class RoundingModel:
    """Per query row, what the working precision's rounding can do in the scans behind a state (module docstring).

    ``coef`` 1/(2σ²T); ``eta`` ≥ ‖x̃ − x‖ + max_j ‖ỹ_j − y_j‖ (the inputs' rounding to the working dtype);
    ``chain`` roundings per weight in the sums (:func:`generic_chain` or a backend's ``accumulation_chain``); ``slack`` K and ``floor`` κ of the logit bound;
    ``values`` ≥ the norm of the largest absolute values the sums add: max_j ‖y_j‖, + 2‖centre‖ where they add
    centred rows and then the centre times l (the torch reference).
    """

    dtype: torch.dtype
    dim: int
    coef: torch.Tensor
    eta: torch.Tensor
    chain: torch.Tensor
    slack: torch.Tensor
    floor: torch.Tensor
    values: torch.Tensor

    def to(self, device: torch.device | str) -> RoundingModel:
        move = [t.to(device) for t in (self.coef, self.eta, self.chain, self.slack, self.floor, self.values)]
        return RoundingModel(self.dtype, self.dim, *move)

    def combine(self, other: RoundingModel) -> RoundingModel:
        """Two states of the same rows combined (shards, the mirrored half): one more rescale-and-add per weight."""
        return RoundingModel(
            self.dtype,
            self.dim,
            torch.maximum(self.coef, other.coef),
            torch.maximum(self.eta, other.eta),
            torch.maximum(self.chain, other.chain) + 6,
            torch.maximum(self.slack, other.slack),
            torch.maximum(self.floor, other.floor),
            torch.maximum(self.values, other.values),
        )

    def _terms(self) -> tuple[float, float, torch.Tensor, torch.Tensor, torch.Tensor]:
        u = unit_roundoff(self.dtype)
        g = logit_gamma(self.dim, self.dtype)
        coef = self.coef.to(torch.float64)
        beta = 2.0 * coef.sqrt() * self.eta * (1.0 + g)
        floor = self.floor + coef * self.eta * self.eta * (1.0 + g)
        a_exp = u * kept_nats(self.dtype) + 5.0 * u * (self.chain + 1.0)  # exp arguments, exp values, rescales
        return u, g, beta, floor, a_exp

    def max_logit(self, m: torch.Tensor) -> torch.Tensor:
        """M⁺ ≥ the exact max logit's magnitude M, from the computed max ``m`` (nats): M ≤ |m̃| + err(M), solved
        for √M (a quadratic); +inf where γ·(1 + K) ≥ 1/2 (no bound)."""
        u, g, beta, floor, _ = self._terms()
        mt = (-m.to(torch.float64)).clamp_min(0.0) * (1.0 + 4.0 * u)  # the reported max's own rounding
        a1 = 1.0 - g * (1.0 + self.slack)
        s = (beta + (beta * beta + 4.0 * a1 * (mt + floor)).sqrt()) / (2.0 * a1)
        return torch.where(a1 > 0.5, s * s, torch.full_like(s, math.inf))

    def logit_error(self, L: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """Bound (nats) on the error of a kept logit of exact magnitude ≤ ``L`` in a row whose max has magnitude
        ≤ ``M``, exp and rescales included."""
        _, g, beta, floor, a_exp = self._terms()
        return g * (L + self.slack * M) + beta * L.clamp_min(0.0).sqrt() + floor + a_exp

    def mean_error(
        self, m: torch.Tensor, l: torch.Tensor, n: torch.Tensor, mean: torch.Tensor, center: torch.Tensor, radius: float
    ) -> torch.Tensor:
        """(B,) float64 bound on ‖m̃ − m_S‖₂: the computed mean ``mean`` of a state (max ``m`` nats, normaliser
        ``l``) over ``n`` candidates against the exact softmax mean over the same candidates, which lie in the ball
        B(``center``, ``radius``). docs/design.md §13 derives it; capped at the trivial R + ‖m̃ − c‖."""
        u, g, beta, floor, a_exp = self._terms()
        n = n.to(torch.float64).clamp_min(1.0)
        C = kept_nats(self.dtype)
        Mp = self.max_logit(m)
        base = floor + self.slack * g * Mp  # the parts of a(L) that do not grow with L

        def a(L: torch.Tensor) -> torch.Tensor:
            return g * L + beta * L.sqrt() + base

        aM = a(Mp)
        # G: candidates whose exact logit is more than G below the max weigh < e^{−T} in all, distortion included:
        # −G + a(M + G) + a_exp ≤ −T − ln n, a quadratic in √(M + G) (ψ decreases beyond it).
        T = 70.0 + torch.log(4.0 * n)
        a2 = 1.0 - g
        sF = (beta + (beta * beta + 4.0 * a2 * (Mp + base + a_exp + T)).sqrt()) / (2.0 * a2)
        G = torch.maximum(sF * sF - Mp, 2.0 * aM + 1.0)
        psi = -G + a(Mp + G) + a_exp
        aN = a(Mp + G)
        aa = aN + a_exp
        w_out = n * torch.exp(-(C - 2.0 * aN)) + n * torch.exp(-G)  # exact weight of dropped and far candidates
        e_out = n * torch.exp(-C * (1.0 - u) + a_exp + aM) + n * torch.exp(psi)  # their computed weight (×e^{m̃−m})
        gc = gamma(self.chain + 4.0, u)  # the sums, the final division
        tail = (1.0 - torch.exp(-a_exp) * (1.0 - gc) / l.to(torch.float64)).clamp(0.0, 1.0)  # computed 1 − ŵ_max
        ea = torch.exp(aa)
        one_minus_w = (tail * ea * (ea + e_out) + w_out).clamp(max=1.0)
        n_tau = 2.0 * one_minus_w * (ea - 1.0 / ea) + 3.0 * w_out * (ea + e_out) + 3.0 * e_out
        tau = (n_tau * ea / (1.0 - w_out)).clamp(max=2.0)
        valid = torch.isfinite(Mp) & torch.isfinite(aa) & torch.isfinite(e_out) & (w_out < 1.0) & (gc < 0.5)
        tau = torch.where(valid, tau, torch.full_like(tau, 2.0))
        mean64 = mean.to(torch.float64)
        dist = (mean64 - center.to(mean64.device)).norm(dim=1)
        inputs = self.eta  # Σ ŵ (ỹ − y)
        sums = torch.where(valid, 2.0 * gc / (1.0 - gc), torch.full_like(gc, math.inf)) * self.values
        sums = sums + 2.0 * u * mean64.norm(dim=1)
        spread = torch.minimum(torch.full_like(dist, 2.0 * radius), radius + dist + inputs + sums + 2.0 * tau * radius)
        err = tau * spread + inputs + sums
        return torch.minimum(err, radius + dist)
