"""Callbacks: likelihood and FID/KID evaluation during fit and test; pictures in TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import CatMetric

from mulan.figures import image_grid, log_snr_spread, schedule_maps, snr_variance
from mulan.lightning.task import DiffusionTask, split_batch
from mulan.likelihood import dense_elbo, ode_likelihood
from mulan.sampling import SAMPLERS, ancestral_sample

PICTURES_DIR = "pictures"  # under the run's log directory: what PicturesCallback draws at test
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def resolve_inception_weights(path: str | None) -> str:
    """The path of torch-fidelity's InceptionV3 weights, checked to exist and to load with ``weights_only=True``.

    Without ``path``, torch's hub cache (where torch-fidelity would download them) is used. Offline and
    without the file this raises at once, with where to put it, instead of failing after hours of training.
    torch-fidelity itself loads the file with ``weights_only=False``; loading it here first with
    ``weights_only=True`` refuses a file that holds anything but tensors before that happens.
    """
    candidate = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not candidate.is_file():
        raise FileNotFoundError(
            f"FID/KID need torch-fidelity's InceptionV3 weights, not found at {candidate}. This machine cannot "
            f"download them at run time: fetch {INCEPTION_URL} elsewhere, then either pass "
            f"feature_extractor_weights_path=/path/to/{INCEPTION_FILE} to the EvaluationCallback, or copy the "
            f"file to {Path(torch.hub.get_dir()) / 'checkpoints'}/. Or set fid: false."
        )
    try:
        torch.load(candidate, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"{candidate} is not a plain InceptionV3 state dict ({type(exc).__name__}: {exc}).") from exc
    return str(candidate)


class EvaluationCallback(L.Callback):
    """Dense-ELBO bits/dim and FID (optionally KID) on the validation and test data.

    During validation it runs every ``every_n_validations``-th validation (how often validation runs is the
    trainer's ``val_check_interval``; 0: never); during test always. The model in use is the one validation/test uses
    (the EMA weights with Lightning's EMA callback). Logged: ``{stage}/dense_bpd``, ``{stage}/dense_bpd_stderr``,
    ``{stage}/fid``, ``{stage}/kid_mean``, ``{stage}/kid_std``, and with ``ode_images > 0`` the probability-flow
    ODE bound ``{stage}/ode_bpd`` (+ ``_stderr``; see :func:`mulan.likelihood.ode_likelihood` for which bound), its
    mean NFE ``{stage}/ode_nfe`` and ``{stage}/ode_seconds_per_image``. With Hutchinson probes and ``ode_draws > 1``
    also the importance-weighted figure of the papers, ``{stage}/ode_iw_bpd``: an estimate, not a bound, optimistic
    by about ``{stage}/ode_iw_bias_bpd`` (logged when ``ode_probes >= 2`` lets it be estimated). With
    ``ode_exact_divergence`` the importance-weighted bound is the headline ``ode_bpd`` itself.

    Args:
        num_images: real images (from the loader) used for the dense ELBO and as FID's real set.
        num_times: stratified times per image in the dense ELBO (the reference uses 128).
        num_samples: generated images for FID/KID.
        sample_steps: sampling steps ``T`` (ancestral: 256 is usual; ``dpm_solver``: a few dozen).
        sampler: ``"ancestral"`` (:func:`~mulan.sampling.ancestral_sample`) or ``"dpm_solver"``
            (:func:`~mulan.sampling.dpm_solver_sample`, deterministic, few steps).
        fid, kid: compute FID / KID (torchmetrics with torch-fidelity's InceptionV3).
        feature_extractor_weights_path: InceptionV3 weights (see :func:`resolve_inception_weights`).
        ode_images: images (per process) evaluated with the probability-flow ODE likelihood (0: off; slow).
        ode_draws: truncated-normal dequantisation draws per image (more draws: less variance per image; the
            paper's importance-weighted figure used 20).
        ode_probes: Hutchinson probes per solve (``>= 2`` estimates the probe noise and the importance-weighted
            figure's bias).
        ode_exact_divergence: the exact trace instead of Hutchinson probes (``D`` vector-Jacobian products per
            evaluation: small images only); makes the importance-weighted figure a bound, and the headline.
        ode_rtol, ode_atol: tolerances of the adaptive dopri5 solver.
        ode_solve_batch_size: (image, draw) rows per ODE solve (default: all of a batch's at once).
        feature_extractor: a custom feature network for FID/KID instead of InceptionV3 (uint8 (N, 3, H, W) in,
            (N, F) out, with a ``num_features`` attribute), e.g. for tests or non-natural images.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_images: int = 1000,
        num_times: int = 128,
        num_samples: int = 1000,
        sample_steps: int = 256,
        sample_batch_size: int = 250,
        sampler: str = "ancestral",
        fid: bool = True,
        kid: bool = False,
        kid_subset_size: int = 100,
        feature_extractor_weights_path: str | None = None,
        feature_extractor: nn.Module | None = None,
        ode_images: int = 0,
        ode_draws: int = 1,
        ode_probes: int = 1,
        ode_exact_divergence: bool = False,
        ode_rtol: float = 1e-5,
        ode_atol: float = 1e-5,
        ode_solve_batch_size: int | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}.")
        self.ode_images, self.ode_draws, self.ode_rtol, self.ode_atol = ode_images, ode_draws, ode_rtol, ode_atol
        self.ode_probes, self.ode_exact_divergence = ode_probes, ode_exact_divergence
        self.ode_solve_batch_size, self.sampler = ode_solve_batch_size, sampler
        self._ode_bpd, self._ode_iw_bpd, self._ode_iw_bias = CatMetric(), CatMetric(), CatMetric()
        self._ode_nfe, self._dense_bpd = CatMetric(), CatMetric()
        self._ode_seconds: list[float] = []
        self._ode_seen = 0
        self._sample_y: list[Tensor] = []
        self.every_n_validations, self.num_images, self.num_times = every_n_validations, num_images, num_times
        self.num_samples, self.sample_steps, self.sample_batch_size = num_samples, sample_steps, sample_batch_size
        self.fid, self.kid, self.kid_subset_size, self.progress = fid, kid, kid_subset_size, progress
        self.weights_path, self.feature_extractor = feature_extractor_weights_path, feature_extractor
        self.metrics: dict[str, Metric] = {}
        self._validations = 0
        self._active = False
        self._seen = 0

    # ------------------------------------------------------------------ set-up: fail early, not after training
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not (self.fid or self.kid) or self.metrics:
            return
        from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
        from torchmetrics.image.kid import KernelInceptionDistance

        feature = self.feature_extractor
        if feature is None:  # torch-fidelity's InceptionV3 (2048-d pool features), shared by FID and KID
            weights = resolve_inception_weights(self.weights_path)
            feature = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
            feature.num_features = 2048
        if self.fid:
            self.metrics["fid"] = FrechetInceptionDistance(feature=feature)
        if self.kid:
            self.metrics["kid"] = KernelInceptionDistance(feature=feature, subset_size=self.kid_subset_size)
        for metric in [*self.metrics.values(), *self._own_metrics()]:
            metric.to(pl_module.device)

    @property
    def _reports_iw(self) -> bool:
        """Whether the importance-weighted estimate is logged beside the bound (with the exact divergence it is the
        bound itself, and with one draw it equals it)."""
        return self.ode_draws > 1 and not self.ode_exact_divergence

    def _own_metrics(self) -> list[Metric]:
        return [self._dense_bpd, self._ode_bpd, self._ode_iw_bpd, self._ode_iw_bias, self._ode_nfe]

    # ------------------------------------------------------------------ per stage
    def _start(self, trainer: L.Trainer, stage: str) -> None:
        if stage == "val":
            self._validations += 1
            due = self.every_n_validations > 0 and self._validations % self.every_n_validations == 0
            self._active = due and not trainer.sanity_checking
        else:
            self._active = True
        self._seen, self._ode_seen, self._ode_seconds, self._sample_y = 0, 0, [], []
        for metric in [*self.metrics.values(), *self._own_metrics()]:
            metric.reset()

    def _batch(self, pl_module: DiffusionTask, batch: Tensor | tuple) -> None:
        if not self._active or self._seen >= self.num_images:
            return
        images, y = split_batch(batch)
        images = images[: self.num_images - self._seen]
        y = None if y is None else y[: images.shape[0]]
        self._seen += images.shape[0]
        bound = dense_elbo(pl_module.model, images, y, num_times=self.num_times)
        self._dense_bpd.update(pl_module.model.bpd(bound.total))
        for metric in self.metrics.values():
            metric.update(_rgb(images), real=True)
        if y is not None:
            self._sample_y.append(y)
        self._ode_batch(pl_module, images, y)

    def _ode_batch(self, pl_module: DiffusionTask, images: Tensor, y: Tensor | None) -> None:
        if self._ode_seen >= self.ode_images:
            return
        # The ODE's divergence needs autograd, which Lightning's evaluation loops switch off.
        with torch.inference_mode(False), torch.enable_grad():
            count = self.ode_images - self._ode_seen
            images, y = images[:count].clone(), None if y is None else y[:count].clone()
            self._ode_seen += images.shape[0]
            result = ode_likelihood(
                pl_module.model,
                images,
                y,
                num_draws=self.ode_draws,
                num_probes=self.ode_probes,
                exact_divergence=self.ode_exact_divergence,
                rtol=self.ode_rtol,
                atol=self.ode_atol,
                solve_batch_size=self.ode_solve_batch_size,
                progress=self.progress,
            )
        self._ode_bpd.update(result.bpd.detach())
        if self._reports_iw:
            self._ode_iw_bpd.update(result.iw_bpd.detach())
            if self.ode_probes > 1:  # one probe shows no spread: the bias is unknown (NaN)
                self._ode_iw_bias.update(pl_module.model.bpd(result.iw_bias_nats).detach())
        self._ode_nfe.update(result.nfe.detach().float())
        self._ode_seconds.append(result.seconds_per_image)

    def _end(self, trainer: L.Trainer, pl_module: DiffusionTask, stage: str) -> None:
        if not self._active:
            return
        # CatMetric gathers every rank's values, uneven counts included: each image is counted once.
        bpd = self._dense_bpd.compute().reshape(-1)
        results = {f"{stage}/dense_bpd": bpd.mean(), f"{stage}/dense_bpd_stderr": bpd.std() / math.sqrt(bpd.numel())}
        results[f"{stage}/dense_images"] = torch.tensor(float(bpd.numel()))
        if self.ode_images > 0:
            ode = self._ode_bpd.compute().reshape(-1)
            results[f"{stage}/ode_bpd"] = ode.mean()
            results[f"{stage}/ode_bpd_stderr"] = ode.std() / math.sqrt(ode.numel())
            if self._reports_iw:
                results[f"{stage}/ode_iw_bpd"] = self._ode_iw_bpd.compute().mean()
                if self.ode_probes > 1:
                    results[f"{stage}/ode_iw_bias_bpd"] = self._ode_iw_bias.compute().mean()
            results[f"{stage}/ode_nfe"] = self._ode_nfe.compute().mean()
            seconds = self._ode_seconds or [0.0]
            results[f"{stage}/ode_seconds_per_image"] = torch.tensor(sum(seconds) / len(seconds))
        if self.metrics:
            per_rank = math.ceil(self.num_samples / trainer.world_size)
            given = torch.cat(self._sample_y) if self._sample_y else None
            for start in range(0, per_rank, self.sample_batch_size):
                count = min(self.sample_batch_size, per_rank - start)
                y = None if given is None else given[torch.arange(start, start + count) % given.shape[0]]
                samples = SAMPLERS[self.sampler](
                    pl_module.model,
                    count,
                    steps=self.sample_steps,
                    y=y,
                    progress=self.progress and trainer.is_global_zero,
                ).samples
                for metric in self.metrics.values():
                    metric.update(_rgb(samples), real=False)
            if "fid" in self.metrics:
                results[f"{stage}/fid"] = self.metrics["fid"].compute()
            if "kid" in self.metrics:
                mean, std = self.metrics["kid"].compute()
                results[f"{stage}/kid_mean"], results[f"{stage}/kid_std"] = mean, std
        pl_module.log_dict({k: v.float() for k, v in results.items()}, sync_dist=False, rank_zero_only=False)
        rank_zero_info("  ".join(f"{k} = {float(v):.4f}" for k, v in results.items()))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, "val")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(pl_module, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._end(trainer, pl_module, "test")


def _rgb(images: Tensor) -> Tensor:
    """uint8 (N, 1 or 3, H, W) -> (N, 3, H, W) for Inception-style feature networks."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class PicturesCallback(L.Callback):
    """Pictures of the model as it trains and as it is tested.

    - After every ``every_n_validations``-th validation (0: never), to TensorBoard: a sample grid, and for
      per-dimension schedules the log-SNR maps of ``num_maps`` validation images and the variance of the SNR across
      latents against ``t``. Needs a :class:`~lightning.pytorch.loggers.TensorBoardLogger` (otherwise skipped).
    - After ``test`` (``test_pictures``), as PNG files in ``<log_dir>/pictures/``: ``samples.png``, and for
      per-dimension schedules ``schedule_maps.png`` (the log-SNR maps of ``num_maps`` test images side by side at
      several ``t``, on one colour scale), ``log_snr_spread.png`` and ``log_snr_spread.txt`` (the spread of the
      learned log-SNR across up to ``num_spread`` test images and within each image, against ``t``, in nats).
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
        self._test_images = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        held = sum(images.shape[0] for images in self._test_images)
        if self.test_pictures and held < max(self.num_spread, self.num_maps):
            self._test_images.append(split_batch(batch)[0][: max(self.num_spread, self.num_maps) - held].cpu())

    @torch.no_grad()
    def on_test_end(self, trainer: L.Trainer, pl_module: DiffusionTask) -> None:  # type: ignore[override]
        if not (self.test_pictures and trainer.is_global_zero):
            return
        folder = Path(trainer.log_dir or ".") / PICTURES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        model = pl_module.model
        samples = ancestral_sample(model, self.num_samples, steps=self.sample_steps).samples.cpu()
        _save_png(image_grid(samples), folder / "samples.png")
        if model.process.multivariate and self._test_images:
            images = torch.cat(self._test_images).to(pl_module.device)
            import matplotlib.pyplot as plt

            maps = schedule_maps(model, images[: self.num_maps], times=(0.2, 0.4, 0.6, 0.8))
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


def _save_png(grid: Tensor, path: Path) -> None:
    """Saves a uint8 (C, H, W) grid as a PNG, 3x enlarged (nearest neighbour) so that small images stay visible."""
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    image.resize((array.shape[1] * 3, array.shape[0] * 3), Image.Resampling.NEAREST).save(path)


class SampleWriter(BasePredictionWriter):
    """Writes what ``mulan-cli predict`` generated to ``output_dir``: ``samples.npz`` (uint8 (N, C, H, W) under
    ``samples``), ``samples.png`` (a grid) and, for per-dimension schedules, ``schedule_maps.png`` (log-SNR maps
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
        grid = image_grid(samples[:256]).permute(1, 2, 0).numpy()
        Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(
            self.output_dir / f"samples{suffix}.png"
        )
        model = pl_module.model
        if model.process.multivariate and self._images is not None:
            schedule_maps(model, self._images.to(pl_module.device)).savefig(
                self.output_dir / f"schedule_maps{suffix}.png", dpi=120
            )
            snr_variance(model)[0].savefig(self.output_dir / f"snr_variance{suffix}.png", dpi=120)
        rank_zero_info(f"Wrote {samples.shape[0]} samples and figures to {self.output_dir}/")
