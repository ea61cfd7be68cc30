"""The LightningModule: components in, bits/dim out. It wires training, logging and optimisation only;
the model is :class:`mulan.model.DiffusionModel` (pure torch)."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from functools import partial
from typing import cast

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, RandomSampler

from mulan.latents import LatentFactory, NoLatent
from mulan.lightning.metrics import MeanStdErr
from mulan.lightning.optim import AdamW, LinearWarmup
from mulan.model import DiffusionModel, ELBOTerms
from mulan.networks import DenoiserFactory, UNet
from mulan.sampling import ancestral_sample
from mulan.schedules import FixedLinear, ImageShape, ScheduleFactory


def _seed_sampler(sampler: RandomSampler, seed: int, epoch: int) -> None:
    sampler.generator = torch.Generator().manual_seed((seed + 7919 * (epoch + 1)) % 2**63)


TERMS = ("total", "recon", "prior", "diffusion", "latent", "latent_surrogate")


class DiffusionModule(L.LightningModule):
    """Trains a VDM or MuLAN model on uint8 images by minimising the bound in bits/dim.

    Components are factories (a class plus its options in the config), called with the data's shape:

    Args:
        image_shape: ``(C, H, W)``; the CLI links it from ``data.image_shape``.
        denoiser: called as ``denoiser(image_shape, latent_dim)``.
        schedule: called as ``schedule(image_shape, latent_dim)``.
        latent: called as ``latent(image_shape)``; ``NoLatent`` for VDM.
        timesteps: 0 for continuous time, ``T`` for the ``T``-step loss.
        optimizer: called with the parameter groups (default: AdamW, lr 2e-4, betas (0.9, 0.99), wd 0.01;
            biases and normalisation scales are never decayed).
        lr_scheduler: called with the optimiser, stepped every optimiser step (default: 100-step warm-up).
        schedule_lr: learning rate of the schedule and latent encoder parameters (default: the optimiser's).
        schedule_weight_decay: their weight decay (default: the optimiser's; biases are never decayed).
        seed_every_step: seed the random draws of training step ``n`` on rank ``r`` from ``(seed, n, r)``, where
            ``seed`` is the run's seed (``seed_everything``): every DDP rank draws its own times, noise, latents
            and dropout, and a run resumed from a checkpoint draws exactly what the uninterrupted run would.
        sample_steps: ancestral sampling steps of ``predict``.
        channels_last: convolution weights (hence activations) in channels-last memory format; same values,
            usually faster (CPU oneDNN and GPU tensor cores; docs/benchmarks.md).
    """

    def __init__(
        self,
        image_shape: ImageShape = (3, 32, 32),
        denoiser: DenoiserFactory = UNet,
        schedule: ScheduleFactory = FixedLinear,
        latent: LatentFactory = NoLatent,
        timesteps: int = 0,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable = LinearWarmup,
        schedule_lr: float | None = None,
        schedule_weight_decay: float | None = None,
        seed_every_step: bool = True,
        sample_steps: int = 256,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        image_shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        latent_module = latent(image_shape)
        self.model = DiffusionModel(
            image_shape,
            schedule=schedule(image_shape, latent_module.dim),
            denoiser=denoiser(image_shape, latent_module.dim),
            latent=latent_module,
            timesteps=timesteps,
            channels_last=channels_last,
        )
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.schedule_lr, self.schedule_weight_decay = schedule_lr, schedule_weight_decay
        self.seed_every_step, self.sample_steps = seed_every_step, sample_steps
        self._base_seed = torch.initial_seed()
        self.meters = nn.ModuleDict({f"{stage}_bpd": MeanStdErr(len(TERMS)) for stage in ("train", "val", "test")})
        self.test_results: dict[str, tuple[float, float]] = {}

    # ----------------------------------------------------------------------------------------- steps
    def forward(self, images: Tensor) -> ELBOTerms:
        """The per-example bound terms (nats) of uint8 images (B, C, H, W)."""
        return self.model(images)

    def _bpd_terms(self, images: Tensor) -> Tensor:
        """(B, len(TERMS)) bits/dim per example, in the order of ``TERMS``."""
        terms = self.model(images).as_dict()
        return self.model.bpd(torch.stack([terms[name] for name in TERMS], dim=1))

    def on_train_start(self) -> None:
        # A shuffling sampler without a generator seeds itself from the global RNG, whose state at the start of an
        # epoch differs between an uninterrupted run and one resumed there. Give it a ``set_epoch`` (which
        # Lightning calls before every epoch, resumed or not) that seeds it from (seed, epoch), like
        # DistributedSampler under DDP already does.
        if not self.seed_every_step:
            return
        loaders = self.trainer.train_dataloader
        loaders = (
            loaders.values()
            if isinstance(loaders, dict)
            else loaders
            if isinstance(loaders, list | tuple)
            else [loaders]
        )
        for loader in loaders:
            sampler = getattr(loader, "sampler", None)
            if type(sampler) is RandomSampler and sampler.generator is None and not hasattr(sampler, "set_epoch"):
                sampler.set_epoch = partial(_seed_sampler, sampler, self._base_seed)  # type: ignore[attr-defined]

    def on_train_batch_start(self, batch: Tensor, batch_idx: int) -> None:
        if self.seed_every_step:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            torch.manual_seed((self._base_seed + 1 + self.global_step * world + rank) % 2**63)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        bpd = self._bpd_terms(batch)
        loss = bpd[:, 0].mean()
        if not torch.isfinite(loss):
            bad = {n: v for n, v in zip(TERMS, bpd.mean(0).tolist(), strict=True)}
            raise FloatingPointError(
                f"non-finite loss at global step {self.global_step} (bits/dim per term: {bad}); training "
                "stopped. The last good checkpoint is kept; lower the learning rate or check the data."
            )
        self.meter("train").update(bpd)
        self.log("train/bpd_step", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.meter("val").update(self._without_padding(self._bpd_terms(batch), "val"))

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self.meter("test").update(self._without_padding(self._bpd_terms(batch), "test"))

    def on_validation_epoch_start(self) -> None:
        self._seen = 0

    def on_test_epoch_start(self) -> None:
        self._seen = 0

    def _without_padding(self, bpd: Tensor, stage: str) -> Tensor:
        """Drop the duplicates a DistributedSampler appends to make the data set divisible by the world size.

        Rank ``r`` of ``W`` gets positions ``r, r + W, ...`` of the (padded) index list; padding occupies the
        positions ``>= len(dataset)``, so only a rank's last sample can be a duplicate."""
        seen, self._seen = getattr(self, "_seen", 0), getattr(self, "_seen", 0) + bpd.shape[0]
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        sampler = getattr(loaders, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return bpd
        last = sampler.num_samples - 1  # within-rank position of this rank's last sample
        padded = sampler.rank + last * sampler.num_replicas >= len(cast(Sized, sampler.dataset))
        if not padded or not seen <= last < self._seen:
            return bpd
        return torch.cat([bpd[: last - seen], bpd[last - seen + 1 :]])

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """As many ancestral samples (uint8 (B, C, H, W), ``z`` from the prior) as the batch has images."""
        return ancestral_sample(self.model, batch.shape[0], steps=self.sample_steps).samples

    def meter(self, stage: str) -> MeanStdErr:
        """The bits/dim meter of ``stage`` (train, val or test)."""
        return cast(MeanStdErr, self.meters[f"{stage}_bpd"])

    def _log_epoch(self, stage: str) -> dict[str, tuple[float, float]]:
        meter = self.meter(stage)
        mean, stderr = meter.compute()
        meter.reset()
        results = {n: (float(m), float(s)) for n, m, s in zip(TERMS, mean, stderr, strict=True)}
        self.log_dict({f"{stage}/bpd" if n == "total" else f"{stage}/{n}_bpd": m for n, (m, _) in results.items()})
        self.log(f"{stage}/bpd_stderr", results["total"][1])
        return results

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_epoch("test")
        lines = [f"{'term':<18}{'bits/dim':>12}{'std. err.':>12}"]
        lines += [f"{n:<18}{m:>12.4f}{s:>12.4f}" for n, (m, s) in self.test_results.items()]
        rank_zero_info(
            "Test bound (one-sample ELBO per image; 'total' uses the honest latent KL):\n" + "\n".join(lines)
        )

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mulan_base_seed"] = self._base_seed  # a resumed run draws what the uninterrupted one would

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._base_seed = int(checkpoint.get("mulan_base_seed", self._base_seed))
        saved = checkpoint.get("hyper_parameters", {}).get("image_shape")
        ours = tuple(int(s) for s in self.hparams["image_shape"])
        if saved is not None and tuple(int(s) for s in saved) != ours:
            raise ValueError(
                f"checkpoint {self._checkpoint_name()} was trained on images of shape {tuple(saved)} (C, H, W), but "
                f"the data given now has shape {ours}. Evaluate it on data of shape {tuple(saved)}: with mulan-cli, "
                "leave out --data so the data configuration saved in the checkpoint is used."
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            if "Error(s) in loading state_dict" not in str(error):
                raise
            detail = str(error).split(":", 1)[-1].strip()
            raise RuntimeError(
                f"checkpoint {self._checkpoint_name()} was trained with a different model configuration than the "
                f"one given now: {detail}\nWith mulan-cli, test it without --model so the configuration saved in "
                "the checkpoint is used."
            ) from error

    def _checkpoint_name(self) -> str:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return repr(str(path)) if path else "(the one being loaded)"

    # ----------------------------------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict]:
        """Denoiser and schedule+encoder parameters, each split into decayed (weights) and not decayed (biases,
        normalisation scales and other vectors or scalars)."""

        def split(parameters: Iterator[nn.Parameter], **options) -> list[dict]:
            params = [p for p in parameters if p.requires_grad]
            decay = [p for p in params if p.ndim >= 2]
            keep = [p for p in params if p.ndim < 2]
            return [{"params": decay, **options}, {"params": keep, **options, "weight_decay": 0.0}]

        aux_options = {}
        if self.schedule_lr is not None:
            aux_options["lr"] = self.schedule_lr
        if self.schedule_weight_decay is not None:
            aux_options["weight_decay"] = self.schedule_weight_decay
        aux = [*self.model.schedule.parameters(), *self.model.latent.parameters()]
        groups = split(self.model.denoiser.parameters()) + split(iter(aux), **aux_options)
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
