"""Sampling runs over several processes (torchrun): dataset parallel, sample parallel, or both.

* ``dataset``: every rank holds one shard of the training set; each retrieval combines the ranks' partial states
  (:mod:`analytic_diffusion.ops.distributed`), so every rank follows the same trajectories, bit for bit.
* ``samples``: the n samples are split into contiguous blocks, one per rank; sample i keeps seed + i, so the
  result does not depend on the number of ranks. The blocks are gathered in rank order.
* ``dataset,samples``: S × G ranks, G (``dataset_ranks``) sharing each training shard set, S sample blocks.

Only the main rank (global rank 0) writes files and prints progress.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..ops import distributed
from .generate import SampleResult, sample

MODES = ("none", "dataset", "samples", "dataset,samples")


@dataclass
class Parallel:
    mode: str = "none"
    data: distributed.ShardGroup | None = None  # the ranks that shard the training set between them
    samples: distributed.ShardGroup | None = None  # the ranks that split the samples
    rank: int = 0
    world: int = 1
    device: torch.device | str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, run: str, failure: BaseException | None = None) -> None:
        """Before any work, on every rank: raise where the main rank failed to start (``failure``, e.g. its out
        folder is taken) so that no rank waits for it, and raise ShardError where the ranks were given different
        runs (``run``: a fingerprint of everything that changes the answer). One process: raises ``failure``."""
        if self.world == 1:
            if failure is not None:
                raise failure
            return
        group = distributed.ShardGroup()  # the whole world, whatever the mode
        seen = group.all_gather_object((run, None if failure is None else str(failure)), "checking the run")
        if failure is not None:
            raise failure
        if seen[0][1] is not None:
            raise ValueError(f"{seen[0][1]} (reported by rank 0)")
        runs = [r for r, _ in seen]
        if len(set(runs)) != 1:
            differ = [r for r in range(len(runs)) if runs[r] != runs[0]]
            raise distributed.ShardError(
                f"the ranks were given different runs: ranks {differ} differ from rank 0 in "
                f"{_first_difference(runs[0], runs[differ[0]])}; every rank must run the same command"
            )

    def config(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "world": self.world,
            "dataset_ranks": None if self.data is None else self.data.world,
            "sample_ranks": None if self.samples is None else self.samples.world,
        }


def _first_difference(a: str, b: str) -> str:
    """The settings in which two run fingerprints (JSON objects) differ, as ``name (a vs b)``."""
    import json

    ja, jb = json.loads(a), json.loads(b)
    keys = [k for k in sorted(set(ja) | set(jb)) if ja.get(k) != jb.get(k)]
    return ", ".join(f"{k} ({ja.get(k)!r} vs {jb.get(k)!r})" for k in keys[:4]) or "their fingerprints"


def setup(mode: str = "none", *, device: torch.device | str = "cpu", dataset_ranks: int | None = None) -> Parallel:
    """Join torchrun's process group for ``mode`` (validated first). Without a launcher (one process) every mode
    runs as a single process; under a launcher ``mode`` must say how to split the work."""
    if mode not in MODES:
        raise ValueError(f"parallel: expected one of {', '.join(MODES)}, got {mode!r}")
    if dataset_ranks is not None and mode != "dataset,samples":
        raise ValueError("dataset_ranks: only for --parallel dataset,samples")
    if not distributed.launched():
        return Parallel(device=device)
    if mode == "none":
        raise ValueError(
            "this process was started by a launcher (WORLD_SIZE > 1) but --parallel was not given: "
            "use --parallel dataset, samples or dataset,samples"
        )
    world_group, device = distributed.init_from_env(device)
    if mode == "dataset":
        return Parallel(mode, world_group, None, world_group.rank, world_group.world, device)
    if mode == "samples":
        return Parallel(mode, None, world_group, world_group.rank, world_group.world, device)
    if dataset_ranks is None:
        raise ValueError(
            "dataset_ranks: --parallel dataset,samples needs --dataset-ranks G (ranks per training "
            "shard set; the world size must be a multiple of it)"
        )
    data, samples = distributed.split_groups(dataset_ranks)
    return Parallel(mode, data, samples, world_group.rank, world_group.world, device)


def sample_parallel(
    denoiser: Callable[..., torch.Tensor],
    n: int,
    par: Parallel,
    *,
    seed: int = 0,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    **kw: Any,
) -> SampleResult:
    """:func:`sample` with the n samples split over ``par.samples`` (or all here when it is None)."""
    if par.samples is None:
        return sample(denoiser, n, seed=seed, class_labels=class_labels, **kw)
    group = par.samples
    if n < group.world:
        raise ValueError(
            f"n: {n} samples cannot be split over {group.world} sample ranks; ask for at least one sample per rank"
        )
    start, stop = group.shard_range(n)
    labels = None if class_labels is None else torch.as_tensor(class_labels)[start:stop]
    part = sample(denoiser, stop - start, seed=seed + start, class_labels=labels, **kw)
    samples = group.all_gather_rows(part.samples.contiguous(), "gathering samples")
    elapsed = max(group.all_gather_object(part.elapsed_s, "gathering timings"))
    config = {
        **part.config,
        "n": n,
        "seed": seed,
        "class_labels": None if class_labels is None else torch.as_tensor(class_labels).tolist(),
    }
    return replace(part, samples=samples, seeds=[seed + i for i in range(n)], config=config, elapsed_s=elapsed)
