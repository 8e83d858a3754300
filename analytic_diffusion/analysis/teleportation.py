"""How many sampling steps does analytic teleportation save? (Wang & Vastola, arXiv 2303.02984.)

For each σ_skip the full run (all ``steps`` of the grid) is compared sample by sample with two runs that call the
denoiser equally often: the teleported run (exact Gaussian flow down to σ_skip, then the rest of the same grid) and
a plain run on a coarser grid with as many steps as the teleported run has left. Agreement with the full run is the
per-sample Pearson r and the RMS difference of the final samples, so "steps saved at equal agreement" reads off the
table: the largest share of steps skipped whose teleported agreement still reaches ``r_min``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..metrics.agreement import pearson_r
from ..sampling.generate import sample
from ..sampling.teleport import sample_teleported

if TYPE_CHECKING:
    from ..denoisers import Wiener

__all__ = ["teleportation_study"]


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    r = pearson_r(a.double(), b.double())
    rms = (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()
    return {"pearson_r": float(r.mean()), "pearson_r_min": float(r.min()), "rms": float(rms.mean())}


def teleportation_study(
    denoiser: Callable[..., torch.Tensor],
    gaussian: Wiener,
    n: int = 8,
    *,
    steps: int = 18,
    sigma_skips: Sequence[float] = (20.0, 10.0, 5.0, 2.0, 1.0),
    sampler: str = "heun",
    schedule: str = "karras",
    schedule_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    r_min: float = 0.99,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Full run vs teleported runs vs equally cheap plain runs, one row per σ_skip (see the module docstring).

    Returns {"rows": [{sigma_skip, steps_skipped, fraction_skipped, evaluations, teleported: {pearson_r,
    pearson_r_min, rms}, plain: {...}}], "steps_saved": the largest steps_skipped whose teleported mean r ≥ r_min
    (0 if none), "fraction_saved", "full": the full run's config, "samples": {"full": tensor, σ_skip: tensor}}.
    Evaluations count denoiser calls (Heun: 2 per step but 1 on the last step to σ = 0).
    """
    if not 0 < float(r_min) <= 1:
        raise ValueError(f"r_min: expected a correlation in (0, 1], got {r_min!r}")
    kw: dict[str, Any] = dict(sampler=sampler, seed=seed, batch_size=batch_size, progress=progress)
    full = sample(denoiser, n, steps=steps, schedule=schedule, schedule_kwargs=schedule_kwargs, **kw)

    def evaluations(grid: torch.Tensor) -> int:
        k = len(grid) - 1
        return 2 * k - int(float(grid[-1]) == 0.0) if sampler == "heun" else k

    full_evaluations = evaluations(full.sigmas)

    rows: list[dict[str, Any]] = []
    samples: dict[str | float, torch.Tensor] = {"full": full.samples}
    for s in sorted({float(v) for v in sigma_skips}, reverse=True):
        tele = sample_teleported(
            denoiser, gaussian, n, sigma_skip=s, steps=steps, schedule=schedule, schedule_kwargs=schedule_kwargs, **kw
        )
        skipped = tele.config["steps_skipped"]
        left = steps - skipped
        plain = (
            sample(denoiser, n, steps=left, schedule=schedule, schedule_kwargs=schedule_kwargs, **kw)
            if left < steps
            else full
        )
        samples[s] = tele.samples
        rows.append(
            {
                "sigma_skip": s,
                "steps_skipped": skipped,
                "fraction_skipped": skipped / steps,
                "evaluations": evaluations(tele.sigmas),
                "full_evaluations": full_evaluations,
                "teleported": _agreement(tele.samples, full.samples),
                "plain": _agreement(plain.samples, full.samples),
            }
        )
    good = [r["steps_skipped"] for r in rows if r["teleported"]["pearson_r"] >= r_min]
    saved = max(good, default=0)
    return {
        "rows": rows,
        "steps_saved": saved,
        "fraction_saved": saved / steps,
        "r_min": float(r_min),
        "full": full.config,
        "samples": samples,
    }
