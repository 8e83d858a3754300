"""The main job behind ``analytic-diffusion sample``: load data, build a denoiser, sample, write a run folder."""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from ..data import Dataset, load_dataset
from ..data.cache import fingerprint as tensor_fingerprint
from ..data.packed import check_options as check_packed_options
from ..data.packed import is_packed, load_packed_shard
from ..denoisers import denoiser_options, make_denoiser
from ..denoisers.patch_schedule import PatchSchedule
from ..files import FolderClaim, check_out_folder
from ..grids import Schedule, get_schedule
from ..metrics import memorization
from ..ops import gather_rows
from ..viz.images import save_grid, save_nearest_panel, save_x0_strips
from .generate import check_seeds
from .parallel import sample_parallel
from .parallel import setup as setup_parallel

if TYPE_CHECKING:
    from ..data.transforms import Resolution
    from ..ops.distributed import ShardGroup

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def prepare_dataset(
    dataset: str | Path | Dataset,
    *,
    split: str | None = None,
    subset: int | None = None,
    subset_random: bool = False,
    resolution: Resolution | None = None,
    pad_to: Resolution | None = None,
    flips: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    shard_group: ShardGroup | None = None,
) -> Dataset:
    """A Dataset from a name or path (or an existing Dataset), with subset and flips applied; with
    ``shard_group`` this rank's shard of it (of a packed folder, only the shard is mapped and verified)."""
    if shard_group is not None and isinstance(dataset, (str, os.PathLike)) and is_packed(dataset) and subset is None:
        check_packed_options(dataset, split=split, resolution=resolution, pad_to=pad_to)
        ds = load_packed_shard(dataset, shard_group).with_flips(flips)
        return ds if str(device) == "cpu" else ds.to(device)  # a GPU rank holds its shard on its device
    if isinstance(dataset, (str, os.PathLike)):
        kw: dict[str, Any] = {
            k: v for k, v in dict(split=split, resolution=resolution, pad_to=pad_to).items() if v is not None
        }
        # Sharded: loaded on the host, and only this rank's shard goes to its device.
        dataset = load_dataset(dataset, device=device if shard_group is None else "cpu", **kw)
    if subset is not None:
        dataset = dataset.subset(subset, random=subset_random, seed=seed)
    if flips:
        dataset = dataset.with_flips(True)
    return dataset if shard_group is None else dataset.shard(shard_group).to(device)


