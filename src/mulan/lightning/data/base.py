"""The base of every data module: uint8 batches from a subclass's ``_load_split``, loaders seeded per epoch, and
evaluation loaders that count each image exactly once under DDP.

Contract shared by every data module of :mod:`mulan.lightning.data`:

* every batch of the train/val/test/predict loaders is a ``torch.uint8`` tensor of shape ``(B, C, H, W)`` with
  values in ``0..255`` (conditional data modules yield ``(images, y)`` pairs);
* ``image_shape`` is the ``(C, H, W)`` of one image, known right after ``__init__`` without touching the disk
  (the CLI links it into the model);
* ``__init__`` calls ``save_hyperparameters()`` so a checkpoint can rebuild it;
* ``random_flip`` (off by default) mirrors each training image left-right with probability 1/2, drawn per image
  when the batch is collated; the val/test/predict loaders never flip (the bound is measured on the images as
  they are).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from mulan.data import UInt8Images, check_images

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
SPLIT_FILE = "split.json"
"""Where a data module that splits files by itself records the split, in the run's log directory."""
SPLIT_METHOD = (
    "u = the first 8 bytes of SHA-256('<seed>:<key>') / 2**64, key = {what}; test if u < test_fraction, val if "
    "u < test_fraction + val_fraction, else train (a split left empty takes the nearest key of the largest one)"
)
STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


