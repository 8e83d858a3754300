"""Agreement between denoisers along the sampling process: single-step and trajectory comparisons.

* :func:`single_step`: every denoiser and the reference see the *same* noisy inputs x0 + σε; per σ, the MSE and
  r² of x̂0 against the reference's x̂0 and the cosine of the scores (x̂0 − x)/σ².
* :func:`trajectories`: each model samples its own trajectory from the same seeds. Per step, the method's x̂0 is
  compared with the reference's x̂0 at the same step on the reference's own trajectory ("trajectory"), and with
  the reference evaluated on the method's own x_t ("single"); the final samples are compared by Pearson r per
  seed (and its median).

The per-sample measures (mse, r2, pearson_r, score_cosine) are in :mod:`analytic_diffusion.metrics.agreement`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, cast

import torch
from tqdm.auto import tqdm

from ..grids import Schedule
from ..metrics.agreement import _score, mse, pearson_r, r2, score_cosine, seed_list
from ..sampling.generate import sample

__all__ = ["single_step", "trajectories"]


def _call(
    den: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int | None,
) -> torch.Tensor:
    """D(x, σ) in batches; output on CPU float64."""
    outs = []
    step = x.shape[0] if batch_size is None else batch_size
    for s in range(0, x.shape[0], step):
        kw = {} if labels is None else {"class_labels": labels[s : s + step]}
        out = den(x[s : s + step], sigma[s : s + step], **kw)
        outs.append(out.detach().to("cpu", torch.float64))
    return torch.cat(outs)


def _device_of(den: object, default: str = "cpu") -> torch.device:
    return torch.device(getattr(den, "device", None) or default)


def _check_models(denoisers: Mapping[str, Callable[..., torch.Tensor]], reference: Callable[..., torch.Tensor]) -> None:
    if not isinstance(denoisers, dict) or not denoisers:
        raise ValueError("denoisers: expected a non-empty dict name -> denoiser")
    for name, d in list(denoisers.items()) + [("reference", reference)]:
        if not callable(d):
            raise TypeError(f"denoiser {name!r} is not callable")


# ----------------------------------------------------------------------------------------- single step
def single_step(
    denoisers: Mapping[str, Callable[..., torch.Tensor]],
    reference: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    seed: int = 0,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, Any]:
    """Every denoiser and the reference on the same noisy inputs x0 + σ·ε, for each σ in ``sigmas``.

    ε is drawn once per σ (in the order of ``sigmas``) from a CPU generator seeded with ``seed`` and shared by
    all models. Inputs are cast to ``dtype`` and moved to each model's ``device`` attribute (CPU otherwise).

    Returns {"sigmas": [S], "n": n, "seed": seed, "methods": {name: {"mse", "r2", "score_cosine": (S,) means over
    the n images, "mse_per_sample", "r2_per_sample", "score_cosine_per_sample": (S, n)}}}. r² uses the
    reference's variance (the reference is `ref` in :func:`r2`).
    """
    _check_models(denoisers, reference)
    if not torch.is_tensor(x0) or x0.dim() != 4:
        raise ValueError(f"x0: expected clean images (n, C, H, W), got {getattr(x0, 'shape', type(x0))}")
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
    if sig.numel() < 1 or not bool(torch.isfinite(sig).all()) or bool((sig <= 0).any()):
        raise ValueError(f"sigmas: expected finite values > 0, got {sig.tolist()}")
    n = x0.shape[0]
    labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    x0c = x0.detach().to("cpu", torch.float64)
    per: dict[str, dict[str, list[torch.Tensor]]] = {
        name: {"mse": [], "r2": [], "score_cosine": []} for name in denoisers
    }
    for s in tqdm(sig.tolist(), desc="single-step σ", disable=not progress, leave=False):
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(torch.float64)
        x = x0c + s * eps
        srow = torch.full((n,), s, dtype=torch.float64)

        def run(den: Callable[..., torch.Tensor]) -> torch.Tensor:
            dev = _device_of(den)
            lab = None if labels is None else labels.to(dev)
            return _call(den, x.to(dev, dtype), srow.to(dev, dtype), lab, batch_size)

        ref_out = run(reference)
        ref_score = _score(ref_out, x, srow)
        for name, den in denoisers.items():
            out = run(den)
            per[name]["mse"].append(mse(out, ref_out))
            per[name]["r2"].append(r2(out, ref_out))
            per[name]["score_cosine"].append(score_cosine(_score(out, x, srow), ref_score))
    methods: dict[str, dict[str, torch.Tensor]] = {}
    for name, d in per.items():
        entry = {}
        for key, rows in d.items():
            t = torch.stack(rows)  # (S, n)
            entry[key] = t.mean(1)
            entry[key + "_per_sample"] = t
        methods[name] = entry
    return {"sigmas": sig, "n": n, "seed": int(seed), "methods": methods}


# ----------------------------------------------------------------------------------------- trajectories
def _runs(seeds: list[int]) -> list[tuple[int, ...]]:
    """Split seeds into maximal runs of consecutive integers: [(first, count), ...]."""
    out: list[list[int]] = []
    for s in seeds:
        if out and s == out[-1][0] + out[-1][1]:
            out[-1][1] += 1
        else:
            out.append([s, 1])
    return [tuple(r) for r in out]


def _trajectory(
    den: Callable[..., torch.Tensor],
    seeds: list[int],
    *,
    steps: int,
    sampler: str,
    schedule: str | Schedule,
    schedule_kwargs: dict[str, Any] | None,
    shape: Sequence[int] | None,
    class_labels: torch.Tensor | None,
    batch_size: int | None,
    eta: float,
    clip_x0: bool,
    dtype: torch.dtype,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Sample from ``seeds`` recording x, σ and x̂0 at every step: (samples (n,...), xs, x0s (steps, n, ...), σ)."""
    chunks = []
    elapsed = 0.0
    offset = 0
    sigmas: torch.Tensor | None = None
    for first, count in _runs(seeds):
        rec: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

        def callback(
            step: int,
            x: torch.Tensor,
            sigma: torch.Tensor,
            x0_hat: torch.Tensor,
            rec: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = rec,
        ) -> None:
            rec.setdefault(step, []).append(
                (
                    x.detach().to("cpu", torch.float32),
                    sigma.detach().to("cpu", torch.float64),
                    x0_hat.detach().to("cpu", torch.float32),
                )
            )

        labels = None if class_labels is None else class_labels[offset : offset + count]
        res = sample(
            den,
            count,
            steps=steps,
            sampler=sampler,
            schedule=schedule,
            schedule_kwargs=schedule_kwargs,
            seed=first,
            shape=shape,
            batch_size=batch_size,
            eta=eta,
            clip_x0=clip_x0,
            class_labels=labels,
            callback=callback,
            dtype=dtype,
            progress=progress,
        )
        elapsed += res.elapsed_s
        sigmas = res.sigmas
        keys = sorted(rec)
        xs = torch.stack([torch.cat([r[0] for r in rec[k]]) for k in keys])
        sg = torch.stack([torch.cat([r[1] for r in rec[k]]) for k in keys])
        x0s = torch.stack([torch.cat([r[2] for r in rec[k]]) for k in keys])
        chunks.append((res.samples.to(torch.float32), xs, sg, x0s))
        offset += count
    samples = torch.cat([c[0] for c in chunks])
    xs = torch.cat([c[1] for c in chunks], 1)
    sg = torch.cat([c[2] for c in chunks], 1)
    x0s = torch.cat([c[3] for c in chunks], 1)
    return samples, xs, sg, x0s, cast(torch.Tensor, sigmas), elapsed  # seeds is never empty (seed_list)


