"""Tests of mulan.lightning.data: uint8 (B, C, H, W) batches, splits, file formats, errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from mulan.lightning.data import (
    CIFAR10DataModule,
    EmbeddedDataModule,
    ImageNet32DataModule,
    MNISTDataModule,
    SyntheticDataModule,
    check_images,
    photo_crops,
)


def _rng_images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


# --------------------------------------------------------------------------- embedded


def test_digits_batch_is_uint8_and_equals_sklearn_rescaled() -> None:
    dm = EmbeddedDataModule("digits", batch_size=64)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.uint8 and batch.shape == (64, 1, 8, 8)
    assert tuple(batch.shape[1:]) == dm.image_shape == (1, 8, 8)

    train = dm.datasets["train"].images
    assert int(train.min()) == 0 and int(train.max()) == 255
    raw = load_digits().images
    k = int(dm.indices["train"][5])
    expected = torch.tensor([[round(v * 255 / 16) for v in row] for row in raw[k]], dtype=torch.uint8)
    assert torch.equal(train[5, 0], expected)
    all_images = dm.all_images()[:, 0]
    assert torch.equal(all_images[raw == 16].unique(), torch.tensor([255], dtype=torch.uint8))
    assert torch.equal(all_images[raw == 8].unique(), torch.tensor([128], dtype=torch.uint8))  # 127.5 rounds up


def test_embedded_splits_disjoint_cover_and_seeded() -> None:
    dm = EmbeddedDataModule("digits", seed=0)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.indices.items()}
    assert sizes == {"train": 1437, "val": 180, "test": 180}
    union = torch.cat([dm.indices[s] for s in ("train", "val", "test")])
    assert torch.equal(union.sort().values, torch.arange(1797))  # disjoint + cover

    same = EmbeddedDataModule("digits", seed=0)
    same.setup()
    other = EmbeddedDataModule("digits", seed=1)
    other.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(dm.indices[split], same.indices[split])
        assert torch.equal(dm.datasets[split].images, same.datasets[split].images)
    assert not torch.equal(dm.indices["val"], other.indices["val"])


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"source": "digits"}, (1, 8, 8)),
        ({"source": "digits", "image_size": 16}, (1, 16, 16)),
        ({"source": "digits", "image_size": 12, "interpolation": "bilinear"}, (1, 12, 12)),
        ({"source": "photos"}, (3, 16, 16)),
        ({"source": "photos", "image_size": 32}, (3, 32, 32)),
    ],
)
def test_embedded_image_shape_matches_batches(kwargs: dict, shape: tuple[int, int, int]) -> None:
    dm = EmbeddedDataModule(**kwargs, batch_size=8)
    assert dm.image_shape == shape  # known before any loading
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batch = next(iter(loader))
        assert isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8
        assert tuple(batch.shape) == (8, *shape)


def test_digits_nearest_resize_repeats_pixels() -> None:
    small = EmbeddedDataModule("digits", seed=3)
    big = EmbeddedDataModule("digits", image_size=16, seed=3)
    small.setup("test")
    big.setup("test")
    a, b = small.datasets["test"].images, big.datasets["test"].images
    assert torch.equal(b, a.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_photo_crops_equal_regions_of_sklearn_photos() -> None:
    size = 16
    photos = load_sample_images().images
    crops = photo_crops(size)
    rows, cols = 427 // size, 640 // size
    assert crops.shape == (2 * rows * cols, 3, size, size) and crops.dtype == torch.uint8

    dm = EmbeddedDataModule("photos", image_size=size, seed=0)
    dm.setup("fit")
    for i in (0, 7, len(dm.indices["train"]) - 1):
        k = int(dm.indices["train"][i])
        photo, j = divmod(k, rows * cols)
        r, c = divmod(j, cols)
        region = photos[photo][r * size : (r + 1) * size, c * size : (c + 1) * size]
        expected = torch.from_numpy(region.copy()).permute(2, 0, 1)
        assert torch.equal(dm.datasets["train"].images[i], expected)


def test_empty_split_raises_clear_value_error() -> None:
    dm = EmbeddedDataModule("digits", val_fraction=0.0)
    with pytest.raises(ValueError, match=r"EmbeddedDataModule.*'val' split is empty.*val_fraction"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="'val' split is empty"):
        SyntheticDataModule(num_eval=0).setup("validate")


def test_bad_fractions_rejected() -> None:
    with pytest.raises(ValueError, match="sum to less than 1"):
        EmbeddedDataModule("digits", val_fraction=0.5, test_fraction=0.5)


def test_check_images_validates_dtype_and_shape() -> None:
    with pytest.raises(TypeError, match="uint8"):
        check_images(torch.zeros(2, 1, 8, 8), (1, 8, 8), "M", "train")
    with pytest.raises(ValueError, match=r"expected \(N, 1, 8, 8\)"):
        check_images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), (1, 8, 8), "M", "train")


# --------------------------------------------------------------------------- loaders


def test_drop_last_only_with_a_full_batch() -> None:
    dm = SyntheticDataModule(shape=(1, 4, 4), num_train=10, num_eval=5, batch_size=4)
    dm.setup()
    assert [b.shape[0] for b in dm.train_dataloader()] == [4, 4]
    assert [b.shape[0] for b in dm.val_dataloader()] == [4, 1]

    tiny = SyntheticDataModule(shape=(1, 4, 4), num_train=10, num_eval=5, batch_size=16)
    tiny.setup()
    assert [b.shape[0] for b in tiny.train_dataloader()] == [10]


def test_train_shuffles_eval_does_not() -> None:
    dm = SyntheticDataModule(shape=(1, 2, 2), num_train=64, num_eval=64, batch_size=64)
    dm.setup()
    torch.manual_seed(0)
    assert not torch.equal(next(iter(dm.train_dataloader())), dm.datasets["train"].images)
    assert torch.equal(next(iter(dm.val_dataloader())), dm.datasets["val"].images)
    assert not torch.equal(dm.datasets["val"].images, dm.datasets["test"].images)


def test_hparams_and_image_shape_without_disk(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"), batch_size=7)
    assert dm.image_shape == (3, 32, 32)
    assert dm.hparams["batch_size"] == 7 and dm.hparams["root"] == str(tmp_path / "nowhere")
    assert dm.eval_batch_size == 7
    assert MNISTDataModule(pad_to_32=True).image_shape == (1, 32, 32)
    assert SyntheticDataModule(shape=(2, 5, 6)).hparams["shape"] == (2, 5, 6)


# --------------------------------------------------------------------------- missing files


def test_missing_files_raise_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        CIFAR10DataModule(root=str(tmp_path)).setup("fit")
    msg = str(err.value)
    for part in (
        "cifar-10-batches-py",
        "data_batch_1",
        "test_batch",
        "cifar-10-python.tar.gz",
        "download true",
    ):
        assert part in msg

    with pytest.raises(FileNotFoundError) as err:
        MNISTDataModule(root=str(tmp_path)).setup("fit")
    msg = str(err.value)
    assert str(Path(tmp_path, "MNIST", "raw")) in msg and "train-images-idx3-ubyte" in msg
    assert "t10k-labels-idx1-ubyte" in msg

    with pytest.raises(FileNotFoundError) as err:
        ImageNet32DataModule(root=str(tmp_path), version="old").setup("fit")
    assert "train_32x32/" in str(err.value) and "valid_32x32/" in str(err.value)

    with pytest.raises(FileNotFoundError) as err:
        ImageNet32DataModule(root=str(tmp_path), version="new").setup("fit")
    msg = str(err.value)
    assert "train_data_batch_1" in msg and "train_data_batch_10" in msg and "Imagenet32_train.zip" in msg


# --------------------------------------------------------------------------- real formats, tiny fakes


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_imagenet32_new_reads_pickles_and_prefers_npz(tmp_path: Path) -> None:
    train = _rng_images(20, (3, 32, 32), seed=1)  # CHW images
    for i in range(10):
        _write_pickle(tmp_path / f"train_data_batch_{i + 1}", {"data": train[2 * i : 2 * i + 2].reshape(2, 3072)})
    val = _rng_images(3, (3, 32, 32), seed=2)
    _write_pickle(tmp_path / "val_data", {"data": np.zeros((3, 3072), np.uint8), "labels": [1, 2, 3]})
    np.savez(tmp_path / "val_data.npz", data=val.reshape(3, 3072))

    dm = ImageNet32DataModule(root=str(tmp_path), version="new", batch_size=4)
    dm.setup()
    assert torch.equal(dm.datasets["train"].images, torch.from_numpy(train))
    assert torch.equal(dm.datasets["val"].images, torch.from_numpy(val))  # npz wins over the pickle
    assert torch.equal(dm.datasets["test"].images, torch.from_numpy(val))
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 32, 32)


def test_imagenet32_new_lists_missing_batches(tmp_path: Path) -> None:
    _write_pickle(tmp_path / "train_data_batch_1", {"data": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(FileNotFoundError, match="train_data_batch_2"):
        ImageNet32DataModule(root=str(tmp_path), version="new").setup("fit")


def test_imagenet32_old_reads_pngs_and_caches_npz(tmp_path: Path) -> None:
    sets = {
        "train_32x32": _rng_images(3, (32, 32, 3), seed=3),
        "valid_32x32": _rng_images(2, (32, 32, 3), seed=4),
    }
    for name, images in sets.items():
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{i:05d}.png")

    dm = ImageNet32DataModule(root=str(tmp_path), version="old", batch_size=2)
    dm.setup()
    expected_train = torch.from_numpy(sets["train_32x32"]).permute(0, 3, 1, 2)
    assert torch.equal(dm.datasets["train"].images, expected_train)
    assert torch.equal(dm.datasets["val"].images, torch.from_numpy(sets["valid_32x32"]).permute(0, 3, 1, 2))
    assert (tmp_path / "train_32x32.npz").is_file()

    for png in (tmp_path / "train_32x32").glob("*.png"):
        png.unlink()  # the cache must now be what is read
    again = ImageNet32DataModule(root=str(tmp_path), version="old")
    again.setup("fit")
    assert torch.equal(again.datasets["train"].images, expected_train)


def test_imagenet32_old_accepts_nchw_npz(tmp_path: Path) -> None:
    images = _rng_images(4, (3, 32, 32), seed=5)
    np.savez(tmp_path / "train_32x32.npz", data=images)
    np.savez(tmp_path / "valid_32x32.npz", data=images[:2].transpose(0, 2, 3, 1))
    dm = ImageNet32DataModule(root=str(tmp_path))
    dm.setup("fit")
    assert torch.equal(dm.datasets["train"].images, torch.from_numpy(images))
    assert torch.equal(dm.datasets["val"].images, torch.from_numpy(images[:2]))


def test_cifar10_reads_torchvision_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # fakes have other md5s
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": _rng_images(2, (3, 32, 32), seed=i) for i in range(1, 6)}
    batches["test_batch"] = _rng_images(3, (3, 32, 32), seed=9)
    for name, images in batches.items():
        _write_pickle(folder / name, {"data": images.reshape(len(images), 3072), "labels": [0] * len(images)})
    _write_pickle(folder / "batches.meta", {"label_names": [str(i) for i in range(10)]})

    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4)
    dm.setup()
    train = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    assert torch.equal(dm.datasets["train"].images, torch.from_numpy(train))
    assert torch.equal(dm.datasets["val"].images, torch.from_numpy(batches["test_batch"]))
    assert torch.equal(dm.datasets["test"].images, torch.from_numpy(batches["test_batch"]))
    assert next(iter(dm.train_dataloader())).shape == (4, 3, 32, 32)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("pad", [False, True])
def test_mnist_reads_gzipped_idx_files(tmp_path: Path, pad: bool) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train, test = _rng_images(5, (28, 28), seed=6), _rng_images(3, (28, 28), seed=7)
    arrays = {
        "train-images-idx3-ubyte": train,
        "train-labels-idx1-ubyte": np.arange(5),
        "t10k-images-idx3-ubyte": test,
        "t10k-labels-idx1-ubyte": np.arange(3),
    }
    for name, array in arrays.items():
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write(_idx_bytes(array))

    dm = MNISTDataModule(root=str(tmp_path), pad_to_32=pad, batch_size=2)
    dm.setup()
    got, got_test = dm.datasets["train"].images, dm.datasets["test"].images
    assert got.shape == (5, *dm.image_shape) and got_test.shape == (3, *dm.image_shape)
    inner = (slice(None), 0, slice(2, 30), slice(2, 30)) if pad else (slice(None), 0)
    assert torch.equal(got[inner], torch.from_numpy(train))
    assert torch.equal(got_test[inner], torch.from_numpy(test))
    if pad:
        assert got[:, :, :2].eq(0).all() and got[:, :, :, 30:].eq(0).all()
    assert next(iter(dm.test_dataloader())).dtype == torch.uint8
