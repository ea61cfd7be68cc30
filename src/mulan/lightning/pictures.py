"""Pictures of a model as it trains, is tested and predicts: :class:`PicturesCallback` (TensorBoard during fit, PNG
files after test) and :class:`SampleWriter` (what ``mulan-cli predict`` generated). The figures themselves are
:mod:`mulan.figures`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import save_image

from mulan.figures import image_grid, log_snr_spread, schedule_maps, snr_variance, superresolution_grid
from mulan.lightning.task import DiffusionTask, split_batch
from mulan.sampling import ancestral_sample

PICTURES_DIR = "pictures"  # under the run's log directory: what PicturesCallback draws at test


class PicturesCallback(L.Callback):
    """Pictures of the model as it trains and as it is tested.

    - After every ``every_n_validations``-th validation (0: never), to TensorBoard: a sample grid, and for
      per-dimension schedules the log-SNR maps of ``num_maps`` validation images and the variance of the SNR across
      latents against ``t``. Needs a :class:`~lightning.pytorch.loggers.TensorBoardLogger` (otherwise skipped).
    - After ``test`` (``test_pictures``), as PNG files in ``<log_dir>/pictures/``: ``samples.png``, and for
      per-dimension schedules ``schedule_maps.png`` (the log-SNR maps of ``num_maps`` test images, evenly spaced
      among the first ``num_spread``, side by side at several ``t``, one colour scale per ``t``),
      ``log_snr_spread.png`` and ``log_snr_spread.txt`` (the spread of the learned log-SNR across up to
      ``num_spread`` test images and within each image, against ``t``, in nats). For a conditional model
      (batches ``(x, y)``, e.g. CVDM's super-resolution) ``conditional_samples.png`` replaces ``samples.png``: one
      row per test image (``num_maps`` of them, evenly spaced among the first ``num_spread``), the input ``y``
      upscaled, three samples of ``x`` given ``y`` and the truth (:func:`~mulan.figures.superresolution_grid`).
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_samples: int = 64,
        sample_steps: int = 256,
        num_maps: int = 4,
        test_pictures: bool = True,
        num_spread: int = 64,
    ) -> None:
        super().__init__()
        self.every_n_validations, self.num_samples = every_n_validations, num_samples
        self.sample_steps, self.num_maps = sample_steps, num_maps
        self.test_pictures, self.num_spread = test_pictures, num_spread
        self._validations = 0
        self._images: Tensor | None = None
        self._test_images: list[Tensor] = []
        self._test_y: list[Tensor] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self._images = split_batch(batch)[0][: self.num_maps]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: DiffusionTask) -> None:  # type: ignore[override]
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._validations += 1
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or self.every_n_validations <= 0 or self._validations % self.every_n_validations:
            return
        model, step, writer = pl_module.model, trainer.global_step, logger.experiment
        samples = ancestral_sample(model, self.num_samples, steps=self.sample_steps).samples
        writer.add_image("samples", image_grid(samples), step)
        if model.process.multivariate and self._images is not None:
            writer.add_figure("schedule/log_snr_maps", schedule_maps(model, self._images), step)
            writer.add_figure("schedule/snr_variance_across_latents", snr_variance(model)[0], step)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._test_images, self._test_y = [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        held = sum(images.shape[0] for images in self._test_images)
        wanted = max(self.num_spread, self.num_maps) - held
        if self.test_pictures and wanted > 0:
            images, y = split_batch(batch)
            self._test_images.append(images[:wanted].cpu())
            if y is not None:
                self._test_y.append(y[:wanted].cpu())

    @torch.no_grad()
    def on_test_end(self, trainer: L.Trainer, pl_module: DiffusionTask) -> None:  # type: ignore[override]
        if not (self.test_pictures and trainer.is_global_zero):
            return
        folder = Path(trainer.log_dir or ".") / PICTURES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        model = pl_module.model
        if self._test_y:  # a conditional model: samples given test inputs (images y: the grid shows them)
            if self._test_y[0].dim() != 4:
                rank_zero_info("PicturesCallback: the conditioning input is not an image; no test pictures.")
                return
            images, y = torch.cat(self._test_images), torch.cat(self._test_y)
            chosen = torch.linspace(0, images.shape[0] - 1, min(self.num_maps, images.shape[0])).round().long()
            grid = superresolution_grid(model, images[chosen], y[chosen], num_samples=3, steps=self.sample_steps)
            _save_png(grid, folder / "conditional_samples.png", scale=3)
            rank_zero_info(f"Wrote test pictures to {folder}/")
            return
        samples = ancestral_sample(model, self.num_samples, steps=self.sample_steps).samples.cpu()
        _save_png(image_grid(samples), folder / "samples.png", scale=3)
        if model.process.multivariate and self._test_images:
            images = torch.cat(self._test_images).to(pl_module.device)
            import matplotlib.pyplot as plt

            chosen = torch.linspace(0, images.shape[0] - 1, min(self.num_maps, images.shape[0])).round().long()
            maps = schedule_maps(model, images[chosen.to(images.device)], times=(0.2, 0.4, 0.6, 0.8))
            maps.savefig(folder / "schedule_maps.png", dpi=110)
            figure, times, across, within, adaptive = log_snr_spread(model, images[: self.num_spread])
            figure.savefig(folder / "log_snr_spread.png", dpi=110)
            plt.close(maps)
            plt.close(figure)
            table = zip(times.tolist(), across.tolist(), within.tolist(), strict=True)
            rows = [f"{t:.2f}\t{a:.5f}\t{w:.5f}" for t, a, w in table]
            verdict = "adaptive to the latent" if adaptive else "flat spread across images: the schedule ignores z"
            (folder / "log_snr_spread.txt").write_text(
                "t\tstd across images\tstd within an image (log-SNR, nats)\n" + "\n".join(rows) + f"\n# {verdict}\n"
            )
        rank_zero_info(f"Wrote test pictures to {folder}/")


GRID_MIN_SIDE = 256
"""``mulan-cli predict``'s ``samples.png`` is enlarged by a whole factor until its shorter side has at least this many
pixels (:func:`grid_scale`)."""
GRID_MAX_SIDE = 4096
"""... unless that would make its longer side exceed this many pixels."""


def grid_scale(height: int, width: int, min_side: int = GRID_MIN_SIDE, max_side: int = GRID_MAX_SIDE) -> int:
    """The whole enlargement factor (>= 1) for a ``height`` x ``width`` picture: the smallest that brings its shorter
    side to ``min_side`` pixels or more, lowered if needed so that the longer side stays within ``max_side``
    (16 images of 1x8x8 make a 37 x 37 grid with its 1-pixel borders, enlarged 7 times to 259 x 259)."""
    wanted = -(-min_side // max(1, min(height, width)))  # ceil
    return max(1, min(wanted, max_side // max(1, height, width)))


class _Repeated(Dataset):
    """Item ``i`` of ``dataset``, for ``i`` in ``0..length - 1``, taken cyclically (``dataset[i % len(dataset)]``)."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        self.dataset, self.length = dataset, length
        self.size = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % self.size]


def fixed_count_loader(loader: DataLoader, num_samples: int) -> DataLoader:
    """A predict loader that makes ``predict`` draw exactly ``num_samples`` samples, whatever the size of the data:
    ``num_samples`` items of ``loader``'s data set taken in order and cyclically (``i % len``), in batches of
    ``loader``'s batch size (the last one smaller), with its collation and workers. :meth:`DiffusionTask.predict_step
    <mulan.lightning.task.DiffusionTask.predict_step>` draws one sample per item; for conditional data the sample of
    item ``i`` is given the ``y`` of test item ``i % len``. Under DDP Lightning gives each rank its own share."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}: give how many samples predict draws.")
    dataset = loader.dataset
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ValueError(
            f"--num_samples needs a predict data set with a length and items by index, got {type(dataset).__name__} "
            "(or an empty one); leave --num_samples out to draw one sample per predict image."
        )
    return DataLoader(
        _Repeated(dataset, num_samples),
        batch_size=loader.batch_size or 1,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


def _save_png(grid: Tensor, path: Path, scale: int = 1) -> None:
    """Saves a uint8 (C, H, W) grid as a PNG, ``scale`` times enlarged (nearest neighbour) so that small images stay
    visible: each pixel repeated, since ``save_image`` does not resize."""
    enlarged = grid.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    save_image(enlarged.float() / 255, path)  # (k / 255) * 255 + 0.5 rounds back to k: the same bytes


class SampleWriter(BasePredictionWriter):
    """Writes what ``mulan-cli predict`` generated to ``output_dir``: ``samples.npz`` (uint8 (N, C, H, W) under
    ``samples``), ``samples.png`` (a grid of the first 256, enlarged by the whole factor of :func:`grid_scale`, each
    pixel repeated) and, for per-dimension schedules, ``schedule_maps.png`` (log-SNR maps
    of the first predict images) and ``snr_variance.png``. Under DDP each rank writes its own ``rank{r}`` files."""

    def __init__(self, output_dir: str = "samples") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self._images: Tensor | None = None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._images is None:
            self._images = split_batch(batch)[0][:4]

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        samples = torch.cat([p.cpu() for p in predictions])
        np.savez_compressed(self.output_dir / f"samples{suffix}.npz", samples=samples.numpy())
        grid = image_grid(samples[:256])
        _save_png(grid, self.output_dir / f"samples{suffix}.png", scale=grid_scale(grid.shape[-2], grid.shape[-1]))
        model = pl_module.model
        if model.process.multivariate and self._images is not None:
            schedule_maps(model, self._images.to(pl_module.device)).savefig(
                self.output_dir / f"schedule_maps{suffix}.png", dpi=120
            )
            snr_variance(model)[0].savefig(self.output_dir / f"snr_variance{suffix}.png", dpi=120)
        rank_zero_info(f"Wrote {samples.shape[0]} samples and figures to {self.output_dir}/")
