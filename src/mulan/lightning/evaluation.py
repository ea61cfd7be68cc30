"""The evaluation callback: dense-ELBO bits/dim, the probability-flow ODE bound and FID/KID on the validation and
test data, with per-image results that are reproducible and survive a restart (:mod:`mulan.lightning.evaluation_cache`).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import CatMetric

from mulan.lightning.evaluation_cache import CACHE_FORMAT, ImageKeys, ResultCache, fingerprint, seeded_rng
from mulan.lightning.features import inception_features, rgb
from mulan.lightning.metrics import evaluation_seed
from mulan.lightning.task import DiffusionTask, split_batch
from mulan.likelihood import dense_elbo, ode_likelihood
from mulan.ode import DEFAULT_TIME_VARIABLE, ODESettings, check_divergence_options
from mulan.sampling import SAMPLERS


def _planned_images(trainer: L.Trainer, stage: str) -> int | None:
    """How many images this rank's loader of ``stage`` will give (after ``limit_*_batches``); None if unknown."""
    try:
        loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
        loader: Any = loaders[0] if isinstance(loaders, list | tuple) else loaders
        count = len(loader.sampler) if getattr(loader, "sampler", None) is not None else len(loader.dataset)
        batches = (trainer.num_test_batches if stage == "test" else trainer.num_val_batches)[0]
        if math.isfinite(batches) and loader.batch_size:
            count = min(count, int(batches) * loader.batch_size)
        return int(count)
    except (AttributeError, IndexError, TypeError):
        return None


