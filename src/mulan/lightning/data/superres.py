"""Super-resolution of the embedded colour images: ``(x, y)`` pairs, ``y`` the image ``x`` downsampled, no download.

An inverse problem that runs offline: the model learns ``p(x | y)`` and its bound is ``-log p(x | y)``. ``x`` are the
non-overlapping ``s x s`` crops of scikit-learn's two sample photos (:func:`mulan.data.photo_crops`), ``y`` their
``factor``-times smaller versions by block averaging (each low-resolution pixel the rounded mean of its
``factor x factor`` block), both uint8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mulan.data import check_images, photo_crops, split_indices
from mulan.lightning.data.base import ImageDataModule, Split


def downsample(images: Tensor, factor: int) -> Tensor:
    """Block means of uint8 (N, C, H, W) images, rounded: uint8 (N, C, H / factor, W / factor)."""
    means = F.avg_pool2d(images.float(), factor)
    return means.round().clamp(0, 255).to(torch.uint8)


class ConditionedImages(Dataset):
    """In-memory ``(image, y)`` pairs: ``dataset[i] = (images[i], conditions[i])``, both uint8."""

    def __init__(self, images: Tensor, conditions: Tensor) -> None:
        if images.shape[0] != conditions.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {conditions.shape[0]} conditioning inputs.")
        self.images, self.conditions = images, conditions

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.conditions[index]


class SuperResolutionDataModule(ImageDataModule):
    """``(x, y)`` batches for ``factor``-times super-resolution of the embedded photo crops.

    Every batch is a pair: uint8 ``x`` (B, 3, s, s) and uint8 ``y`` (B, 3, s / factor, s / factor). The crops are
    split deterministically by ``seed`` into train / val / test (``indices[split]`` index ``photo_crops(s)``).

    Args:
        factor: the downsampling factor, 2 or 4 (``image_size`` must be a multiple of it).
        image_size: side ``s`` of the high-resolution crops.
        val_fraction, test_fraction, seed: the split.
        batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        factor: int = 2,
        image_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip)
        if factor not in (2, 4):
            raise ValueError(f"SuperResolutionDataModule: factor must be 2 or 4, got {factor}.")
        if not 1 <= image_size <= 427 or image_size % factor:
            raise ValueError(
                f"SuperResolutionDataModule: image_size={image_size} must be a multiple of factor={factor} "
                "between 1 and 427 (the photos are 427 x 640)."
            )
        split_indices(1, val_fraction, test_fraction, seed)  # validates the fractions early
        self.save_hyperparameters()
        self.factor, self.image_size = factor, image_size
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.indices: dict[str, Tensor] = {}
        self._all: Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def condition_shape(self) -> tuple[int, int, int]:
        """Shape (C, h, w) of one conditioning input ``y``."""
        side = self.image_size // self.factor
        return (3, side, side)

    def _load_split(self, split: Split) -> Tensor:
        if self._all is None:
            self._all = photo_crops(self.image_size)
            self.indices = split_indices(len(self._all), self.val_fraction, self.test_fraction, self.seed)
        return self._all[self.indices[split]]

    def _build(self, split: Split) -> Dataset:
        name = type(self).__name__
        images = check_images(self._load_split(split), self.image_shape, name, split, self._empty_hint(split))
        return ConditionedImages(images, downsample(images, self.factor))

    def _empty_hint(self, split: Split) -> str:
        return "Increase val_fraction/test_fraction (or lower them if train is empty), or use a smaller image_size."
