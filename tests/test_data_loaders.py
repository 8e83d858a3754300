"""Every loader on small files written here, plus the errors for bad input (each naming the file/argument)."""

import gzip
import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from analytic_diffusion.data import (
    load_array,
    load_cifar,
    load_dataset,
    load_edm_zip,
    load_idx,
    load_image_folder,
    load_numpy,
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AD_CACHE_DIR", str(tmp_path / "stats-cache"))


def pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ------------------------------------------------------------------ writers for the formats
def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder, prefix, images, labels, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    for kind, magic, arr in (("images-idx3", 2051, images), ("labels-idx1", 2049, labels)):
        data = idx_bytes(arr, magic)
        path = folder / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(data) if gz else data)
    return folder / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}"


def write_png(path, array, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ MNIST idx
@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_both_splits_and_direct_file(tmp_path, gz):
    train, test = pixels((7, 6, 5), 1), pixels((3, 6, 5), 2)
    write_idx(tmp_path, "train", train, np.arange(7) % 10, gz)
    images_file = write_idx(tmp_path, "t10k", test, np.array([4, 5, 6]), gz)
    ds = load_dataset(tmp_path)
    assert ds.split == "train" and ds.images.shape == (7, 1, 6, 5) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(train)) and ds.labels.tolist() == list(range(7))
    ts = load_idx(tmp_path, split="test")
    assert ts.split == "test" and torch.equal(ts.images[:, 0], torch.from_numpy(test))
    direct = load_dataset(images_file)
    assert direct.split == "test" and direct.labels.tolist() == [4, 5, 6]
    assert load_idx(images_file, labels=False).labels is None


def test_idx_errors_name_the_file(tmp_path):
    images_file = write_idx(tmp_path, "train", pixels((4, 3, 3)), np.arange(4), gz=False)
    labels_file = tmp_path / "train-labels-idx1-ubyte"
    good = images_file.read_bytes()
    images_file.write_bytes(good[:-5])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated.*36 bytes of data, found 31"):
        load_idx(tmp_path)
    images_file.write_bytes(good + b"xx")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: 2 unexpected bytes"):
        load_idx(tmp_path)
    images_file.write_bytes(idx_bytes(pixels((4, 3, 3)), 2049))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: wrong magic number 2049 .expected 2051"):
        load_idx(tmp_path)
    images_file.write_bytes(good)
    labels_file.write_bytes(idx_bytes(np.arange(3), 2049))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: 3 labels for 4 images"):
        load_idx(tmp_path)
    gz = tmp_path / "gz" / "train-images-idx3-ubyte.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        load_idx(gz)
    with pytest.raises(FileNotFoundError, match="no t10k-images-idx3-ubyte"):
        load_idx(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="nowhere: no such file"):
        load_idx(tmp_path / "nowhere")


# ------------------------------------------------------------------ CIFAR
def write_cifar_pickle(path, images, labels, key):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(
            {b"data": images.reshape(len(images), -1), key: list(map(int, labels)), b"batch_label": b"x"}, f, protocol=2
        )


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    parts = [pixels((2, 3, 32, 32), s) for s in range(6)]
    for i in range(5):
        write_cifar_pickle(folder / f"data_batch_{i + 1}", parts[i], [i, i], b"labels")
    write_cifar_pickle(folder / "test_batch", parts[5], [9, 8], b"labels")
    train = load_dataset(tmp_path)  # the parent of the extracted archive works too
    assert train.images.shape == (10, 3, 32, 32) and train.split == "train"
    assert torch.equal(train.images, torch.from_numpy(np.concatenate(parts[:5])))
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    test = load_cifar(folder, split="test")
    assert torch.equal(test.images, torch.from_numpy(parts[5])) and test.labels.tolist() == [9, 8]
    single = load_dataset(folder / "test_batch")
    assert single.split == "test" and torch.equal(single.images, test.images)


def test_cifar100_python(tmp_path):
    train, test = pixels((4, 3, 32, 32), 1), pixels((2, 3, 32, 32), 2)
    write_cifar_pickle(tmp_path / "train", train, [10, 20, 30, 99], b"fine_labels")
    write_cifar_pickle(tmp_path / "test", test, [5, 6], b"fine_labels")
    ds = load_dataset(tmp_path)
    assert torch.equal(ds.images, torch.from_numpy(train)) and ds.labels.tolist() == [10, 20, 30, 99]
    assert load_dataset(tmp_path, split="test").labels.tolist() == [5, 6]