def class_labels_for(
    dataset: Dataset, n: int, *, class_label: int | None = None, random_classes: bool = False, seed: int = 0
) -> torch.Tensor | None:
    if class_label is None and not random_classes:
        return None
    if dataset.labels is None:
        raise ValueError("class-conditional sampling: the dataset has no labels")
    classes = cast("list[int]", dataset.classes)  # the dataset has labels (checked above)
    if class_label is not None:
        if random_classes:
            raise ValueError("give either class_label or random_classes, not both")
        if class_label not in classes:
            raise ValueError(f"class_label: {class_label} is not a class of the dataset ({classes})")
        return torch.full((n,), int(class_label), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.as_tensor(classes)[torch.randint(len(classes), (n,), generator=g)]


def check_device(device: torch.device | str) -> torch.device:
    """The torch device for ``device``, or a clear ValueError (unknown name, CUDA absent, index out of range)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: unknown device {device!r} (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {device!r} asked for, but CUDA is not available on this machine "
                "(no GPU, or a CPU-only torch build); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device: {device!r}: only cpu and cuda devices are supported")
    return dev


def _input_paths(dataset: object) -> list[str | os.PathLike[str]]:
    """The files a run reads, which its --out must never replace: the dataset, when given as a path."""
    return [dataset] if isinstance(dataset, (str, os.PathLike)) and os.path.exists(dataset) else []


def run_fingerprint(settings: dict[str, Any]) -> str:
    """Canonical JSON of a run's settings (tensors by content hash): the ranks of a torchrun job compare it, so that
    ranks given different seeds, temperatures or options refuse to combine their partial answers."""

    def canonical(v: object) -> object:
        if torch.is_tensor(v):
            return f"tensor:{tensor_fingerprint(v)}"
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        return repr(v)

    return json.dumps(settings, sort_keys=True, default=canonical)


def check_patch_coverage(
    denoiser_or_schedule: object,
    schedule: str | Schedule = "karras",
    steps: int = 18,
    schedule_kwargs: dict[str, Any] | None = None,
) -> None:
    """Raise a clear ValueError up front if a patch-size table does not cover the sampler's σ grid.

    Takes a PatchSchedule or a denoiser with a ``patch`` PatchSchedule (local methods); anything else passes.
    """
    patch = denoiser_or_schedule
    if not isinstance(patch, PatchSchedule):
        patch = getattr(denoiser_or_schedule, "patch", None)
    if not isinstance(patch, PatchSchedule) or patch.is_constant:
        return
    sched = schedule if isinstance(schedule, Schedule) else get_schedule(schedule, steps, **(schedule_kwargs or {}))
    try:
        patch.check_covers(sched.sigmas.tolist())
    except ValueError as e:
        raise ValueError(
            f"{e} ({sched.name} grid, {sched.steps} steps); use a schedule calibrated on this grid "
            f"(`analytic-diffusion calibrate`) or a constant --patch"
        ) from None


def run_sample(
    *,
    method: str = "optimal",
    dataset: str | Path | Dataset = "mnist",
    split: str | None = None,
    subset: int | None = None,
    subset_random: bool = False,
    resolution: Resolution | None = None,
    pad_to: Resolution | None = None,
    flips: bool = False,
    class_label: int | None = None,
    random_classes: bool = False,
    n: int = 64,
    steps: int = 18,
    sampler: str = "heun",
    schedule: str = "karras",
    schedule_kwargs: dict[str, Any] | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    method_options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    out: str | None = None,
    save_x0: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    parallel: str = "none",
    dataset_ranks: int | None = None,
    memory_budget: int | None = None,
) -> dict[str, Any]:
    """Run one sampling job and write its folder; returns the metrics dict (also in metrics.json).

    ``out`` must be a new or empty folder, or ``overwrite=True`` replaces it whole. The files are written to a
    temporary sibling folder that is renamed to ``out`` at the end, so an interrupted run leaves no ``out``.

    ``parallel`` (under torchrun): ``dataset`` shards the training set over the ranks, ``samples`` splits the n
    samples, ``dataset,samples`` both (``dataset_ranks`` ranks per shard set); see :mod:`.parallel`. Only rank 0
    writes the folder and prints progress; every rank returns the metrics. ``memory_budget`` (bytes) bounds
    each retrieval's working memory (the method's and the memorisation scan's).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    device = check_device(device)
    check_seeds(seed, n)
    out = out or os.path.join("runs", f"{method}-{os.path.basename(str(dataset)).split('.')[0]}-seed{seed}")
    check_out_folder(out, overwrite)
    t0 = time.perf_counter()
    patch = (method_options or {}).get("patch")
    if isinstance(patch, PatchSchedule):  # fail before loading any data
        check_patch_coverage(patch, schedule, steps, schedule_kwargs)
    settings = dict(
        method=method,
        dataset=dataset if isinstance(dataset, (str, os.PathLike)) else repr(dataset),
        split=split,
        subset=subset,
        subset_random=subset_random,
        resolution=resolution,
        pad_to=pad_to,
        flips=flips,
        class_label=class_label,
        random_classes=random_classes,
        n=n,
        steps=steps,
        sampler=sampler,
        schedule=schedule,
        schedule_kwargs=schedule_kwargs,
        eta=eta,
        clip_x0=clip_x0,
        seed=seed,
        batch_size=batch_size,
        method_options=method_options,
        device=device.type,
        dtype=dtype,
        parallel=parallel,
        dataset_ranks=dataset_ranks,
        memory_budget=memory_budget,
    )
    par = setup_parallel(parallel, device=device, dataset_ranks=dataset_ranks)
    device, progress = par.device, progress and par.is_main
    with ExitStack() as stack:
        claim: FolderClaim | None = None
        failure: Exception | None = None
        if par.is_main:  # only the main rank writes: it claims --out before any rank loads anything
            try:
                claim = stack.enter_context(FolderClaim(out, overwrite=overwrite, protect=_input_paths(dataset)))
            except (ValueError, OSError) as e:
                failure = e
        par.agree(run_fingerprint(settings), failure)
        ds = prepare_dataset(
            dataset,
            split=split,
            subset=subset,
            subset_random=subset_random,
            resolution=resolution,
            pad_to=pad_to,
            flips=flips,
            seed=seed,
            device=device,
            shard_group=par.data,
        )
        options = dict(method_options or {})
        if memory_budget is not None and "memory_budget" in denoiser_options(method):
            options["memory_budget"] = int(memory_budget)
        denoiser = make_denoiser(method, ds, dtype=_DTYPES[dtype], **options)
        check_patch_coverage(denoiser, schedule, steps, schedule_kwargs)
        labels = class_labels_for(ds, n, class_label=class_label, random_classes=random_classes, seed=seed)
        x0_steps: list[tuple[int, torch.Tensor]] = []

        def record(step: int, x: torch.Tensor, sigma: torch.Tensor, x0_hat: torch.Tensor) -> None:
            x0_steps.append((step, x0_hat.detach().to("cpu", torch.float32)))

        result = sample_parallel(
            denoiser,
            n,
            par,
            steps=steps,
            sampler=sampler,
            schedule=schedule,
            schedule_kwargs=schedule_kwargs or {},
            seed=seed,
            batch_size=batch_size,
            eta=eta,
            clip_x0=clip_x0,
            class_labels=labels,
            callback=record if save_x0 else None,
            device=device,
            dtype=_DTYPES[dtype],
            progress=progress,
        )
        samples = result.samples
        mem = memorization(samples.to(ds.device), ds, memory_budget=memory_budget)
        neighbours = gather_rows(ds.keys(), mem.nn_index.to(ds.device)).reshape(samples.shape).cpu()
        if not par.is_main:
            return {**mem.summary(), "sampling_seconds": result.elapsed_s, "total_seconds": time.perf_counter() - t0}

        config = {
            "method": method,
            "denoiser": denoiser.config(),
            "dataset": repr(ds),
            "n": n,
            "steps": steps,
            "sampler": sampler,
            "schedule": schedule,
            "schedule_kwargs": schedule_kwargs or {},
            "eta": eta,
            "clip_x0": clip_x0,
            "seed": seed,
            "class_labels": None if labels is None else labels.tolist(),
            "device": str(device),
            "dtype": dtype,
            "sampling": result.config,
            "parallel": par.config(),
        }
        metrics = {**mem.summary(), "sampling_seconds": result.elapsed_s, "total_seconds": time.perf_counter() - t0}
        certificate = getattr(denoiser, "pruning_summary", lambda: None)()
        if certificate is not None:  # certified pruning (tolerance > 0): what was scored and how far off it may be
            metrics["scored_fraction"] = certificate["scored_fraction"]
            metrics["certificate"] = certificate
        if claim is None or claim.stage is None:  # the main rank holds its claim from the start
            raise RuntimeError("run_sample: the main rank has no claim on --out")
        stage = claim.stage
        save_grid(os.path.join(stage, "grid.png"), samples)
        save_nearest_panel(os.path.join(stage, "nearest.png"), samples, neighbours, mem.memorized)
        if save_x0:
            # Batches append their steps in turn: regroup by step, samples in order.
            steps_seen = sorted({s for s, _ in x0_steps})
            traj = torch.stack([torch.cat([x for s, x in x0_steps if s == k]) for k in steps_seen])
            save_x0_strips(os.path.join(stage, "x0_strips.png"), traj[:, :16])
        # uint64: every seed < 2^64 (check_seeds) is stored exactly, never as a float
        np.savez_compressed(
            os.path.join(stage, "samples.npz"),
            samples=samples.numpy(),
            seeds=np.asarray(result.seeds, dtype=np.uint64),
            nn_index=mem.nn_index.numpy(),
            nn_ratio=mem.ratio.numpy(),
            config=json.dumps(config),
        )
        with open(os.path.join(stage, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(stage, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        claim.commit()
        if progress:
            print(
                f"{method}: {n} samples in {result.elapsed_s:.1f} s; memorisation ratio "
                f"{100 * mem.share:.0f}% (nearest/second-nearest < 1/3); wrote {out}/"
            )
        return metrics
