"""Loaders for real dataset formats, each returning a :class:`Dataset`; :func:`load_dataset` picks one by path.

Formats: MNIST/Fashion-MNIST idx (gz or raw), CIFAR-10/100 (python pickles or binary batches), image folders
(PNG/JPEG, class = first subfolder), EDM-style zips (+ dataset.json labels), .npy/.npz, in-memory arrays.
Every loader takes the same options: ``resolution`` (bilinear resize), ``grayscale`` (True: to one channel,
False: to RGB), ``pad_to`` (centred black padding), ``labels`` (False drops them), ``device``. Errors name the
file and the problem.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch
from PIL import Image

from . import embedded
from .dataset import ArrayLike, Dataset
from .readers import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, _finish, _options, read_idx
from .transforms import Resolution, as_size, resize, to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
CIFAR_PIXELS = 3 * 32 * 32
CIFAR_SUBFOLDERS = ("cifar-10-batches-py", "cifar-100-python", "cifar-10-batches-bin", "cifar-100-binary")


def _idx_files(path: Path, split: str) -> tuple[Path, Path | None, str]:
    """(images file, labels file or None, split) for an idx directory or a direct images file."""
    if path.is_dir():
        prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"{path}: split must be 'train' or 'test' for idx files, got {split!r}")
        images = _first_existing(path, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
        if images is None:
            raise FileNotFoundError(f"{path}: no {prefix}-images-idx3-ubyte[.gz] file for split {split!r}")
        labels = _first_existing(path, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
        return images, labels, split
    base = re.sub(r"\.gz$", "", path.name)
    stems = [base.replace("images-idx3", "labels-idx1"), base.replace("images.idx3", "labels.idx1")]
    labels = _first_existing(path.parent, [s for s in stems if s != base])
    split = "test" if base.startswith("t10k") else "train" if base.startswith("train") else split
    return path, labels, split


def _first_existing(folder: Path, stems: Iterable[str]) -> Path | None:
    for stem in stems:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_idx(path: str | os.PathLike[str], *, split: str = "train", **options: Any) -> Dataset:
    """MNIST-format idx data: a folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], or an images file.

    The labels file is optional (found next to the images file by name).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    images_path, labels_path, split = _idx_files(path, split)
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected 3 dims (N, H, W), got {images.shape}")
    labels: np.ndarray | None = None
    if labels_path is not None and options.get("labels", True):
        labels = read_idx(labels_path, IDX_LABELS_MAGIC).astype(np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path.name}"
            )
    return _finish(images, labels, source=str(images_path.resolve()), split=split, **_options(options))


# ==================================================================== CIFAR-10 / CIFAR-100
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR pickles hold numpy arrays, lists and bytes only; refuse anything else (pickles can run code)."""

    ALLOWED = frozenset({"_reconstruct", "ndarray", "dtype", "scalar"})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes in protocol-2 pickles
            return super().find_class(module, name)
        if module.split(".")[0] == "numpy" and name in self.ALLOWED:
            if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy 1.x pickles under numpy 2
                module = module.replace("numpy.core", "numpy._core", 1)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not a readable CIFAR python batch ({e})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict in the CIFAR pickle, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch:
        raise ValueError(f"{path}: no 'data' entry in the CIFAR pickle (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        raise ValueError(f"{path}: expected uint8 data of shape (N, {CIFAR_PIXELS}), got {data.dtype} {data.shape}")
    key = "fine_labels" if "fine_labels" in batch else "labels"
    labels = np.asarray(batch.get(key, []), dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} {key} for {data.shape[0]} images")
    _check_class_range(path, labels, 100 if key == "fine_labels" else 10)
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_bin(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of label byte(s) + 3072 pixels; CIFAR-100 has (coarse, fine): the fine label is used."""
    data = path.read_bytes()
    record = label_bytes + CIFAR_PIXELS
    if len(data) == 0 or len(data) % record:
        raise ValueError(
            f"{path}: truncated or not a CIFAR-{10 if label_bytes == 1 else 100} binary batch: "
            f"{len(data)} bytes is not a multiple of the {record}-byte record"
        )
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    _check_class_range(path, labels, 10 if label_bytes == 1 else 100)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _check_class_range(path: Path, labels: np.ndarray, classes: int) -> None:
    """CIFAR-10 labels are 0..9, CIFAR-100 fine labels 0..99: anything else is a corrupt or foreign file."""
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}: record {i} has label {int(labels[i])}, outside the {classes} classes "
            f"0..{classes - 1} ({int(bad.sum())} such records)"
        )


