"""Your own images: a folder of PNG/JPEG files (RGB or grayscale, any size) as uint8 batches.

Two layouts are recognised under ``root``:

* sub-folders ``train/`` and ``val/`` and/or ``test/``: the given split (a missing ``val/`` uses ``test/`` and a
  missing ``test/`` uses ``val/``, as CIFAR-10's val = test);
* anything else: every image under ``root`` (searched recursively, so class sub-folders are fine), split into
  train / val / test by a hash of each file's path relative to ``root`` and ``seed``
  (:func:`mulan.data.hash_split`): the same split on every run and rank, and adding or removing images never
  moves another image to another split. The split (which file went where) is written to ``split.json`` in the
  run's log directory.

Every problem that can be seen without training (no images, unreadable files, mixed sizes without
``image_size``, a colour mode that does not match ``channels``) is raised by ``__init__`` or ``setup`` (from each
file's header) with the file and the option that fixes it named. The pixels are decoded when a batch is built, by
the loader's workers (:class:`FolderImages`), so memory does not grow with the folder; ``on_unreadable: skip``
leaves unreadable files out instead of stopping.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from mulan.data import hash_split, nhwc_to_nchw
from mulan.lightning.data.base import SPLIT_METHOD, SPLITS, ImageDataModule, Split

GRAY_MODES = frozenset({"1", "L", "LA"})
"""PIL modes read as one channel (alpha dropped)."""
COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})
"""PIL modes read as three RGB channels (alpha dropped, palettes expanded)."""
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
READ_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    struct.error,
    EOFError,
    AttributeError,  # a corrupt PNG chunk name: 'PngStream' object has no attribute 'chunk_...'
    IndexError,
    KeyError,
    TypeError,
    zlib.error,
)
"""What PIL raises for unreadable, truncated or corrupt files (each becomes a ValueError naming the file)."""
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
"""EXIF orientations that swap width and height (the image is rotated by 90 degrees when read)."""


def list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Image files under ``folder`` (recursively; hidden files and folders skipped), sorted by relative path."""
    suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    found = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def mode_channels(mode: str) -> int | None:
    """1 for grayscale PIL modes, 3 for colour ones, None for modes mulan cannot read as 8-bit (16-bit, float)."""
    if mode in GRAY_MODES:
        return 1
    if mode in COLOUR_MODES:
        return 3
    return None


