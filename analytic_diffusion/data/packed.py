"""Packed datasets for sets larger than memory: uint8 images in a memory-mappable .npy, read in place.

A packed dataset is a folder:

    images.npy    (N, C, H, W) uint8, a plain NumPy file (np.load(..., mmap_mode="r") maps it)
    labels.npy    (N,) int64, when the source had labels
    header.json   format, version, shape, source, split, transform, class names, the images' BLAKE2b checksum,
                  one checksum per block of ``block_rows`` rows (a rank verifies only the blocks it maps) and
                  the labels' checksum (format 2; every load verifies all labels)

:func:`pack` writes one from any :class:`Dataset` in a streaming pass, into a claimed staging folder that
becomes the packed folder only when complete (:class:`analytic_diffusion.files.FolderClaim`); :func:`load_packed` maps it (all rows, or
one rank's rows), verifies the checksums of what it maps and returns a :class:`Dataset` whose images stay in
the file: retrievals and statistics read them chunk by chunk and hand the pages back to the OS after each chunk
(:class:`MappedRows`), so the resident memory stays O(chunk) whatever N.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from ..files import FolderClaim
from .dataset import Dataset
from .transforms import Resolution

if TYPE_CHECKING:
    from ..ops.distributed import ShardGroup

FORMAT = "analytic-diffusion-packed"
VERSION = 2  # 2: the labels have a checksum too
READABLE_VERSIONS = (1, 2)
HEADER, IMAGES, LABELS = "header.json", "images.npy", "labels.npy"
BLOCK_BYTES = 64 * 2**20  # checksum granularity
PAGE = mmap.PAGESIZE


def is_packed(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / HEADER).is_file()


def _hash(buf: bytes | memoryview) -> str:
    return hashlib.blake2b(buf, digest_size=16).hexdigest()


def source_paths(dataset: Dataset) -> list[str]:
    """The files ``dataset`` is read from (its loader's path, a packed set's mapped file): a pack of it must
    never replace them."""
    paths = [dataset.source] if os.path.exists(dataset.source) else []
    mapped = getattr(dataset, "_mapped", None)
    if mapped is not None and getattr(mapped.arr, "filename", None):
        paths.append(os.fspath(mapped.arr.filename))
    return paths


def claim(
    out: str | os.PathLike[str], *, overwrite: bool = False, protect: Iterable[str | os.PathLike[str]] = ()
) -> FolderClaim:
    """The exclusive claim on the folder ``out`` that :func:`write_packed` fills (docs/design.md §14.2): refused
    when ``out`` is a file, a non-empty folder (without ``overwrite``), a folder holding anything but a packed
    set, one of the ``protect`` paths (the source being packed) or a folder another process is writing."""
    return FolderClaim(out, overwrite=overwrite, protect=protect, allowed={HEADER, IMAGES, LABELS})


def pack(
    dataset: Dataset,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, Any]:
    """Write ``dataset`` (uint8 images) to the folder ``out``; returns the header. Streams ``BLOCK_BYTES`` at a time
    into a staging folder that becomes ``out`` only once complete (``overwrite``: replace an existing packed set;
    never the dataset's own files)."""
    _check_packable(dataset)
    with claim(out, overwrite=overwrite, protect=source_paths(dataset)) as c:
        return write_packed(dataset, c, progress=progress)


def _check_packable(dataset: Dataset) -> None:
    if dataset.dtype != torch.uint8:
        raise ValueError(
            f"pack: packed datasets store uint8 images; {dataset.source!r} holds "
            f"{str(dataset.dtype).replace('torch.', '')} (an 8-bit source packs as is)"
        )
    if dataset.sharding is not None:
        raise ValueError("pack: this dataset is one rank's shard; pack the whole set")


def _write_synced(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a new file, flushed to the disk before it counts as written: a full disk is an OSError
    here (ENOSPC), never a SIGBUS later from a mapping whose pages have no room."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def labels_checksum(labels: np.ndarray) -> str:
    return _hash(np.ascontiguousarray(labels, dtype="<i8").data)


def write_packed(
    dataset: Dataset, claimed: FolderClaim, *, progress: Callable[[int, int], object] | None = None
) -> dict[str, Any]:
    """Fill the claimed folder with ``dataset`` and commit it (see :func:`pack`); returns the header."""
    _check_packable(dataset)
    if claimed.stage is None:
        raise RuntimeError("write_packed: the folder claim is not entered (use it in a `with`)")
    stage = Path(claimed.stage)
    images = dataset.images
    n = images.shape[0]
    row_bytes = int(np.prod(images.shape[1:]))
    block_rows = max(1, BLOCK_BYTES // row_bytes)
    whole, blocks = hashlib.blake2b(digest_size=16), []

    def write_images(f: BinaryIO) -> None:
        header = {"descr": "|u1", "fortran_order": False, "shape": tuple(int(v) for v in images.shape)}
        np.lib.format.write_array_header_1_0(f, header)
        for s in range(0, n, block_rows):
            chunk = images[s : s + block_rows].cpu().contiguous().numpy()
            f.write(chunk.data)
            whole.update(chunk.data)
            blocks.append(_hash(chunk.data))
            if progress:
                progress(min(n, s + block_rows), n)

    _write_synced(stage / IMAGES, write_images)
    labels = None if dataset.labels is None else dataset.labels.cpu().numpy().astype("<i8")
    if labels is not None:
        _write_synced(stage / LABELS, lambda f: np.save(f, labels, allow_pickle=False))
    header = {
        "format": FORMAT,
        "version": VERSION,
        "shape": list(images.shape),
        "dtype": "uint8",
        "source": dataset.source,
        "split": dataset.split,
        "transform": dataset.transform,
        "subset": dataset.subset_desc,
        "labels": labels is not None,
        "labels_checksum": None if labels is None else labels_checksum(labels),
        "class_names": None if dataset.class_names is None else list(dataset.class_names),
        "checksum": whole.hexdigest(),
        "block_rows": block_rows,
        "block_checksums": blocks,
    }
    _write_synced(stage / HEADER, lambda f: f.write(json.dumps(header, indent=1).encode()))
    claimed.commit()
    return header


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path) / HEADER
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no packed-dataset header (write one with `analytic-diffusion pack`)")
    try:
        h = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a readable packed-dataset header ({e})") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise ValueError(f"{p}: not a packed-dataset header (format {h.get('format') if isinstance(h, dict) else h!r})")
    if h.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{p}: packed format version {h.get('version')!r}, this reader knows {', '.join(map(str, READABLE_VERSIONS))}"
        )
    for key in ("shape", "checksum", "block_rows", "block_checksums") + (
        ("labels_checksum",) if h["version"] >= 2 else ()
    ):
        if key not in h:
            raise ValueError(f"{p}: the header has no {key!r} entry")
    return h


def _map_images(path: Path, header: dict[str, Any]) -> np.memmap:
    f = path / IMAGES
    if not f.is_file():
        raise FileNotFoundError(f"{f}: the packed images are missing")
    shape = tuple(int(v) for v in header["shape"])
    try:
        arr = np.load(f, mmap_mode="c", allow_pickle=False)  # copy-on-write: writable for torch, file untouched
    except ValueError as e:  # a truncated file fails here (mmap length > file size) or in the npy header
        expected = int(np.prod(shape))
        raise ValueError(
            f"{f}: cannot map the packed images ({e}); the file is {f.stat().st_size} bytes for "
            f"{expected} image bytes plus the .npy header: truncated or corrupted"
        ) from None
    if arr.dtype != np.uint8 or tuple(arr.shape) != shape:
        raise ValueError(f"{f}: holds {arr.dtype} {tuple(arr.shape)}, the header says uint8 {shape}")
    return arr


class MappedRows:
    """Rows of a memory-mapped array that can be given back to the OS once read (``release``)."""

    def __init__(self, arr: np.memmap, start: int) -> None:
        self.arr, self.start = arr, start
        self.row_bytes = int(np.prod(arr.shape[1:]))
        self._mm = arr._mmap  # type: ignore[attr-defined, unused-ignore]  # the mapping np.memmap made; the array starts at arr.offset % granularity in it
        self._base = arr.offset % mmap.ALLOCATIONGRANULARITY if hasattr(arr, "offset") else 0

    def _range(self, a: int, b: int) -> tuple[int, int]:
        lo = self._base + (self.start + a) * self.row_bytes
        hi = self._base + (self.start + b) * self.row_bytes
        lo -= lo % PAGE
        return lo, min(len(self._mm), hi) - lo

    def release(self, a: int, b: int) -> None:
        """Drop the resident pages of rows a:b (shard-local); they are re-read from the file if touched again."""
        lo, length = self._range(a, b)
        if length > 0:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, length)

    def prefetch(self, a: int, b: int) -> None:
        """Ask the OS to start reading rows a:b in the background (overlaps the read with compute)."""
        lo, length = self._range(a, b)
        if length > 0:
            self._mm.madvise(mmap.MADV_WILLNEED, lo, length)