def _cifar_files(path: Path, split: str) -> tuple[list[Path], str] | None:
    """(batch files, 'pickle' | 'bin10' | 'bin100') for a CIFAR folder or file, or None if it is not one."""
    if path.is_file():
        name = path.name
        if name.endswith(".bin"):
            return [path], "bin100" if name in ("train.bin", "test.bin") else "bin10"
        if re.fullmatch(r"data_batch_\d+|test_batch|train|test", name):
            return [path], "pickle"
        return None
    for sub in CIFAR_SUBFOLDERS:  # the folder the official archive extracts to
        if (path / sub).is_dir():
            path = path / sub
            break
    if split not in ("train", "test"):
        raise ValueError(f"{path}: split must be 'train' or 'test' for CIFAR, got {split!r}")

    def batches(pattern: str) -> list[Path]:
        found = [p for p in path.iterdir() if re.fullmatch(pattern, p.name) and p.is_file()]
        return sorted(found, key=lambda p: int(re.sub(r"\D", "", p.name) or 0))

    for train_pattern, test_name, kind in (
        (r"data_batch_\d+", "test_batch", "pickle"),
        (r"data_batch_\d+\.bin", "test_batch.bin", "bin10"),
        (r"train\.bin", "test.bin", "bin100"),
        (r"train", "test", "pickle"),
    ):
        train, test = batches(train_pattern), (path / test_name)
        if train or test.is_file():
            files = train if split == "train" else [test] if test.is_file() else []
            if not files:
                raise FileNotFoundError(f"{path}: no CIFAR batch files for split {split!r}")
            return files, kind
    return None