def describe_mode(mode: str) -> str:
    """``"grayscale (PIL mode 'L')"``, ``"colour (PIL mode 'RGB')"``, ..."""
    kind = {1: "grayscale", 3: "colour"}.get(mode_channels(mode) or 0, "not 8-bit")
    return f"{kind} (PIL mode {mode!r})"


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` once the EXIF orientation is applied, read from the header alone."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in TRANSPOSED_ORIENTATIONS else (width, height)


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square of ``image``."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


class UnreadableImageError(ValueError):
    """A file PIL cannot open or decode (not an image, truncated, corrupt): the one error ``on_unreadable: skip``
    leaves out (a wrong size or colour mode is a configuration problem and is always refused)."""


class ImageReader:
    """Reads one file of a folder as uint8 ``(H, W, C)`` of ``image_shape``: oriented, converted, cropped, resized.

    Holds only the options (paths and plain values), so DataLoader worker processes can pickle it. Every read
    checks that image against the options (colour mode unless ``convert``, size when ``image_size`` is ``None``)
    and names the file in the error.

    Args:
        root: the data folder (named in the messages).
        image_shape: ``(C, H, W)`` of the images it returns.
        channels: the ``channels`` option as given (``None``: taken from the first image), for the messages.
        image_size, crop, interpolation, convert: as for :class:`ImageFolderDataModule`.
        first: the reference image (the first training image) and its ``(PIL mode, (width, height))``, named when
            another image differs from it.
    """

    def __init__(
        self,
        root: Path,
        image_shape: tuple[int, int, int],
        channels: int | None,
        image_size: int | None,
        crop: str,
        interpolation: str,
        convert: bool,
        first: tuple[Path, str, tuple[int, int]],
    ) -> None:
        self.root, self.image_shape, self.channels = root, image_shape, channels
        self.image_size, self.crop, self.interpolation, self.convert = image_size, crop, interpolation, convert
        self.first = first

    def unreadable(self, path: Path, error: BaseException) -> UnreadableImageError:
        return UnreadableImageError(
            f"ImageFolderDataModule: cannot read the image {path} ({type(error).__name__}: "
            f"{' '.join(str(error).split())}). Delete or replace the file, move it out of {self.root}, or set "
            "`on_unreadable: skip` (--data.init_args.on_unreadable skip) to leave unreadable files out."
        )

    def open(self, path: Path) -> Image.Image:
        try:
            return Image.open(path)
        except READ_ERRORS as error:
            raise self.unreadable(path, error) from error

    def header(self, path: Path) -> tuple[str, tuple[int, int]]:
        """``(PIL mode, (width, height))`` of an image file, from its header (the pixels are not decoded)."""
        with self.open(path) as image:
            try:
                return image.mode, oriented_size(image)
            except READ_ERRORS as error:
                raise self.unreadable(path, error) from error

    def check(self, path: Path, mode: str, size: tuple[int, int]) -> None:
        """Refuse a file whose colour mode differs from ``image_shape``'s (unless ``convert``) or, without
        ``image_size``, whose size differs from the first image's."""
        channels = readable_channels(path, mode)
        first, first_mode, first_size = self.first
        if channels != self.image_shape[0] and not self.convert:
            raise ValueError(self._mode_message(path, mode, first, first_mode))
        if self.image_size is None and size != first_size:
            raise ValueError(
                f"ImageFolderDataModule: the images under {self.root} have different sizes: {first} is "
                f"{first_size[0]}x{first_size[1]} and {path} is {size[0]}x{size[1]} (width x height). Set "
                "`image_size` to centre-crop and resize every image to one size, e.g. "
                f"--data.init_args.image_size {min(*first_size, *size)}."
            )

    def _mode_message(self, path: Path, mode: str, first: Path, first_mode: str) -> str:
        c = self.image_shape[0]
        target, other = ("RGB", "grayscale") if c == 3 else ("grayscale", "colour")
        if self.channels is None:
            return (
                f"ImageFolderDataModule: the images under {self.root} mix colour modes: {first} is "
                f"{describe_mode(first_mode)} and {path} is {describe_mode(mode)}. Set `channels` "
                f"(--data.init_args.channels 1 or 3) and `convert: true` (--data.init_args.convert true) to convert "
                "every image to one mode."
            )
        return (
            f"ImageFolderDataModule: {path} is {describe_mode(mode)} but channels={c} (image_shape "
            f"{self.image_shape}). Set `channels: {4 - c}` (--data.init_args.channels {4 - c}) if your data is "
            f"{other}, or set `convert: true` (--data.init_args.convert true) to convert every image to {target}."
        )

    def read(self, path: Path) -> np.ndarray:
        """One image as uint8 (H, W, C) of ``image_shape``, checked (:meth:`check`) before it is decoded.

        Raises:
            UnreadableImageError: PIL cannot open or decode the file (named).
            ValueError: the file's colour mode or size does not match (named, with the option that fixes it).
        """
        channels, height, width = self.image_shape
        with self.open(path) as image:
            try:
                mode, size = image.mode, oriented_size(image)
            except READ_ERRORS as error:
                raise self.unreadable(path, error) from error
            self.check(path, mode, size)
            try:
                image.load()
                picture = ImageOps.exif_transpose(image).convert("L" if channels == 1 else "RGB")
            except READ_ERRORS as error:
                raise self.unreadable(path, error) from error
        if self.image_size is not None:
            if self.crop == "centre":
                picture = centre_square(picture)
            if picture.size != (width, height):
                picture = picture.resize((width, height), RESAMPLING[self.interpolation])
        array = np.array(picture, dtype=np.uint8)  # a writable copy
        return array.reshape(height, width, channels)


def readable_channels(path: Path, mode: str) -> int:
    """1 or 3 for an 8-bit PIL mode; a ValueError naming ``path`` for 16-bit and float images."""
    channels = mode_channels(mode)
    if channels is None:
        raise ValueError(
            f"ImageFolderDataModule: {path} is not an 8-bit image ({describe_mode(mode)}; 16-bit and float "
            "images are not supported). mulan models 8-bit pixels: save it as an 8-bit grayscale or RGB image."
        )
    return channels


class FolderImages(Dataset):
    """The images of one split, decoded when indexed (by the loader's worker processes), never held in memory.

    ``dataset[i]`` is the uint8 ``(C, H, W)`` tensor of ``files[i]`` (:meth:`ImageReader.read`). With
    ``skip_unreadable``, a file that cannot be decoded gives ``None`` instead (the loaders' collate leaves it out,
    so that batch is one image short) and a warning naming it; otherwise its error is raised.
    """

    def __init__(self, files: Sequence[Path], reader: ImageReader, skip_unreadable: bool = False) -> None:
        self.files, self.reader, self.skip_unreadable = list(files), reader, skip_unreadable

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor | None:
        path = self.files[index]
        try:
            array = self.reader.read(path)
        except UnreadableImageError as error:
            if not self.skip_unreadable:
                raise
            warnings.warn(f"{error} Skipped (on_unreadable='skip').", stacklevel=2)
            return None
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()

    def decode_all(self) -> Tensor:
        """Every image of the split decoded, uint8 (N, C, H, W) (N x C x H x W bytes: for small sets, tests, or
        writing an ``.npz``); unreadable files raise even with ``skip_unreadable``."""
        channels, height, width = self.reader.image_shape
        images = np.empty((len(self.files), height, width, channels), dtype=np.uint8)
        for i, path in enumerate(self.files):
            images[i] = self.reader.read(path)
        return nhwc_to_nchw(images) if len(self.files) else torch.empty(0, channels, height, width, dtype=torch.uint8)


class ImageFolderDataModule(ImageDataModule):
    """A folder of PNG/JPEG images as uint8 images (C, H, W), decoded lazily by the loaders' workers.

    Args:
        root: the folder (see the module docstring for the two layouts).
        channels: 1 (grayscale) or 3 (RGB); ``None``: those of the first image. Images of the other kind are
            refused unless ``convert`` is set.
        image_size: ``s``: every image becomes ``s x s`` (see ``crop``); ``None``: the images keep their size,
            which must then be the same for all.
        crop: with ``image_size``: ``"centre"`` takes the largest centred square first (keeps the aspect
            ratio), ``"none"`` resizes the whole image (stretches non-square images).
        interpolation: the resampling filter of the resize (PIL's; ``"bicubic"``, ``"lanczos"`` and ``"box"``
            antialias when shrinking).
        convert: convert images whose colour mode differs from ``channels`` (grayscale -> RGB repeats the
            channel; RGB -> grayscale takes the luminance) instead of refusing them.
        val_fraction, test_fraction, seed: the split by a hash of each file's relative path and ``seed``
            (ignored when ``root`` has ``train/``); stable when images are added.
        extensions: file suffixes read as images (case-insensitive).
        on_unreadable: ``"refuse"`` (default): a file PIL cannot open or decode stops the run with an error naming
            it; ``"skip"``: such files are left out: those whose header is unreadable at ``setup`` (one warning
            with the count and the first names; listed under ``skipped`` in ``split.json``), those that fail later
            when decoded (truncated pixels) with a warning each, their batch one image short.
        batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip: see :class:`ImageDataModule`.

    ``setup`` reads every file's header (mode and size, no pixels) and refuses wrong modes and sizes before the
    first step; the pixels are decoded when a batch is built (by ``num_workers`` worker processes), so memory
    does not grow with the folder; each read checks its image again and names the file in any error.
    """

    def __init__(
        self,
        root: str,
        channels: int | None = None,
        image_size: int | None = None,
        crop: Literal["centre", "none"] = "centre",
        interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = "bicubic",
        convert: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        extensions: Sequence[str] = (".png", ".jpg", ".jpeg"),
        on_unreadable: Literal["refuse", "skip"] = "refuse",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip)
        self._check_options(channels, image_size, crop, interpolation)
        if on_unreadable not in ("refuse", "skip"):
            raise ValueError(f"ImageFolderDataModule: on_unreadable must be 'refuse' or 'skip', got {on_unreadable!r}.")
        hash_split([], val_fraction, test_fraction, seed)  # validates the fractions early
        self.save_hyperparameters()
        self.root = Path(root)
        self.channels, self.image_size, self.crop = channels, image_size, crop
        self.interpolation, self.convert = interpolation, convert
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.extensions = tuple(extensions)
        self.on_unreadable = on_unreadable
        self.skipped: list[Path] = []
        self.files: dict[Split, list[Path]] = self._split_files()
        self.reader = self._first_image_reader()
        self._headers_checked = False

    @staticmethod
    def _check_options(channels: int | None, image_size: int | None, crop: str, interpolation: str) -> None:
        if channels not in (None, 1, 3):
            raise ValueError(f"ImageFolderDataModule: channels must be 1 (grayscale), 3 (RGB) or null, got {channels}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"ImageFolderDataModule: image_size must be >= 1 or null, got {image_size}.")
        if crop not in ("centre", "none"):
            raise ValueError(f"ImageFolderDataModule: crop must be 'centre' or 'none', got {crop!r}.")
        if interpolation not in RESAMPLING:
            raise ValueError(
                f"ImageFolderDataModule: interpolation must be one of {', '.join(RESAMPLING)}, got {interpolation!r}."
            )

    # ------------------------------------------------------------------------------------------ files and splits
    def _split_files(self) -> dict[Split, list[Path]]:
        """The image files of each split (sub-folders, or a split of everything by ``seed``)."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"ImageFolderDataModule: the image folder {self.root} does not exist. Pass the folder holding your "
                "PNG/JPEG images: --data.init_args.root PATH."
            )
        if (self.root / "train").is_dir():
            return self._given_split_files()
        files = list_images(self.root, self.extensions)
        if not files:
            raise ValueError(
                f"ImageFolderDataModule: no images under {self.root} (searched recursively for "
                f"{', '.join(self.extensions)}). Put your images there, or set `extensions` for other file types."
            )
        keys = [path.relative_to(self.root).as_posix() for path in files]
        parts = hash_split(keys, self.val_fraction, self.test_fraction, self.seed)
        counts = {split: len(parts[split]) for split in SPLITS}
        if min(counts.values()) == 0:
            raise ValueError(
                f"ImageFolderDataModule: {len(files)} images under {self.root} split by val_fraction="
                f"{self.val_fraction} and test_fraction={self.test_fraction} give "
                + ", ".join(f"{n} {split}" for split, n in counts.items())
                + " images; every split needs at least one. Add images, or raise the fraction of the empty split."
            )
        return {split: [files[int(i)] for i in parts[split]] for split in SPLITS}

    def _given_split_files(self) -> dict[Split, list[Path]]:
        """``train/``, ``val/``, ``test/`` under ``root``; a missing ``val/`` or ``test/`` uses the other."""
        found = {split: list_images(self.root / split, self.extensions) for split in SPLITS}
        present = {split for split in SPLITS if (self.root / split).is_dir()}
        if not {"val", "test"} & present:
            raise ValueError(
                f"ImageFolderDataModule: {self.root} has a train/ sub-folder but neither val/ nor test/. Add one "
                "of them (a missing one uses the other), or move the images out of train/ to split them by `seed`."
            )
        found["val"] = found["val"] if "val" in present else found["test"]
        found["test"] = found["test"] if "test" in present else found["val"]
        for split, files in found.items():
            if not files:
                folder = self.root / (split if split in present else ({"val", "test"} - {split}).pop())
                raise ValueError(
                    f"ImageFolderDataModule: no images in {folder}/ (the {split} split; searched recursively for "
                    f"{', '.join(self.extensions)}). Put images there, or set `extensions` for other file types."
                )
        return found

    def _all_files(self) -> list[Path]:
        """Every file once, in split order."""
        return list(dict.fromkeys(f for split in SPLITS for f in self.files[split]))

    # ------------------------------------------------------------------------------------------ headers
    def _first_image_reader(self) -> ImageReader:
        """The reader, with (C, H, W) from the options or from the header of the first (readable, with ``skip``)
        training image."""
        for first in self.files["train"]:
            probe = ImageReader(self.root, (3, 1, 1), None, None, "none", "nearest", False, (first, "", (0, 0)))
            try:
                mode, (width, height) = probe.header(first)
            except UnreadableImageError:
                if self.on_unreadable == "skip":
                    continue
                raise
            channels = self.channels or readable_channels(first, mode)
            side = self.image_size
            shape = (channels, height, width) if side is None else (channels, side, side)
            return ImageReader(
                self.root,
                shape,
                self.channels,
                self.image_size,
                self.crop,
                self.interpolation,
                self.convert,
                (first, mode, (width, height)),
            )
        raise ValueError(
            f"ImageFolderDataModule: no readable image in the train split of {self.root} (on_unreadable='skip' left "
            f"out all {len(self.files['train'])}). Replace the broken files."
        )

    def check_files(self) -> None:
        """Read the header of every file (no pixels): unreadable files are refused (or, with
        ``on_unreadable: skip``, left out of ``files`` and reported once); colour modes other than
        ``image_shape``'s (unless ``convert``) and, without ``image_size``, sizes other than the first image's are
        refused."""
        unreadable: list[Path] = []
        for path in self._all_files():
            try:
                mode, size = self.reader.header(path)
            except UnreadableImageError:
                if self.on_unreadable != "skip":
                    raise
                unreadable.append(path)
                continue
            self.reader.check(path, mode, size)
        if unreadable:
            left_out = set(unreadable)
            self.files = {split: [f for f in files if f not in left_out] for split, files in self.files.items()}
            self.skipped = unreadable
            names = ", ".join(str(p.relative_to(self.root)) for p in unreadable[:5])
            more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
            warnings.warn(
                f"ImageFolderDataModule: skipped {len(unreadable)} unreadable file(s) under {self.root} "
                f"(on_unreadable='skip'): {names}{more}. They are listed under 'skipped' in split.json.",
                stacklevel=2,
            )
        self._headers_checked = True

    # ------------------------------------------------------------------------------------------ pixels
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.reader.image_shape

    def read_image(self, path: Path) -> np.ndarray:
        """One image as uint8 (H, W, C) of ``image_shape``: oriented, converted, cropped and resized."""
        return self.reader.read(path)

    def _build(self, split: Split) -> Dataset:
        if not self._headers_checked:
            self.check_files()
        if not self.files[split]:
            raise ValueError(
                f"ImageFolderDataModule: the '{split}' split is empty (0 images). {self._empty_hint(split)}".strip()
            )
        return FolderImages(self.files[split], self.reader, self.on_unreadable == "skip")

    def _empty_hint(self, split: Split) -> str:
        return f"Put images into {self.root}, or lower the fractions of the other splits."

    def split_record(self) -> dict[str, Any]:
        """Which file (path relative to ``root``, POSIX) went to which split, and how the split was made."""
        given = (self.root / "train").is_dir()
        return {
            "data": str(self.root),
            "method": "the sub-folders train/, val/, test/ of the data folder"
            if given
            else SPLIT_METHOD.format(what="the file's path relative to the data folder"),
            "seed": None if given else self.seed,
            "val_fraction": None if given else self.val_fraction,
            "test_fraction": None if given else self.test_fraction,
            "splits": {split: [p.relative_to(self.root).as_posix() for p in self.files[split]] for split in SPLITS},
            "skipped": [p.relative_to(self.root).as_posix() for p in self.skipped],
        }
