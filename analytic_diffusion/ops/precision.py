"""Precision policy of the fused global kernels: modes, their logit error bounds per row, and the fallback rule.

Modes (``precision=``):

* ``exact`` (default): distances in the direct form Σ (q − y)² in fp32 (split-N kernel), or expanded-form
  GEMMs with IEEE fp32 dots only for rows whose bound below is under ``EXACT_TOLERANCE``.
* ``tf32``: expanded-form GEMMs with tf32 operands (10 mantissa bits; keys that are 8-bit integers are exact).
* ``bf16``: expanded-form GEMMs in bf16 with uint8 keys (exact in bf16) and the query split into a bf16
  hi + lo pair (two MMAs), so only the query's residual rounding, ≤ 2^-14 |q| even with truncation, remains.
  The weights of the second GEMM are split the same way.

Error bound of a logit in nats for query row b (z_bj = 2·coef_b·scale·⟨q_b, u_j⟩ − coef_b·n_j + const_b, with u
the raw key values, q centred on the dataset mean):

    E_b = coef_b · [ 2·scale·(u_op + 4·√D·u32) · G_b  +  4·u32·(2·scale·G_b + n_max) ],
    G_b = Σ_d |q_bd| · U_d,   U_d = max_j |u_jd|

The operand term u_op·G_b is rigorous (each product's relative error is at most u_op); the accumulation term
models fp32 rounding errors as independent (4 standard deviations of a √D random walk; the worst case D·u32 is
never approached by MMA's blocked sums); the last term covers rounding the final fp32 sum. The tests check the
bound against the float64 logits on random data and MNIST at σ from 1e-3 to 1e3.

A logit error δ scales each weight by at most e^{±δ}, so the posterior mean moves by at most (e^{2δ} − 1)·max‖y‖;
rows whose bound exceeds the mode's tolerance fall back to the next more precise path (bf16/tf32 → IEEE fp32 →
direct form), so every mode keeps its stated accuracy at every σ: at low noise most rows fall back.
"""

from __future__ import annotations

import math

import torch

MODES = ("exact", "tf32", "bf16")
U32 = 2.0**-24
# Operand unit roundoff per dot kind (truncation-safe: tensor cores may truncate instead of rounding).
OPERAND_ROUNDOFF = {"ieee": 0.0, "tf32": 2.0**-10, "bf16x2": 2.0**-14}
# Largest logit error (nats) each mode accepts before a row falls back to a more precise path.
EXACT_TOLERANCE = 1e-5
FAST_TOLERANCE = 1e-2
# The second GEMM's weights: relative error of p per mode (the mean moves by at most this times max‖y‖).
WEIGHT_ROUNDOFF = {"ieee": 0.0, "tf32": 2.0**-10, "bf16x2": 2.0**-14}


def check_mode(precision: str) -> str:
    if precision not in MODES:
        raise ValueError(f"precision: expected one of {', '.join(MODES)}, got {precision!r}")
    return precision


def dot_kinds(precision: str) -> tuple[str, ...]:
    """The expanded-form dot kinds a mode may use, fastest first (the direct form is the final fallback)."""
    return {"exact": ("ieee",), "tf32": ("tf32", "ieee"), "bf16": ("bf16x2", "ieee")}[check_mode(precision)]


def tolerance(precision: str, max_logit_error: float | None = None) -> float:
    if max_logit_error is not None:
        if not max_logit_error > 0:
            raise ValueError(f"max_logit_error: expected > 0 nats, got {max_logit_error}")
        return float(max_logit_error)
    return EXACT_TOLERANCE if check_mode(precision) == "exact" else FAST_TOLERANCE


def logit_error_bound(
    coef: torch.Tensor, q_centred: torch.Tensor, key_absmax: torch.Tensor, scale: float, key_norm_max: float, kind: str
) -> torch.Tensor:
    """E_b in nats for each query row (see the module docstring); float64 (B,)."""
    q = q_centred.to(torch.float64)
    g = (q.abs() * key_absmax.to(torch.float64, copy=False).to(q.device)).sum(1)
    d = q.shape[1]
    u_op = OPERAND_ROUNDOFF[kind]
    c = coef.to(torch.float64)
    return c * (2.0 * scale * (u_op + 4.0 * math.sqrt(d) * U32) * g + 4.0 * U32 * (2.0 * scale * g + key_norm_max))
