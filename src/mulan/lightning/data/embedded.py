"""Data that needs no download: real images shipped with scikit-learn, and synthetic uniform images."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mulan.data import digits_images, photo_crops, resize_uint8, split_indices
from mulan.lightning.data.base import SPLITS, ImageDataModule, Split


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
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip)
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
                self._all = resize_uint8(digits_images(), self.size, self.interpolation)
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


class SyntheticDataModule(ImageDataModule):
    """Uniform random uint8 images of ``shape`` (C, H, W), for tests and benchmarks.

    ``num_train`` train images; ``num_eval`` val and ``num_eval`` (different) test
    images; everything is fixed by ``seed``.
    """

    def __init__(
        self,
        shape: tuple[int, int, int] = (3, 8, 8),
        num_train: int = 256,
        num_eval: int = 64,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"SyntheticDataModule: shape must be 3 positive ints (C, H, W), got {shape}.")
        self.save_hyperparameters()  # (named `shape`, not `image_shape`: that hyper-parameter is the model's)
        self._image_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.num_train, self.num_eval, self.seed = num_train, num_eval, seed

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def _load_split(self, split: Split) -> Tensor:
        n = self.num_train if split == "train" else self.num_eval
        generator = torch.Generator().manual_seed(self.seed * 3 + SPLITS.index(split))
        return torch.randint(0, 256, (n, *self.image_shape), generator=generator, dtype=torch.uint8)

    def _empty_hint(self, split: Split) -> str:
        return "Set num_train / num_eval to at least 1."
