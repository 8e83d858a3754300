"""Training dynamics of memorisation: when does a network trained on N images start copying them?

Marion & Wu (2026; docs/methods.md §8) report that the training time to memorise grows about linearly with the
training-set size N. :func:`training_dynamics` measures this with the built-in networks: for each N it trains
:func:`~analytic_diffusion.networks.train.train_network` on a seeded random subset, keeps checkpoints along the way,
and at every checkpoint (EMA weights, as :func:`~analytic_diffusion.networks.train.load_network` loads them):

* samples ``n_samples`` images from fixed seeds (``sample_seed``, ``sample_seed + 1``, ...; the same noise for
  every checkpoint and every N) with the EDM Heun sampler on the Karras grid;
* the memorisation ratio of those samples against the subset (the share with NN1/NN2 < 1/3, docs/methods.md §9a),
  the median L2 distance to the nearest subset image and the median NN1/NN2 ratio;
* the single-step agreement with the exact ``optimal`` denoiser of the same subset: both models denoise the same
  x0 + σ·ε (ε seeded, shared) at each σ in ``sigmas`` (default 0.5, 1, 2) and we record r² (variance-normalised
  by the optimal denoiser's output, :func:`~analytic_diffusion.metrics.agreement.r2`) and MSE of x̂0. The x0 are
  ``n_probe`` **held-out** images (the last ones of the same seeded permutation that draws the subsets, so they
  lie outside every subset) when the dataset has room for them, otherwise the first ``n_probe`` subset
  (training) images; ``probe`` forces one or the other and metrics.json says which was used. On held-out inputs
  the optimal denoiser snaps towards the nearest training image, so a high r² there is a signature of
  memorisation, not just of good denoising.

The memorisation onset of a size is the first checkpoint step whose memorisation ratio is ≥ ``onset_threshold``
(0.5), or None if no checkpoint reaches it (:func:`memorization_onset`).

Subsets: ``dataset.subset(N, random=True, seed=seed)`` for every N, i.e. prefixes of one seeded permutation, so
the subsets are nested (the 64-image set is inside the 256-image set).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..data import Dataset

__all__ = ["DEFAULT_SIGMAS", "ONSET_THRESHOLD", "memorization_onset", "training_dynamics"]

ONSET_THRESHOLD = 0.5
DEFAULT_SIGMAS = (0.5, 1.0, 2.0)
_RESERVED = {"arch", "steps", "seed", "out_dir", "checkpoint_every", "callback", "progress"}


def memorization_onset(
    steps: Sequence[int], ratios: Sequence[float | None], threshold: float = ONSET_THRESHOLD
) -> int | None:
    """The first step (in the order given, which must be increasing) whose ratio is >= threshold; None if none.

    Non-finite ratios (NaN) never count as an onset.
    """
    steps, ratios = list(steps), list(ratios)
    if len(steps) != len(ratios):
        raise ValueError(f"memorization_onset: {len(steps)} steps for {len(ratios)} ratios")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"memorization_onset: steps must be strictly increasing, got {steps}")
    for s, r in zip(steps, ratios):
        if r is not None and math.isfinite(float(r)) and float(r) >= threshold:
            return int(s)
    return None


def _int_at_least(name: str, v: int, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def _check_sizes(sizes: Iterable[int], available: int) -> list[int]:
    try:
        sizes = list(sizes)
    except TypeError:
        raise ValueError(f"sizes: expected a sequence of training-set sizes, got {sizes!r}") from None
    if not sizes:
        raise ValueError("sizes: give at least one training-set size")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(
                f"sizes: every size must be an integer >= 2 (the memorisation ratio needs a nearest "
                f"and a second-nearest image), got {n!r}"
            )
        if n > available:
            raise ValueError(f"sizes: {n} is larger than the dataset ({available} images)")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes: duplicate sizes in {sizes}")
    return sorted(sizes)


def _checkpoint_steps(steps: int, every: int) -> list[int]:
    """The steps train_network saves at: every ``every`` steps before the end, then the final step."""
    return list(range(every, steps, every)) + [steps]


def _as_dataset(dataset: Dataset | torch.Tensor) -> Dataset:
    from ..data import Dataset

    if isinstance(dataset, Dataset):
        return dataset
    if torch.is_tensor(dataset):
        return Dataset.from_array(dataset)
    raise TypeError(
        f"dataset: expected an analytic_diffusion Dataset or an (N, C, H, W) tensor in [-1, 1], got "
        f"{type(dataset).__name__}"
    )


def training_dynamics(
    dataset: Dataset | torch.Tensor,
    sizes: Sequence[int] = (64, 256, 1024),
    *,
    steps: int,
    checkpoint_every: int,
    n_samples: int = 16,
    sample_steps: int = 18,
    sampler: str = "heun",
    sample_seed: int = 0,
    arch: str = "resnet",
    seed: int = 0,
    out_dir: str | os.PathLike[str],
    train_kwargs: dict[str, Any] | None = None,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    n_probe: int = 16,
    probe: str = "auto",
    onset_threshold: float = ONSET_THRESHOLD,
    device: torch.device | str = "cpu",
    keep_checkpoints: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one network per training-set size and track memorisation through training (module docstring).

    dataset:          a Dataset (or an (N, C, H, W) float tensor in [-1, 1]); no flips.
    sizes:            training-set sizes N (each >= 2 and <= the dataset's size), a seeded random subset each.
    steps, checkpoint_every: optimiser steps per size, and the evaluation interval; checkpoints are taken at
                      checkpoint_every, 2·checkpoint_every, ... < steps and at steps (checkpoint_every <= steps).
    n_samples, sample_steps, sampler, sample_seed: the samples drawn at every checkpoint (seeds fixed).
    arch, seed, train_kwargs: passed to train_network (train_kwargs: channels, blocks, batch_size, lr, ...; not
                      arch/steps/seed/out_dir/checkpoint_every/callback/progress). ``seed`` also draws the subsets.
    sigmas, n_probe, probe: the single-step agreement with ``optimal`` ("auto" | "heldout" | "train" inputs).
    out_dir:          gets metrics.json, memorization_vs_step.png, agreement_vs_step.png, peak_ratio_vs_size.png,
                      onset_vs_size.png (when some size has an onset) and the checkpoints in size_N/.
    keep_checkpoints: False deletes each size's .pt files once evaluated.

    Returns the dict written to metrics.json: {"config", "probe", "sizes": {str(N): {"n", "subset", "steps",
    "checkpoints": [{"step", "loss", "memorization_ratio", "nn_distance_median", "nn_ratio_median",
    "agreement": {"sigmas", "r2", "mse"}, "r2_mean"}], "onset_step", "peak_memorization_ratio", "train_s"}},
    "onset": {str(N): step or None}, "plots": {...}, "elapsed_s"}.
    """
    from ..denoisers import make_denoiser
    from ..metrics import memorization
    from ..networks.models import ARCHITECTURES
    from ..networks.train import load_network, train_network
    from ..sampling.generate import sample
    from ..viz.plots import line_plot
    from .agreement import single_step

    ds = _as_dataset(dataset)
    if ds.flips:
        raise ValueError("dataset: flips are not supported here (train_network sees stored images only)")
    sizes = _check_sizes(sizes, ds.num_stored)
    steps = _int_at_least("steps", steps, 1)
    checkpoint_every = _int_at_least("checkpoint_every", checkpoint_every, 1)
    if checkpoint_every > steps:
        raise ValueError(f"checkpoint_every ({checkpoint_every}) must be <= steps ({steps})")
    n_samples = _int_at_least("n_samples", n_samples, 1)
    sample_steps = _int_at_least("sample_steps", sample_steps, 1)
    n_probe = _int_at_least("n_probe", n_probe, 1)
    _int_at_least("seed", seed, 0)
    _int_at_least("sample_seed", sample_seed, 0)
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(map(repr, ARCHITECTURES))}; got {arch!r}")
    if probe not in ("auto", "heldout", "train"):
        raise ValueError(f"probe must be 'auto', 'heldout' or 'train', got {probe!r}")
    if not 0 < float(onset_threshold) <= 1:
        raise ValueError(f"onset_threshold must be in (0, 1], got {onset_threshold!r}")
    sig = [float(s) for s in sigmas]
    if not sig or not all(math.isfinite(s) and s > 0 for s in sig):
        raise ValueError(f"sigmas: expected finite values > 0, got {list(sigmas)}")
    train_kwargs = dict(train_kwargs or {})
    clash = sorted(_RESERVED & set(train_kwargs))
    if clash:
        raise ValueError(f"train_kwargs: {', '.join(clash)} are set by training_dynamics itself")
    if out_dir is None:
        raise ValueError("out_dir is required")

    # Probe inputs for the agreement: held out = the tail of the permutation that Dataset.subset draws from.
    room = ds.num_stored - max(sizes)
    if probe == "heldout" and room < 1:
        raise ValueError(
            f"probe='heldout': no image is left outside the largest subset ({max(sizes)} of {ds.num_stored})"
        )
    probe_kind = "heldout" if probe == "heldout" or (probe == "auto" and room >= 1) else "train"
    if probe_kind == "heldout":
        perm = torch.randperm(ds.num_stored, generator=torch.Generator().manual_seed(int(seed)))
        k = min(n_probe, room)
        probe_idx = perm[ds.num_stored - k :].sort().values
        probe_x0 = ds.images_float(probe_idx.to(ds.device)).cpu()

    os.makedirs(out_dir, exist_ok=True)
    ck_steps = _checkpoint_steps(steps, checkpoint_every)
    t_all = time.time()
    per_size: dict[str, dict[str, Any]] = {}
    for N in sizes:
        sub = ds.subset(N, random=True, seed=seed)
        x0 = probe_x0 if probe_kind == "heldout" else sub.images_float()[:n_probe].cpu()
        size_dir = os.path.join(out_dir, f"size_{N}")
        res = train_network(
            sub,
            arch=arch,
            steps=steps,
            seed=seed,
            out_dir=size_dir,
            checkpoint_every=checkpoint_every,
            progress=progress,
            device=device,
            **train_kwargs,
        )
        if len(res.checkpoints) != len(ck_steps):  # guards the assumption about train_network's schedule
            raise RuntimeError(f"expected checkpoints at steps {ck_steps}, train_network wrote {res.checkpoints}")
        optimal = make_denoiser("optimal", sub)
        rows: list[dict[str, Any]] = []
        for step, path in zip(ck_steps, res.checkpoints):
            net = load_network(path, device=device)
            smp = sample(net, n_samples, steps=sample_steps, sampler=sampler, seed=sample_seed, progress=False)
            mem = memorization(smp.samples.to(ds.device), sub)
            agree = single_step({"network": net}, optimal, x0, sig, seed=seed)["methods"]["network"]
            k = min(max(1, checkpoint_every), step)
            r2 = [float(v) for v in agree["r2"]]
            rows.append(
                {
                    "step": step,
                    "loss": float(sum(res.losses[step - k : step]) / k),
                    "memorization_ratio": mem.share,
                    "nn_distance_median": float(mem.nn_distance.median()),
                    "nn_ratio_median": float(mem.ratio.median()),
                    "agreement": {"sigmas": sig, "r2": r2, "mse": [float(v) for v in agree["mse"]]},
                    "r2_mean": sum(r2) / len(r2),
                }
            )
            if not keep_checkpoints:
                os.remove(path)
        onset = memorization_onset([r["step"] for r in rows], [r["memorization_ratio"] for r in rows], onset_threshold)
        per_size[str(N)] = {
            "n": N,
            "subset": repr(sub),
            "steps": ck_steps,
            "checkpoints": rows,
            "onset_step": onset,
            "peak_memorization_ratio": max(r["memorization_ratio"] for r in rows),
            "train_s": res.elapsed_s,
            "checkpoint_files": [os.path.relpath(p, out_dir) for p in res.checkpoints] if keep_checkpoints else [],
        }

    plots: dict[str, str | None] = {}
    lab = {str(N): f"N = {N}" for N in sizes}
    p = os.path.join(out_dir, "memorization_vs_step.png")
    line_plot(
        p,
        ck_steps,
        {lab[k]: [r["memorization_ratio"] for r in v["checkpoints"]] for k, v in per_size.items()},
        xlabel="training step",
        ylabel="memorisation ratio (NN1/NN2 < 1/3)",
        title="memorisation ratio through training",
        logx=False,
        ylim=(0, 1),
    )
    plots["memorization_vs_step"] = os.path.basename(p)
    p = os.path.join(out_dir, "agreement_vs_step.png")
    line_plot(
        p,
        ck_steps,
        {lab[k]: [r["r2_mean"] for r in v["checkpoints"]] for k, v in per_size.items()},
        xlabel="training step",
        ylabel=f"single-step r² vs optimal (mean over σ = {', '.join(map(str, sig))})",
        title=f"agreement with the optimal denoiser ({probe_kind} inputs)",
        logx=False,
    )
    plots["agreement_vs_step"] = os.path.basename(p)
    p = os.path.join(out_dir, "peak_ratio_vs_size.png")
    line_plot(
        p,
        sizes,
        {"peak ratio": [per_size[str(N)]["peak_memorization_ratio"] for N in sizes]},
        xlabel="training-set size N",
        ylabel="highest memorisation ratio over checkpoints",
        title="peak memorisation vs dataset size",
        logx=len(sizes) > 1,
        ylim=(0, 1),
    )
    plots["peak_ratio_vs_size"] = os.path.basename(p)
    onsets = {str(N): per_size[str(N)]["onset_step"] for N in sizes}
    if any(v is not None for v in onsets.values()):
        p = os.path.join(out_dir, "onset_vs_size.png")
        line_plot(
            p,
            sizes,
            {f"onset (ratio >= {onset_threshold:g})": [onsets[str(N)] for N in sizes]},
            xlabel="training-set size N",
            ylabel="memorisation onset (training step)",
            title="memorisation onset vs dataset size (sizes that never memorised are left out)",
            logx=len(sizes) > 1,
        )
        plots["onset_vs_size"] = os.path.basename(p)
    else:
        plots["onset_vs_size"] = None  # no size reached the threshold: nothing to draw

    result = {
        "config": {
            "sizes": sizes,
            "steps": steps,
            "checkpoint_every": checkpoint_every,
            "n_samples": n_samples,
            "sample_steps": sample_steps,
            "sampler": sampler,
            "schedule": "karras",
            "sample_seeds": [sample_seed, sample_seed + n_samples - 1],
            "arch": arch,
            "seed": seed,
            "train_kwargs": {
                k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                for k, v in train_kwargs.items()
            },
            "onset_threshold": float(onset_threshold),
            "memorization_threshold": 1.0 / 3.0,
            "dataset": repr(ds),
            "device": str(device),
        },
        "probe": {
            "kind": probe_kind,
            "n": int(x0.shape[0]),
            "sigmas": sig,
            "seed": seed,
            "reference": "optimal",
            "metric": "r² of the network's x̂0 vs optimal's x̂0 on the same x0 + σ·ε (variance of "
            "optimal's output), and MSE",
        },
        "sizes": per_size,
        "onset": onsets,
        "plots": plots,
        "elapsed_s": time.time() - t_all,
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    return result