def load_cifar(path: str | os.PathLike[str], *, split: str = "train", **options: Any) -> Dataset:
    """CIFAR-10/100: a folder (python or binary version, or its parent) or one batch file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    found = _cifar_files(path, split)
    if found is None:
        raise ValueError(
            f"{path}: not a CIFAR batch file or folder (expected data_batch_N/test_batch, "
            f"train/test pickles, or *.bin batches)"
        )
    files, kind = found
    parts = [
        _read_cifar_pickle(f) if kind == "pickle" else _read_cifar_bin(f, 1 if kind == "bin10" else 2) for f in files
    ]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if path.is_file():
        split = "test" if path.name.startswith("test") else "train"
    return _finish(images, labels, source=str(path.resolve()), split=split, **_options(options))


# ==================================================================== image folders and EDM zips
def _decode_images(
    entries: Sequence[tuple[str, Callable[[], IO[bytes]]]], resolution: Resolution | None, grayscale: bool | None
) -> np.ndarray:
    """Decode (name, open-binary-file) entries into (N, C, H, W) uint8, resizing each when asked.

    Grayscale sources stay one channel unless mixed with colour ones (then all become RGB).
    """
    size = as_size(resolution) if resolution is not None else None
    arrays: list[np.ndarray]
    first: tuple[str, tuple[int, ...]] | None
    arrays, first = [], None
    for name, opener in entries:
        try:
            with opener() as f, Image.open(f) as im:
                gray = grayscale if grayscale is not None else im.mode in GRAY_MODES
                arr = np.asarray(_to_8bit(im).convert("L" if gray else "RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{name}: cannot read image ({e})") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if size is not None:
            arr = resize(arr[None], size)[0]
        elif first is None:
            first = (name, arr.shape[1:])
        elif arr.shape[1:] != first[1]:
            raise ValueError(
                f"{name}: image is {arr.shape[1]}x{arr.shape[2]} but {first[0]} is "
                f"{first[1][0]}x{first[1][1]} (height x width); pass resolution= to resize all"
            )
        arrays.append(arr)
    if len({a.shape[0] for a in arrays}) > 1:
        arrays = [to_rgb(a[None])[0] for a in arrays]
    return np.stack(arrays)


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale scaled to 0..255; Pillow's convert("L") would clip it at 255."""
    if im.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return im
    v = np.asarray(im).astype(np.float64)
    if im.mode == "I" and v.size and v.max() <= 255 and v.min() >= 0:  # 8-bit values held as 32-bit
        return Image.fromarray(v.astype(np.uint8), "L")
    lo = 0.0 if im.mode != "I" or v.min() >= 0 else float(np.iinfo(np.int32).min)
    hi = 65535.0 if im.mode != "I" or v.max() <= 65535 else float(np.iinfo(np.int32).max)
    return Image.fromarray(np.rint((v - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8), "L")


def _image_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.lower().endswith(IMAGE_EXTENSIONS) and not any(p.startswith(".") for p in parts)


def load_image_folder(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    resolution: Resolution | None = None,
    grayscale: bool | None = None,
    **options: Any,
) -> Dataset:
    """PNG/JPEG files found recursively, in sorted order. When every image sits inside a subfolder, the label
    is the index of its top-level subfolder name in sorted order (``class_names``); otherwise no labels."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and _image_name(str(p.relative_to(root))))
    if not files:
        raise ValueError(f"{root}: empty dataset: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    rel = [p.relative_to(root).parts for p in files]
    class_names: list[str] | None
    labels: np.ndarray | None
    class_names = labels = None
    if all(len(parts) >= 2 for parts in rel):
        class_names = sorted({parts[0] for parts in rel})
        labels = np.array([class_names.index(parts[0]) for parts in rel], dtype=np.int64)
    # each opener's file is opened and closed by _decode_images
    openers = [(str(p), lambda p=p: open(p, "rb")) for p in files]  # noqa: SIM115
    images = _decode_images(openers, resolution, grayscale)
    return _finish(
        images,
        labels,
        source=str(root.resolve()),
        split=split,
        resolution=resolution,
        grayscale=grayscale,
        class_names=class_names,
        **_options(options),
    )


def load_edm_zip(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    resolution: Resolution | None = None,
    grayscale: bool | None = None,
    **options: Any,
) -> Dataset:
    """An EDM ``dataset_tool.py`` zip: images inside, labels from ``dataset.json`` {"labels": [[name, label]]}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such zip file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a readable zip file ({e})") from None
    with archive:
        names = sorted(n for n in archive.namelist() if _image_name(n) and not n.startswith("__MACOSX"))
        if not names:
            raise ValueError(f"{path}: empty dataset: no image files inside the zip")
        labels: np.ndarray | None = None
        if "dataset.json" in archive.namelist():
            try:
                meta = json.loads(archive.read("dataset.json"))
            except ValueError as e:
                raise ValueError(f"{path}: dataset.json is not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise ValueError(
                    f'{path}: dataset.json must be an object {{"labels": [[name, label], ...]}}, '
                    f"got a JSON {type(meta).__name__}"
                )
            if meta.get("labels") is not None:
                rows = meta["labels"]
                if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 for r in rows):
                    raise ValueError(f"{path}: dataset.json 'labels' must be a list of [name, label] pairs")
                table = dict(rows)
                missing = [n for n in names if n not in table]
                if missing:
                    raise ValueError(
                        f"{path}: dataset.json has no label for {missing[0]} ({len(missing)} images unlabelled)"
                    )
                if not all(
                    isinstance(table[n], int) and not isinstance(table[n], bool) and table[n] >= 0 for n in names
                ):
                    raise ValueError(f"{path}: dataset.json labels must be non-negative integers (class indices)")
                labels = np.array([table[n] for n in names], dtype=np.int64)
        entries = [(f"{path}:{n}", lambda n=n: io.BytesIO(archive.read(n))) for n in names]
        images = _decode_images(entries, resolution, grayscale)
    return _finish(
        images,
        labels,
        source=str(path.resolve()),
        split=split,
        resolution=resolution,
        grayscale=grayscale,
        **_options(options),
    )