def test_cifar_binary_10_and_100(tmp_path):
    images = pixels((3, 3, 32, 32))
    rows10 = np.concatenate([np.array([[1], [2], [3]], np.uint8), images.reshape(3, -1)], 1)
    (tmp_path / "c10").mkdir()
    (tmp_path / "c10" / "data_batch_1.bin").write_bytes(rows10.tobytes())
    (tmp_path / "c10" / "data_batch_2.bin").write_bytes(rows10[:1].tobytes())
    (tmp_path / "c10" / "test_batch.bin").write_bytes(rows10[2:].tobytes())
    ds = load_dataset(tmp_path / "c10")
    assert ds.images.shape == (4, 3, 32, 32) and ds.labels.tolist() == [1, 2, 3, 1]
    assert torch.equal(ds.images[:3], torch.from_numpy(images))
    assert load_dataset(tmp_path / "c10", split="test").labels.tolist() == [3]
    rows100 = np.concatenate([np.array([[0, 50], [1, 60], [2, 70]], np.uint8), images.reshape(3, -1)], 1)
    (tmp_path / "c100").mkdir()
    (tmp_path / "c100" / "train.bin").write_bytes(rows100.tobytes())
    gray = load_cifar(tmp_path / "c10", grayscale=True, resolution=16)
    assert gray.images.shape == (4, 1, 16, 16) and gray.transform == "grayscale,resize16x16bilinear"
    expect = np.array(Image.fromarray(images[1].transpose(1, 2, 0)).convert("L").resize((16, 16), Image.BILINEAR))
    assert torch.equal(gray.images[1, 0], torch.from_numpy(expect))  # same pixels as Pillow end to end
    ds100 = load_cifar(tmp_path / "c100" / "train.bin")
    assert ds100.labels.tolist() == [50, 60, 70] and torch.equal(ds100.images, torch.from_numpy(images))
    (tmp_path / "c100" / "test.bin").write_bytes(rows100.tobytes()[:-1])
    with pytest.raises(ValueError, match=r"test.bin: truncated.*3074-byte record"):
        load_dataset(tmp_path / "c100", split="test")


def test_cifar_pickle_errors(tmp_path):
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_1: not a readable CIFAR python batch"):
        load_dataset(bad)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(bad, "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(ValueError, match="data_batch_1: .*refusing to unpickle builtins.print"):
        load_cifar(bad)
    write_cifar_pickle(bad, pixels((2, 3, 16, 16)), [0, 1], b"labels")
    with pytest.raises(ValueError, match=r"data_batch_1: expected uint8 data of shape \(N, 3072\)"):
        load_cifar(bad)


# ------------------------------------------------------------------ image folders and EDM zips
def test_image_folder_with_classes_png_and_jpeg(tmp_path):
    cats, dogs = pixels((2, 8, 8, 3), 1), pixels((1, 8, 8, 3), 2)
    # JPEG of noise is poor; a gradient survives nearly intact
    cats[0] = np.linspace(0, 255, 8).astype(np.uint8)[None, :, None]
    write_png(tmp_path / "dog" / "a.png", dogs[0])
    write_png(tmp_path / "cat" / "x" / "b.png", cats[1])  # nested deeper: still class "cat"
    write_png(tmp_path / "cat" / "a.png", cats[0])
    write_png(tmp_path / "cat" / "c.jpg", cats[0], "JPEG")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset(tmp_path)
    assert ds.class_names == ("cat", "dog") and ds.labels.tolist() == [0, 0, 0, 1]
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == torch.uint8 and ds.split is None
    # sorted relative paths: cat/a.png, cat/c.jpg, cat/x/b.png, dog/a.png
    assert torch.equal(ds.images[0], torch.from_numpy(cats[0]).permute(2, 0, 1))
    assert torch.equal(ds.images[2], torch.from_numpy(cats[1]).permute(2, 0, 1))
    jpeg_err = (ds.images[1].float() - ds.images[0].float()).abs().mean()
    assert 0 <= jpeg_err < 4  # lossy, but the same picture

    small = load_image_folder(tmp_path, resolution=4, grayscale=True)
    assert small.images.shape == (4, 1, 4, 4) and "grayscale" in small.transform and "resize4x4" in small.transform
    expect = np.array(Image.fromarray(cats[0]).convert("L").resize((4, 4), Image.BILINEAR))
    assert torch.equal(small.images[0, 0], torch.from_numpy(expect))


def test_flat_image_folder_has_no_labels_and_keeps_grayscale(tmp_path):
    gray = pixels((3, 5, 5))
    for i, g in enumerate(gray):
        write_png(tmp_path / f"{i}.png", g)
    ds = load_dataset(tmp_path)
    assert ds.labels is None and ds.class_names is None and ds.images.shape == (3, 1, 5, 5)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(gray))
    rgb = load_dataset(tmp_path, grayscale=False)
    assert rgb.images.shape == (3, 3, 5, 5) and torch.equal(rgb.images[:, 1], rgb.images[:, 0])


