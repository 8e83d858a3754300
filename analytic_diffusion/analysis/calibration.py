"""Calibrate a patch-size schedule: choose k per σ so that a local method matches a reference.

This is Kamb & Ganguli's procedure (docs/methods.md §1.4), made generic over denoiser objects:

* ``reference`` = a denoiser (or a method name): run the reference's own deterministic trajectory (DDIM η = 0
  on the σ grid, which in σ-space is x' = x̂0 + σ'/σ·(x − x̂0)) from each seed. At every step evaluate the
  reference and every candidate method ``make_method(k)`` on the reference's x_t.
* ``reference = "clean"`` (the studio's ``calibrate_scales``, docs/design.md §10.2): probes are held-out clean images
  x0 noised as x = x0 + σ·ε with one fixed ε per seed (and per probe), and the target x̂0 is x0 itself.

metric="cosine" compares scores (x̂0 − x)/σ² by their cosine similarity over the whole image (C·H·W; the 1/σ²
cancels), higher is better; metric="mse" compares x̂0 by mean squared error, lower is better. For each seed
and step the best k is picked (ties go to the smaller k); the table's k at that σ is the median of those picks
over seeds, rounded to the nearest candidate size (ties to the smaller one). With probes, a seed's metric is
the mean over its probes.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Callable, cast

import numpy as np
import torch

from ..denoisers.patch_schedule import PatchSchedule, check_patch_size
from ..grids import Schedule, get_schedule

if TYPE_CHECKING:
    from ..data import Dataset

__all__ = ["METRICS", "calibrate_patch_sizes", "plot_calibration", "split_probes"]

METRICS = ("cosine", "mse")


def split_probes(dataset: Dataset, n_probe: int) -> tuple[Dataset, torch.Tensor, torch.Tensor | None]:
    """(candidates, probes): the first N − n_probe stored images as a Dataset, the last n_probe as float images.

    Probe labels (or None) come third. Flips stay a flag of the candidate set; probes are never mirrored.
    """
    n = dataset.num_stored
    if isinstance(n_probe, bool) or not isinstance(n_probe, int) or not 1 <= n_probe < n:
        raise ValueError(
            f"n_probe: expected an integer in [1, {n - 1}] (the dataset holds {n} images), got {n_probe!r}"
        )
    idx = torch.arange(n - n_probe, n)
    probes = dataset.images_float(idx)
    labels = None if dataset.labels is None else dataset.labels[idx.to(dataset.labels.device)].cpu()
    return dataset.subset(n - n_probe), probes, labels


def _accepts_dataset(fn: Callable[..., Any]) -> bool:
    """Whether make_method takes the dataset: a second required positional parameter, or one named 'dataset'."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return len(required) >= 2 or any(p.name == "dataset" for p in positional[1:])


def _method_factory(
    make_method: Callable[..., Callable[..., torch.Tensor]] | str, method_options: dict[str, Any] | None
) -> tuple[Callable[..., Callable[..., torch.Tensor]], bool, str]:
    """make_method as a callable (k) or (k, dataset), or a method name built with ``patch=k``."""
    if isinstance(make_method, str):
        from ..denoisers import denoiser_options, make_denoiser

        name = make_method
        if "patch" not in denoiser_options(name):
            raise ValueError(f"method {name!r} takes no 'patch' option, so it has no patch size to calibrate")
        return (lambda k, ds: make_denoiser(name, ds, patch=k, **(method_options or {}))), True, name
    if method_options:
        raise ValueError("method_options apply only when make_method is a method name")
    if not callable(make_method):
        raise TypeError(
            f"make_method: expected a callable k -> denoiser or a method name, got {type(make_method).__name__}"
        )
    return make_method, _accepts_dataset(make_method), getattr(make_method, "__name__", "method")


def _reference_denoiser(
    reference: Callable[..., torch.Tensor] | str, dataset: Dataset | None
) -> tuple[Callable[..., torch.Tensor], str]:
    if isinstance(reference, str):
        from ..denoisers import make_denoiser

        return make_denoiser(reference, cast("Dataset", dataset)), reference  # the caller checked it is given
    if not callable(reference):
        raise TypeError(f"reference: expected a denoiser, a method name or 'clean', got {type(reference).__name__}")
    return reference, getattr(reference, "name", None) or type(reference).__name__


