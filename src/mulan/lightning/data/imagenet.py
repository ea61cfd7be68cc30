"""ImageNet 32x32, old (van den Oord et al.) and new (Chrabaszcz et al.) versions, from files on disk."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mulan.data import nhwc_to_nchw, read_npz_array
from mulan.lightning.data.base import ImageDataModule, Split

_ARRAY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: any other global (a function or class that could run
    code, like ``os.system``) is refused with an error that says the file is unsafe."""

    def __init__(self, file: Any, path: Path, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"ImageNet32DataModule: refused to read {self.path}: it is unsafe, it references {module}.{name}, which "
            "a data file of arrays never needs (loading it could run code). Use the .npz version of the data set."
        )


OWNER = "ImageNet32DataModule"
NPZ_FIX = (
    "Download or extract the data set again, or convert it to a uint8 array saved with numpy.savez(FILE, data=x) "
    "(a cache of decoded PNGs: delete it and it is rebuilt)."
)


def _load_user_pickle(path: Path) -> Any:
    """A Chrabaszcz et al. batch (a dict of numpy arrays), read by :class:`ArrayUnpickler` (numpy arrays and
    plain containers only; any other global is refused, as one-line ValueError, before it is imported)."""
    with open(path, "rb") as f:
        try:
            try:
                return ArrayUnpickler(f, path).load()
            except UnicodeDecodeError:
                f.seek(0)
                return ArrayUnpickler(f, path, encoding="latin1").load()
        except pickle.UnpicklingError as error:
            if "unsafe" in str(error):
                raise ValueError(str(error)) from error
            raise ValueError(_bad_pickle(path, error)) from error
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
            raise ValueError(_bad_pickle(path, error)) from error


def _bad_pickle(path: Path, error: BaseException) -> str:
    return (
        f"{OWNER}: cannot read {path} ({type(error).__name__}: {' '.join(str(error).split())}): it is truncated or "
        f"not a batch of the data set. {NPZ_FIX}"
    )


def _read_new_batch(stem: Path) -> np.ndarray:
    """One Chrabaszcz et al. batch (``stem.npz`` preferred, else pickle ``stem``) -> uint8 (N, 3072)."""
    npz = stem.with_name(stem.name + ".npz")
    if npz.is_file():
        data = read_npz_array(npz, "data", OWNER, NPZ_FIX)
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
        return nhwc_to_nchw(data)
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
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip)
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
            return _to_nchw_32(read_npz_array(npz, "data", OWNER, NPZ_FIX), npz)
        if not folder.is_dir():
            raise FileNotFoundError(self._missing_message(part, [f"{name}/ (or {name}.npz)"]))
        data = _read_png_dir(folder)
        if self.cache and len(data):
            self._write_cache(npz, data)
        return nhwc_to_nchw(data)

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