# ==================================================================== numpy files and arrays
def load_numpy(
    path: str | os.PathLike[str],
    *,
    split: str = "train",
    value_range: tuple[float, float] | None = None,
    layout: str | None = None,
    **options: Any,
) -> Dataset:
    """.npy (images only) or .npz: images under x_{split}, images_{split}, images, x (else the first array);
    labels under y_{split}, labels_{split}, labels, y. Float data in [-1, 1] unless ``value_range`` says;
    ``layout`` where the shape is ambiguous (see :meth:`Dataset.from_array`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read as .npy/.npz ({e})") from None
    labels: np.ndarray | None = None
    if isinstance(loaded, np.ndarray):
        images = loaded
    else:
        with loaded:
            keys = loaded.files
            if not keys:
                raise ValueError(f"{path}: empty dataset: the .npz holds no arrays")
            image_key = next((k for k in (f"x_{split}", f"images_{split}", "images", "x") if k in keys), keys[0])
            label_key = next((k for k in (f"y_{split}", f"labels_{split}", "labels", "y") if k in keys), None)
            images = loaded[image_key]
            labels = loaded[label_key] if label_key is not None else None
    return _finish(
        images,
        labels,
        source=str(path.resolve()),
        split=split,
        value_range=value_range,
        layout=layout,
        **_options(options),
    )


def load_array(
    array: ArrayLike,
    labels: ArrayLike | Sequence[int] | None = None,
    *,
    source: str = "array",
    split: str | None = None,
    value_range: tuple[float, float] | None = None,
    layout: str | None = None,
    **options: Any,
) -> Dataset:
    """In-memory numpy array or tensor (NCHW, NHWC or NHW, ``layout`` where the shape is ambiguous); see
    :meth:`Dataset.from_array`."""
    return _finish(
        array, labels, source=source, split=split, value_range=value_range, layout=layout, **_options(options)
    )


# ==================================================================== dispatch
def detect_format(path: Path) -> Callable[..., Dataset]:
    """The loader for a path, from its name (files) or contents (folders)."""
    if path.is_dir():
        from .packed import is_packed, load_packed_dataset

        if is_packed(path):
            return load_packed_dataset
        if any(path.glob("*images*idx3-ubyte*")):
            return load_idx
        if _cifar_files(path, "train") is not None or _cifar_files(path, "test") is not None:
            return load_cifar
        return load_image_folder  # raises "no image files" itself when there are none
    name = path.name.lower()
    if name.endswith((".npy", ".npz")):
        return load_numpy
    if name.endswith(".zip"):
        return load_edm_zip
    if "idx" in name and "ubyte" in name:
        return load_idx
    if _cifar_files(path, "train") is not None:
        return load_cifar
    raise ValueError(
        f"{path}: unknown dataset format (expected an idx file, CIFAR batch, .npy/.npz, .zip, or a folder of images)"
    )


def load_dataset(
    source: str | Path | np.ndarray | torch.Tensor,
    *,
    split: str | None = None,
    resolution: Resolution | None = None,
    grayscale: bool | None = None,
    pad_to: Resolution | None = None,
    labels: bool = True,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Load a dataset from a path, a built-in name ("mnist": the embedded 10k test set at 28×28, "mnist32":
    zero-padded to 32×32), or an in-memory array/tensor.

    ``split`` defaults to "train" for files and "test" for the embedded MNIST (the only split shipped).
    """
    options: dict[str, Any] = dict(
        resolution=resolution, grayscale=grayscale, pad_to=pad_to, labels=labels, device=device
    )
    if isinstance(source, (np.ndarray, torch.Tensor)):  # unlabelled; use load_array(images, labels) for labels
        options.pop("labels")
        return load_array(source, split=split, **options)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source: expected a path, a dataset name or an array, got {type(source).__name__}")
    if isinstance(source, str) and not source.strip():  # Path("") is the working directory: never load it
        raise ValueError(
            f"source: empty dataset name or path {source!r} (built-in datasets: "
            f"{', '.join(embedded.NAMES)}, or a file or folder path)"
        )
    # A bare built-in name always means the embedded set, whatever the working directory holds ("./mnist" for
    # a local folder of that name), so that scripts behave the same everywhere.
    if isinstance(source, str) and source.lower() in embedded.NAMES:
        return embedded.load_embedded(source.lower(), split=split, **options)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (built-in datasets: {', '.join(embedded.NAMES)})")
    loader = detect_format(path)
    if split is None and loader in (load_idx, load_cifar, load_numpy):
        split = "train"
    return loader(path, split=split, **options)