def test_image_folder_errors(tmp_path):
    write_png(tmp_path / "a.png", pixels((4, 4, 3)))
    write_png(tmp_path / "b.png", pixels((5, 4, 3)))
    with pytest.raises(ValueError, match=r"b.png: image is 5x4 but .*a.png is 4x4.*resolution="):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, resolution=(3, 2)).images.shape == (2, 3, 3, 2)
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="c.png: cannot read image"):
        load_dataset(tmp_path, resolution=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: empty dataset: no image files"):
        load_image_folder(tmp_path / "empty")


def test_edm_zip_with_labels(tmp_path):
    images = pixels((3, 6, 6, 3))
    names = [f"00000/img{i:08d}.png" for i in range(3)]
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, im in zip(names, images):
            z.writestr(name, png_bytes(im))
        z.writestr("dataset.json", json.dumps({"labels": [[n, l] for n, l in zip(names, [2, 0, 1])]}))
    ds = load_dataset(path)
    assert torch.equal(ds.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == [2, 0, 1]
    assert load_edm_zip(path, pad_to=8).images.shape == (3, 3, 8, 8)
    unlabelled = tmp_path / "nolabels.zip"
    with zipfile.ZipFile(unlabelled, "w") as z:
        z.writestr("a.png", png_bytes(images[0]))
        z.writestr("dataset.json", json.dumps({"labels": None}))
    assert load_dataset(unlabelled).labels is None


def test_edm_zip_errors(tmp_path):
    path = tmp_path / "partial.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.png", png_bytes(pixels((4, 4))))
        z.writestr("b.png", png_bytes(pixels((4, 4))))
        z.writestr("dataset.json", json.dumps({"labels": [["a.png", 1]]}))
    with pytest.raises(ValueError, match="partial.zip: dataset.json has no label for b.png"):
        load_dataset(path)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK not really")
    with pytest.raises(ValueError, match="broken.zip: not a readable zip file"):
        load_dataset(broken)
    bad_image = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad_image, "w") as z:
        z.writestr("x.png", b"nope")
    with pytest.raises(ValueError, match=r"bad.zip:x.png: cannot read image"):
        load_edm_zip(bad_image)


# ------------------------------------------------------------------ numpy files and arrays
def test_npy_and_npz(tmp_path):
    images = pixels((5, 6, 6, 3))
    np.save(tmp_path / "x.npy", images)
    ds = load_dataset(tmp_path / "x.npy")
    assert ds.images.shape == (5, 3, 6, 6) and ds.labels is None
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(5))
    assert load_dataset(tmp_path / "d.npz").labels.tolist() == list(range(5))
    np.savez(tmp_path / "split.npz", x_train=images, y_train=np.arange(5), x_test=images[:2], y_test=[7, 8])
    assert load_numpy(tmp_path / "split.npz", split="test").labels.tolist() == [7, 8]
    floats = images.astype(np.float32) / 255
    np.save(tmp_path / "f.npy", floats)
    with pytest.raises(ValueError, match=r"f.npy: values in \[.*\] are outside the range \[-1, 1\]|f.npy"):
        np.save(tmp_path / "f.npy", floats * 3)
        load_dataset(tmp_path / "f.npy")
    np.save(tmp_path / "f.npy", floats)
    assert load_numpy(tmp_path / "f.npy", value_range=(0, 1)).images.dtype == torch.float32
    nan = floats.copy()
    nan[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ValueError, match="nan.npy: 1 NaN/Inf"):
        load_dataset(tmp_path / "nan.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="empty.npy: the dataset is empty"):
        load_dataset(tmp_path / "empty.npy")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npy: cannot read"):
        load_dataset(tmp_path / "junk.npy")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
def test_in_memory_arrays_with_transforms(layout):
    x = pixels((4, 3, 6, 6)) if layout != "NHW" else pixels((4, 1, 6, 6))
    src = {"NCHW": x, "NHWC": x.transpose(0, 2, 3, 1), "NHW": x[:, 0]}[layout]
    ds = load_dataset(torch.from_numpy(np.ascontiguousarray(src)), labels=False)
    assert torch.equal(ds.images, torch.from_numpy(x)) and ds.source == "array"
    padded = load_array(src, [0, 1, 2, 3], pad_to=10)
    assert padded.images.shape == (4, x.shape[1], 10, 10) and padded.transform == "pad10x10"
    assert torch.equal(padded.images[:, :, 2:8, 2:8], torch.from_numpy(x))
    assert int(padded.images[:, :, :2].max()) == 0 and float(padded.images_float()[:, :, :, :2].max()) == -1.0
    resized = load_array(src, resolution=3)
    assert resized.images.shape == (4, x.shape[1], 3, 3)
    assert resized.images.dtype == torch.uint8 and resized.transform == "resize3x3bilinear"


def test_float_arrays_resize_and_pad_with_minus_one():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 6, 6)).astype(np.float32)
    ds = load_array(x, resolution=4, pad_to=6)
    assert ds.images.dtype == torch.float32 and ds.images.shape == (2, 1, 6, 6)
    assert float(ds.images[:, :, 0].max()) == -1.0 and float(ds.images.abs().max()) <= 1.0


def test_dispatch_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz: no such file or directory"):
        load_dataset(tmp_path / "missing.npz")
    (tmp_path / "thing.csv").write_text("1,2,3")
    with pytest.raises(ValueError, match="thing.csv: unknown dataset format"):
        load_dataset(tmp_path / "thing.csv")
    with pytest.raises(ValueError, match="pad_to: 2x2 is smaller than the images"):
        load_array(pixels((2, 4, 4)), pad_to=2)
    with pytest.raises(ValueError, match="resolution: expected a positive int"):
        load_array(pixels((2, 4, 4)), resolution=0)
    with pytest.raises(TypeError, match="source: expected a path"):
        load_dataset(42)
