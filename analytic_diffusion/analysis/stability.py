"""Training-set stability: do two networks trained on disjoint halves of a dataset generate the same images?

Kadkhodaie et al. (arXiv 2310.02557) train two copies of a network on disjoint training sets of size N and sample
both from the same noise. Small N: each copies its own training set, so the two samples differ. Large N: both
generalise and their samples nearly coincide, so the network's output no longer depends on which images it saw.
The optimal denoisers of the two halves are the reference that never generalises: they copy different images
at every N. :func:`training_set_stability` runs both comparisons per N, from one seeded permutation (half A is
its first N images, half B the next N, so the halves are disjoint and nested across sizes).

Per N it records the per-sample Pearson r and RMS distance between the A and B samples, for the networks and for
the optimal denoisers, and the networks' memorisation ratio against their own halves.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..data import Dataset
from ..denoisers import make_denoiser
from ..metrics import memorization, pearson_r
from ..networks.train import train_network
from ..sampling.generate import sample

__all__ = ["disjoint_halves", "training_set_stability"]


def disjoint_halves(dataset: Dataset, n: int, *, seed: int = 0) -> list[Dataset]:
    """Two disjoint subsets of ``n`` images each: the first and second n of one permutation seeded by ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    if 2 * n > dataset.num_stored:
        raise ValueError(f"n: two disjoint halves of {n} need {2 * n} images; the dataset has {dataset.num_stored}")
    perm = torch.randperm(dataset.num_stored, generator=torch.Generator().manual_seed(int(seed)))
    halves = []
    for name, idx in (("A", perm[:n]), ("B", perm[n : 2 * n])):
        idx = idx.sort().values.to(dataset.images.device)
        labels = None if dataset.labels is None else dataset.labels[idx]
        halves.append(
            Dataset.from_array(
                dataset.images[idx],
                labels,
                source=f"{dataset.source} half {name} ({n} of seed {seed})",
                device=dataset.images.device,
            )
        )
    return halves


def _pair_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    r = pearson_r(a.double(), b.double())
    d = (a.double() - b.double()).flatten(1).norm(dim=1)
    return {
        "pearson_r": r.tolist(),
        "distance": d.tolist(),
        "pearson_r_median": float(r.median()),
        "distance_median": float(d.median()),
    }


def training_set_stability(
    dataset: Dataset,
    sizes: Sequence[int] = (8, 64, 512),
    *,
    steps: int = 2000,
    n_samples: int = 16,
    sample_steps: int = 18,
    sampler: str = "heun",
    sample_seed: int = 0,
    seed: int = 0,
    arch: str = "resnet",
    train_kwargs: dict[str, Any] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """For each N in ``sizes``: train on halves A and B (same architecture, same initial weights and batch seed,
    so the data are the only difference), sample both networks and both halves' optimal denoisers from seeds
    ``sample_seed`` …, and compare A with B. Writes metrics.json, stability.png and samples_N.png to ``out_dir``
    when given. Returns {"sizes": {N: {"network": stats, "optimal": stats, "memorization": {"A", "B"},
    "train_seconds"}}, "config": ...}; stats hold per-sample lists and medians of Pearson r and distance."""
    sizes = [int(v) for v in sizes]
    if not sizes or any(v < 1 for v in sizes):
        raise ValueError(f"sizes: expected positive integers, got {list(sizes)}")
    if 2 * max(sizes) > dataset.num_stored:
        raise ValueError(
            f"sizes: the largest size {max(sizes)} needs {2 * max(sizes)} images for two disjoint "
            f"halves; the dataset has {dataset.num_stored}"
        )
    train_kwargs = dict(train_kwargs or {})
    reserved = {"arch", "steps", "seed", "out_dir", "progress", "device"} & set(train_kwargs)
    if reserved:
        raise ValueError(f"train_kwargs: {sorted(reserved)} are set by training_set_stability itself")
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    kw: dict[str, Any] = dict(steps=sample_steps, sampler=sampler, seed=sample_seed, progress=False)
    result: dict[str, Any] = {
        "sizes": {},
        "config": {
            "dataset": repr(dataset),
            "sizes": sizes,
            "steps": steps,
            "arch": arch,
            "n_samples": n_samples,
            "sample_steps": sample_steps,
            "sampler": sampler,
            "sample_seed": sample_seed,
            "seed": seed,
            "train_kwargs": train_kwargs,
        },
    }
    grids: dict[int, torch.Tensor] = {}
    for n in sizes:
        half_a, half_b = disjoint_halves(dataset, n, seed=seed)
        t0 = time.perf_counter()
        nets = [
            train_network(
                h, arch=arch, steps=steps, seed=seed, device=device, progress=progress, **train_kwargs
            ).denoiser
            for h in (half_a, half_b)
        ]
        train_s = time.perf_counter() - t0
        net_samples = [sample(net, n_samples, **kw).samples for net in nets]
        opt_samples = [sample(make_denoiser("optimal", h), n_samples, **kw).samples for h in (half_a, half_b)]
        mem = {name: memorization(s, h).share for name, s, h in zip("AB", net_samples, (half_a, half_b))}
        result["sizes"][str(n)] = {
            "network": _pair_stats(*net_samples),
            "optimal": _pair_stats(*opt_samples),
            "memorization": mem,
            "train_seconds": train_s,
        }
        grids[n] = torch.cat(net_samples + opt_samples)
    if out_dir is not None:
        _write(out_dir, result, grids, n_samples)
    return result


def _write(
    out_dir: str | os.PathLike[str], result: dict[str, Any], grids: dict[int, torch.Tensor], n_samples: int
) -> None:
    from ..viz.images import save_grid
    from ..viz.plots import line_plot

    sizes = [int(k) for k in result["sizes"]]
    med = lambda kind, key: [result["sizes"][str(n)][kind][key] for n in sizes]  # noqa: E731
    line_plot(
        os.path.join(out_dir, "stability.png"),
        sizes,
        {"networks A vs B": med("network", "pearson_r_median"), "optimal A vs B": med("optimal", "pearson_r_median")},
        xlabel="training images per half N",
        ylabel="median Pearson r of A and B samples",
        title="training-set stability (disjoint halves)",
        logx=True,
    )
    for n, g in grids.items():  # rows: network A, network B, optimal A, optimal B
        save_grid(os.path.join(out_dir, f"samples_{n}.png"), g, nrow=n_samples)
    result["plots"] = ["stability.png"] + [f"samples_{n}.png" for n in grids]
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
