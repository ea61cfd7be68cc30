"""Data helpers of the pure-torch core: in-memory uint8 image sets, checks, splits, and the embedded real images.

Everything here is plain torch/numpy (no Lightning): the data modules of :mod:`mulan.lightning.data` and the
examples build on it. The embedded images come with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from pathlib import Path
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
    "hash_split",
    "split_position",
    "read_npz_array",
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


NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)
"""What numpy raises for a missing, truncated or foreign ``.npz`` (a truncated zip: ``BadZipFile``)."""


def pickled_data_message(owner: str, path: Path | str, fix: str) -> str:
    """The one-line refusal of a data file that holds pickled Python objects."""
    return (
        f"{owner}: refused to read {path}: it holds pickled Python objects (an object array or a pickle), which a "
        f"file of images never needs and whose loading could run code; mulan reads data files without pickle. {fix}"
    )


def read_npz_array(path: Path | str, key: str, owner: str, fix: str) -> np.ndarray:
    """The array ``key`` of the ``.npz`` file ``path``, read with ``allow_pickle=False`` (nothing is unpickled).

    Raises:
        ValueError: one line naming ``path`` and ending with ``fix`` (what to do), chained from numpy's or
            zipfile's error: for a file that holds pickled objects, and for a missing array or a truncated or
            foreign file (``zipfile.BadZipFile``).
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise KeyError(f"no array {key!r}; the file has {sorted(archive.files)}")
            return archive[key]
    except ValueError as error:
        if "allow_pickle" in str(error):  # numpy's refusal of an object array, or of a whole-file pickle
            raise ValueError(pickled_data_message(owner, path, fix)) from error
        raise ValueError(_unreadable_npz(owner, path, error, fix)) from error
    except NPZ_READ_ERRORS as error:
        raise ValueError(_unreadable_npz(owner, path, error, fix)) from error


def _unreadable_npz(owner: str, path: Path | str, error: BaseException, fix: str) -> str:
    detail = " ".join(str(error).split())  # one line
    return (
        f"{owner}: cannot read {path} as a .npz file of arrays ({type(error).__name__}: {detail}): it is truncated, "
        f"corrupted or not a .npz file. {fix}"
    )


HASH_SPLITS = ("train", "val", "test")


def split_position(key: str, seed: int) -> float:
    """Where ``key`` falls in [0, 1): the first 8 bytes of SHA-256(``"<seed>:<key>"``) as a fraction of 2**64."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(keys: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """Partition of ``range(len(keys))`` into train/val/test that stays put when keys are added.

    Each key (a file's relative POSIX path, or an image's position in an array) gets a position
    ``u = split_position(key, seed)``, uniform in [0, 1) and independent of every other key: ``u < test_fraction``
    goes to test, ``u < test_fraction + val_fraction`` to val, the rest to train. Adding or removing keys
    therefore never moves another key between splits, and the fractions hold on average (binomially: about
    ``n * fraction +- sqrt(n * fraction)`` images). One exception keeps small sets usable: a split left empty by
    the hash (its fraction being > 0) takes the one key of the largest split whose position is nearest its
    interval, so with 3 or more keys every split with a positive fraction is non-empty. Each index tensor
    (int64, shape (n_split,)) is sorted.
    """
    if not (0.0 <= val_fraction and 0.0 <= test_fraction and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and sum to less than 1."
        )
    bounds = {"test": (0.0, test_fraction), "val": (test_fraction, test_fraction + val_fraction)}
    bounds["train"] = (test_fraction + val_fraction, 1.0)
    position = [split_position(key, seed) for key in keys]
    members: dict[str, list[int]] = {split: [] for split in HASH_SPLITS}
    for index, u in enumerate(position):
        members["test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"].append(index)
    for split in ("test", "val", "train"):
        low, high = bounds[split]
        if members[split] or high <= low:
            continue
        donor = max(HASH_SPLITS, key=lambda s: len(members[s]))  # the largest split (first of equals)
        if len(members[donor]) < 2:
            continue

        def distance(index: int, low: float = low, high: float = high) -> float:
            return low - position[index] if position[index] < low else position[index] - high

        moved = min(members[donor], key=distance)
        members[donor].remove(moved)
        members[split].append(moved)
    return {split: torch.tensor(sorted(members[split]), dtype=torch.int64) for split in HASH_SPLITS}


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
