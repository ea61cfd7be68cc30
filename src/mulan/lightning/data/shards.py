"""Write litdata shards of uint8 images from a folder or an array file, for :class:`.streaming.StreamingDataModule`.

    python -m mulan.lightning.data.shards SOURCE OUT [--image_size 64] [--val_fraction 0.1] [--workers 8]

``SOURCE`` is a folder of images (read as :class:`.folder.ImageFolderDataModule` reads it) or a ``.npy``/``.npz``
file (read as :class:`.arrays.ArrayDataModule` reads it); the train/val/test split is decided here, once, by the
same rules (a folder gives the same split as the folder module with the same ``seed`` and fractions). ``OUT`` (a
local folder or an object-store URL litdata writes, ``s3://...``) receives ``train/``, ``val/``, ``test/`` (one
litdata data set each: items ``{"image": uint8 (C, H, W), "label": int}``, ``label`` -1 without classes),
``mulan_shards.json`` (format, image shape, counts, classes) and ``split.json`` (which file or array position went
where). Class labels are the first sub-folder of each image (``cats/001.png`` -> ``cats``) when every image of a
folder lies in one, or an integer array named by ``--labels`` in the ``.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from mulan.lightning.data.arrays import ArrayDataModule
from mulan.lightning.data.base import SPLITS, Split
from mulan.lightning.data.folder import ImageFolderDataModule, ImageReader
from mulan.lightning.data.streaming import METADATA_FILE, SHARDS_FORMAT, is_remote


class FolderItems:
    """``item(i)`` of one split of a folder: ``{"image": uint8 (C, H, W), "label": int}`` (picklable: paths and
    options only; the pixels are decoded by litdata's worker processes)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], reader: ImageReader) -> None:
        self.files, self.labels, self.reader = list(files), list(labels), reader

    def __call__(self, index: int) -> dict[str, Any]:
        image = self.reader.read(self.files[index])  # (H, W, C), checked, the file named in any error
        return {"image": np.ascontiguousarray(image.transpose(2, 0, 1)), "label": int(self.labels[index])}


class ArrayItems:
    """``item(i)`` of one split of an array file (the array is read once per worker process)."""

    def __init__(self, data: ArrayDataModule, split: Split, labels: np.ndarray | None) -> None:
        self.data, self.split, self.labels = data, split, labels
        self._images: Any = None

    def __call__(self, index: int) -> dict[str, Any]:
        if self._images is None:
            self._images = self.data._load_split(self.split).numpy()
        label = -1 if self.labels is None else int(self.labels[index])
        return {"image": np.ascontiguousarray(self._images[index]), "label": label}


def folder_labels(data: ImageFolderDataModule, split: Split) -> tuple[list[int], list[str] | None]:
    """Class index of each file of ``split`` from its first sub-folder (below ``train/`` etc. for given splits),
    and the sorted class names; ``-1`` labels and ``None`` when some image is not in a sub-folder."""
    given = (data.root / "train").is_dir()

    def parts(path: Path) -> tuple[str, ...]:
        relative = path.relative_to(data.root).parts
        return relative[1:] if given else relative

    every = {f: parts(f) for s in SPLITS for f in data.files[s]}
    if any(len(p) < 2 for p in every.values()):
        return [-1] * len(data.files[split]), None
    classes = sorted({p[0] for p in every.values()})
    index = {name: i for i, name in enumerate(classes)}
    return [index[every[f][0]] for f in data.files[split]], classes


def write_shards(
    source: str | Path,
    output_dir: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    crop: str = "centre",
    interpolation: str = "bicubic",
    convert: bool = False,
    on_unreadable: Literal["refuse", "skip"] = "refuse",
    key: str | None = None,
    layout: str = "auto",
    labels: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    chunk_bytes: str = "64MB",
    num_workers: int | None = None,
    start_method: str | None = None,
) -> dict[str, Any]:
    """Write the shards of ``source`` (folder or ``.npy``/``.npz``) to ``output_dir``; returns the metadata
    written to ``mulan_shards.json`` (``image_shape``, ``counts`` per split, ``classes``, ``source``).

    The options are those of :class:`.folder.ImageFolderDataModule` (folders) and :class:`.arrays.ArrayDataModule`
    (arrays); ``labels`` names an integer array (N,) of the ``.npz`` aligned with the image array (split by seed
    only). ``num_workers`` processes of ``litdata.optimize`` decode the images (default: litdata's, the CPU
    count); ``start_method`` is theirs (``"fork"`` starts fastest on Linux).
    """
    from litdata import optimize  # type: ignore[import-untyped]

    path = Path(source)
    kwargs: dict[str, Any] = dict(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, num_workers=0)
    items: dict[Split, Any] = {}
    classes: list[str] | None = None
    if path.is_dir():
        folder = ImageFolderDataModule(
            str(path),
            channels=channels,
            image_size=image_size,
            crop=cast(Any, crop),  # checked by the module
            interpolation=cast(Any, interpolation),
            convert=convert,
            on_unreadable=on_unreadable,
            **kwargs,
        )
        folder.check_files()  # every header: refuses (or skips) before anything is written
        for split in SPLITS:
            split_labels, classes = folder_labels(folder, split)
            items[split] = FolderItems(folder.files[split], split_labels, folder.reader)
        data: ImageFolderDataModule | ArrayDataModule = folder
        counts = {split: len(folder.files[split]) for split in SPLITS}
    else:
        arrays = ArrayDataModule(str(path), key, layout, **kwargs)  # type: ignore[arg-type]
        label_array = read_labels(arrays, labels)
        for split in SPLITS:
            picked = None if label_array is None else label_array[arrays.indices[split].numpy()]
            items[split] = ArrayItems(arrays, split, picked)
        data = arrays
        counts = {split: len(arrays.indices[split]) for split in SPLITS}
        classes = None if label_array is None else [str(c) for c in np.unique(label_array)]
    out = output_dir.rstrip("/")
    for split in SPLITS:
        optimize(
            fn=items[split],
            inputs=list(range(counts[split])),
            output_dir=f"{out}/{split}",
            chunk_bytes=chunk_bytes,
            num_workers=num_workers,
            mode="overwrite",
            reorder_files=False,  # keep the split's order: val/test are read in it
            start_method=start_method,
            verbose=False,
        )
    metadata = {
        "format": SHARDS_FORMAT,
        "image_shape": list(data.image_shape),
        "counts": counts,
        "classes": classes,
        "source": str(path),
        "item": {"image": "uint8 (C, H, W)", "label": "int, -1 without classes"},
    }
    record = data.split_record() or {"data": str(path), "method": "the arrays train/val/test of the file"}
    write_text(out, METADATA_FILE, json.dumps(metadata, indent=1) + "\n")
    write_text(out, "split.json", json.dumps(record, indent=1) + "\n")
    return metadata


def read_labels(arrays: ArrayDataModule, name: str | None) -> np.ndarray | None:
    """The integer label array ``name`` of the array file (one per image of the split-by-seed array)."""
    if name is None:
        return None
    if arrays.sources["train"] == "train":
        raise ValueError(
            "mulan-shards: --labels works with one image array split by seed; this file names its splits "
            "(train/val/test). Write the images as one array with a label array beside it."
        )
    with np.load(arrays.path, allow_pickle=False) as archive:
        if name not in archive.files:
            raise ValueError(f"mulan-shards: {arrays.path} has no array {name!r} for --labels; it has {archive.files}.")
        values = archive[name]
    n = int(sum(len(arrays.indices[s]) for s in SPLITS))
    if values.shape != (n,) or values.dtype.kind not in "iu":
        raise ValueError(
            f"mulan-shards: the label array {name!r} of {arrays.path} is {values.dtype} {values.shape}; expected "
            f"integers of shape ({n},), one per image."
        )
    return values.astype(np.int64)


def write_text(folder: str, name: str, text: str) -> None:
    """Write ``text`` to ``folder/name``, a local folder or an object-store URL (through litdata's client)."""
    if not is_remote(folder):
        Path(folder, name).write_text(text)
        return
    from litdata.streaming.fs_provider import _get_fs_provider  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory() as local:
        file = os.path.join(local, name)
        Path(file).write_text(text)
        _get_fs_provider(f"{folder}/{name}").upload_file(file, f"{folder}/{name}")


def main(argv: Sequence[str] | None = None) -> None:
    """``mulan-shards SOURCE OUT [options]``: see the module docstring."""
    parser = argparse.ArgumentParser(prog="mulan-shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a folder of images, or a .npy/.npz file of uint8 images")
    parser.add_argument("output_dir", help="the shard folder to write (local path or s3://bucket/path)")
    parser.add_argument("--image_size", type=int, default=None, help="folders: resize every image to s x s")
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3))
    parser.add_argument("--crop", default="centre", choices=("centre", "none"))
    parser.add_argument("--interpolation", default="bicubic")
    parser.add_argument("--convert", action="store_true", help="folders: convert colour modes instead of refusing")
    parser.add_argument("--on_unreadable", default="refuse", choices=("refuse", "skip"))
    parser.add_argument("--key", default=None, help="arrays: the image array of a .npz with several")
    parser.add_argument("--layout", default="auto", choices=("auto", "NCHW", "NHWC"))
    parser.add_argument("--labels", default=None, help="arrays: an integer label array of the .npz")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--test_fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk_bytes", default="64MB")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: the CPU count)")
    parser.add_argument("--start_method", default=None, choices=("fork", "spawn", "forkserver"))
    args = parser.parse_args(argv)
    try:
        metadata = write_shards(
            args.source,
            args.output_dir,
            image_size=args.image_size,
            channels=args.channels,
            crop=args.crop,
            interpolation=args.interpolation,
            convert=args.convert,
            on_unreadable=args.on_unreadable,
            key=args.key,
            layout=args.layout,
            labels=args.labels,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            chunk_bytes=args.chunk_bytes,
            num_workers=args.workers,
            start_method=args.start_method,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.exit(2, f"mulan-shards: error: {error}\n")
    counts = ", ".join(f"{n} {split}" for split, n in metadata["counts"].items())
    print(f"Wrote {counts} images {tuple(metadata['image_shape'])} to {args.output_dir}")


if __name__ == "__main__":
    main()
