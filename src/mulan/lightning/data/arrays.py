"""Your own images as uint8 arrays in a ``.npy`` or ``.npz`` file.

* ``.npz`` with arrays named ``train`` and ``val`` and/or ``test``: the given split (a missing ``val`` uses
  ``test`` and a missing ``test`` uses ``val``);
* any other ``.npz`` (one array, or the one named by ``key``) or a ``.npy``: split into train / val / test by
  ``seed`` with :func:`mulan.data.hash_split` on each image's position, so appending images never moves an
  earlier one to another split; the split is written to ``split.json`` in the run's log directory.

Arrays are uint8 (N, H, W) (grayscale), (N, H, W, C) or (N, C, H, W) with C = 1 or 3. Their headers are read in
``__init__`` (shape and dtype, no pixels), so a wrong dtype or shape is refused before the model is built; the
pixels are read at ``setup``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mulan.data import hash_split, pickled_data_message
from mulan.lightning.data.base import SPLIT_METHOD, SPLITS, ImageDataModule, Split

Layout = Literal["auto", "NCHW", "NHWC"]
UINT8_FIX = "Save the images as a uint8 array with numpy.save / numpy.savez."
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def npy_header(file) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` from the header of an open ``.npy`` stream (the pixels are not read)."""
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(file)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(file)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def image_layout(shape: tuple[int, ...], layout: Layout) -> str | None:
    """``"NHW"``, ``"NCHW"`` or ``"NHWC"`` for an array of ``shape``; None when ``"auto"`` cannot tell."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) != 4:
        return None
    if layout != "auto":
        return layout
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if first == last:
        return None
    return "NCHW" if first else "NHWC"


def to_nchw(array: np.ndarray, layout: str) -> Tensor:
    """uint8 array in ``layout`` -> contiguous uint8 tensor (N, C, H, W)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if layout == "NHW":
        return tensor.unsqueeze(1)
    if layout == "NHWC":
        return tensor.permute(0, 3, 1, 2).contiguous()
    return tensor


