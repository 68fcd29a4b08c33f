"""Real datasets and the user's own captioned images, read from small fixtures in the real on-disk
formats (idx files, Python 2 pickles, image folders) written here byte by byte: nothing downloads."""

import io
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from minisd.cli import main
from minisd.data import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    CaptionedImages,
    Shapes,
    load_dataset,
)
from minisd.errors import MinisdError

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --- fixtures in the official formats ---------------------------------------------------------
def write_idx(path, array):
    """The idx format: big-endian magic 0x0000 08 ndim (08 = uint8), each dimension, the bytes."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def write_mnist(root, folder="MNIST", n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 + 1) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = images, labels
    return arrays


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2's str (SHORT_BINSTRING, BINSTRING), as cPickle did for
    the official CIFAR-10 files; Python 3's protocol 2 would call _codecs.encode instead."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(data)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + data if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj, numpy_module=b"numpy.core.multiarray"):
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    # numpy 2 names its own module numpy._core; numpy 1 under Python 2 wrote numpy.core
    return f.getvalue().replace(b"numpy._core.multiarray\n", numpy_module + b"\n")


def write_cifar(root, per_batch=4, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(py2_pickle(
        {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR_CLASSES],
         b"num_vis": 3072}))
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": f"batch {k}".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{k}_{i}.png".encode() for i in range(n)]}
        module = b"numpy._core.multiarray" if name == "test_batch" else b"numpy.core.multiarray"
        (folder / name).write_bytes(py2_pickle(batch, module))
        batches[name] = data, labels
    return batches


def save_image(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


# --- MNIST and Fashion-MNIST ------------------------------------------------------------------
def test_mnist_digits_sit_padded_in_every_channel_with_their_captions(tmp_path):
    arrays = write_mnist(tmp_path)
    ds = load_dataset("mnist", "train", root=tmp_path)
    images, labels = arrays["train"]
    assert isinstance(ds, CaptionedImages) and len(ds) == 12 and ds.image_size == 32
    assert ds.images.shape == (12, 3, 32, 32) and ds.images.dtype == torch.uint8
    for c in range(3):
        assert np.array_equal(ds.images[:, c, 2:30, 2:30].numpy(), images)
    border = ds.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.max() == 0  # black padding all round
    assert ds.labels.tolist() == labels.tolist() and ds.caption_ids.tolist() == labels.tolist()
    assert ds.texts[7] == "a handwritten digit seven" and len(ds.texts) == 10
    assert ds.captions == [f"a handwritten digit {MNIST_CLASSES[v]}" for v in labels]
    item = ds[3]
    assert item["caption"] == ds.captions[3] and item["caption_id"] == labels[3]
    assert torch.equal(item["image"], ds.images[3].float() / 255)

    test = load_dataset("mnist", "test", root=tmp_path)
    assert len(test) == 5 and np.array_equal(test.images[:, 1, 2:30, 2:30].numpy(), arrays["t10k"][0])
    assert len(load_dataset("mnist", root=tmp_path, num_images=4)) == 4
    assert len(load_dataset("mnist", root=tmp_path, num_images=100)) == 12  # all there are


def test_fashion_mnist_captions_and_a_smaller_image_size(tmp_path):
    arrays = write_mnist(tmp_path, folder="FashionMNIST", seed=1)
    ds = load_dataset("fashion-mnist", "train", root=tmp_path, num_images=6, image_size=16)
    assert ds.texts[0] == "a photo of a t-shirt" and ds.texts[9] == "a photo of an ankle boot"
    assert ds.captions == [f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}"
                           for c in (FASHION_MNIST_CLASSES[v] for v in arrays["train"][1][:6])]
    # padded to 32 first, then resized: PIL's antialiased bicubic is the reference; torch's cubic
    # kernel is a little sharper (a = -0.75, PIL -0.5), so a few pixels differ by up to ~5
    padded = np.pad(arrays["train"][0][:6], ((0, 0), (2, 2), (2, 2)))
    reference = np.stack([np.asarray(Image.fromarray(p).resize((16, 16), Image.Resampling.BICUBIC))
                          for p in padded]).astype(int)
    assert ds.images.shape == (6, 3, 16, 16)
    diff = np.abs(ds.images[:, 2].numpy().astype(int) - reference)
    assert diff.max() <= 8 and diff.mean() < 0.5  # resizing 28 → 16 without the padding: ~48


# --- CIFAR-10 ---------------------------------------------------------------------------------
def test_cifar10_planes_land_in_their_channels_and_batches_in_order(tmp_path):
    batches = write_cifar(tmp_path)
    ds = load_dataset("cifar10", "train", root=tmp_path)
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.images.shape == (20, 3, 32, 32) and ds.labels.tolist() == labels
    for k in (0, 5, 19):
        for c in range(3):  # red, green, blue planes of 1024 values, each row by row
            assert np.array_equal(ds.images[k, c].numpy(), data[k, c * 1024:(c + 1) * 1024].reshape(32, 32))
    assert ds.texts[:4] == ["a photo of an airplane", "a photo of an automobile", "a photo of a bird",
                            "a photo of a cat"]
    assert ds.captions == [ds.texts[v] for v in labels]

    test = load_dataset("cifar10", "test", root=tmp_path)  # written under numpy 2's module name
    assert len(test) == 3 and np.array_equal(test.images.reshape(3, -1).numpy(), batches["test_batch"][0])
    first = load_dataset("cifar10", root=tmp_path, num_images=6)
    assert torch.equal(first.images, ds.images[:6])
    assert load_dataset("cifar10", root=tmp_path, image_size=16).images.shape == (20, 3, 16, 16)


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_cifar_batch_that_would_run_code_is_refused_unrun(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = py2_pickle({b"data": RunsCommand(f"touch {marker}"), b"labels": []})
    assert b"system" in evil
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(evil)
    with pytest.raises(MinisdError, match=rf"refusing to unpickle .*data_batch_1.*{os.system.__module__}\.system"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()

    path.write_bytes(b"this is no pickle")
    with pytest.raises(MinisdError, match="data_batch_1.* is not a CIFAR-10 batch"):
        load_dataset("cifar10", root=tmp_path)


# --- missing data and splits ------------------------------------------------------------------
@pytest.mark.parametrize("name,place,hint", [
    ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
    ("fashion-mnist", "FashionMNIST/raw", "t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
])
def test_missing_data_names_where_it_looked_and_how_to_get_it(tmp_path, name, place, hint):
    with pytest.raises(MinisdError) as e:
        load_dataset(name, root=tmp_path / "store")
    message = str(e.value)
    assert f"not found in '{tmp_path / 'store' / place}'" in message and hint in message
    assert f"minisd data --dataset {name} --root {tmp_path / 'store'} --download" in message
    assert "\n" not in message


def test_splits_shapes_heldout_and_errors(tmp_path):
    ds = load_dataset("shapes", "heldout", num_images=40, seed=2)
    ref = Shapes("heldout", 40, seed=2)
    assert torch.equal(ds.images, ref.images) and torch.equal(ds.labels, ref.labels)
    assert ds.captions == ref.captions and len(set(ds.texts)) == len(ds.texts)
    assert ds[0]["labels"].shape == (4,)
    write_mnist(tmp_path)
    with pytest.raises(MinisdError, match="unknown split 'heldout' for mnist; allowed: 'train', 'test'"):
        load_dataset("mnist", "heldout", root=tmp_path)
    assert DATASETS == ("shapes", "mnist", "fashion-mnist", "cifar10", "emoji", "emoji-ja", "emoji-both")


# --- the user's own folder --------------------------------------------------------------------
def test_folder_of_images_with_caption_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    save_image(folder / "b.png", np.full((20, 20, 3), (10, 200, 30)))
    save_image(folder / "a.PNG", np.full((32, 32, 3), (250, 0, 0)))
    save_image(folder / "c.bmp", np.full((8, 8, 3), (0, 0, 250)))
    (folder / "a.txt").write_text("  a red square\n", encoding="utf-8")
    (folder / "b.txt").write_text("a green square", encoding="utf-8")
    (folder / "c.txt").write_text("a red square", encoding="utf-8")
    (folder / "notes.md").write_text("not an image")
    (folder / "sub").mkdir()
    save_image(folder / "sub" / "skipped.png", np.zeros((8, 8, 3)))  # subfolders are not searched

    ds = load_dataset(str(folder), image_size=16)
    assert ds.name == str(folder) and ds.split == "train" and ds.labels is None
    assert ds.captions == ["a red square", "a green square", "a red square"]  # sorted by file name
    assert ds.texts == ["a red square", "a green square"] and ds.caption_ids.tolist() == [0, 1, 0]
    assert ds.images.shape == (3, 3, 16, 16)
    for k, colour in enumerate([(250, 0, 0), (10, 200, 30), (0, 0, 250)]):
        assert ds.images[k].reshape(3, -1).T.unique(dim=0).tolist() == [list(colour)]
    assert len(load_dataset(folder, num_images=2)) == 2


def test_captions_jsonl_wins_and_accepts_each_key(tmp_path):
    folder = tmp_path / "mine"
    (folder / "pics").mkdir(parents=True)
    for name in ("x.jpg", "pics/y.webp", "z.png"):
        save_image(folder / name, np.full((12, 12, 3), 128))
    (folder / "x.txt").write_text("ignored: captions.jsonl wins")
    lines = [{"file_name": "x.jpg", "text": "first"}, {"file": "pics/y.webp", "caption": "second"},
             {"image": "z.png", "text": "first", "other": 1}]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    ds = load_dataset(folder, image_size=8)
    assert ds.captions == ["first", "second", "first"] and ds.texts == ["first", "second"]
    assert ds.images.shape == (3, 3, 8, 8) and (ds.images.int() - 128).abs().max() <= 2  # JPEG, WebP


def test_a_wide_image_is_centre_cropped_then_resized(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    wide = np.zeros((40, 60, 3), np.uint8)  # H 40, W 60: green strips of 10 either side get cut
    wide[:, :10] = wide[:, 50:] = (0, 255, 0)
    wide[:, 10:30], wide[:, 30:50] = (255, 0, 0), (0, 0, 255)
    save_image(folder / "wide.png", wide)
    (folder / "wide.txt").write_text("red and blue")
    img = load_dataset(folder, image_size=16).images[0]
    assert img.shape == (3, 16, 16)
    assert img[1].max() == 0  # no green left, not even at the edges
    assert (img[:, :, :6] == torch.tensor([255, 0, 0]).view(3, 1, 1)).all()
    assert (img[:, :, 10:] == torch.tensor([0, 0, 255]).view(3, 1, 1)).all()


def _folder(tmp_path, files):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, content in files.items():
        if isinstance(content, np.ndarray):
            save_image(folder / name, content)
        else:
            (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


IMG = np.zeros((8, 8, 3), np.uint8)


@pytest.mark.parametrize("files,split,message", [
    (None, "train", r"unknown dataset '.*nowhere'; allowed: 'shapes', 'mnist', 'fashion-mnist', 'cifar10', 'emoji', 'emoji-ja', 'emoji-both', or the path"),
    ({}, "train", r"no images in '.*mine': put image files \(.png .jpg .jpeg .webp .bmp\)"),
    ({"a.png": IMG, "b.png": IMG, "a.txt": "x"}, "train", r"image '.*b.png' has no caption; write it into '.*b.txt'"),
    ({"a.png": IMG, "a.txt": " \n"}, "train", r"caption file '.*a.txt' is empty"),
    ({"a.png": IMG, "a.txt": "x"}, "test", r"a folder of images has one split, 'train'"),
    ({"a.png": b"not a png", "a.txt": "x"}, "train", r"cannot read image '.*a.png'"),
    ({"a.png": IMG, "captions.jsonl": '{"file_name": "a.png", "text": "x"}\n{oops\n'}, "train",
     r"captions.jsonl' line 2 is not JSON"),
    ({"a.png": IMG, "captions.jsonl": '{"path": "a.png", "text": "x"}\n'}, "train",
     r"line 1 names no image; .* 'file_name', 'file', 'image'"),
    ({"a.png": IMG, "captions.jsonl": '\n{"file_name": "a.png", "label": "x"}\n'}, "train",
     r"line 2 has no caption; .* 'text', 'caption'"),
    ({"a.png": IMG, "captions.jsonl": '{"file_name": "gone.png", "text": "x"}\n'}, "train",
     r"line 1 names 'gone.png', which does not exist in '.*mine'"),
    ({"a.gif": b"GIF89a", "captions.jsonl": '{"file_name": "a.gif", "text": "x"}\n'}, "train",
     r"line 1 names 'a.gif'; allowed image types: .png .jpg .jpeg .webp .bmp"),
])
def test_folder_mistakes_name_the_bad_file(tmp_path, files, split, message):
    folder = tmp_path / "nowhere" if files is None else _folder(tmp_path, files)
    with pytest.raises(MinisdError, match=message) as e:
        load_dataset(str(folder), split)
    assert "\n" not in str(e.value)


# --- the command ------------------------------------------------------------------------------
def test_data_command_previews_mnist_and_reports_missing_data(tmp_path, capsys):
    write_mnist(tmp_path / "store")
    png = tmp_path / "grid.png"
    assert main(["data", "--dataset", "mnist", "--root", str(tmp_path / "store"), "-n", "8",
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "8 train images of 32×32 from mnist" in capsys.readouterr().out

    assert main(["data", "--dataset", "cifar10", "--root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "other.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: CIFAR-10 not found in '{tmp_path / 'none' / 'cifar-10-batches-py'}'")
    assert err.count("\n") == 1 and not (tmp_path / "other.png").exists()