def _verify(path: Path, arr: np.memmap, header: dict[str, Any], start: int, stop: int, pages: MappedRows) -> None:
    """Check the block checksums over rows start:stop (whole blocks), releasing the pages as it goes."""
    block_rows, sums = int(header["block_rows"]), header["block_checksums"]
    n = arr.shape[0]
    if len(sums) != -(-n // block_rows):
        raise ValueError(f"{path / HEADER}: {len(sums)} block checksums for {n} rows in blocks of {block_rows}")
    for b in range(start // block_rows, -(-stop // block_rows)):
        s, e = b * block_rows, min(n, (b + 1) * block_rows)
        if _hash(np.ascontiguousarray(arr[s:e]).data) != sums[b]:
            raise ValueError(
                f"{path / IMAGES}: checksum mismatch in rows {s}:{e} (block {b}): the file is "
                "corrupted or was changed after packing; pack it again"
            )
        pages.release(s - pages.start, e - pages.start)


def _verify_labels(path: Path, labels: np.ndarray, header: dict[str, Any]) -> None:
    """All N labels against the header's checksum (8 bytes a row: cheap next to the images, and a rank's class
    filter needs every label to be right, not only its shard's)."""
    expected = header.get("labels_checksum")
    if expected is None:  # format 1 kept no labels checksum
        warnings.warn(
            f"{path}: packed by an older version without a labels checksum, so the labels are not verified; "
            "pack the source again to protect them",
            stacklevel=3,
        )
        return
    if labels.dtype != np.dtype("<i8") or labels_checksum(labels) != expected:
        raise ValueError(
            f"{path}: the labels do not match the header's checksum: the file is corrupted or was changed "
            "after packing; pack it again"
        )


def load_packed(
    path: str | os.PathLike[str],
    *,
    rows: tuple[int, int] | None = None,
    verify: bool = True,
    device: torch.device | str = "cpu",
) -> Dataset:
    """The packed dataset at ``path``, mapped (not read): all rows, or ``rows`` = (start, stop) only.

    ``verify`` checks the checksums of the blocks holding the mapped rows (one streaming pass). The dataset's
    content fingerprint is the header's whole-file checksum, so every rank that maps a part of the same file
    agrees on it. On another ``device`` than the CPU the rows are copied there (no longer out of core).
    """
    path = Path(path)
    header = read_header(path)
    arr = _map_images(path, header)
    n = arr.shape[0]
    start, stop = (0, n) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= start < stop <= n:
        raise ValueError(f"rows: expected 0 <= start < stop <= {n}, got {start}, {stop}")
    pages = MappedRows(arr, 0)
    if verify:
        _verify(path, arr, header, start, stop, pages)
    labels = None
    if header.get("labels"):
        lf = path / LABELS
        if not lf.is_file():
            raise FileNotFoundError(f"{lf}: the header says the dataset has labels, but the file is missing")
        try:
            lab = np.load(lf, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{lf}: cannot read the labels ({e})") from None
        if lab.shape != (n,):
            raise ValueError(f"{lf}: {lab.shape} labels for {n} images")
        _verify_labels(lf, lab, header)
        labels = torch.from_numpy(np.array(lab[start:stop], dtype=np.int64))
    images = torch.from_numpy(arr[start:stop])  # a view of the mapping: nothing is read yet
    ds = Dataset(
        images,
        labels,
        source=str(header.get("source") or path),
        split=header.get("split"),
        transform=header.get("transform") or "none",
        subset=header.get("subset") or "all",
        class_names=header.get("class_names"),
        device=None if str(device) == "cpu" else device,
    )
    ds._fingerprint = f"packed:{header['checksum']}" + ("" if rows is None else f"[{start}:{stop}]")
    if str(device) == "cpu":
        ds._mapped = MappedRows(arr, start)
    return ds


def load_packed_shard(path: str | os.PathLike[str], group: ShardGroup, *, verify: bool = True) -> Dataset:
    """This rank's shard of the packed dataset at ``path`` (``group``: an ops.distributed.ShardGroup): only the
    shard's rows are mapped and verified. A collective; the ranks first compare the file's checksum."""
    from ..ops.distributed import Shard

    header = read_header(path)
    n = int(header["shape"][0])
    group.check_same("datasets (packed checksums)", f"packed:{header['checksum']} N={n}")
    start, stop = group.shard_range(n)
    ds = load_packed(path, rows=(start, stop), verify=verify)
    ds._shard = Shard(group, start, n)
    ds._fingerprint = f"packed:{header['checksum']}"  # the whole set's (statistics and their cache key)
    return ds


def check_options(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    resolution: Resolution | None = None,
    grayscale: bool | None = None,
    pad_to: Resolution | None = None,
) -> None:
    """Loader options a packed folder cannot honour raise (it is used as packed), before anything is mapped."""
    for name, value in (("resolution", resolution), ("pad_to", pad_to), ("grayscale", grayscale)):
        if value is not None:
            raise ValueError(
                f"{name}: a packed dataset is used as packed ({Path(path) / HEADER}); pack the "
                f"source again with the transform instead"
            )
    packed_split = read_header(path).get("split")
    if split is not None and packed_split is not None and split != packed_split:
        raise ValueError(f"split: {Path(path)} holds the {packed_split!r} split, not {split!r}")


def load_packed_dataset(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    resolution: Resolution | None = None,
    grayscale: bool | None = None,
    pad_to: Resolution | None = None,
    labels: bool = True,
    device: torch.device | str = "cpu",
) -> Dataset:
    """:func:`load_dataset`'s loader for a packed folder: the images are used as packed."""
    check_options(path, split=split, resolution=resolution, grayscale=grayscale, pad_to=pad_to)
    ds = load_packed(path, device=device)
    if not labels and ds.labels is not None:
        ds = ds._derive(ds.images, None)  # the same images: mapping and fingerprint stay
    return ds
