"""Local-file data sources: IDX (MNIST family) and image folders, on tiny files made here."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedms_jax.data import files
from fedms_jax.data.sources import DataError, load_dataset


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding written independently of the reader: magic 0 0 0x08 ndim, >i4 dims."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_idx_dir(d: Path, n_train=12, n_test=5, size=(6, 7), gz=True, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n,) + size).astype(np.uint8)
        labels = rng.integers(0, 3, n).astype(np.uint8)
        labels[:3] = [0, 1, 2]
        for kind, arr, nd in (("images", images, 3), ("labels", labels, 1)):
            name = f"{split}-{kind}-idx{nd}-ubyte" + (".gz" if gz else "")
            data = _idx_bytes(arr)
            (d / name).write_bytes(gzip.compress(data) if gz else data)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trip(tmp_path, gz):
    want = _write_idx_dir(tmp_path, gz=gz)
    train, test = load_dataset("idx", str(tmp_path))
    for ds, split in ((train, "train"), (test, "t10k")):
        images, labels = want[split]
        np.testing.assert_array_equal(ds.images, images[..., None])
        np.testing.assert_array_equal(ds.labels, labels.astype(np.int32))
        assert ds.images.dtype == np.uint8 and ds.class_names == ("0", "1", "2")


def test_idx_class_names_from_classes_txt_and_fashion_directory(tmp_path):
    _write_idx_dir(tmp_path)
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    assert load_dataset("idx", str(tmp_path))[0].class_names == ("cat", "dog", "bird")
    fashion = tmp_path / "fashion-mnist"
    fashion.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 20), ("t10k", 10)):
        (fashion / f"{split}-images-idx3-ubyte").write_bytes(_idx_bytes(rng.integers(0, 256, (n, 4, 4))))
        (fashion / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(n) % 10))
    assert load_dataset("idx", str(fashion))[0].class_names == files.FASHION_MNIST_CLASSES


def _corrupt(path: Path, how: str) -> None:
    raw = gzip.decompress(path.read_bytes())
    if how == "truncated":
        raw = raw[:-5]
    elif how == "magic":
        raw = b"\x01\x02" + raw[2:]
    elif how == "dtype":
        raw = raw[:2] + b"\x0d" + raw[3:]
    path.write_bytes(gzip.compress(raw))


@pytest.mark.parametrize("how,match", [
    ("truncated", "truncated or wrong file"),
    ("magic", "bad IDX magic number"),
    ("dtype", "type code 0x0d"),
])
def test_idx_malformed_file_names_the_file(tmp_path, how, match):
    _write_idx_dir(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    _corrupt(bad, how)
    with pytest.raises(DataError, match=match) as e:
        load_dataset("idx", str(tmp_path))
    assert str(bad) in str(e.value)


def test_idx_truncated_gzip_missing_file_and_count_mismatch(tmp_path):
    _write_idx_dir(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-12])  # a cut-off download
    with pytest.raises(DataError, match="cannot read") as e:
        files.load_idx(tmp_path)
    assert str(labels) in str(e.value)
    labels.write_bytes(gzip.compress(_idx_bytes(np.zeros(4, np.uint8))))  # 4 labels for 5 images
    with pytest.raises(DataError, match="holds 5 images but .* 4 labels"):
        files.load_idx(tmp_path)
    labels.unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        files.load_idx(tmp_path)
    with pytest.raises(DataError, match="set data.data_dir"):
        load_dataset("idx", "")


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _folder(root: Path, size=(5, 4), mode="RGB", seed=0) -> dict:
    rng = np.random.default_rng(seed)
    made = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("ant", "bee"):
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                arr = rng.integers(0, 256, shape).astype(np.uint8)
                _png(root / split / cls / f"{i}.png", arr)
                made[(split, cls, i)] = arr
    return made


def test_image_folder_rgb_and_grey(tmp_path):
    made = _folder(tmp_path / "rgb")
    train, test = load_dataset("folder", str(tmp_path / "rgb"))
    assert train.class_names == ("ant", "bee") and train.images.shape == (6, 4, 5, 3)
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(train.images[4], made[("train", "bee", 1)])  # PNG is lossless
    np.testing.assert_array_equal(test.images[1], made[("test", "ant", 1)])
    _folder(tmp_path / "grey", mode="L")
    train, _ = load_dataset("folder", str(tmp_path / "grey"))
    assert train.images.shape == (6, 4, 5, 1)  # grey stays 1 channel; preprocess repeats it


def test_image_folder_resize_and_size_mismatch(tmp_path):
    _folder(tmp_path)
    odd = tmp_path / "train" / "bee" / "odd.png"
    _png(odd, np.zeros((9, 9, 3), np.uint8))
    with pytest.raises(DataError, match="set data.image_size") as e:
        load_dataset("folder", str(tmp_path))
    assert str(odd) in str(e.value)
    train, test = load_dataset("folder", str(tmp_path), image_size=8)
    assert train.images.shape == (7, 8, 8, 3) and test.images.shape == (4, 8, 8, 3)


def test_image_folder_errors(tmp_path):
    _folder(tmp_path)
    empty = tmp_path / "train" / "cat"
    empty.mkdir()
    with pytest.raises(DataError, match="has no images") as e:
        load_dataset("folder", str(tmp_path))
    assert str(empty) in str(e.value)
    empty.rmdir()
    broken = tmp_path / "test" / "ant" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot read the image") as e:
        load_dataset("folder", str(tmp_path))
    assert str(broken) in str(e.value)
    broken.unlink()
    (tmp_path / "test" / "wasp").mkdir()
    with pytest.raises(DataError, match=r"class folders \['wasp'\]"):
        load_dataset("folder", str(tmp_path))
    with pytest.raises(DataError, match="no train/"):
        load_dataset("folder", str(tmp_path / "test"))


def test_cli_rejects_bad_local_data_before_compiling(tmp_path, capsys):
    from fedms_jax.cli import main

    (tmp_path / "idx").mkdir()
    _write_idx_dir(tmp_path / "idx")
    (tmp_path / "idx" / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    work = tmp_path / "work"
    rc = main(["run", "--workdir", str(work), "--no-progress", "--config.data.name=idx",
               f"--config.data.data_dir={tmp_path / 'idx'}"])
    assert rc == 1 and "train-images-idx3-ubyte.gz" in capsys.readouterr().err
    assert not work.exists()
    assert main(["run", "--workdir", str(work), "--config.data.name=folder"]) == 2
    assert "config.data.data_dir" in capsys.readouterr().err


def test_idx_corrupt_gzip_body_is_a_data_error(tmp_path):
    _write_idx_dir(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[12:20] = b"\xff" * 8  # inside the deflate stream: zlib.error, not OSError
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cannot read") as e:
        files.load_idx(tmp_path)
    assert str(path) in str(e.value)


def test_image_folder_16_bit_grey_is_scaled_and_32_bit_refused(tmp_path):
    _folder(tmp_path, mode="L")
    deep = tmp_path / "train" / "ant" / "0.png"
    values = np.zeros((4, 5), np.uint16)  # the folder's images are 5 wide, 4 high
    values[0, :4] = [0, 257, 65535, 32896]
    Image.fromarray(values).save(deep)  # uint16 -> mode I;16
    train, _ = load_dataset("folder", str(tmp_path))
    np.testing.assert_array_equal(train.images[0, 0, :4, 0], [0, 1, 255, 128])  # top 8 bits, not clipped
    Image.fromarray(np.zeros((4, 5), np.float32)).save(tmp_path / "train" / "ant" / "1.tiff")
    with pytest.raises(DataError, match="32-bit"):
        load_dataset("folder", str(tmp_path))


def test_subsample_is_stratified_exact_and_seeded():
    from fedms_jax.data.sources import Dataset, subsample

    labels = np.repeat(np.arange(4), [50, 30, 15, 5]).astype(np.int32)
    ds = Dataset(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), labels, ("a", "b", "c", "d"))
    sub = subsample(ds, 20, seed=3)
    assert len(sub) == 20
    np.testing.assert_array_equal(np.bincount(sub.labels, minlength=4), [10, 6, 3, 1])  # 50:30:15:5
    # The images travel with their labels, in the original order, and the seed fixes the draw.
    np.testing.assert_array_equal(labels[sub.images.ravel()], sub.labels)
    assert (np.diff(sub.images.ravel().astype(int)) > 0).all()
    np.testing.assert_array_equal(subsample(ds, 20, seed=3).images, sub.images)
    assert not np.array_equal(subsample(ds, 20, seed=4).images, sub.images)
    assert subsample(ds, 0, seed=3) is ds and subsample(ds, 100, seed=3) is ds