class ResumableSampler(DistributedSampler):
    """The training order: a shuffle fixed by ``(seed, epoch)``, this rank's share of it, and a one-off skip.

    A ``DistributedSampler`` (so Lightning keeps it under DDP instead of wrapping it), for one process as well:
    Lightning calls ``set_epoch`` before every epoch, resumed or not, so epoch ``e`` sees the same order in an
    uninterrupted and a resumed run; :meth:`skip_next` drops the first indices of the next pass, which
    :class:`ResumableLoader` uses to continue an epoch in the middle.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        world, rank = _distributed()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self._skip = 0

    def skip_next(self, count: int) -> None:
        """Leave out the first ``count`` indices of the next pass (only that pass)."""
        self._skip = count

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """A training loader Lightning can checkpoint and resume in the middle of an epoch.

    Its state is the shuffling seed, the epoch and the number of batches the training loop has *consumed* in it
    (counted by the data module's ``on_before_batch_transfer``, so the batches Lightning prefetched but did not use
    are not lost); loading it makes the next pass skip those batches. The order comes from :class:`ResumableSampler`.
    """

    consumed: int = 0

    def state_dict(self) -> dict[str, int]:
        sampler = cast(ResumableSampler, self.sampler)
        epoch, consumed = int(sampler.epoch), self.consumed
        if consumed >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, consumed = epoch + 1, 0
        return {"seed": int(sampler.seed), "epoch": epoch, "consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = cast(ResumableSampler, self.sampler)
        sampler.seed = state["seed"]  # the interrupted run's order, whatever seed the resumed run was given
        sampler.set_epoch(state["epoch"])
        self.consumed = state["consumed"]
        sampler.skip_next(state["consumed"] * int(self.batch_size or 1))

    def __iter__(self):
        self.consumed = cast(ResumableSampler, self.sampler)._skip // int(self.batch_size or 1)
        return super().__iter__()


class Collate:
    """The collate function of every loader: leaves out items that are ``None`` (an image a data module skipped
    as unreadable), stacks the rest with torch's ``default_collate`` and, with ``flip``, mirrors each image
    left-right with probability 1/2 (torch's RNG of the process or worker that collates).

    Batches are uint8 ``(B, C, H, W)`` or tuples whose tensors are all flipped with the same per-image draw (for
    ``(x, y)`` pairs where ``y`` is an image of ``x``, e.g. its downsampled version: flipping commutes with block
    averaging). A module-level class, so worker processes can pickle it.
    """

    def __init__(self, flip: bool = False) -> None:
        self.flip = flip

    def __call__(self, items: list[Any]) -> Any:
        kept = [item for item in items if item is not None]
        if not kept:
            raise ValueError(
                f"every one of the {len(items)} images of a batch was unreadable and skipped; the data set is broken "
                "beyond skipping: check the files named in the warnings above."
            )
        batch = default_collate(kept)
        return flip_halves(batch) if self.flip else batch


def flip_halves(batch: Any) -> Any:
    """Mirror (along W, the last axis) each image of ``batch`` with probability 1/2; a tuple/list batch flips all
    its 4-D tensors with the same draws. Returns a new batch of the same shapes and dtypes."""
    tensors = batch if isinstance(batch, (tuple, list)) else [batch]
    size = int(tensors[0].shape[0])
    chosen = torch.rand(size) < 0.5

    def flip(tensor: Any) -> Any:
        if not isinstance(tensor, Tensor) or tensor.ndim != 4:
            return tensor
        mask = chosen.view(-1, 1, 1, 1)
        return torch.where(mask, tensor.flip(-1), tensor)

    flipped = [flip(t) for t in tensors]
    return type(batch)(flipped) if isinstance(batch, (tuple, list)) else flipped[0]


def ensure_files(
    present: Callable[[], bool], download: bool, fetch: Callable[[], object], missing: Callable[[], str]
) -> None:
    """Make sure a data set's files are on disk: ``present()`` says whether they are, ``fetch()`` downloads them
    (only when ``download`` is set), ``missing()`` is the message that says which files go where."""
    if present():
        return
    if not download:
        raise FileNotFoundError(missing())
    try:
        fetch()
    except Exception as error:  # offline, blocked, disk full: explain what to do
        raise FileNotFoundError(f"{missing()}\nThe download attempt failed: {type(error).__name__}: {error}") from error
    if not present():
        raise FileNotFoundError(missing())


def _distributed() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ImageDataModule(L.LightningDataModule):
    """Base class: builds uint8 loaders from ``_load_split`` of a subclass.

    Subclasses implement ``image_shape`` (C, H, W) and ``_load_split(split)`` returning a uint8 tensor
    (N, C, H, W) for ``split`` in "train"/"val"/"test" (or override ``_build`` to return any data set, e.g. of
    ``(image, y)`` pairs). The train loader shuffles in an order fixed by ``(shuffle_seed, epoch)``, drops the last
    incomplete batch when at least one full batch exists, and resumes in the middle of an epoch; the evaluation
    loaders keep the order and, under DDP, give each rank a disjoint share with no image repeated (Lightning's
    ``UnrepeatedDistributedSampler``).

    Args:
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: data-loader worker processes.
        shuffle_seed: seed of the training order (default: the run's seed, ``torch.initial_seed()`` when built).
        random_flip: mirror each training image left-right with probability 1/2 (a data augmentation; never on
            val/test/predict). Off by default and in the paper configs.
    """

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        random_flip: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(
                f"{type(self).__name__}: batch sizes must be >= 1, got batch_size={batch_size}, "
                f"eval_batch_size={eval_batch_size}."
            )
        if num_workers < 0:
            raise ValueError(f"{type(self).__name__}: num_workers must be >= 0, got {num_workers}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_seed = torch.initial_seed() % 2**63 if shuffle_seed is None else shuffle_seed
        self.random_flip = bool(random_flip)
        self.datasets: dict[str, Dataset] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        raise NotImplementedError

    def _load_split(self, split: Split) -> Tensor:
        """Return the uint8 images (N, C, H, W) of ``split``."""
        raise NotImplementedError

    def _empty_hint(self, split: Split) -> str:
        """What to do when ``split`` turns out empty (used in the error message)."""
        return "Check that the data files under `root` are complete and not empty."

    def _stage_splits(self, stage: str | None) -> tuple[Split, ...]:
        """Splits needed by a Lightning stage; all three for ``None``."""
        return STAGE_SPLITS.get(stage or "", SPLITS)

    def setup(self, stage: str | None = None) -> None:
        """Load and validate the splits needed by ``stage`` (all when None); when attached to a trainer, write
        :meth:`split_record` (if any) to ``split.json`` in the trainer's log directory (rank 0)."""
        for split in self._stage_splits(stage):
            self._dataset(split)
        self._write_split_record()

    def split_record(self) -> dict[str, Any] | None:
        """Which image went to which split, for data modules that split by themselves (None: nothing to record,
        e.g. fixed splits such as CIFAR-10's)."""
        return None

    def _write_split_record(self) -> Path | None:
        record = self.split_record()
        trainer = self.trainer
        if record is None or trainer is None:
            return None
        folder = trainer.log_dir  # a collective under DDP: every rank asks, rank 0 writes
        if folder is None or not trainer.is_global_zero:
            return None
        path = Path(folder) / SPLIT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        return path

    def _build(self, split: Split) -> Dataset:
        name = type(self).__name__
        images = check_images(self._load_split(split), self.image_shape, name, split, self._empty_hint(split))
        return UInt8Images(images)

    def _dataset(self, split: Split) -> Dataset:
        if split not in self.datasets:
            self.datasets[split] = self._build(split)
        return self.datasets[split]

    def _loader(
        self, dataset: Dataset, batch_size: int, drop_last: bool, sampler, kind=DataLoader, flip: bool = False
    ) -> DataLoader:
        return kind(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=Collate(flip),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled uint8 batches (batch_size, C, H, W) of the train split, resumable mid-epoch; each image
        mirrored with probability 1/2 when ``random_flip``."""
        dataset = self._dataset("train")
        full_batch = len(dataset) >= self.batch_size * _distributed()[0]  # type: ignore[arg-type]
        sampler = ResumableSampler(dataset, self.shuffle_seed)
        self._train_loader = self._loader(
            dataset, self.batch_size, full_batch, sampler, ResumableLoader, flip=self.random_flip
        )
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches the loop consumes (the state of :class:`ResumableLoader`)."""
        loader = getattr(self, "_train_loader", None)
        if loader is not None and self.trainer is not None and self.trainer.training:
            loader.consumed += 1
        return batch

    def _eval_loader(self, split: Split) -> DataLoader:
        dataset = self._dataset(split)
        world, rank = _distributed()
        sampler = UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        return self._loader(dataset, self.eval_batch_size, False, sampler)

    def val_dataloader(self) -> DataLoader:
        """uint8 batches (eval_batch_size, C, H, W) of the val split, in order; each image once across ranks."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """uint8 batches (eval_batch_size, C, H, W) of the test split, in order; each image once across ranks."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Same batches as ``test_dataloader``."""
        return self.test_dataloader()
