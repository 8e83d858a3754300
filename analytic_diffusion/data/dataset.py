"""A training set held once, resident on one device: uint8 + an affine map to [-1, 1] when 8-bit (docs/design.md §2)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Union, cast

import numpy as np
import torch

from ..ops.keys import KeyBank
from . import cache as stats_cache

if TYPE_CHECKING:
    from ..ops.distributed import Shard, ShardGroup

UINT8_SCALE, UINT8_SHIFT = 2.0 / 255.0, -1.0
# Float input may overshoot [-1, 1] by rounding (x / 127.5 - 1 in float32); beyond this it is a real error.
RANGE_TOLERANCE = 1e-5
# Rows per chunk in the statistics passes: ~32 MiB of float64 per chunk whatever D is.
STATS_CHUNK_ELEMENTS = 1 << 22

ArrayLike = Union[np.ndarray, torch.Tensor]


class Dataset:
    """N images (N, C, H, W) stored once, plus labels and the metadata that names them in cache keys.

    ``images`` is uint8 (value = 2/255·v − 1) for 8-bit sources, else float32 or float64 already in [-1, 1].
    ``flips=True`` adds every image mirrored left-right as a candidate without copying anything: retrieval ops
    take the flag, ``n`` counts 2N, index i ≥ N in :meth:`images_float` means image i − N mirrored, and the
    statistics are those of the augmented set.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        source: str = "array",
        split: str | None = None,
        transform: str = "none",
        subset: str = "all",
        flips: bool = False,
        class_names: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        _check_images(images, source)
        if device is not None:
            images = images.to(device)
        self._images = images.contiguous()
        self._labels = _check_labels(labels, images.shape[0], source, self._images.device)
        self.source, self.split, self.transform, self.subset_desc = str(source), split, transform, subset
        self.class_names = tuple(class_names) if class_names is not None else None
        self._flips = bool(flips)
        self._keys: KeyBank | None = None
        self._fingerprint: str | None = None
        self._stats: dict[str, dict[str, torch.Tensor]] = {}
        self._shard: Shard | None = None  # ops.distributed.Shard when this holds one rank's rows of a sharded set
        self._mapped: Any = None  # data.packed.MappedRows when the images are a view of a memory-mapped file

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_array(
        cls,
        array: ArrayLike,
        labels: ArrayLike | None = None,
        *,
        source: str = "array",
        value_range: tuple[float, float] | None = None,
        split: str | None = None,
        transform: str = "none",
        class_names: Sequence[str] | None = None,
        device: torch.device | str | None = "cpu",
        layout: str | None = None,
    ) -> Dataset:
        """Images as NCHW, NHWC or NHW (grayscale); numpy or torch.

        ``layout`` ("NCHW", "NHWC", "NHW") says which; without it a 4-D shape is NCHW (the convention) unless
        its last dim is a channel count (1, 3, 4): then it is NHWC when dim 1 is larger than 4, NCHW when dim 1 is
        a channel count too, and refused otherwise ((N, 2, 6, 3): 2 channels of 6×3 or 3 channels of 2×6?),
        never guessed.

        uint8 is stored as is, sharing the caller's memory when already NCHW and contiguous (no second copy of a
        large set). Other input is float in [-1, 1], or in ``value_range`` (e.g. (0, 1), (0, 255)) and rescaled;
        float64 input stays float64 (the exactness of a float64 denoiser depends on it), other floats become
        float32. Integer input within 0..255 and no other range is stored as uint8.
        """
        x = standardize_images(array, source, value_range, layout=layout)
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        return cls(x, labels, source=source, split=split, transform=transform, class_names=class_names, device=device)

    def _derive(
        self, images: torch.Tensor, labels: torch.Tensor | None, subset: str | None = None, flips: bool | None = None
    ) -> Dataset:
        """A new Dataset over (already validated) tensors, inheriting the metadata."""
        out = object.__new__(Dataset)
        out.__dict__.update(self.__dict__)
        out.__dict__.pop("_flip_twin", None)
        out._images, out._labels = images.contiguous(), labels
        out.subset_desc = self.subset_desc if subset is None else subset
        out._flips = self._flips if flips is None else flips
        out._keys, out._stats = None, {}
        if images is not self._images:
            out._fingerprint = None
            if not (self._mapped is not None and images.data_ptr() == self._images.data_ptr()):
                out._mapped = None  # a copy (subset, another device): no longer the file's pages
        return out

    # ---------------------------------------------------------------- properties
    @property
    def images(self) -> torch.Tensor:
        """The stored (N, C, H, W) tensor (uint8 or float32); mirrored copies are never stored."""
        return self._images

    @property
    def labels(self) -> torch.Tensor | None:
        return self._labels

    @property
    def num_stored(self) -> int:
        return self._images.shape[0]

    @property
    def total_stored(self) -> int:
        """Stored images over every rank's shard (= num_stored when not sharded)."""
        return self.num_stored if self._shard is None else self._shard.total

    @property
    def sharding(self) -> Shard | None:
        """The :class:`~analytic_diffusion.ops.distributed.Shard` this rank holds, or None."""
        return self._shard

    @property
    def n(self) -> int:
        """Number of candidate images (over every shard): 2N with flips."""
        return self.total_stored * (2 if self._flips else 1)

    def __len__(self) -> int:
        return self.n

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return cast("tuple[int, int, int]", tuple(self._images.shape[1:]))  # (N, C, H, W) is checked

    @property
    def dim(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    @property
    def device(self) -> torch.device:
        return self._images.device

    @property
    def dtype(self) -> torch.dtype:
        return self._images.dtype

    @property
    def flips(self) -> bool:
        return self._flips

    @property
    def scale(self) -> float:
        return UINT8_SCALE if self._images.dtype == torch.uint8 else 1.0

    @property
    def shift(self) -> float:
        return UINT8_SHIFT if self._images.dtype == torch.uint8 else 0.0

    @property
    def classes(self) -> list[int] | None:
        """Labels present (over every shard when sharded: then a collective)."""
        if self._labels is None:
            return None
        if self._shard is not None:
            return torch.unique(self._shard.group.all_gather_rows(self._labels, "gathering labels")).tolist()
        return torch.unique(self._labels).tolist()

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        subset = f", subset={self.subset_desc!r}" if self.subset_desc != "all" else ""
        return (
            f"Dataset(source={self.source!r}{split}, N={self.total_stored}, shape={self.image_shape}, "
            f"dtype={str(self.dtype).replace('torch.', '')}, flips={self._flips}, "
            f"labels={'yes' if self._labels is not None else 'no'}{subset}, device={self.device})"
        )

    # ---------------------------------------------------------------- access
    def keys(self) -> KeyBank:
        """The retrieval ops' view of the stored rows (no copy); cached so its ``center`` is computed once."""
        if self._keys is None:
            self._keys = KeyBank(
                values=self._images.reshape(self.num_stored, self.dim),
                scale=self.scale,
                shift=self.shift,
                labels=self._labels,
                image_shape=self.image_shape,
                shard=self._shard,
                pages=self._mapped,
            )
            if self._shard is not None:  # a collective: every rank builds its keys at the same point
                self._keys.get_center(torch.float64)
        return self._keys

    def shard(self, group: ShardGroup) -> Dataset:
        """This rank's contiguous, balanced shard of the stored images (``group``: an
        :class:`~analytic_diffusion.ops.distributed.ShardGroup`; a collective, every rank calls it).

        The ranks first compare the whole set's content fingerprint and all raise if they differ. Retrievals on
        the shard's :meth:`keys` combine every rank's result; statistics are reduced over the shards.
        """
        from ..ops.distributed import Shard

        if self._shard is not None:
            raise ValueError("shard: this dataset is already one rank's shard")
        fp = self.cache_params()["content"]
        group.check_same(
            "datasets (content fingerprints)",
            f"{fp} N={self.num_stored} {self.image_shape} {self.subset_desc} flips={self._flips}",
        )
        start, stop = group.shard_range(self.num_stored)
        out = self._derive(self._images[start:stop], _take(self._labels, slice(start, stop)))
        if self._mapped is not None:  # this rank touches (and releases) only its rows of the file
            out._mapped = type(self._mapped)(self._mapped.arr, self._mapped.start + start)
        out._shard = Shard(group, start, self.num_stored)
        out._fingerprint = fp  # the whole set's: statistics are the whole set's, and so is their cache key
        return out

    def images_float(
        self, index: int | Sequence[int] | torch.Tensor | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Float images in [-1, 1]: all ``n`` candidates (index None) or those at ``index`` (int, list, tensor).

        Index i ≥ N (flips on) is image i − N mirrored left-right.
        """
        self._unsharded("images_float")
        if index is None:
            out = self._to_float(self._images, dtype, copy=True)  # never hand out the stored tensor itself
            return torch.cat([out, out.flip(-1)]) if self._flips else out
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(
                f"images_float: index out of range [0, {self.n}) (N = {self.num_stored}, flips = {self._flips})"
            )
        mirrored = idx >= self.num_stored
        out = self._to_float(self._images[torch.where(mirrored, idx - self.num_stored, idx)], dtype)
        return torch.where(mirrored.reshape(*idx.shape, 1, 1, 1), out.flip(-1), out)

    def _to_float(self, x: torch.Tensor, dtype: torch.dtype, copy: bool = False) -> torch.Tensor:
        x = x.to(dtype, copy=copy)
        # Same affine map as KeyBank.rows so both views of a row agree bit for bit.
        return x * self.scale + self.shift if self._images.dtype == torch.uint8 else x

    # ---------------------------------------------------------------- derived datasets
    def _unsharded(self, what: str) -> None:
        if self._shard is not None:
            raise ValueError(f"{what}: this dataset is one rank's shard; call it on the whole set before Dataset.shard")

    def subset(self, n: int, *, random: bool = False, seed: int = 0) -> Dataset:
        """The first ``n`` stored images (a view), or ``n`` drawn without replacement by ``seed`` (kept sorted)."""
        self._unsharded("subset")
        if not 1 <= int(n) <= self.num_stored:
            raise ValueError(f"subset: n must be in [1, {self.num_stored}], got {n}")
        n = int(n)
        if not random:
            return self._derive(self._images[:n], _take(self._labels, slice(0, n)), self._chain(f"first{n}"))
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(self.num_stored, generator=gen)[:n].sort().values.to(self.device)
        return self._derive(self._images[idx], _take(self._labels, idx), self._chain(f"random{n}@seed{seed}"))

    def filter_classes(self, classes: int | Iterable[int]) -> Dataset:
        """Only the images whose label is in ``classes`` (an int or a collection of ints)."""
        self._unsharded("filter_classes")
        if self._labels is None:
            raise ValueError(f"filter_classes: dataset {self.source!r} has no labels")
        wanted = sorted({int(c) for c in np.atleast_1d(np.asarray(classes).astype(np.int64))})
        keep = torch.isin(self._labels, torch.tensor(wanted, device=self.device))
        if not bool(keep.any()):
            raise ValueError(f"filter_classes: no image has a label in {wanted} (classes present: {self.classes})")
        idx = keep.nonzero().squeeze(1)
        return self._derive(self._images[idx], self._labels[idx], self._chain(f"classes{wanted}"))

    def with_flips(self, on: bool = True) -> Dataset:
        """Horizontal-flip augmentation as a flag: nothing is copied. The same flag is this dataset; the other
        flag's twin is kept, so that its cached statistics (PCA, covariance) are computed or loaded once."""
        if bool(on) == self._flips:
            return self
        twin = self.__dict__.get("_flip_twin")
        if twin is None:
            twin = self.__dict__["_flip_twin"] = self._derive(self._images, self._labels, flips=bool(on))
        return twin

    def to(self, device: torch.device | str) -> Dataset:
        out = self._derive(self._images.to(device), _take(self._labels, None, device))
        out._fingerprint = self._fingerprint  # same bytes, different device
        return out

    def _chain(self, step: str) -> str:
        return step if self.subset_desc == "all" else f"{self.subset_desc}|{step}"

    # ---------------------------------------------------------------- statistics
    def cache_params(self) -> dict[str, Any]:
        """Every parameter that changes the statistics; hashed into the cache file name."""
        if self._fingerprint is None:
            self._fingerprint = stats_cache.fingerprint(self._images)
        return {
            "source": self.source,
            "split": self.split,
            "subset": self.subset_desc,
            "transform": self.transform,
            "flips": self._flips,
            "N": self.total_stored,
            "shape": list(self.image_shape),
            "dtype": str(self.dtype),
            "scale": self.scale,
            "shift": self.shift,
            "content": self._fingerprint,
            "version": 1,
        }

    def mean(self, *, cache: bool = True) -> torch.Tensor:
        """Mean image as a (D,) float64 vector (of the augmented set when flips are on)."""
        return self._stat("mean", self._compute_mean, cache)["mean"]

    def covariance(self, *, cache: bool = True) -> torch.Tensor:
        """(D, D) float64 population covariance (1/N), accumulated in chunks: O(D² + chunk·D) memory."""
        return self._stat("cov", lambda: self._compute_covariance(self.mean(cache=cache)), cache)["cov"]

    def pca(self, rank: int | None = None, *, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean (D,), eigenvalues descending and ≥ 0, U with eigenvectors as columns), float64.

        ``rank`` keeps the leading ``rank`` components: eigenvalues (rank,), U (D, rank).
        """
        out = self._stat("pca", lambda: self._compute_pca(cache), cache)
        mean, vals, vecs = out["mean"], out["eigvals"], out["U"]
        if rank is not None:
            if not 1 <= int(rank) <= self.dim:
                raise ValueError(f"pca: rank must be in [1, {self.dim}], got {rank}")
            vals, vecs = vals[: int(rank)], vecs[:, : int(rank)]
        return mean, vals, vecs

    def _stat(
        self, kind: str, compute: Callable[[], dict[str, torch.Tensor]], use_cache: bool
    ) -> dict[str, torch.Tensor]:
        if kind not in self._stats:
            if self._shard is not None:
                out = self._stat_sharded(kind, compute, use_cache)
            else:
                out = stats_cache.cached(kind, self.cache_params(), compute) if use_cache else compute()
            self._stats[kind] = {k: v.to(self.device) for k, v in out.items()}
        return self._stats[kind]

    def _stat_sharded(
        self, kind: str, compute: Callable[[], dict[str, torch.Tensor]], use_cache: bool
    ) -> dict[str, torch.Tensor]:
        """The cache is used only when every rank finds the entry (computing is a collective: all ranks or
        none); rank 0 alone writes it."""
        group = cast("Shard", self._shard).group  # called only when sharded
        params = self.cache_params()
        hit = stats_cache.lookup(kind, params) if use_cache else None
        if all(group.all_gather_object(hit is not None, f"{kind} cache lookup")):
            return cast("dict[str, torch.Tensor]", hit)  # every rank, this one included, found it
        out = {k: v.detach().cpu() for k, v in compute().items()}
        if use_cache and group.rank == 0:
            stats_cache.store(kind, params, out)
        return out

    def _chunks(self) -> Iterator[torch.Tensor]:
        elements = STATS_CHUNK_ELEMENTS
        if self._mapped is not None:  # out of core: chunks within the retrieval budget too (float64, ~2 copies)
            from ..ops import retrieval

            elements = max(1, min(elements, retrieval.DEFAULT_MEMORY_BUDGET // 16))
        step = max(1, elements // self.dim)
        for s in range(0, self.num_stored, step):
            rows = self._images[s : s + step].to(torch.float64)
            if self._images.dtype == torch.uint8:  # in place, the same bits as _to_float
                rows.mul_(self.scale).add_(self.shift)
            yield rows.reshape(-1, self.dim)
            del rows
            if self._mapped is not None:  # a streaming pass over a mapped file: hand the pages back
                self._mapped.release(s, s + step)

    def _mirror_perm(self) -> torch.Tensor:
        """Permutation p of the D coordinates with flip(x) = x[p]."""
        c, h, w = self.image_shape
        return torch.arange(self.dim, device=self.device).reshape(c, h, w).flip(-1).reshape(-1)

    def _compute_mean(self) -> dict[str, torch.Tensor]:
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for rows in self._chunks():
            total += rows.sum(0)
        if self._shard is not None:  # float64 sums added in rank order: the same bits on every rank
            total = self._shard.group.sum(total, "dataset mean")
        mean = total / self.total_stored
        if self._flips:  # mean of {x} ∪ {flip x} = (μ + flip μ) / 2
            mean = 0.5 * (mean + mean[self._mirror_perm()])
        return {"mean": mean}

    def _compute_covariance(self, mean: torch.Tensor) -> dict[str, torch.Tensor]:
        # Centred two-pass accumulation: far more accurate than E[xxᵀ] − μμᵀ when |μ| ≫ spread.
        scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        for rows in self._chunks():
            rows = rows - mean
            scatter.addmm_(rows.T, rows)
        if self._shard is not None:
            scatter = self._shard.group.sum(scatter, "dataset covariance")
        if self._flips:
            # The augmented mean is mirror-symmetric, so flip(x) − μ = P(x − μ) and the mirrored half's scatter
            # is P S Pᵀ: a permutation of S, no second pass over the data.
            p = self._mirror_perm()
            scatter = scatter + scatter[p][:, p]
        return {"cov": scatter / self.n}

    def _compute_pca(self, use_cache: bool) -> dict[str, torch.Tensor]:
        cov = self.covariance(cache=use_cache)
        vals, vecs = torch.linalg.eigh(cov)  # ascending
        return {"mean": self.mean(cache=use_cache), "eigvals": vals.flip(0).clamp_min(0.0), "U": vecs.flip(1)}


# -------------------------------------------------------------------- validation helpers
LAYOUTS = ("NCHW", "NHWC", "NHW")


def _read_layout(shape: tuple[int, ...], layout: str | None, source: str) -> str:
    """The layout of an image array: ``layout`` when given (checked against the shape), else from the shape
    only where it can mean one thing (see :meth:`Dataset.from_array`)."""
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)} or None, got {layout!r}")
        if len(shape) != len(layout):
            raise ValueError(f"layout: {layout} needs a {len(layout)}-D array, got shape {tuple(shape)}")
        return layout
    if len(shape) == 3:
        return "NHW"
    if len(shape) != 4:
        raise ValueError(f"{source}: expected images as NCHW, NHWC or NHW, got shape {tuple(shape)}")
    first, last = shape[1], shape[-1]
    if last in (1, 3, 4) and first > 4:
        return "NHWC"
    if last in (1, 3, 4) and first not in (1, 3, 4):
        raise ValueError(
            f"{source}: shape {tuple(shape)} is ambiguous (NCHW with {first} channels or NHWC with "
            f"{last}); pass layout='NCHW' or layout='NHWC'"
        )
    return "NCHW"


def standardize_images(
    array: ArrayLike, source: str = "array", value_range: tuple[float, float] | None = None, layout: str | None = None
) -> torch.Tensor:
    """Any supported layout/dtype -> the stored form: (N, C, H, W) uint8, or float32 / float64 in [-1, 1]
    (validated)."""
    if isinstance(array, np.ndarray):
        if array.dtype.kind in "iu" and array.dtype != np.uint8:  # torch lacks most ops on uint16/32/64
            array = array.astype(np.int64)
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # np.frombuffer / memmap: torch wants memory it may write
            array = array.copy()
        array = torch.from_numpy(array)
    x = array
    if not torch.is_tensor(x):
        raise TypeError(f"{source}: expected a numpy array or torch tensor, got {type(array).__name__}")
    found = _read_layout(tuple(x.shape), layout, source)
    if found == "NHW":
        x = x.unsqueeze(1)
    elif found == "NHWC":
        x = x.permute(0, 3, 1, 2)
    if x.shape[0] == 0:
        raise ValueError(f"{source}: the dataset is empty (0 images)")
    return _to_storage(x, source, value_range).contiguous()


def _to_storage(x: torch.Tensor, source: str, value_range: tuple[float, float] | None) -> torch.Tensor:
    """uint8 stays uint8, float64 stays float64; everything else becomes float32 in [-1, 1] after range checks."""
    lo: float
    hi: float
    if x.dtype == torch.uint8:
        if value_range is not None and tuple(value_range) != (0, 255):
            raise ValueError(f"{source}: uint8 images are always in (0, 255), got value_range={value_range}")
        return x
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{source}: expected uint8 or real-valued images, got {x.dtype}")
    if not x.is_floating_point():
        lo, hi = int(x.min()), int(x.max())
        if value_range is None and lo >= 0 and hi <= 255:
            return x.to(torch.uint8)
        x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{source}: {bad} NaN/Inf values in the images")
    lo, hi = (-1.0, 1.0) if value_range is None else map(float, value_range)
    if not hi > lo:
        raise ValueError(f"{source}: value_range must be (low, high) with high > low, got {value_range}")
    xmin, xmax, tol = float(x.min()), float(x.max()), RANGE_TOLERANCE * (hi - lo)
    if xmin < lo - tol or xmax > hi + tol:
        hint = "" if value_range is not None else "; pass value_range=(0, 1) or (0, 255) to rescale"
        raise ValueError(f"{source}: values in [{xmin:g}, {xmax:g}] are outside the range [{lo:g}, {hi:g}]{hint}")
    keep64 = x.dtype == torch.float64
    x = x.to(torch.float64)
    if (lo, hi) != (-1.0, 1.0):
        x = (x - lo) * (2.0 / (hi - lo)) - 1.0
    return x.clamp_(-1.0, 1.0).to(torch.float64 if keep64 else torch.float32)


def _check_images(images: torch.Tensor, source: str) -> None:
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{source}: expected an (N, C, H, W) tensor, got {shape} (use Dataset.from_array)")
    if images.shape[0] == 0 or images.numel() == 0:
        raise ValueError(f"{source}: the dataset is empty (shape {tuple(images.shape)})")
    if images.dtype not in (torch.uint8, torch.float32, torch.float64):
        raise TypeError(
            f"{source}: stored images must be uint8, float32 or float64, got {images.dtype} "
            f"(use Dataset.from_array to convert)"
        )
    if images.dtype != torch.uint8:
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"{source}: NaN/Inf values in the images")
        if float(images.abs().max()) > 1.0 + RANGE_TOLERANCE:
            raise ValueError(f"{source}: float images must lie in [-1, 1], got max |x| = {float(images.abs().max()):g}")


def _check_labels(labels: torch.Tensor | None, n: int, source: str, device: torch.device) -> torch.Tensor | None:
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{source}: {n} images but labels have shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool or (labels.is_floating_point() and not bool((labels == labels.round()).all())):
        raise ValueError(f"{source}: labels must be integers, got {labels.dtype}")
    if labels.numel() and float(labels.min()) < 0:
        raise ValueError(f"{source}: labels must be non-negative class indices, got {float(labels.min()):g}")
    return labels.to(device=device, dtype=torch.int64, copy=True)  # labels are tiny: never alias the caller's


def _take(
    labels: torch.Tensor | None, index: slice | torch.Tensor | None, device: torch.device | str | None = None
) -> torch.Tensor | None:
    if labels is None:
        return None
    out = labels if index is None else labels[index]
    return out.to(device) if device is not None else out
