"""MNIST, read with torchvision from files on disk."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mulan.lightning.data.base import ImageDataModule, Split, ensure_files

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
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip)
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
        from torchvision import datasets

        def fetch() -> object:
            return datasets.MNIST(str(self.root), train=True, download=True)

        ensure_files(self._unpack_gz, self.download, fetch, self._missing_message)

    def _load_split(self, split: Split) -> Tensor:
        from torchvision import datasets

        self._ensure_files()
        try:
            data = datasets.MNIST(str(self.root), train=split == "train", download=False).data
        except (RuntimeError, ValueError, AssertionError) as error:
            raise FileNotFoundError(f"{self._missing_message()}\nReading them failed: {error}") from error
        images = data.to(torch.uint8).unsqueeze(1)
        return F.pad(images, (2, 2, 2, 2)) if self.pad_to_32 else images