def _duration(seconds: float) -> str:
    """``seconds`` as ``"1 h 02 min"``, ``"3 min 05 s"`` or ``"12 s"``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class EvaluationCallback(L.Callback):
    """Dense-ELBO bits/dim and FID (optionally KID) on the validation and test data.

    During validation it runs every ``every_n_validations``-th validation (how often validation runs is the
    trainer's ``val_check_interval``; 0: never); during test always. The model in use is the one validation/test uses
    (the EMA weights with Lightning's EMA callback). Logged: ``{stage}/dense_bpd``, ``{stage}/dense_bpd_stderr``,
    ``{stage}/fid``, ``{stage}/kid_mean``, ``{stage}/kid_std``, and with ``ode_images > 0`` the probability-flow
    ODE bound ``{stage}/ode_bpd`` (+ ``_stderr``; see :func:`mulan.likelihood.ode_likelihood` for which bound), its
    mean NFE ``{stage}/ode_nfe`` and ``{stage}/ode_seconds_per_image``. With Hutchinson probes and ``ode_draws > 1``
    also the importance-weighted figure of the papers, ``{stage}/ode_iw_bpd``: an estimate, not a bound, optimistic
    by about ``{stage}/ode_iw_bias_bpd`` (logged when ``ode_probes >= 2`` or ``ode_divergence_samples`` lets it be
    estimated). With ``ode_exact_divergence`` (and the integral solved) the importance-weighted bound is the
    headline ``ode_bpd`` itself. When each image's figure comes with an estimate of its own noise (several probes,
    sampled divergence times, or the exact divergence), ``{stage}/ode_noise_bpd`` is the root mean square of the
    images' standard deviations: the part of the spread between images that is the estimator's (times and probes,
    given the dequantisation draws). Every ``_stderr`` is ``std / sqrt(n)`` over the images, the standard error of
    the mean: each (image, draw) row draws its own times, probes and noise, so the images are independent (docs:
    evaluation, "What each ± means").

    With ``progress``, rank zero logs a line after each batch of the ODE stage: images done / total, the time
    spent and an estimate of the time left. Each batch's random draws come from a seed of the run's seed, the stage
    and the batch's image keys (hashes of their bytes), not from the global random state, which is left as it was.
    With ``cache_dir`` the per-image results of a test are stored as each batch finishes, under a fingerprint of
    the weights and of every setting they depend on: a test interrupted and started again recomputes only the
    images it had not finished and gives the values of an uninterrupted test (:mod:`~mulan.lightning.evaluation_cache`;
    docs: evaluation, "Reproducible evaluation"). Validation during fit does not use the cache. This rank's values
    of the last stage are in :attr:`per_image`: image key -> ``{"dense_bpd", "ode_bpd", "ode_iw_bpd",
    "ode_iw_bias_bpd", "ode_noise_bpd"}`` (bits/dim), ``"ode_nfe"`` (drift evaluations per solve) and
    ``"ode_seconds"`` (wall-clock seconds per image of its call).

    Args:
        num_images: real images (from the loader) used for the dense ELBO and as FID's real set.
        num_times: stratified times per image in the dense ELBO (the reference uses 128).
        num_samples: generated images for FID/KID.
        sample_steps: sampling steps ``T`` (ancestral: 256 is usual; ``dpm_solver``: a few dozen).
        sampler: ``"ancestral"`` (:func:`~mulan.sampling.ancestral_sample`), ``"dpm_solver"``
            (:func:`~mulan.sampling.dpm_solver_sample`, deterministic, few steps) or ``"dpm_solver_sde"`` (its
            stochastic form, few steps).
        fid, kid: compute FID / KID (torchmetrics with torch-fidelity's InceptionV3).
        feature_extractor_weights_path: InceptionV3 weights (see
            :func:`~mulan.lightning.features.resolve_inception_weights`).
        ode_images: images (per process) evaluated with the probability-flow ODE likelihood (0: off; slow).
        ode_draws: truncated-normal dequantisation draws per image (more draws: less variance per image; the
            paper's importance-weighted figure used 20).
        ode_probes: Hutchinson probes per solve (``>= 2`` estimates the probe noise and the importance-weighted
            figure's bias).
        ode_exact_divergence: the exact trace instead of Hutchinson probes (``D`` vector-Jacobian products per
            evaluation: small images only); makes the importance-weighted figure a bound, and the headline.
        ode_rtol, ode_atol: tolerances of the adaptive dopri5 solver.
        ode_divergence_atol: the log-density integral's own absolute tolerance in nats (``.inf`` in YAML: not
            error-controlled, the trajectory sets the steps; None: ``ode_rtol``/``ode_atol`` like the state; docs:
            evaluation, "Error control of the divergence integral").
        ode_divergence_samples: an even ``M``: the log-density integral by stratified sampling at ``M`` times on
            the trajectory solved alone (unbiased; ``M`` more evaluations; the per-image noise is estimated and
            logged as ``ode_noise_bpd``; docs: evaluation, "Sampled divergence integral"). None: solved.
        ode_solve_batch_size: (image, draw) rows per ODE solve (default: all of a batch's at once).
        ode_time_variable: the ODE's integration variable, ``"t"`` or ``"log_snr"`` (the normalised mean log-SNR
            time, :class:`mulan.ode.LogSNRTime`; the same bound, other steps; docs: evaluation, "Time variable").
        cache_dir: directory for per-image test results, reused by a restarted test (None: no cache).
        progress: progress bars for the ODE solves and FID sampling, and the ODE stage's ETA lines (rank zero).
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
        ode_divergence_atol: float | None = None,
        ode_divergence_samples: int | None = None,
        ode_solve_batch_size: int | None = None,
        ode_time_variable: str = DEFAULT_TIME_VARIABLE,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}.")
        check_divergence_options(ode_time_variable, ode_divergence_atol, ode_divergence_samples, prefix="ode_")
        self.ode_settings = ODESettings(
            num_draws=ode_draws,
            num_probes=ode_probes,
            exact_divergence=ode_exact_divergence,
            rtol=ode_rtol,
            atol=ode_atol,
            divergence_atol=ode_divergence_atol,
            divergence_samples=ode_divergence_samples,
            time_variable=ode_time_variable,
            solve_batch_size=ode_solve_batch_size,
        )
        self.cache_dir = cache_dir
        self.per_image: dict[str, dict[str, float]] = {}
        self._cache: ResultCache | None = None
        self._stage = "test"
        self._base_seed = 0
        self._is_global_zero = True
        self._ode_total = 0
        self._ode_computed, self._ode_compute_seconds, self._ode_started = 0, 0.0, 0.0
        self._image_keys = ImageKeys()
        self.ode_images, self.sampler = ode_images, sampler
        self._ode_bpd, self._ode_iw_bpd, self._ode_iw_bias = CatMetric(), CatMetric(), CatMetric()
        self._ode_nfe, self._dense_bpd, self._ode_noise = CatMetric(), CatMetric(), CatMetric()
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
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        feature = self.feature_extractor or inception_features(self.weights_path)  # shared by FID and KID
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
        return self.ode_settings.num_draws > 1 and not self.ode_settings.exact_log_p

    @property
    def _noise_known(self) -> bool:
        """Whether each image's ODE figure comes with an estimate of its own noise (several probes, sampled
        divergence times, or none at all with the exact divergence integrated by the solver)."""
        ode = self.ode_settings
        return ode.num_probes > 1 or ode.exact_divergence or ode.divergence_samples is not None

    def _own_metrics(self) -> list[Metric]:
        return [self._dense_bpd, self._ode_bpd, self._ode_iw_bpd, self._ode_iw_bias, self._ode_noise, self._ode_nfe]

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
        self._stage, self._is_global_zero = stage, trainer.is_global_zero
        self._base_seed = int(getattr(trainer.lightning_module, "_base_seed", 0))
        self.per_image, self._image_keys, self._cache = {}, ImageKeys(), None
        self._ode_computed, self._ode_compute_seconds, self._ode_started = 0, 0.0, time.perf_counter()
        planned = _planned_images(trainer, stage)
        self._ode_total = min(self.ode_images, self.num_images, planned if planned is not None else self.ode_images)

    # ------------------------------------------------------------------ per-image keys, the cache, seeds
    def _settings(self, trainer_precision: str, stage: str) -> dict:
        """Everything besides the weights that the per-image values depend on (the cache's fingerprint)."""
        ode = self.ode_settings  # named as the callback's options, so the JSON (and the fingerprint) is format 3's
        return {
            "format": CACHE_FORMAT,
            "stage": stage,
            "num_times": self.num_times,
            "ode_draws": ode.num_draws,
            "ode_probes": ode.num_probes,
            "ode_exact_divergence": ode.exact_divergence,
            "ode_rtol": ode.rtol,
            "ode_atol": ode.atol,
            "ode_divergence_atol": ode.divergence_atol,
            "ode_divergence_samples": ode.divergence_samples,
            "ode_solve_batch_size": ode.solve_batch_size,
            "ode_time_variable": ode.time_variable,
            "precision": trainer_precision,
        }

    def _open_cache(self, pl_module: DiffusionTask) -> ResultCache:
        """This stage's cache: on disk under ``cache_dir/<fingerprint>`` in test with a ``cache_dir``, else in memory.
        Opened at the first batch, after every callback's epoch-start hook (an EMA swap) has run."""
        if self._cache is None:
            root = None
            if self.cache_dir is not None and self._stage == "test":
                trainer = pl_module.trainer
                settings = self._settings(str(trainer.precision), self._stage)
                root = Path(self.cache_dir) / fingerprint(pl_module.model, settings)
            self._cache = ResultCache(root, pl_module.global_rank)
            if root is not None and (self._cache.dense or self._cache.ode):
                rank_zero_info(
                    f"EvaluationCallback: {len(self._cache.dense)} dense and {len(self._cache.ode)} ODE per-image "
                    f"results found in {root}; they are not computed again."
                )
        return self._cache

    def _seeded(self, what: str, keys: list[str], device: torch.device) -> contextlib.AbstractContextManager:
        """The global random state seeded from the run's seed, the stage, ``what`` and the images' keys for the
        duration (restored after): a batch draws the same whether the test follows fit or runs alone, runs twice,
        or was interrupted and resumed, and with or without a cache (docs: evaluation, "Reproducible evaluation")."""
        return seeded_rng(evaluation_seed(self._base_seed, self._stage, what, ",".join(keys)), device)

    def _batch(self, pl_module: DiffusionTask, batch: Tensor | tuple) -> None:
        if not self._active or self._seen >= self.num_images:
            return
        images, y = split_batch(batch)
        images = images[: self.num_images - self._seen]
        y = None if y is None else y[: images.shape[0]]
        self._seen += images.shape[0]
        keys, cache = self._image_keys(images, y), self._open_cache(pl_module)
        missing = [i for i, key in enumerate(keys) if key not in cache.dense]
        if missing:
            rows = torch.tensor(missing, device=images.device)
            with self._seeded("dense", [keys[i] for i in missing], images.device):
                bound = dense_elbo(pl_module.model, images[rows], None if y is None else y[rows], self.num_times)
            values = pl_module.model.bpd(bound.total).tolist()
            cache.save("dense", {keys[i]: v for i, v in zip(missing, values, strict=True)})
        dense = [cache.dense[key] for key in keys]
        self._dense_bpd.update(torch.tensor(dense, device=pl_module.device))
        for key, value in zip(keys, dense, strict=True):
            self.per_image.setdefault(key, {})["dense_bpd"] = value
        for metric in self.metrics.values():
            metric.update(rgb(images), real=True)
        if y is not None:
            self._sample_y.append(y)
        self._ode_batch(pl_module, images, y, keys, cache)

    def _ode_batch(
        self, pl_module: DiffusionTask, images: Tensor, y: Tensor | None, keys: list[str], cache: ResultCache
    ) -> None:
        """The ODE bound of this batch's first images up to ``ode_images`` (per process); images with results in the
        cache are not solved again."""
        if self._ode_seen >= self.ode_images:
            return
        count = self.ode_images - self._ode_seen
        images, y, keys = images[:count], None if y is None else y[:count], keys[:count]
        self._ode_seen += images.shape[0]
        missing = [i for i, key in enumerate(keys) if key not in cache.ode]
        if missing:
            start = time.perf_counter()
            rows = torch.tensor(missing, device=images.device)
            # The ODE's divergence needs autograd, which Lightning's evaluation loops switch off.
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                self._seeded("ode", [keys[i] for i in missing], images.device),
            ):
                result = ode_likelihood(
                    pl_module.model,
                    images[rows].clone(),
                    None if y is None else y[rows].clone(),
                    self.ode_settings,
                    progress=self.progress and self._is_global_zero,
                )
            columns = {
                "ode_bpd": result.bpd.tolist(),
                "ode_iw_bpd": result.iw_bpd.tolist(),
                "ode_iw_bias_bpd": pl_module.model.bpd(result.iw_bias_nats).tolist(),
                "ode_nfe": result.nfe.float().tolist(),
            }
            if self._noise_known:  # otherwise NaN: unknown
                columns["ode_noise_bpd"] = pl_module.model.bpd(result.nll_var_nats.sqrt()).tolist()
            entries = {}
            for j, i in enumerate(missing):
                entries[keys[i]] = {name: values[j] for name, values in columns.items()}
                entries[keys[i]]["ode_seconds"] = result.seconds_per_image
            cache.save("ode", entries)
            self._ode_computed += len(missing)
            self._ode_compute_seconds += time.perf_counter() - start
        results = [cache.ode[key] for key in keys]
        for key, entry in zip(keys, results, strict=True):
            self.per_image.setdefault(key, {}).update(entry)

        def column(name: str) -> Tensor:
            return torch.tensor([entry[name] for entry in results], device=pl_module.device)

        self._ode_bpd.update(column("ode_bpd"))
        if self._reports_iw:
            self._ode_iw_bpd.update(column("ode_iw_bpd"))
            if self._noise_known:  # one probe in a solved integral shows no spread: the bias is unknown (NaN)
                self._ode_iw_bias.update(column("ode_iw_bias_bpd"))
        if self._noise_known:
            self._ode_noise.update(column("ode_noise_bpd"))
        self._ode_nfe.update(column("ode_nfe"))
        self._ode_seconds.extend(entry["ode_seconds"] for entry in results)
        self._report_progress(len(keys) - len(missing))

    def _report_progress(self, reused: int) -> None:
        """Rank zero, with ``progress``: ODE images done / total on this rank, time spent, and an estimate of the
        time left (the mean time of the images computed so far, times the images left)."""
        if not (self.progress and self._is_global_zero):
            return
        done, total = self._ode_seen, max(self._ode_total, self._ode_seen)
        elapsed = time.perf_counter() - self._ode_started
        line = f"ODE likelihood: {done}/{total} images"
        if reused:
            line += f" ({reused} of this batch from the cache)"
        line += f", {_duration(elapsed)} elapsed"
        if self._ode_computed:  # the ODE's mean time per image so far (the dense ELBO's is small beside it)
            left = (total - done) * self._ode_compute_seconds / self._ode_computed
            line += f", about {_duration(left)} left"
        rank_zero_info(line)

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
                if self._noise_known:
                    results[f"{stage}/ode_iw_bias_bpd"] = self._ode_iw_bias.compute().mean()
            if self._noise_known:  # the root mean square of the images' own standard deviations
                results[f"{stage}/ode_noise_bpd"] = self._ode_noise.compute().reshape(-1).square().mean().sqrt()
            results[f"{stage}/ode_nfe"] = self._ode_nfe.compute().mean()
            seconds = self._ode_seconds or [0.0]
            results[f"{stage}/ode_seconds_per_image"] = torch.tensor(sum(seconds) / len(seconds))
        if self.metrics:
            per_rank = math.ceil(self.num_samples / trainer.world_size)
            given = torch.cat(self._sample_y) if self._sample_y else None
            for start in range(0, per_rank, self.sample_batch_size):
                count = min(self.sample_batch_size, per_rank - start)
                y = None if given is None else given[torch.arange(start, start + count) % given.shape[0]]
                seed = evaluation_seed(self._base_seed, stage, "samples", trainer.global_rank, start)
                with seeded_rng(seed, pl_module.device):  # each rank and batch its own draws, reproducibly
                    samples = SAMPLERS[self.sampler](
                        pl_module.model,
                        count,
                        steps=self.sample_steps,
                        y=y,
                        progress=self.progress and trainer.is_global_zero,
                    ).samples
                for metric in self.metrics.values():
                    metric.update(rgb(samples), real=False)
            if "fid" in self.metrics:
                results[f"{stage}/fid"] = self.metrics["fid"].compute()
            if "kid" in self.metrics:
                mean, std = self.metrics["kid"].compute()
                results[f"{stage}/kid_mean"], results[f"{stage}/kid_std"] = mean, std
        # Synced metrics hold the global value on every rank, so averaging them over ranks changes nothing; the one
        # per-rank figure, the ODE's seconds per image, becomes the mean of the ranks' averages.
        pl_module.log_dict({k: v.float() for k, v in results.items()}, sync_dist=True)
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
