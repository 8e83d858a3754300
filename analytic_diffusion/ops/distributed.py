"""Retrieval over a training set sharded across processes, on torch.distributed (docs/design.md §5).

Each rank holds one contiguous, balanced shard of the candidate rows (:func:`shard_range`). A retrieval computes
its partial state on the shard; the states are all-gathered and combined in rank order on every rank, so every
rank gets bitwise the same answer, run after run. Whole-set sums (mean, covariance) are all-gathered in float64
and added in rank order too. The collectives here are the only communication: denoisers and samplers just carry
a :class:`ShardGroup` inside the dataset's :class:`~analytic_diffusion.ops.keys.KeyBank` (``keys.shard``).

Backends: gloo on CPU, NCCL when the ranks compute on CUDA (chosen by :func:`init_from_env`). A collective that
does not complete within the group's timeout (a rank raised or died) raises :class:`ShardError` on the ranks
still waiting, naming the step, instead of hanging.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import env
from .partial import PartialState, combine_partials, merge_knn_lists


class ShardError(RuntimeError):
    """A collective failed: another rank raised, died, or holds different data."""


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return env.read("WORLD_SIZE") > 1


def rank_prefix() -> str:
    """' (rank r/W)' under a launcher, '' in a single process: for messages every rank prints."""
    try:
        return f" (rank {env.read('RANK')}/{env.read('WORLD_SIZE')})" if launched() else ""
    except ValueError:  # a malformed launcher variable is reported by its own message, not here
        return ""


def init_from_env(device: torch.device | str = "cpu", timeout_s: float | None = None) -> tuple[ShardGroup, str]:
    """Join the process group torchrun describes (env://): NCCL for a CUDA ``device``, else gloo.

    ``timeout_s`` (None: ``AD_DIST_TIMEOUT``, 120 s by default) bounds every collective.

    Returns (the world group, this rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK``). Rendezvous addresses
    come from the launcher; nothing here opens a port of its own.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", env.read("LOCAL_RANK") % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = (
            env.read("AD_DIST_TIMEOUT") if timeout_s is None else env.parse_positive_seconds(timeout_s, "timeout_s")
        )
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return ShardGroup(), str(dev)


def split_groups(dataset_ranks: int) -> tuple[ShardGroup, ShardGroup]:
    """(dataset group, sample group) of this rank for a world of S × G ranks, G = ``dataset_ranks``: ranks
    s·G … s·G + G − 1 shard the training set between them and share samples block s; ranks d, G + d, 2G + d, …
    hold the same shard and split the samples. A collective (every rank creates every group, in one order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if (
        isinstance(dataset_ranks, bool)
        or not isinstance(dataset_ranks, int)
        or dataset_ranks < 1
        or world % dataset_ranks
    ):
        raise ValueError(f"dataset_ranks: expected a divisor of the {world} ranks, got {dataset_ranks!r}")
    G = dataset_ranks
    data = sample = None
    for s in range(world // G):
        g = dist.new_group(list(range(s * G, s * G + G)))
        if rank // G == s:
            data = g
    for d in range(G):
        g = dist.new_group(list(range(d, world, G)))
        if rank % G == d:
            sample = g
    return ShardGroup(data), ShardGroup(sample)


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of rank ``rank``: contiguous, sizes differ by at most one, lower ranks first."""
    if n < world:
        raise ValueError(
            f"cannot shard {n} training images over {world} ranks: every rank needs at least one "
            "image; use fewer processes or --parallel samples"
        )
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardGroup:
    """A torch.distributed process group seen as an ordered list of shards (default: the whole world)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ShardError(
                "ShardGroup: torch.distributed is not initialised; launch with torchrun (or call "
                "torch.distributed.init_process_group) first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        # NCCL moves device tensors only; gloo moves CPU tensors.
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        )

    def __repr__(self) -> str:
        return f"ShardGroup(rank={self.rank}, world={self.world}, backend={self.backend})"

    def shard_range(self, n: int) -> tuple[int, int]:
        return shard_range(n, self.world, self.rank)

    # ---------------------------------------------------------------- collectives (fixed rank order)
    def _fail(self, what: str, exc: BaseException) -> ShardError:
        return ShardError(
            f"rank {self.rank}/{self.world}: {what} did not complete ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); another rank failed, died or timed "
            "out — see its own message"
        )

    def all_gather(self, t: torch.Tensor, what: str = "all_gather") -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype on every rank), in rank order, on ``t``'s device."""
        src = t.detach().contiguous().to(self.comm_device)
        out = [torch.empty_like(src) for _ in range(self.world)]
        try:
            dist.all_gather(out, src, group=self.group)
        except (RuntimeError, ValueError) as e:
            raise self._fail(what, e) from None
        return [o.to(t.device) for o in out]

    def all_gather_object(self, obj: object, what: str = "all_gather_object") -> list[Any]:
        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except (RuntimeError, ValueError) as e:
            raise self._fail(what, e) from None
        return out

    def all_gather_rows(self, t: torch.Tensor, what: str = "all_gather_rows") -> torch.Tensor:
        """Concatenate every rank's rows (dim 0 may differ between ranks) in rank order."""
        sizes = [int(s) for s in self.all_gather(torch.tensor([t.shape[0]], dtype=torch.long), what)]
        pad = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        pad[: t.shape[0]] = t
        parts = self.all_gather(pad, what)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def sum(self, t: torch.Tensor, what: str = "sum") -> torch.Tensor:
        """Σ over ranks added in rank order: the same bits on every rank (no reduction-tree ambiguity)."""
        parts = self.all_gather(t, what)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total

    def combine(self, state: PartialState, what: str = "retrieval") -> PartialState:
        """Combine every rank's partial state in rank order (exact online-softmax merge)."""
        # One buffer per rank, (B, 3 + D [+ D]): one collective, one latency.
        D = state.o.shape[1]
        cols = [state.m[:, None], state.l[:, None], state.l2[:, None], state.o] + (
            [] if state.o2 is None else [state.o2]
        )
        parts = self.all_gather(torch.cat(cols, 1), what)
        states = [
            PartialState(p[:, 0], p[:, 1], p[:, 2], p[:, 3 : 3 + D], o2=None if state.o2 is None else p[:, 3 + D :])
            for p in parts
        ]
        return combine_partials(states)

    def check_same(self, name: str, value: str) -> None:
        """Raise on every rank when the ranks disagree on ``value`` (e.g. a dataset fingerprint)."""
        values = self.all_gather_object(value, f"comparing {name}")
        if len(set(values)) != 1:
            by_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ShardError(
                f"the ranks hold different {name} ({by_rank}); every rank must load the same "
                "dataset with the same options"
            )


