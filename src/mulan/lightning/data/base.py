"""The base of every data module: uint8 batches from a subclass's ``_load_split``, loaders seeded per epoch, and
evaluation loaders that count each image exactly once under DDP.

Contract shared by every data module of :mod:`mulan.lightning.data`:

* every batch of the train/val/test/predict loaders is a ``torch.uint8`` tensor of shape ``(B, C, H, W)`` with
  values in ``0..255`` (conditional data modules yield ``(images, y)`` pairs);
* ``image_shape`` is the ``(C, H, W)`` of one image, known right after ``__init__`` without touching the disk
  (the CLI links it into the model);
* ``__init__`` calls ``save_hyperparameters()`` so a checkpoint can rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mulan.data import UInt8Images, check_images

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


class EpochSeededRandomSampler(RandomSampler):
    """A shuffling sampler whose order in epoch ``e`` depends only on ``(seed, e)``.

    Lightning calls ``set_epoch`` before every epoch (resumed or not), so a resumed run sees the order the
    uninterrupted run would have (under DDP Lightning's ``DistributedSampler``, seeded the same way, replaces it).
    """

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source, generator=torch.Generator())  # type: ignore[arg-type]
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        assert self.generator is not None
        self.generator.manual_seed((self.seed + 7919 * (epoch + 1)) % 2**63)


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
    ``(image, y)`` pairs). The train loader shuffles in an order fixed by ``(shuffle_seed, epoch)`` and drops the
    last incomplete batch when at least one full batch exists; the evaluation loaders keep the order and, under
    DDP, give each rank a disjoint share with no image repeated (Lightning's ``UnrepeatedDistributedSampler``).

    Args:
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: data-loader worker processes.
        shuffle_seed: seed of the training order (default: the run's seed, ``torch.initial_seed()`` when built).
    """

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
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
        """Load and validate the splits needed by ``stage`` (all when None)."""
        for split in self._stage_splits(stage):
            self._dataset(split)

    def _build(self, split: Split) -> Dataset:
        name = type(self).__name__
        images = check_images(self._load_split(split), self.image_shape, name, split, self._empty_hint(split))
        return UInt8Images(images)

    def _dataset(self, split: Split) -> Dataset:
        if split not in self.datasets:
            self.datasets[split] = self._build(split)
        return self.datasets[split]

    def _loader(self, dataset: Dataset, batch_size: int, drop_last: bool, sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled uint8 batches (batch_size, C, H, W) of the train split."""
        dataset = self._dataset("train")
        full_batch = len(dataset) >= self.batch_size  # type: ignore[arg-type]
        return self._loader(dataset, self.batch_size, full_batch, EpochSeededRandomSampler(dataset, self.shuffle_seed))

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
