"""End-to-end timing: n samples with a global method over a training set of a given shape (sampler included)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..data import Dataset
from ..denoisers import make_denoiser
from ..sampling.generate import sample


def run_e2e(
    *,
    n_train: int,
    shape: tuple[int, int, int],
    samples: int,
    steps: int = 18,
    sampler: str = "heun",
    method: str = "optimal",
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    precision: str = "exact",
    seed: int = 0,
    dataset: Dataset | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Seconds for ``samples`` samples; random uint8 training images of ``shape`` unless ``dataset`` is given."""
    dev = torch.device(device)
    if dataset is None:
        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n_train, *shape), generator=gen, dtype=torch.uint8)
        dataset = Dataset(images, source=f"random uint8 {n_train}x{'x'.join(map(str, shape))}", device=dev)
    den = make_denoiser(method, dataset, backend=backend, precision=precision)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    out = sample(
        den, samples, steps=steps, sampler=sampler, seed=seed, batch_size=batch_size, device=dev, progress=progress
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t
    calls = steps * (2 if sampler == "heun" else 1) - (1 if sampler == "heun" else 0)
    return {
        "method": method,
        "n_train": dataset.num_stored,
        "shape": list(dataset.image_shape),
        "samples": samples,
        "steps": steps,
        "sampler": sampler,
        "batch_size": batch_size or samples,
        "device": str(dev),
        "backend": backend,
        "precision": precision,
        "seconds": seconds,
        "denoiser_calls_per_sample": calls,
        "ms_per_sample_step": 1e3 * seconds / (samples * steps),
        "finite": bool(torch.isfinite(out.samples).all()),
    }