@dataclass
class Shard:
    """Where one rank's rows sit in the whole candidate set."""

    group: ShardGroup
    start: int  # global index of this shard's first stored row
    total: int  # stored rows over all shards (mirrored copies not counted)


def global_index(local: torch.Tensor, n_local: int, shard: Shard) -> torch.Tensor:
    """Shard-local candidate indices (i ≥ n_local: mirrored) -> global ones (i ≥ total: mirrored)."""
    mirrored = local >= n_local
    return torch.where(mirrored, local - n_local + shard.start + shard.total, local + shard.start)


def merge_topk(shard: Shard, d: torch.Tensor, i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of per-shard k-NN lists (global indices): the k smallest (distance, index) pairs overall.

    Shards hold fewer than k candidates at most once per rank; their lists are padded with (inf, -1) slots
    that sort last. Ties go to the lower global index, as in the single-process search.
    """
    B = d.shape[0]
    pad = k - d.shape[1]
    if pad > 0:
        d = torch.cat([d, torch.full((B, pad), float("inf"), dtype=d.dtype, device=d.device)], 1)
        i = torch.cat([i, torch.full((B, pad), -1, dtype=i.dtype, device=i.device)], 1)
    d_all = torch.cat(shard.group.all_gather(d, "k-NN merge"), 1)
    i_all = torch.cat(shard.group.all_gather(i, "k-NN merge"), 1)
    return merge_knn_lists(d_all, i_all, k)


def global_max(shard: Shard, score: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the largest score over the shards and its (global) index; ties go to the lower rank, i.e. the
    lower index, as in one scan."""
    scores = shard.group.all_gather(score, "posterior draw")
    indices = shard.group.all_gather(index, "posterior draw")
    best_s, best_i = scores[0], indices[0]
    for s, i in zip(scores[1:], indices[1:]):
        better = s > best_s
        best_s, best_i = torch.where(better, s, best_s), torch.where(better, i, best_i)
    return best_s, best_i


def gather_global_rows(
    shard: Shard,
    rows_of_local: Callable[[torch.Tensor], torch.Tensor],
    index: torch.Tensor,
    n_local: int,
    dim: int,
    dtype: torch.dtype,
    mirror: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Rows at global candidate indices, whichever rank owns them: each rank fills the rows it owns, the
    owners' rows are all-gathered and picked by owner (a selection, so exact)."""
    flat = index.reshape(-1)
    mirrored = flat >= shard.total
    base = torch.where(mirrored, flat - shard.total, flat)
    owned = (base >= shard.start) & (base < shard.start + n_local)
    mine = torch.zeros(flat.numel(), dim, dtype=dtype, device=index.device)
    if bool(owned.any()):
        rows = rows_of_local(base[owned] - shard.start).to(index.device)
        mine[owned] = rows
    parts = shard.group.all_gather(mine, "gathering rows")
    owner = owner_of(base, shard)
    out = torch.stack(parts)[owner, torch.arange(flat.numel(), device=index.device)]
    if bool(mirrored.any()):
        out = torch.where(mirrored[:, None], mirror(out), out)
    return out.reshape(*index.shape, dim)


def owner_of(base: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The rank that stores each global row index (the balanced split of :func:`shard_range`)."""
    starts = torch.tensor(
        [shard_range(shard.total, shard.group.world, r)[0] for r in range(shard.group.world)], device=base.device
    )
    return torch.searchsorted(starts, base, right=True) - 1
