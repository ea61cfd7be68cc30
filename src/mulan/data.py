"""Data helpers of the pure-torch core: in-memory uint8 image sets, checks, splits, and the embedded real images.

Everything here is plain torch/numpy (no Lightning): the data modules of :mod:`mulan.lightning.data` and the
examples build on it. The embedded images come with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "UInt8Images",
    "check_images",
    "split_indices",
    "nhwc_to_nchw",
    "resize_uint8",
    "digits_images",
    "photo_crops",
]


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


def nhwc_to_nchw(array: np.ndarray) -> Tensor:
    """uint8 numpy array (N, H, W, C) -> contiguous uint8 tensor (N, C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


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


def resize_uint8(images: Tensor, size: int, mode: str) -> Tensor:
    """Resize uint8 (N, C, H, W) to (N, C, size, size), staying uint8."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if mode == "nearest":
        return F.interpolate(images.float(), size=(size, size), mode="nearest").to(torch.uint8)
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)
