"""LightningDataModules that yield batches of uint8 images.

Contract shared by every data module in this file:

* every batch of the train/val/test/predict dataloaders is a ``torch.uint8``
  tensor of shape ``(B, C, H, W)`` with values in ``0..255`` (no labels);
* ``image_shape`` is the ``(C, H, W)`` tuple of one image, known right after
  ``__init__`` without touching the disk (the CLI links it into the model);
* ``__init__`` calls ``save_hyperparameters()`` so a checkpoint can rebuild it.

Concrete modules only implement ``image_shape`` and ``_load_split(split)``,
which returns the uint8 ``(N, C, H, W)`` tensor of one split; the base class
validates it and builds the loaders.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "UInt8Images",
    "ImageDataModule",
    "CIFAR10DataModule",
    "MNISTDataModule",
    "ImageNet32DataModule",
    "EmbeddedDataModule",
    "SyntheticDataModule",
    "check_images",
    "split_indices",
    "digits_images",
    "photo_crops",
]

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


class UInt8Images(Dataset):
    """In-memory data set over a uint8 tensor ``images`` of shape (N, C, H, W).

    ``dataset[i]`` is the uint8 image ``images[i]`` of shape (C, H, W).
    """

    def __init__(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            shape = tuple(getattr(images, "shape", ()))
            raise TypeError(
                "UInt8Images expects a torch.uint8 tensor of shape (N, C, H, W), got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')} {shape}"
            )
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def check_images(images: Any, image_shape: Sequence[int], module: str, split: str, hint: str = "") -> Tensor:
    """Check that ``images`` is a non-empty uint8 tensor of shape (N, *image_shape).

    Raises ``TypeError`` (wrong type/dtype) or ``ValueError`` (wrong shape, or an
    empty split) with a message naming the data module and the split.
    """
    where = f"{module}: the '{split}' split"
    if not isinstance(images, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(images).__name__}.")
    if images.dtype != torch.uint8:
        raise TypeError(f"{where} must have dtype torch.uint8, got {images.dtype}.")
    expected = tuple(int(s) for s in image_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"{where} has shape {tuple(images.shape)}, expected (N, {', '.join(map(str, expected))}).")
    if images.shape[0] == 0:
        raise ValueError(f"{where} is empty (0 images). {hint}".strip())
    return images


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """Deterministic random partition of ``range(n)`` into train/val/test indices.

    ``round(n * val_fraction)`` go to val and ``round(n * test_fraction)`` to test,
    the rest to train; each index tensor (int64, shape (n_split,)) is sorted.
    """
    if not (0.0 <= val_fraction and 0.0 <= test_fraction and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and sum to less than 1."
        )
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val :],
    }
    return {k: v.sort().values for k, v in parts.items()}


def _nhwc_to_nchw(array: np.ndarray) -> Tensor:
    """uint8 numpy array (N, H, W, C) -> contiguous uint8 tensor (N, C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


class ImageDataModule(L.LightningDataModule):
    """Base class: builds uint8 loaders from ``_load_split`` of a subclass.

    Subclasses implement ``image_shape`` (C, H, W) and ``_load_split(split)``
    returning a uint8 tensor (N, C, H, W) for ``split`` in "train"/"val"/"test".
    Batches are uint8 tensors (B, C, H, W); the train loader shuffles and drops
    the last incomplete batch when at least one full batch exists.
    """

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size=}, {eval_batch_size=}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, UInt8Images] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        raise NotImplementedError

    def _load_split(self, split: Split) -> Tensor:
        """Return the uint8 images (N, C, H, W) of ``split``."""
        raise NotImplementedError

    def _empty_hint(self, split: Split) -> str:
        """What to do when ``split`` turns out empty (used in the error message)."""
        return "Check that the data files under `root` are complete and not empty."

    def _stage_splits(self, stage: str | None) -> tuple[Split, ...]:
        """Splits needed by a Lightning stage; all three for ``None``."""
        return STAGE_SPLITS.get(stage or "", SPLITS)

    def setup(self, stage: str | None = None) -> None:
        """Load and validate the splits needed by ``stage`` (all when None)."""
        for split in self._stage_splits(stage):
            if split not in self.datasets:
                self.datasets[split] = self._build(split)

    def _build(self, split: Split) -> UInt8Images:
        name = type(self).__name__
        images = check_images(self._load_split(split), self.image_shape, name, split, self._empty_hint(split))
        return UInt8Images(images)

    def _dataset(self, split: Split) -> UInt8Images:
        if split not in self.datasets:
            self.datasets[split] = self._build(split)
        return self.datasets[split]

    def _loader(self, split: Split, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled uint8 batches (batch_size, C, H, W) of the train split."""
        full_batch = len(self._dataset("train")) >= self.batch_size
        return self._loader("train", self.batch_size, shuffle=True, drop_last=full_batch)

    def val_dataloader(self) -> DataLoader:
        """uint8 batches (eval_batch_size, C, H, W) of the val split, in order."""
        return self._loader("val", self.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        """uint8 batches (eval_batch_size, C, H, W) of the test split, in order."""
        return self._loader("test", self.eval_batch_size, shuffle=False, drop_last=False)

    def predict_dataloader(self) -> DataLoader:
        """Same batches as ``test_dataloader``."""
        return self.test_dataloader()


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)


def _download_failed(message: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(f"{message}\nThe download attempt failed: {type(error).__name__}: {error}")


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 as uint8 images (3, 32, 32).

    train = the 50k training images; val = test = the 10k test images (VDM and
    MuLAN report test-set bits/dim). Files are read with torchvision from
    ``<root>/cifar-10-batches-py/``.
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = download

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def _missing_message(self) -> str:
        folder = self.root / "cifar-10-batches-py"
        missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
        return (
            f"CIFAR10DataModule: CIFAR-10 not found. Expected the directory {folder}/ with the files "
            f"data_batch_1 .. data_batch_5, test_batch and batches.meta (missing: {', '.join(missing)}).\n"
            f"Get it by extracting cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
            f"into {self.root}/, or pass `--data.init_args.download true` on a machine with internet."
        )

    def _files_present(self) -> bool:
        return all((self.root / "cifar-10-batches-py" / f).is_file() for f in CIFAR10_FILES)

    def prepare_data(self) -> None:
        """Download CIFAR-10 if ``download`` and the files are missing."""
        self._ensure_files()

    def _ensure_files(self) -> None:
        if self._files_present():
            return
        if not self.download:
            raise FileNotFoundError(self._missing_message())
        from torchvision import datasets

        try:
            datasets.CIFAR10(str(self.root), train=True, download=True)
        except Exception as error:  # offline, blocked, disk full: explain what to do
            raise _download_failed(self._missing_message(), error) from error
        if not self._files_present():
            raise FileNotFoundError(self._missing_message())

    def _load_split(self, split: Split) -> Tensor:
        return self._read(train=split == "train")

    def _read(self, train: bool) -> Tensor:
        from torchvision import datasets

        self._ensure_files()
        try:
            data = datasets.CIFAR10(str(self.root), train=train, download=False).data
        except RuntimeError as error:  # torchvision's md5 check failed
            raise FileNotFoundError(
                f"CIFAR10DataModule: the files under {self.root / 'cifar-10-batches-py'}/ are corrupted "
                f"({error}). Delete them and extract cifar-10-python.tar.gz again."
            ) from error
        return _nhwc_to_nchw(data)


# --------------------------------------------------------------------------- MNIST

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class MNISTDataModule(ImageDataModule):
    """MNIST as uint8 images (1, 28, 28), or (1, 32, 32) zero-padded if ``pad_to_32``.

    train = the 60k training images; val = test = the 10k test images. Files are
    read with torchvision from ``<root>/MNIST/raw/`` (``.gz`` files are unpacked
    next to themselves on first use).
    """

    def __init__(
        self,
        root: str = "data/mnist",
        download: bool = False,
        pad_to_32: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = download
        self.pad_to_32 = pad_to_32

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 32, 32) if self.pad_to_32 else (1, 28, 28)

    @property
    def raw_folder(self) -> Path:
        return self.root / "MNIST" / "raw"

    def _missing_message(self) -> str:
        return (
            f"MNISTDataModule: MNIST not found. Expected the directory {self.raw_folder}/ with the files "
            f"{', '.join(MNIST_FILES)} (each may also be gzipped, e.g. train-images-idx3-ubyte.gz).\n"
            "Get them from https://ossci-datasets.s3.amazonaws.com/mnist/ (or "
            "http://yann.lecun.com/exdb/mnist/), or pass `--data.init_args.download true` on a machine "
            "with internet."
        )

    def _unpack_gz(self) -> bool:
        """Unpack ``<file>.gz`` where ``<file>`` is missing; True if all 4 files are present."""
        for name in MNIST_FILES:
            plain, packed = self.raw_folder / name, self.raw_folder / f"{name}.gz"
            if not plain.is_file() and packed.is_file():
                with gzip.open(packed, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return all((self.raw_folder / name).is_file() for name in MNIST_FILES)

    def prepare_data(self) -> None:
        """Download MNIST if ``download`` and the files are missing."""
        self._ensure_files()

    def _ensure_files(self) -> None:
        if self._unpack_gz():
            return
        if not self.download:
            raise FileNotFoundError(self._missing_message())
        from torchvision import datasets

        try:
            datasets.MNIST(str(self.root), train=True, download=True)
        except Exception as error:  # offline, blocked, disk full: explain what to do
            raise _download_failed(self._missing_message(), error) from error
        if not self._unpack_gz():
            raise FileNotFoundError(self._missing_message())

    def _load_split(self, split: Split) -> Tensor:
        from torchvision import datasets

        self._ensure_files()
        try:
            data = datasets.MNIST(str(self.root), train=split == "train", download=False).data
        except (RuntimeError, ValueError, AssertionError) as error:
            raise FileNotFoundError(f"{self._missing_message()}\nReading them failed: {error}") from error
        images = data.to(torch.uint8).unsqueeze(1)
        return F.pad(images, (2, 2, 2, 2)) if self.pad_to_32 else images


# --------------------------------------------------------------------------- ImageNet 32x32


def _load_user_pickle(path: Path) -> Any:
    # These are the user's own downloaded data files (Chrabaszcz et al. batches), not checkpoints.
    with open(path, "rb") as f:
        try:
            return pickle.load(f)
        except UnicodeDecodeError:
            f.seek(0)
            return pickle.load(f, encoding="latin1")


def _read_new_batch(stem: Path) -> np.ndarray:
    """One Chrabaszcz et al. batch (``stem.npz`` preferred, else pickle ``stem``) -> uint8 (N, 3072)."""
    npz = stem.with_name(stem.name + ".npz")
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as archive:
            data = archive["data"]
    else:
        entry = _load_user_pickle(stem)
        data = entry["data"] if "data" in entry else entry[b"data"]
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"ImageNet32DataModule: {stem} holds 'data' {data.dtype} {data.shape}, expected uint8 (N, 3072)."
        )
    return data


def _to_nchw_32(data: np.ndarray, source: Path) -> Tensor:
    """uint8 (N, 32, 32, 3) or (N, 3, 32, 32) -> uint8 tensor (N, 3, 32, 32)."""
    if data.dtype == np.uint8 and data.ndim == 4 and data.shape[1:] == (32, 32, 3):
        return _nhwc_to_nchw(data)
    if data.dtype == np.uint8 and data.ndim == 4 and data.shape[1:] == (3, 32, 32):
        return torch.from_numpy(np.ascontiguousarray(data))
    raise ValueError(
        f"ImageNet32DataModule: {source} holds 'data' {data.dtype} {data.shape}, "
        "expected uint8 (N, 32, 32, 3) or (N, 3, 32, 32)."
    )


def _read_png_dir(folder: Path) -> np.ndarray:
    """All ``*.png`` of ``folder`` (sorted by name) -> uint8 (N, 32, 32, 3)."""
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    images = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, file in enumerate(files):
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB"))
        if array.shape != (32, 32, 3):
            raise ValueError(f"ImageNet32DataModule: {file} is {array.shape[1]}x{array.shape[0]}, expected 32x32.")
        images[i] = array
    return images


class ImageNet32DataModule(ImageDataModule):
    """ImageNet 32x32 as uint8 images (3, 32, 32); val = test = the validation set.

    Two versions exist and their bits/dim are NOT comparable:

    * ``version="old"``: van den Oord et al. 2016 (PixelRNN), the version VDM and
      MuLAN report 3.72 / 3.67 bpd on. Put under ``root`` the directories
      ``train_32x32/`` and ``valid_32x32/`` of PNG files (from ``train_32x32.tar``
      and ``valid_32x32.tar``), or ``train_32x32.npz`` / ``valid_32x32.npz`` with
      a uint8 array ``data`` (N, 32, 32, 3) or (N, 3, 32, 32). Decoding ~1.28M
      PNGs is slow, so the first load caches them as ``<root>/train_32x32.npz``
      (and ``valid_32x32.npz``) when ``cache`` is True; later loads read the npz.
    * ``version="new"``: Chrabaszcz et al. 2017 ("Downsampled ImageNet 32x32",
      ``Imagenet32_train.zip`` / ``Imagenet32_val.zip`` from image-net.org). Put
      under ``root`` the pickle files ``train_data_batch_1`` .. ``train_data_batch_10``
      and ``val_data`` (dicts with ``data`` uint8 (N, 3072) in CHW order), or the
      same names with ``.npz``; the zip sub-folders ``Imagenet32_train/`` and
      ``Imagenet32_val/`` are searched as well.
    """

    def __init__(
        self,
        root: str = "data/imagenet32",
        version: Literal["old", "new"] = "old",
        cache: bool = True,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if version not in ("old", "new"):
            raise ValueError(f"ImageNet32DataModule: version must be 'old' or 'new', got {version!r}.")
        self.save_hyperparameters()
        self.root = Path(root)
        self.version = version
        self.cache = cache
        self._arrays: dict[str, Tensor] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def _load_split(self, split: Split) -> Tensor:
        part = "train" if split == "train" else "val"
        if part not in self._arrays:
            self._arrays[part] = self._read_new(part) if self.version == "new" else self._read_old(part)
        return self._arrays[part]

    # ---- version "new" (Chrabaszcz et al. 2017)
    def _new_stems(self, part: str) -> list[str]:
        return [f"train_data_batch_{i}" for i in range(1, 11)] if part == "train" else ["val_data"]

    def _find_new(self, stem: str, part: str) -> Path | None:
        sub = "Imagenet32_train" if part == "train" else "Imagenet32_val"
        for folder in (self.root, self.root / sub):
            if (folder / f"{stem}.npz").is_file() or (folder / stem).is_file():
                return folder / stem
        return None

    def _read_new(self, part: str) -> Tensor:
        found = {stem: self._find_new(stem, part) for stem in self._new_stems(part)}
        missing = [stem for stem, path in found.items() if path is None]
        if missing:
            raise FileNotFoundError(self._missing_message(part, missing))
        data = np.concatenate([_read_new_batch(path) for path in found.values() if path is not None])
        return torch.from_numpy(data).reshape(-1, 3, 32, 32)

    # ---- version "old" (van den Oord et al. 2016)
    def _read_old(self, part: str) -> Tensor:
        name = "train_32x32" if part == "train" else "valid_32x32"
        npz, folder = self.root / f"{name}.npz", self.root / name
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as archive:
                return _to_nchw_32(archive["data"], npz)
        if not folder.is_dir():
            raise FileNotFoundError(self._missing_message(part, [f"{name}/ (or {name}.npz)"]))
        data = _read_png_dir(folder)
        if self.cache and len(data):
            self._write_cache(npz, data)
        return _nhwc_to_nchw(data)

    @staticmethod
    def _write_cache(npz: Path, data: np.ndarray) -> None:
        try:
            np.savez(npz, data=data)
        except OSError as error:
            warnings.warn(f"ImageNet32DataModule: could not cache the decoded PNGs as {npz}: {error}", stacklevel=2)

    def _missing_message(self, part: str, missing: list[str]) -> str:
        head = (
            f"ImageNet32DataModule(version={self.version!r}): the {part} set is missing under {self.root}/: "
            f"{', '.join(missing)}.\n"
        )
        if self.version == "old":
            return head + (
                f"Put under {self.root}/ the directories train_32x32/ and valid_32x32/ of 32x32 PNG files "
                "(extract train_32x32.tar and valid_32x32.tar of van den Oord et al. 2016, "
                "formerly at http://image-net.org/small/download.php), or train_32x32.npz / "
                "valid_32x32.npz with a uint8 array 'data' of shape (N, 32, 32, 3)."
            )
        return head + (
            f"Put under {self.root}/ the files train_data_batch_1 .. train_data_batch_10 and val_data "
            "(or the same names with .npz) of Chrabaszcz et al. 2017: extract Imagenet32_train.zip and "
            "Imagenet32_val.zip (or the *_npz.zip versions) from https://image-net.org/download-images "
            "('Downsampled ImageNet 32x32'). Note: this 'new' version gives bits/dim not comparable to "
            "the 'old' one reported by VDM/MuLAN."
        )


# --------------------------------------------------------------------------- embedded (scikit-learn)


def digits_images() -> Tensor:
    """scikit-learn's 1797 handwritten digits as uint8 (1797, 1, 8, 8).

    The values 0..16 are rescaled by round(v * 255 / 16) (halves round up).
    """
    from sklearn.datasets import load_digits

    values = load_digits().images  # float64 (1797, 8, 8) in 0..16
    return torch.from_numpy(np.floor(values * 255.0 / 16.0 + 0.5).astype(np.uint8)).unsqueeze(1)


def photo_crops(size: int) -> Tensor:
    """Non-overlapping ``size`` x ``size`` crops of scikit-learn's two sample photos.

    Order: photo ('china.jpg', then 'flower.jpg'), then grid row, then grid column;
    crop k of a photo with ``cols = 640 // size`` columns is the region rows
    ``r*size:(r+1)*size``, columns ``c*size:(c+1)*size`` with ``r, c = divmod(k, cols)``.
    Returns uint8 (N, 3, size, size).
    """
    from sklearn.datasets import load_sample_images

    crops = []
    for photo in load_sample_images().images:  # uint8 (427, 640, 3)
        rows, cols = photo.shape[0] // size, photo.shape[1] // size
        grid = photo[: rows * size, : cols * size].reshape(rows, size, cols, size, 3)
        crops.append(grid.transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, size, size))
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(crops)))


def _resize_uint8(images: Tensor, size: int, mode: str) -> Tensor:
    """Resize uint8 (N, C, H, W) to (N, C, size, size), staying uint8."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if mode == "nearest":
        return F.interpolate(images.float(), size=(size, size), mode="nearest").to(torch.uint8)
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


class EmbeddedDataModule(ImageDataModule):
    """Real images shipped with scikit-learn, no download needed.

    * ``source="digits"``: the 1797 8x8 handwritten digits, uint8 (1, 8, 8), or
      (1, s, s) resized with ``interpolation`` when ``image_size=s`` is given.
    * ``source="photos"``: non-overlapping s x s crops (s = ``image_size``,
      default 16) of the two 427x640 sample photos, uint8 (3, s, s).

    The images are split deterministically (by ``seed``) into train / val / test
    with ``round(N * val_fraction)`` val and ``round(N * test_fraction)`` test
    images (digits default: 1437 / 180 / 180). ``indices[split]`` gives the
    positions in ``digits_images()`` / ``photo_crops(s)``.
    """

    def __init__(
        self,
        source: Literal["digits", "photos"] = "digits",
        image_size: int | None = None,
        interpolation: Literal["nearest", "bilinear"] = "nearest",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if source not in ("digits", "photos"):
            raise ValueError(f"EmbeddedDataModule: source must be 'digits' or 'photos', got {source!r}.")
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(
                f"EmbeddedDataModule: interpolation must be 'nearest' or 'bilinear', got {interpolation!r}."
            )
        if image_size is not None and not 1 <= image_size <= (427 if source == "photos" else 1024):
            raise ValueError(f"EmbeddedDataModule: image_size={image_size} is out of range for source={source!r}.")
        split_indices(1, val_fraction, test_fraction, seed)  # validates the fractions early
        self.save_hyperparameters()
        self.source, self.image_size, self.interpolation = source, image_size, interpolation
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self._all: Tensor | None = None
        self.indices: dict[str, Tensor] = {}

    @property
    def size(self) -> int:
        """Side length of the images."""
        return self.image_size or (8 if self.source == "digits" else 16)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1 if self.source == "digits" else 3, self.size, self.size)

    def all_images(self) -> Tensor:
        """Every image of the source before splitting, uint8 (N, C, s, s)."""
        if self._all is None:
            if self.source == "digits":
                self._all = _resize_uint8(digits_images(), self.size, self.interpolation)
            else:
                self._all = photo_crops(self.size)
            self.indices = split_indices(len(self._all), self.val_fraction, self.test_fraction, self.seed)
        return self._all

    def _load_split(self, split: Split) -> Tensor:
        images = self.all_images()
        return images[self.indices[split]]

    def _empty_hint(self, split: Split) -> str:
        return (
            "Increase val_fraction/test_fraction (or lower them if train is empty), "
            "or use a smaller image_size for source='photos' to get more crops."
        )


# --------------------------------------------------------------------------- synthetic


class SyntheticDataModule(ImageDataModule):
    """Uniform random uint8 images of ``image_shape`` (C, H, W), for tests and benchmarks.

    ``num_train`` train images; ``num_eval`` val and ``num_eval`` (different) test
    images; everything is fixed by ``seed``.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (3, 8, 8),
        num_train: int = 256,
        num_eval: int = 64,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"SyntheticDataModule: image_shape must be 3 positive ints (C, H, W), got {image_shape}.")
        self.save_hyperparameters()
        self._image_shape = tuple(int(s) for s in image_shape)
        self.num_train, self.num_eval, self.seed = num_train, num_eval, seed

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape  # type: ignore[return-value]

    def _load_split(self, split: Split) -> Tensor:
        n = self.num_train if split == "train" else self.num_eval
        generator = torch.Generator().manual_seed(self.seed * 3 + SPLITS.index(split))
        return torch.randint(0, 256, (n, *self.image_shape), generator=generator, dtype=torch.uint8)

    def _empty_hint(self, split: Split) -> str:
        return "Set num_train / num_eval to at least 1."
