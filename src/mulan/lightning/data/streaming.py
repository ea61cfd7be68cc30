"""Data beyond one machine's memory: uint8 images streamed from shards written by :mod:`.shards`, through
Lightning's ``litdata`` (``StreamingDataset`` / ``StreamingDataLoader``).

``input_dir`` is the shard folder, a local path or an object-store URL that litdata reads (``s3://bucket/path``,
``gs://...``); it holds ``train/``, ``val/`` and ``test/`` (one litdata data set each, the split decided once
when the shards were written) and ``mulan_shards.json`` (image shape, counts, classes). Chunks are downloaded to
``cache_dir`` as they are needed and items are decoded by the loader's workers, so neither memory nor local disk
has to hold the data set.

Under DDP litdata gives each rank (and each worker) its own part of the shuffled chunks: every training image is
seen once per epoch across ranks (litdata drops the remainder that does not fill one batch on every rank, a
different remainder each epoch); Lightning does not add a ``DistributedSampler`` (the loader's data set is
iterable). The evaluation loaders keep every image (``drop_last=False``; ranks may get unequal shares, as with
:class:`~lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`).

The training loader is resumable in the middle of an epoch: Lightning stores its ``state_dict`` in the
checkpoint, and :class:`ResumableStreamingLoader` records the state at the last batch the training loop
*consumed* (not the one Lightning prefetched), so a resumed fit continues with the next unseen images.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset  # type: ignore[import-untyped]
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mulan.lightning.data.base import Collate, ImageDataModule, Split

METADATA_FILE = "mulan_shards.json"
"""The description of a shard folder, written by :func:`mulan.lightning.data.shards.write_shards`."""
SHARDS_FORMAT = 1


def is_remote(path: str) -> bool:
    """Whether ``path`` is an object-store URL (``scheme://...``) rather than a local path."""
    return "://" in path and not path.startswith("file://")


def read_metadata(input_dir: str) -> dict[str, Any]:
    """``mulan_shards.json`` of a shard folder (local, or downloaded with litdata's object-store client)."""
    where = f"{input_dir.rstrip('/')}/{METADATA_FILE}"
    fix = "Write the shards with `python -m mulan.lightning.data.shards SOURCE OUT` and pass OUT as input_dir."
    try:
        if is_remote(input_dir):
            from litdata.streaming.fs_provider import _get_fs_provider  # type: ignore[import-untyped]

            with tempfile.TemporaryDirectory() as folder:
                local = os.path.join(folder, METADATA_FILE)
                _get_fs_provider(where).download_file(where, local)
                with open(local) as file:
                    metadata = json.load(file)
        else:
            with open(where.removeprefix("file://")) as file:
                metadata = json.load(file)
    except (OSError, ValueError) as error:  # missing, unreachable, or not JSON
        raise FileNotFoundError(
            f"StreamingDataModule: cannot read {where} ({type(error).__name__}: {' '.join(str(error).split())}). {fix}"
        ) from error
    if metadata.get("format") != SHARDS_FORMAT or len(metadata.get("image_shape", ())) != 3:
        raise ValueError(
            f"StreamingDataModule: {where} is not a mulan shard description (format {SHARDS_FORMAT}). {fix}"
        )
    return metadata


def item_image(item: dict[str, Any]) -> Tensor:
    """A shard item ``{"image": uint8 (C, H, W), "label": int}`` -> the uint8 image tensor (C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(item["image"]))


class ResumableStreamingLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` whose ``state_dict`` is the state after the batches the training loop consumed.

    litdata's own state counts the batches the loader has *yielded*; Lightning prefetches one batch ahead, so a
    checkpoint taken mid-epoch would skip that batch on resume. The data module counts consumed batches in
    ``consumed`` (its ``on_before_batch_transfer``); this loader remembers litdata's counters after each yielded
    batch and reports the state of the ``consumed``-th.
    """

    consumed: int = 0
    _num_samples_yielded_streaming: int
    _latest_worker_idx: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._marks: dict[int, tuple[int, int]] = {0: (0, 0)}
        self._loaded_mark: tuple[int, int] | None = None

    def __iter__(self) -> Any:
        batch_size = int(self.batch_size or 1)
        first = True
        for batch in super().__iter__():
            yielded = self._num_samples_yielded_streaming
            count = yielded // batch_size
            if first:  # a fresh epoch, or the rest of a restored one
                self.consumed = count - 1
                before = self._loaded_mark if self._loaded_mark is not None else (0, 0)
                self._marks = {count - 1: before}
                self._loaded_mark, first = None, False
            self._marks[count] = (yielded, self._latest_worker_idx)
            for old in [k for k in self._marks if k < self.consumed]:
                del self._marks[old]
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """litdata's state after ``consumed`` batches of the current epoch."""
        mark = self._marks.get(self.consumed)
        if mark is None:
            return copy.deepcopy(super().state_dict())
        now = (self._num_samples_yielded_streaming, self._latest_worker_idx)
        self._num_samples_yielded_streaming, self._latest_worker_idx = mark
        try:
            return copy.deepcopy(super().state_dict())
        finally:
            self._num_samples_yielded_streaming, self._latest_worker_idx = now

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._loaded_mark = (int(obj["num_samples_yielded"]), int(obj["latest_worker_idx"]))


class StreamingDataModule(ImageDataModule):
    """uint8 images (C, H, W) streamed from shards (see the module docstring), read lazily, DDP-aware, resumable.

    Args:
        input_dir: the shard folder (local path or object-store URL) written by ``mulan-shards`` /
            ``python -m mulan.lightning.data.shards``.
        cache_dir: where litdata keeps downloaded chunks (default: litdata's cache folder).
        max_cache_size: the most disk the chunk cache may use (litdata's format, e.g. ``"50GB"``).
        batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip: see :class:`ImageDataModule`
            (the training order is litdata's shuffle of chunks and items, fixed by ``shuffle_seed`` and the epoch).

    ``image_shape`` is read from ``mulan_shards.json`` when the module is built (one small file; no image).
    Class labels stored in the shards are not yielded: batches are images only, as for every data module.
    """

    def __init__(
        self,
        input_dir: str,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed, random_flip)
        self.save_hyperparameters()
        self.input_dir, self.cache_dir, self.max_cache_size = input_dir.rstrip("/"), cache_dir, max_cache_size
        self.metadata = read_metadata(self.input_dir)
        c, h, w = (int(s) for s in self.metadata["image_shape"])
        self._image_shape = (c, h, w)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def _build(self, split: Split) -> Dataset:
        if int(self.metadata.get("counts", {}).get(split, 1)) == 0:
            raise ValueError(f"StreamingDataModule: the '{split}' split of {self.input_dir} is empty (0 images).")
        return StreamingDataset(
            f"{self.input_dir}/{split}",
            cache_dir=self.cache_dir,
            shuffle=split == "train",
            seed=int(self.shuffle_seed % 2**31),
            drop_last=None if split == "train" else False,  # None: litdata's choice (True under DDP)
            max_cache_size=self.max_cache_size,
            transform=item_image,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled uint8 batches (batch_size, C, H, W) of this rank's part of the train shards, resumable
        mid-epoch; each image mirrored with probability 1/2 when ``random_flip``."""
        self._train_loader = ResumableStreamingLoader(
            self._dataset("train"),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=Collate(self.random_flip),
            pin_memory=torch.cuda.is_available(),
        )
        return self._train_loader

    def _eval_loader(self, split: Split) -> DataLoader:
        return StreamingDataLoader(
            self._dataset(split),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=Collate(False),
            pin_memory=torch.cuda.is_available(),
        )

    def split_record(self) -> dict[str, Any]:
        """Where the split was decided: when the shards were written (their ``split.json`` lists the files)."""
        return {
            "data": self.input_dir,
            "method": "decided when the shards were written: see split.json in the shard folder",
            "counts": self.metadata.get("counts"),
            "source": self.metadata.get("source"),
        }