def trajectories(
    denoisers: Mapping[str, Callable[..., torch.Tensor]],
    reference: Callable[..., torch.Tensor],
    n: int | None = None,
    steps: int = 19,
    sampler: str = "ddim",
    schedule: str | Schedule = "kamb-cosine",
    seeds: int | Iterable[int] = 0,
    *,
    schedule_kwargs: dict[str, Any] | None = None,
    shape: Sequence[int] | None = None,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    batch_size: int | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, Any]:
    """Each model samples its own trajectory from the same seeds (sample i: seed i, as in :func:`sample`).

    seeds: an explicit list of seeds, or an int = the first seed of ``n`` consecutive ones (then ``n`` is
    required). Stochastic samplers (ddpm, ddim with eta > 0) draw their noise per sample from the same seeded
    generator, so every model sees the same noise sequence. Per step j (σ_j of the sampler's grid) and method m:

    * "trajectory": x̂0 of m on its own trajectory vs x̂0 of the reference on the reference's trajectory
      (both from the same seed): MSE and r² (reference variance), averaged over seeds;
    * "single": m's x̂0 vs the reference evaluated on m's own x_t at σ_j: MSE and r²;
    * "final": the final samples vs the reference's, Pearson r per seed, its median, and MSE / r².

    Returns {"sigmas": (steps,) σ evaluated at each step, "grid": the full σ grid, "seeds": [...],
    "reference": {"samples", "seconds"}, "methods": {name: {"trajectory": {"mse", "r2"}, "single": {"mse",
    "r2"}, "final": {"pearson_r", "pearson_r_median", "pearson_r_mean", "mse", "r2"}, "samples", "seconds"}}}.
    ``samples`` are (n, C, H, W) float32 tensors (drop them with ``to_jsonable(result, skip=("samples",))``).
    """
    _check_models(denoisers, reference)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if n is None:
            raise ValueError("trajectories: give n (the number of seeds) with a first seed, or a list of seeds")
        seed_values = seed_list(n, first=seeds)
    else:
        seed_values = seed_list(seeds, n)
    labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels is not None and labels.numel() != len(seed_values):
        raise ValueError(f"class_labels: expected {len(seed_values)} labels, got {labels.numel()}")
    kw: dict[str, Any] = dict(
        steps=steps,
        sampler=sampler,
        schedule=schedule,
        schedule_kwargs=schedule_kwargs,
        shape=shape,
        class_labels=labels,
        batch_size=batch_size,
        eta=eta,
        clip_x0=clip_x0,
        dtype=dtype,
        progress=progress,
    )
    bar = tqdm(total=len(denoisers) + 1, desc="trajectories", disable=not progress, leave=False)
    bar.set_postfix_str("reference")
    r_samples, _r_xs, r_sg, r_x0s, grid, r_sec = _trajectory(reference, seed_values, **kw)
    bar.update(1)
    step_sigmas = r_sg[:, 0].clone()
    methods: dict[str, Any] = {}
    for name, den in denoisers.items():
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        m_samples, m_xs, m_sg, m_x0s, _, m_sec = _trajectory(den, seed_values, **kw)
        traj_mse = torch.stack([mse(m_x0s[j], r_x0s[j]).mean() for j in range(m_x0s.shape[0])])
        traj_r2 = torch.stack([r2(m_x0s[j], r_x0s[j]).mean() for j in range(m_x0s.shape[0])])
        single_mse, single_r2 = [], []
        dev = _device_of(reference)
        for j in range(m_xs.shape[0]):
            # Same batches as the sampling runs, so that a model compared with itself agrees bit for bit.
            parts, start = [], 0
            for _, count in _runs(seed_values):
                sl = slice(start, start + count)
                parts.append(
                    _call(
                        reference,
                        m_xs[j, sl].to(dev, dtype),
                        m_sg[j, sl].to(dev, dtype),
                        None if labels is None else labels[sl].to(dev),
                        batch_size,
                    )
                )
                start += count
            ref_on_m = torch.cat(parts)
            single_mse.append(mse(m_x0s[j], ref_on_m).mean())
            single_r2.append(r2(m_x0s[j], ref_on_m).mean())
        pr = pearson_r(m_samples, r_samples)
        methods[name] = {
            "trajectory": {"mse": traj_mse, "r2": traj_r2},
            "single": {"mse": torch.stack(single_mse), "r2": torch.stack(single_r2)},
            "final": {
                "pearson_r": pr,
                "pearson_r_median": float(pr.median()),
                "pearson_r_mean": float(pr.mean()),
                "mse": float(mse(m_samples, r_samples).mean()),
                "r2": float(r2(m_samples, r_samples).mean()),
            },
            "samples": m_samples,
            "seconds": m_sec,
            "total_seconds": time.perf_counter() - t0,
        }
        bar.update(1)
    bar.close()
    return {
        "sigmas": step_sigmas,
        "grid": grid,
        "seeds": seed_values,
        "steps": int(step_sigmas.numel()),
        "sampler": sampler,
        "schedule": schedule if isinstance(schedule, str) else schedule.name,
        "reference": {"samples": r_samples, "seconds": r_sec},
        "methods": methods,
    }