class ArrayDataModule(ImageDataModule):
    """uint8 images from a ``.npy`` or ``.npz`` file (see the module docstring for the layouts).

    Args:
        path: the ``.npy`` or ``.npz`` file.
        key: the array of a ``.npz`` holding several arrays but no ``train``; ``None``: the only array.
        layout: ``"NCHW"`` or ``"NHWC"`` for 4-D arrays; ``"auto"`` tells them apart by which axis has 1 or 3
            entries. 3-D arrays are always (N, H, W) grayscale.
        val_fraction, test_fraction, seed: the split by seed (ignored when the ``.npz`` has ``train``).
        batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        path: str,
        key: str | None = None,
        layout: Layout = "auto",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip)
        if layout not in ("auto", "NCHW", "NHWC"):
            raise ValueError(f"ArrayDataModule: layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}.")
        hash_split([], val_fraction, test_fraction, seed)  # validates the fractions early
        self.save_hyperparameters()
        self.path, self.key, self.layout = Path(path), key, layout
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        headers = self._headers()
        self.sources: dict[Split, str] = self._sources(headers)
        self._layouts = {name: self._check_header(name, *headers[name]) for name in set(self.sources.values())}
        self._image_shape = self._common_shape(headers)
        self.indices: dict[str, Tensor] = self._split(headers)
        self._arrays: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------ headers
    def _headers(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{array name: (shape, dtype)}`` of every array in the file (``""`` for a ``.npy``)."""
        if not self.path.is_file():
            raise FileNotFoundError(
                f"ArrayDataModule: {self.path} does not exist. Pass a .npy or .npz file of uint8 images: "
                "--data.init_args.path FILE."
            )
        try:
            if self.path.suffix.lower() == ".npz":
                with zipfile.ZipFile(self.path) as archive:
                    names = [n for n in archive.namelist() if n.endswith(".npy")]
                    headers = {}
                    for name in names:
                        with archive.open(name) as member:
                            headers[name.removesuffix(".npy")] = npy_header(member)
                    return headers
            with open(self.path, "rb") as file:
                return {"": npy_header(file)}
        except READ_ERRORS as error:
            if "allow_pickle" in str(error):
                raise ValueError(pickled_data_message("ArrayDataModule", self.path, UINT8_FIX)) from error
            detail = " ".join(str(error).split())
            raise ValueError(
                f"ArrayDataModule: cannot read {self.path} as a .npy/.npz file ({type(error).__name__}: {detail}): "
                "it is truncated, corrupted or of another format. Write it with numpy.save / numpy.savez."
            ) from error

    def _name(self, name: str) -> str:
        return f"array in {self.path}" if name == "" else f"array {name!r} in {self.path}"

    def _sources(self, headers: dict) -> dict[Split, str]:
        """Which array each split reads."""
        if "train" in headers:
            given = [s for s in ("val", "test") if s in headers]
            if not given:
                raise ValueError(
                    f"ArrayDataModule: {self.path} has an array 'train' but neither 'val' nor 'test'. Add one of them "
                    "(a missing one uses the other), or rename 'train' to split it by `seed`."
                )
            return {"train": "train", "val": given[0], "test": given[-1]}
        if self.key is not None:
            if self.key not in headers:
                raise ValueError(
                    f"ArrayDataModule: {self.path} has no array {self.key!r}; it has {sorted(headers)}. Set `key` "
                    "to one of them."
                )
            name = self.key
        elif len(headers) == 1:
            name = next(iter(headers))
        else:
            raise ValueError(
                f"ArrayDataModule: {self.path} holds several arrays {sorted(headers) or '(none)'}: set `key` "
                "(--data.init_args.key NAME) to the one with the images, or name them train/val/test."
            )
        return {split: name for split in SPLITS}

    def _check_header(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> str:
        """The array's layout, after checking that it holds uint8 images."""
        where = self._name(name)
        if dtype.hasobject:
            raise ValueError(pickled_data_message("ArrayDataModule", self.path, UINT8_FIX))
        if dtype != np.uint8:
            raise TypeError(
                f"ArrayDataModule: the {where} has dtype {dtype}, but mulan models 8-bit pixels: save uint8 values "
                "0..255 (e.g. np.round(x * 255).astype(np.uint8) for floats in [0, 1])."
            )
        layout = image_layout(shape, self.layout)
        if layout is None or (layout != "NHW" and shape[1 if layout == "NCHW" else 3] not in (1, 3)):
            hint = " Set `layout` to 'NCHW' or 'NHWC' to say which axis holds the channels." if len(shape) == 4 else ""
            raise ValueError(
                f"ArrayDataModule: the {where} has shape {shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
                f"with C = 1 or 3.{hint}"
            )
        return layout

    def _shape_of(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
        layout = self._layouts[name]
        if layout == "NHW":
            return (1, shape[1], shape[2])
        if layout == "NHWC":
            return (shape[3], shape[1], shape[2])
        return (shape[1], shape[2], shape[3])

    def _common_shape(self, headers: dict) -> tuple[int, int, int]:
        shapes = {name: self._shape_of(name, headers[name][0]) for name in self._layouts}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{name!r}: {shape}" for name, shape in sorted(shapes.items()))
            raise ValueError(
                f"ArrayDataModule: the arrays of {self.path} hold images of different shapes (C, H, W): {listed}. "
                "Resize them to one shape before saving."
            )
        return next(iter(shapes.values()))

    def _split(self, headers: dict) -> dict[str, Tensor]:
        """Positions of each split in its array (the split by ``seed`` when one array serves all three)."""
        if self.sources["train"] == "train":
            return {split: torch.arange(headers[name][0][0]) for split, name in self.sources.items()}
        n = headers[self.sources["train"]][0][0]
        parts = hash_split([str(i) for i in range(n)], self.val_fraction, self.test_fraction, self.seed)
        if min(len(p) for p in parts.values()) == 0:
            raise ValueError(
                f"ArrayDataModule: {n} images in {self.path} split by val_fraction={self.val_fraction} and "
                f"test_fraction={self.test_fraction} give "
                + ", ".join(f"{len(parts[s])} {s}" for s in SPLITS)
                + " images; every split needs at least one. Add images, or raise the fraction of the empty split."
            )
        return parts

    # ------------------------------------------------------------------------------------------ pixels
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def _array(self, name: str) -> Tensor:
        if name not in self._arrays:
            try:
                if name == "":
                    array = np.load(self.path, allow_pickle=False)
                else:
                    with np.load(self.path, allow_pickle=False) as data:
                        array = data[name]
            except READ_ERRORS as error:
                if "allow_pickle" in str(error):  # numpy's refusal of pickled objects
                    raise ValueError(pickled_data_message("ArrayDataModule", self.path, UINT8_FIX)) from error
                detail = " ".join(str(error).split())
                raise ValueError(
                    f"ArrayDataModule: cannot read the {self._name(name)} ({type(error).__name__}: {detail}): it is "
                    "truncated or corrupted. Write it again with numpy.save / numpy.savez."
                ) from error
            self._arrays[name] = to_nchw(array, self._layouts[name])
        return self._arrays[name]

    def _load_split(self, split: Split) -> Tensor:
        return self._array(self.sources[split])[self.indices[split]]

    def _empty_hint(self, split: Split) -> str:
        return f"Add images to {self.path}, or lower the fractions of the other splits."

    def split_record(self) -> dict[str, Any] | None:
        """Which positions of the array went to which split (None when the file names its splits)."""
        if self.sources["train"] == "train":
            return None
        return {
            "data": str(self.path),
            "array": self.sources["train"] or None,
            "method": SPLIT_METHOD.format(what="the image's position in the array (0, 1, ...)"),
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "splits": {split: [int(i) for i in self.indices[split]] for split in SPLITS},
        }
