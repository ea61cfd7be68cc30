"""Data files are read without pickle, and a bad data file is one library ValueError naming the file and the fix.

A planted payload (an object array whose unpickling creates a marker file) in every ``.npz``/pickle entry point is
refused in one line and never runs; a truncated ``.npz`` is a ValueError chained from ``zipfile.BadZipFile``;
folder problems (corrupt, 16-bit, mixed sizes or colour modes) are one line naming the file, chained from PIL's
error where there is one."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mulan.lightning.data import ArrayDataModule, CIFAR10DataModule, ImageFolderDataModule, ImageNet32DataModule


class Payload:
    """Unpickling it creates the file ``marker`` (what a malicious data file would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted(marker: Path) -> np.ndarray:
    return np.array([Payload(marker), 1], dtype=object)


def images(n: int, shape: tuple[int, ...] = (32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def one_line(error: pytest.ExceptionInfo[BaseException], *names: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The planted file does run its payload when read with pickle allowed: the refusals below are real."""
    marker = tmp_path / "ran"
    np.savez(tmp_path / "x.npz", data=planted(marker))
    with np.load(tmp_path / "x.npz", allow_pickle=True) as archive:
        archive["data"]
    assert marker.exists()


def _imagenet_old(root: Path, marker: Path) -> Callable[[], object]:
    np.savez(root / "train_32x32.npz", data=planted(marker))
    np.savez(root / "valid_32x32.npz", data=planted(marker))
    return lambda: ImageNet32DataModule(str(root), version="old").setup("fit")


def _imagenet_new_npz(root: Path, marker: Path) -> Callable[[], object]:
    for stem in [*(f"train_data_batch_{i}" for i in range(1, 11)), "val_data"]:
        np.savez(root / f"{stem}.npz", data=planted(marker))
    return lambda: ImageNet32DataModule(str(root), version="new").setup("fit")


def _imagenet_new_pickle(root: Path, marker: Path) -> Callable[[], object]:
    for stem in [*(f"train_data_batch_{i}" for i in range(1, 11)), "val_data"]:
        (root / stem).write_bytes(pickle.dumps({"data": planted(marker)}))
    return lambda: ImageNet32DataModule(str(root), version="new").setup("fit")


def _arrays_npz(root: Path, marker: Path) -> Callable[[], object]:
    np.savez(root / "x.npz", images=planted(marker))
    return lambda: ArrayDataModule(str(root / "x.npz")).setup("fit")


def _arrays_npz_splits(root: Path, marker: Path) -> Callable[[], object]:
    np.savez(root / "x.npz", train=planted(marker), val=images(2))
    return lambda: ArrayDataModule(str(root / "x.npz")).setup("fit")


def _arrays_npy(root: Path, marker: Path) -> Callable[[], object]:
    np.save(root / "x.npy", planted(marker), allow_pickle=True)
    return lambda: ArrayDataModule(str(root / "x.npy")).setup("fit")


def _arrays_whole_pickle(root: Path, marker: Path) -> Callable[[], object]:
    (root / "x.npz").write_bytes(pickle.dumps(planted(marker)))  # a plain pickle under a .npz name
    return lambda: ArrayDataModule(str(root / "x.npz")).setup("fit")


REFUSED = "pickled Python objects"
ENTRY_POINTS = {
    "imagenet_old_npz": (_imagenet_old, "train_32x32.npz", REFUSED),
    "imagenet_new_npz": (_imagenet_new_npz, "train_data_batch_1.npz", REFUSED),
    "imagenet_new_pickle": (_imagenet_new_pickle, "train_data_batch_1", "unsafe"),
    "arrays_npz": (_arrays_npz, "x.npz", REFUSED),
    "arrays_npz_splits": (_arrays_npz_splits, "x.npz", REFUSED),
    "arrays_npy": (_arrays_npy, "x.npy", REFUSED),
    "arrays_whole_pickle": (_arrays_whole_pickle, "x.npz", "not a zip file"),  # the .npz header is read first
}
"""Each loading entry point: how to plant the payload, the file the error names, and what it says."""


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_planted_pickle_payload_is_refused_in_one_line_and_never_runs(entry: str, tmp_path: Path) -> None:
    make, name, says = ENTRY_POINTS[entry]
    root, marker = tmp_path / "data", tmp_path / "ran"
    root.mkdir()
    load = make(root, marker)
    with pytest.raises(ValueError) as error:
        load()
    one_line(error, name, says)
    assert not marker.exists()


def test_cifar10_batches_with_a_payload_are_refused(tmp_path: Path) -> None:
    """CIFAR-10 is read by torchvision, whose MD5 check of every batch fails on an edited file before unpickling."""
    folder, marker = tmp_path / "cifar-10-batches-py", tmp_path / "ran"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):  # fmt: skip
        (folder / name).write_bytes(pickle.dumps({"data": planted(marker), "labels": [0]}))
    with pytest.raises(FileNotFoundError, match="corrupted"):
        CIFAR10DataModule(str(tmp_path)).setup("fit")
    assert not marker.exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("entry", ["imagenet_old", "imagenet_new", "arrays"])
def test_a_truncated_npz_is_a_library_error_chained_from_bad_zip_file(entry: str, tmp_path: Path) -> None:
    if entry == "imagenet_old":
        np.savez(tmp_path / "train_32x32.npz", data=images(4))
        np.savez(tmp_path / "valid_32x32.npz", data=images(4))
        file, load = tmp_path / "train_32x32.npz", lambda: ImageNet32DataModule(str(tmp_path)).setup("fit")
    elif entry == "imagenet_new":
        for stem in [*(f"train_data_batch_{i}" for i in range(1, 11)), "val_data"]:
            np.savez(tmp_path / f"{stem}.npz", data=images(4, (3 * 32 * 32,)))
        file = tmp_path / "train_data_batch_3.npz"
        load = lambda: ImageNet32DataModule(str(tmp_path), version="new").setup("fit")  # noqa: E731
    else:
        np.savez(tmp_path / "x.npz", images=images(10, (4, 4, 3)))
        file, load = tmp_path / "x.npz", lambda: ArrayDataModule(str(tmp_path / "x.npz")).setup("fit")
    _truncate(file)
    with pytest.raises(ValueError) as error:
        load()
    message = one_line(error, str(file))
    assert "truncated" in message and ("again" in message or "numpy.save" in message)
    assert isinstance(error.value.__cause__, zipfile.BadZipFile)


# ------------------------------------------------------------------------------------------------ folder errors
def _pngs(folder: Path, n: int, shape: tuple[int, ...] = (4, 4, 3)) -> list[Path]:
    paths = []
    for i, image in enumerate(images(n, shape)):
        paths.append(folder / f"img_{i:02d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_a_corrupt_png_is_named_chained_from_pils_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL reports some corrupt PNG chunks as an AttributeError ('PngStream' object has no attribute
    'chunk_ageg'), others as OSError: both become the library's one-line error naming the file."""
    from PIL import PngImagePlugin

    paths = _pngs(tmp_path, 6)
    data = ImageFolderDataModule(str(tmp_path))
    bad = data.files["train"][0]

    def corrupt_chunk(self) -> None:
        raise AttributeError("'PngStream' object has no attribute 'chunk_ageg'")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load_end", corrupt_chunk)  # chunks after the pixels
    with pytest.raises(ValueError) as error:
        data.read_image(bad)
    one_line(error, str(bad), "Delete or replace the file")
    assert isinstance(error.value.__cause__, AttributeError)
    monkeypatch.undo()
    paths[1].write_bytes(paths[1].read_bytes()[:60])  # header whole, pixels cut: found when decoded
    data = ImageFolderDataModule(str(tmp_path))
    with pytest.raises(ValueError) as error:
        data.setup()  # PIL reads a whole PNG to find its EXIF data, so the header check may catch it already
        for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
            list(loader)
    one_line(error, str(paths[1]), "Delete or replace the file")
    assert isinstance(error.value.__cause__, OSError)


@pytest.mark.parametrize("case", ["mixed_sizes", "mixed_modes", "sixteen_bit"])
def test_folder_setup_problems_are_one_line_naming_the_file_and_the_fix(case: str, tmp_path: Path) -> None:
    _pngs(tmp_path, 5, (4, 4) if case == "mixed_modes" else (4, 4, 3))
    odd = tmp_path / "z_odd.png"
    if case == "mixed_sizes":
        Image.fromarray(images(1, (6, 4, 3))[0]).save(odd)
        fix = "image_size"
    elif case == "mixed_modes":
        Image.fromarray(images(1, (4, 4, 3))[0]).save(odd)
        fix = "--data.init_args.channels"
    else:
        Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(odd)
        fix = "save it as an 8-bit"
    with pytest.raises(ValueError) as error:
        ImageFolderDataModule(str(tmp_path)).setup()
    one_line(error, str(odd), fix)
