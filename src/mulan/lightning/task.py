"""The LightningModule: components in, the bound's named terms out. It wires training, logging and optimisation;
the model is :class:`mulan.model.DiffusionModel` (pure torch) and the data comes from :mod:`mulan.lightning.data`."""

from __future__ import annotations

from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from mulan.checkpoints import load_checkpoint
from mulan.latents import LatentFactory, NoLatent
from mulan.lightning.metrics import MeanStdErr, evaluation_seed
from mulan.lightning.optim import AdamW, LinearWarmup, parameter_groups
from mulan.model import Bound, build_model
from mulan.networks import DenoiserFactory, UNet
from mulan.parameterisation import Epsilon, ParameterisationFactory
from mulan.processes.base import ImageShape, ProcessFactory
from mulan.processes.schedules import FixedLinear
from mulan.sampling import SAMPLERS
from mulan.time_sampling import AntitheticUniform, TimeSamplerFactory

STAGES = ("train", "val", "test")


class SharedCallable:
    """A callable that deep copies share instead of copying (``copy.deepcopy`` returns it unchanged)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> SharedCallable:
        return self


def split_batch(batch: Tensor | tuple | list) -> tuple[Tensor, Tensor | None]:
    """A batch is uint8 images (B, C, H, W), or ``(images, y)`` for conditional data."""
    if isinstance(batch, tuple | list):
        images, y = batch
        return images, y
    return batch, None


def check_options(
    process_lr: float | None, process_weight_decay: float | None, process_width: int | None, sample_steps: int
) -> None:
    """Refuse values of :class:`DiffusionTask`'s numeric options that would train or sample wrongly, one clear line
    each."""
    if process_lr is not None and not process_lr > 0:
        raise ValueError(
            f"process_lr must be positive, got {process_lr}: a learning rate of 0 or below freezes the process or "
            "trains it by gradient ascent. Give a value > 0, or leave it out to use the optimiser's."
        )
    if process_weight_decay is not None and not process_weight_decay >= 0:
        raise ValueError(
            f"process_weight_decay must be 0 or more, got {process_weight_decay}: a negative decay pushes the "
            "process's weights away from zero. Give a value >= 0, or leave it out to use the optimiser's."
        )
    if process_width is not None and not process_width > 0:
        raise ValueError(
            f"process_width must be positive, got {process_width}: it is the fan-in above which the process's "
            "weights learn at lr * process_width / fan_in. Give a value > 0 (default 64), or null for one rate."
        )
    if not sample_steps >= 1:
        raise ValueError(
            f"sample_steps must be at least 1, got {sample_steps}: it is the number of network evaluations per "
            "sample of predict. Give a positive count (256 is usual for ancestral sampling)."
        )


class DiffusionTask(L.LightningModule):
    """Trains a diffusion model on uint8 images by minimising its bound in bits/dim.

    Components are factories (a class plus its options in the config), called with the data's shape.

    Args:
        image_shape: ``(C, H, W)``; the CLI links it from ``data.image_shape``.
        denoiser: called as ``denoiser(state_shape, latent_dim)``: the process's state shape, which is the image
            shape except for processes with auxiliary variables.
        process: the forward process (a noise schedule for VDM and MuLAN), called as
            ``process(image_shape, latent_dim)``.
        latent: called as ``latent(image_shape)``; ``NoLatent`` for VDM.
        parameterisation: what the denoiser predicts (``mulan.parameterisation.Epsilon``, ``Velocity``, ``Data``).
        time_sampler: training times and importance weights (default: antithetic uniform).
        timesteps: 0 for continuous time, ``T`` for the ``T``-step loss.
        optimizer: called with the parameter groups (default: AdamW, lr 2e-4, betas (0.9, 0.99), wd 0.01;
            biases and normalisation scales are never decayed).
        lr_scheduler: called with the optimiser, stepped every optimiser step (default: 100-step warm-up).
        process_lr: learning rate of the process and latent-encoder parameters (default: the optimiser's).
        process_weight_decay: their weight decay (default: the optimiser's; biases are never decayed).
        process_width: the process's weight matrices with a fan-in above this learn at ``lr * process_width /
            fan_in``. Adam moves a layer's outputs by up to ``lr * fan_in`` per step when its gradients agree across
            inputs, so MuLAN's schedule head (layers as wide as the data) would otherwise swing the log-SNR map far
            more per step than the denoiser can follow (docs: learning speed). ``None``: one learning rate for
            every weight, as the MuLAN reference code.
        seed_every_step: seed the random draws of micro-batch ``a`` of optimiser step ``n`` on rank ``r`` from
            ``(seed, n, a, r)``, where ``seed`` is the run's seed (saved in the checkpoint): every DDP rank and every
            accumulated micro-batch draws its own times, noise, latents and dropout, and a run resumed from any
            checkpoint draws exactly what the uninterrupted run would.
        sample_steps: sampling steps (network evaluations per sample) of ``predict``.
        sampler: the sampler of ``predict``: ``"ancestral"`` (256 steps is usual), ``"dpm_solver"`` or
            ``"dpm_solver_sde"`` (a few dozen steps; :mod:`mulan.sampling`).
        channels_last: convolution weights (hence activations) in channels-last memory format.
    """

    def __init__(
        self,
        image_shape: ImageShape = (3, 32, 32),
        denoiser: DenoiserFactory = UNet,
        process: ProcessFactory = FixedLinear,
        latent: LatentFactory = NoLatent,
        parameterisation: ParameterisationFactory = Epsilon,
        time_sampler: TimeSamplerFactory = AntitheticUniform,
        timesteps: int = 0,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable = LinearWarmup,
        process_lr: float | None = None,
        process_weight_decay: float | None = None,
        process_width: int | None = 64,
        seed_every_step: bool = True,
        sample_steps: int = 256,
        channels_last: bool = False,
        sampler: str = "ancestral",
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}.")
        check_options(process_lr, process_weight_decay, process_width, sample_steps)
        image_shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))  # saved as a tuple, like data's
        self.save_hyperparameters()
        self.model = build_model(
            image_shape, denoiser, process, latent, parameterisation, time_sampler, timesteps, channels_last
        )
        # EMAWeightAveraging deep-copies the module: the factories (which may reference the CLI) are shared, not copied
        self.optimizer_factory, self.lr_scheduler_factory = SharedCallable(optimizer), SharedCallable(lr_scheduler)
        self.process_lr, self.process_weight_decay, self.process_width = process_lr, process_weight_decay, process_width
        self.seed_every_step, self.sample_steps, self.sampler = seed_every_step, sample_steps, sampler
        self._base_seed = torch.initial_seed()
        # One meter per stage and quantity. Those the components declare are built here, identically on every rank;
        # a quantity a bound carries beyond them gets its meter when it first appears (:meth:`update_meters`). The
        # meters' states are not saved in checkpoints (torchmetrics' default): neither way changes a checkpoint.
        self.meters = nn.ModuleDict(
            {f"{stage}_{name}": MeanStdErr() for stage in STAGES for name in self.model.term_names}
        )
        self.test_results: dict[str, tuple[float, float]] = {}

    # ----------------------------------------------------------------------------------------- steps
    def forward(self, images: Tensor, y: Tensor | None = None) -> Bound:
        """The per-example bound (nats) of uint8 images (B, C, H, W)."""
        return self.model(images, y)

    def bound(self, batch: Tensor | tuple) -> Bound:
        """The one-sample bound of a batch (uint8 images, or ``(images, y)``): what every step evaluates."""
        images, y = split_batch(batch)
        return self.model(images, y)

    def update_meters(self, stage: str, bound: Bound) -> dict[str, Tensor]:
        """Bits/dim per example (B,) of every quantity the bound carries (``total``, the terms, extras such as
        ``latent_surrogate``, penalties), by name as :meth:`Bound.as_dict`, each added to its meter of ``stage``
        (``"train"``, ``"val"`` or ``"test"``); the epoch's means and standard errors are logged as
        ``{stage}/bpd`` and ``{stage}/{name}_bpd``. A name met for the first time gets a meter on the module's
        device, so the logged names are those the bound actually returns. Override to log more per step (call
        this first)."""
        bpd = {name: self.model.bpd(value) for name, value in bound.as_dict().items()}
        for name, value in bpd.items():
            key = f"{stage}_{name}"
            if key not in self.meters:  # a quantity the components did not declare (e.g. an undeclared surrogate)
                self.meters[key] = MeanStdErr().to(value.device)
            cast(MeanStdErr, self.meters[key]).update(value.detach())
        return bpd

    def training_loss(self, bound: Bound) -> Tensor:
        """The scalar training loss, in bits/dim: the batch mean of the bound plus the batch mean of each of its
        penalties (training-only regularisers such as CVDM's). Override to change the objective (e.g. re-weight a
        term; keep ``super().training_loss(bound)`` so the penalties stay in); :meth:`training_step` checks that
        the result is finite, logs it as ``train/bpd_step`` and returns it. Validation and test do not use it."""
        penalties = (self.model.bpd(value).mean() for value in bound.penalties.values())
        return self.model.bpd(bound.total).mean() + sum(penalties, torch.zeros(()))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed this micro-batch's draws from (run seed, optimiser step, micro-batch within the step, rank)."""
        if self.seed_every_step:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            accumulate = self.trainer.accumulate_grad_batches
            draw = (self.global_step * accumulate + batch_idx % accumulate) * world + rank
            torch.manual_seed((self._base_seed + 1 + draw) % 2**63)

    def on_validation_start(self) -> None:
        self._hold_random_state()

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._seed_evaluation("val", batch_idx, dataloader_idx)

    def on_validation_end(self) -> None:
        self._release_random_state()

    def on_test_start(self) -> None:
        self._hold_random_state()

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._seed_evaluation("test", batch_idx, dataloader_idx)

    def on_test_end(self) -> None:
        self._release_random_state()

    def on_predict_start(self) -> None:
        self._hold_random_state()

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._seed_evaluation("predict", batch_idx, dataloader_idx)

    def on_predict_end(self) -> None:
        self._release_random_state()

    def _seed_evaluation(self, stage: str, batch_idx: int, dataloader_idx: int) -> None:
        """Seed an evaluation batch's draws (times, noise, latents) from (run seed, stage, loader, global batch
        position ``batch_idx * world_size + rank``): a test after fit, ``mulan-cli test`` and a repeated test of the
        same weights draw the same, whatever training left in the random state, and DDP ranks draw apart (docs:
        evaluation, "Reproducible evaluation")."""
        position = batch_idx * self.trainer.world_size + self.trainer.global_rank
        torch.manual_seed(evaluation_seed(self._base_seed, stage, dataloader_idx, position))

    def _hold_random_state(self) -> None:
        """Keep the global random state (CPU, and this CUDA device's) to put back after the stage: training after a
        validation then draws what it would have drawn without it."""
        cuda = self.device.type == "cuda"
        held = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)
        self._held_random_state: tuple[Tensor, Tensor | None] | None = held

    def _release_random_state(self) -> None:
        held = getattr(self, "_held_random_state", None)
        if held is None:
            return
        torch.set_rng_state(held[0])
        if held[1] is not None:
            torch.cuda.set_rng_state(held[1], self.device)
        self._held_random_state = None

    def training_step(self, batch: Tensor | tuple, batch_idx: int) -> Tensor:
        bound = self.bound(batch)
        bpd = self.update_meters("train", bound)
        loss = self.training_loss(bound)
        if not torch.isfinite(loss):
            bad = {name: float(value.detach().mean()) for name, value in bpd.items()}
            raise FloatingPointError(
                f"non-finite loss at global step {self.global_step} (bits/dim per term: {bad}); training "
                "stopped. The last good checkpoint is kept; lower the learning rate or check the data."
            )
        self.log("train/bpd_step", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor | tuple, batch_idx: int) -> None:
        self.update_meters("val", self.bound(batch))

    def test_step(self, batch: Tensor | tuple, batch_idx: int) -> None:
        self.update_meters("test", self.bound(batch))

    def predict_step(self, batch: Tensor | tuple, batch_idx: int) -> Tensor:
        """As many samples of ``sampler`` at ``sample_steps`` (uint8 (B, C, H, W), ``z`` from the prior; given the
        batch's ``y`` for conditional data) as the batch has images. Each batch's draws are seeded from (run seed,
        ``"predict"``, loader, global batch position), so the same checkpoint, seed and batches give the same
        samples, and DDP ranks draw apart."""
        images, y = split_batch(batch)
        return SAMPLERS[self.sampler](self.model, images.shape[0], steps=self.sample_steps, y=y).samples

    def _log_epoch(self, stage: str) -> dict[str, tuple[float, float]]:
        results = {}
        prefix = f"{stage}_"
        for name in [key.removeprefix(prefix) for key in self.meters if key.startswith(prefix)]:
            meter = cast(MeanStdErr, self.meters[prefix + name])
            mean, stderr = meter.compute()
            meter.reset()
            results[name] = (float(mean), float(stderr))
        # The meters are already synced over ranks (torchmetrics), so every rank holds the global values; sync_dist
        # averages equal numbers (a no-op) and tells Lightning they are global, which silences its DDP warning.
        logged = {f"{stage}/bpd" if n == "total" else f"{stage}/{n}_bpd": m for n, (m, _) in results.items()}
        self.log_dict({**logged, f"{stage}/bpd_stderr": results["total"][1]}, sync_dist=True)
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
            "Test bound (one-sample ELBO per image; 'total' uses the honest latent cost):\n" + "\n".join(lines)
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

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ) -> DiffusionTask:
        """Lightning's ``load_from_checkpoint``, after :func:`~mulan.lightning.checkpoint_io.load_checkpoint` has
        read the file with ``weights_only=True``: a checkpoint holding pickled code is refused as unsafe (its code
        never runs), a truncated or foreign file with a clear message. Always loads with ``weights_only=True``
        (the argument is accepted for compatibility with Lightning's signature)."""
        load_checkpoint(str(checkpoint_path))
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs
        )

    def _checkpoint_name(self) -> str:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return repr(str(path)) if path else "(the one being loaded)"

    # ----------------------------------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict]:
        """The denoiser's parameters; the process's, and the latent encoder's (options ``process_lr``,
        ``process_weight_decay``); each split into decayed weights and not-decayed biases and scales. Process
        weights wider than ``process_width`` get their own groups with an ``lr_scale`` of ``process_width / fan_in``
        (applied by :meth:`configure_optimizers`)."""
        options: dict[str, float] = {}
        if self.process_lr is not None:
            options["lr"] = self.process_lr
        if self.process_weight_decay is not None:
            options["weight_decay"] = self.process_weight_decay
        by_scale: dict[float, list[nn.Parameter]] = {}
        for p in self.model.process.parameters():
            fan_in = p[0].numel() if p.ndim >= 2 else 0
            scale = self.process_width / fan_in if self.process_width and fan_in > self.process_width else 1.0
            by_scale.setdefault(scale, []).append(p)
        groups = parameter_groups(self.model.denoiser.parameters())
        groups += parameter_groups([*by_scale.pop(1.0, []), *self.model.latent.parameters()], **options)
        for scale, params in sorted(by_scale.items()):
            groups += parameter_groups(params, **options, lr_scale=scale)
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)  # before the scheduler records each group's initial lr
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