def _call(
    den: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    out = den(x, sigma) if labels is None else den(x, sigma, class_labels=labels)
    return out.to(x.dtype)


def _row_metric(metric: str, x0_hat: torch.Tensor, target_x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row metric of x̂0 against the target x̂0, both on the query x (accumulated in float64)."""
    x0_hat, target_x0, x = x0_hat.double(), target_x0.double(), x.double()
    if metric == "mse":
        return (x0_hat - target_x0).pow(2).flatten(1).mean(1)
    a, b = (x0_hat - x).flatten(1), (target_x0 - x).flatten(1)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(a.dtype).tiny)
    return (a * b).sum(1) / den


def _median_size(picks: Sequence[int], sizes: Sequence[int]) -> int:
    m = float(np.median(np.asarray(picks, dtype=np.float64)))
    return min(sizes, key=lambda k: (abs(k - m), k))


def _mode_size(picks: Sequence[int]) -> int:
    vals, counts = np.unique(np.asarray(picks), return_counts=True)
    return int(vals[np.argmax(counts)])  # smallest k among the most frequent


def _seed_list(seeds: int | Sequence[int], seed: int) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"seeds: expected a count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds: expected at least 1 seed, got {seeds}")
        return [seed + i for i in range(seeds)]
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"seeds: expected a non-empty list of non-negative seeds, got {seeds}")
    return seeds


def _labels_for(
    class_labels: torch.Tensor | Sequence[int] | str | None,
    rows: int,
    what: str,
    dataset: Dataset | None,
    seeds: list[int],
    default: torch.Tensor | None,
) -> torch.Tensor | None:
    """None, a tensor/list of one label per row, or 'auto' (trajectories: a random class per seed, drawn from
    that seed; probes: each probe's own label)."""
    if class_labels is None:
        return None
    if isinstance(class_labels, str):
        if class_labels != "auto":
            raise ValueError(f"class_labels: expected None, 'auto' or one label per {what}, got {class_labels!r}")
        if what == "probe":
            if default is None:
                raise ValueError("class_labels='auto': the probes have no labels; pass one label per probe")
            return default
        classes = getattr(dataset, "classes", None)
        if not classes:
            raise ValueError("class_labels='auto': the dataset has no labels")
        return torch.tensor(
            [
                classes[int(torch.randint(len(classes), (1,), generator=torch.Generator().manual_seed(s)))]
                for s in seeds
            ],
            dtype=torch.long,
        )
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() != rows:
        raise ValueError(f"class_labels: expected one label per {what} ({rows}), got {labels.numel()}")
    return labels


@torch.no_grad()
def calibrate_patch_sizes(
    make_method: Callable[..., Callable[..., torch.Tensor]] | str,
    reference: Callable[..., torch.Tensor] | str,
    dataset: Dataset | None = None,
    *,
    candidate_sizes: Sequence[int] | None = None,
    schedule: str | Schedule = "kamb-cosine",
    steps: int = 19,
    schedule_kwargs: dict[str, Any] | None = None,
    seeds: int | Sequence[int] = 8,
    seed: int = 0,
    metric: str = "cosine",
    n_probe: int = 16,
    probe_images: torch.Tensor | None = None,
    class_labels: torch.Tensor | Sequence[int] | str | None = None,
    method_options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    progress: bool = True,
) -> tuple[PatchSchedule, dict[str, Any]]:
    """Choose a patch size per σ so that ``make_method(k)`` best matches ``reference``.

    make_method:     ``k -> denoiser``, or ``(k, dataset) -> denoiser`` (a second required parameter, or one
                     named ``dataset``: given the candidate dataset, the held-out split with
                     reference="clean"), or a method name (built as
                     ``make_denoiser(name, dataset, patch=k, **method_options)``). Denoisers are any callables
                     ``D(x, sigma[, class_labels=]) -> x0_hat``; each k is built once.
    reference:       a denoiser, a method name (built on ``dataset``) or "clean" (see the module docstring).
    dataset:         the training Dataset. With reference="clean" and no ``probe_images``, its last
                     ``n_probe`` stored images are the probes and the candidates are ``dataset.subset(N −
                     n_probe)`` (see :func:`split_probes`); a one-argument make_method must then be built on
                     that subset itself (a method built on the full dataset would hold the probes, which is
                     refused when detectable through its ``dataset`` attribute).
    candidate_sizes: sizes to try (default 3, 5, …, up to the image height); the table is ``odd`` when they
                     all are.
    schedule, steps, schedule_kwargs: the σ grid (a Schedule, or a name for :func:`get_schedule`); every σ > 0
                     of the grid gets one table entry. Default: Kamb's 19-step cosine grid (t = 0.95 … 0.05).
    seeds:           a count (seeds ``seed``, ``seed + 1``, …) or a list. Seed s draws the initial noise (or the
                     probes' ε) from ``torch.Generator().manual_seed(s)``, as :func:`sampling.sample` does.
    metric:          "cosine" (scores, higher is better) or "mse" (x̂0, lower is better).
    class_labels:    None (unconditional), one label per seed (trajectories) or per probe ("clean"), or
                     "auto": a seeded random class per seed, or the probes' own labels.
    batch_size:      rows per denoiser call (default: all seeds, or all seeds × probes, at once).

    Returns (schedule, report). The report is JSON-serialisable: ``sigmas`` (one per step, high → low),
    ``timesteps``, ``candidate_sizes``, ``values[step][j]`` (the metric of candidate j, median over seeds),
    ``values_mean``, ``best_per_seed[step][seed]``, ``sizes`` (the chosen table), ``mode`` (most frequent pick).
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    factory, takes_dataset, method_name = _method_factory(make_method, method_options)
    seed_list = _seed_list(seeds, seed)
    if isinstance(schedule, Schedule):
        if schedule_kwargs:
            raise ValueError("schedule_kwargs cannot be used with a Schedule instance")
        sched = schedule
    else:
        sched = get_schedule(schedule, steps, **(schedule_kwargs or {}))
    sig = sched.sigmas.tolist()
    step_sigmas = list(sig[:-1])
    if any(not s > 0 for s in step_sigmas):
        raise ValueError("schedule: every σ but the last must be > 0")
    clean = isinstance(reference, str) and reference == "clean"

    # ---- probes / candidate set
    probes: torch.Tensor | None
    probe_labels: torch.Tensor | None
    probes = probe_labels = None
    cand_ds = dataset
    if clean:
        if probe_images is not None:
            probes = torch.as_tensor(probe_images)
            if probes.dim() != 4 or not probes.is_floating_point():
                raise ValueError(
                    f"probe_images: expected a float (P, C, H, W) tensor, got {tuple(probes.shape)} {probes.dtype}"
                )
        else:
            if dataset is None:
                raise ValueError("reference='clean' needs probe_images or a dataset to hold out probes from")
            cand_ds, probes, probe_labels = split_probes(dataset, n_probe)
    elif dataset is None and isinstance(reference, str):
        raise ValueError(f"reference={reference!r}: a dataset is needed to build it")

    # ---- shape, device
    if probes is not None:
        shape = tuple(probes.shape[1:])
    elif dataset is not None:
        shape = tuple(dataset.image_shape)
    else:
        shape = tuple(getattr(reference, "image_shape", ()))
        if len(shape) != 3:
            raise ValueError("dataset: needed for the image shape (the reference has no image_shape)")
    if device is None:
        device = getattr(dataset, "device", None) or "cpu"
    device = torch.device(device)
    if candidate_sizes is None:
        candidate_sizes = list(range(3, shape[1] + 1, 2))
    # Even sizes are allowed for methods that take them (PSPC crops); the method itself rejects what it cannot use.
    sizes = sorted(
        {
            check_patch_size(int(k) if isinstance(k, np.integer) else k, "candidate_sizes", odd=False)
            for k in candidate_sizes
        }
    )
    if not sizes:
        raise ValueError("candidate_sizes: give at least one size")

    # ---- denoisers
    methods: dict[int, Callable[..., torch.Tensor]] = {}
    for k in sizes:
        den = factory(k, cand_ds) if takes_dataset else factory(k)
        if clean and probe_images is None and dataset is not None and getattr(den, "dataset", None) is dataset:
            raise ValueError(
                "reference='clean' holds out the dataset's last n_probe images as probes, but "
                "make_method(k) built its denoiser on the full dataset; accept a second "
                "argument (k, dataset) or build it on split_probes(dataset, n_probe)[0]"
            )
        methods[k] = den
    ref_den, ref_name = (None, "clean") if clean else _reference_denoiser(reference, dataset)

    # ---- rows: seeds (trajectories) or seeds × probes
    S = len(seed_list)
    if clean:
        probes = cast(torch.Tensor, probes)  # clean: probe_images or split_probes set them
        P = probes.shape[0]
        labels = _labels_for(class_labels, P, "probe", dataset, seed_list, probe_labels)
        x0_rows = probes.to(device=device, dtype=dtype).repeat(S, 1, 1, 1)
        eps = torch.cat([torch.randn((P, *shape), generator=torch.Generator().manual_seed(s)) for s in seed_list]).to(
            device=device, dtype=dtype
        )
        row_labels = None if labels is None else labels.repeat(S).to(device)
    else:
        P = 1
        labels = _labels_for(class_labels, S, "seed", dataset, seed_list, None)
        row_labels = None if labels is None else labels.to(device)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seed_list])
        x = x.to(device=device, dtype=dtype) * sched.init_sigma
    rows = S * P
    bs = rows if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size!r}")

    def run(den: Callable[..., torch.Tensor], xq: torch.Tensor, s_rows: torch.Tensor) -> torch.Tensor:
        outs = []
        for a in range(0, rows, bs):
            lab = None if row_labels is None else row_labels[a : a + bs]
            outs.append(_call(den, xq[a : a + bs], s_rows[a : a + bs], lab))
        return torch.cat(outs)

    values = torch.empty(len(step_sigmas), len(sizes), S, dtype=torch.float64)
    iterator: Iterable[int] = range(len(step_sigmas))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"calibrating {method_name}", leave=False)
    for i in iterator:
        s = step_sigmas[i]
        s_rows = torch.full((rows,), s, device=device, dtype=dtype)
        if clean:
            xq = x0_rows + s * eps
            target = x0_rows
        else:
            xq = x
            target = run(cast("Callable[..., torch.Tensor]", ref_den), xq, s_rows)  # set unless clean
        for j, k in enumerate(sizes):
            m = _row_metric(metric, run(methods[k], xq, s_rows), target, xq)
            values[i, j] = m.double().reshape(S, P).mean(1).cpu()
        if not clean:  # DDIM η = 0 along the reference's own trajectory
            s_next = sig[i + 1]
            x = target + (s_next / s) * (x - target)

    if not bool(torch.isfinite(values).all()):
        raise ValueError("calibration: a candidate or the reference produced NaN/Inf values")
    best = values.argmax(1) if metric == "cosine" else values.argmin(1)  # (steps, S); ties -> smaller k
    picks = [[sizes[int(j)] for j in row] for row in best]
    chosen = [_median_size(p, sizes) for p in picks]
    table = PatchSchedule(
        chosen,
        step_sigmas,
        name=name or f"calibrated-{method_name}-vs-{ref_name}-{metric}",
        odd=all(k % 2 for k in sizes),
    )
    report = {
        "method": method_name,
        "reference": ref_name,
        "metric": metric,
        "higher_is_better": metric == "cosine",
        "schedule": sched.name,
        "schedule_kind": sched.kind,
        "sigmas": step_sigmas,
        "timesteps": None if sched.timesteps is None else [float(t) for t in sched.timesteps.tolist()],
        "candidate_sizes": sizes,
        "seeds": seed_list,
        "n_probe": P if clean else None,
        "class_labels": None if labels is None else labels.tolist(),
        "values": values.quantile(0.5, dim=2).tolist(),
        "values_mean": values.mean(2).tolist(),
        "best_per_seed": picks,
        "sizes": chosen,
        "mode": [_mode_size(p) for p in picks],
    }
    return table, report


def plot_calibration(report: dict[str, Any], path: str | os.PathLike[str], size: tuple[int, int] = (1200, 500)) -> None:
    """A PNG of a calibration ``report``: left, the chosen k (line) and every seed's pick (dots) against σ (log
    axis); right, the metric of each candidate k per step (rows: σ in sampling order; columns: k), scaled per
    row, bright = better, the chosen k framed (drawn by viz.plots.calibration_plot)."""
    from ..viz.plots import calibration_plot

    calibration_plot(
        path,
        report["sigmas"],
        report["candidate_sizes"],
        report["sizes"],
        report["best_per_seed"],
        report["values"],
        higher_is_better=report.get("higher_is_better", True),
        metric=report["metric"],
        title=f"{report['method']} vs {report['reference']}: patch size "
        f"per σ ({report['metric']}, {len(report['seeds'])} seeds)",
        size=size,
    )
