"""Subclassing the LightningModule: extra logging and a (documented) loss weighting.

``TermLoggingModule`` keeps everything :class:`mulan.lightning.DiffusionTask` does and adds

* per-term training curves (``train/recon_bpd_step``, ``train/diffusion_bpd_step``, ...) every step, and
* an optional weight on the diffusion term of the *training* loss. With ``diffusion_weight=1`` (default) the
  loss is the bound itself (plus the process's training-only penalties, if it has any); any other value
  optimises a re-weighted objective. Validation and test are not touched, so ``val/bpd`` and ``test/bpd`` stay
  the honest bound.

It overrides only the task's public hooks: :meth:`~mulan.lightning.DiffusionTask.update_meters` (what each step adds to
the epoch meters, returned in bits/dim by name) and :meth:`~mulan.lightning.DiffusionTask.training_loss` (the
objective). Run it from Python (``python -m examples.custom_module``) or from YAML
(``examples/custom_module.yaml``)::

    python -m mulan fit --config examples/custom_module.yaml

(``python -m`` puts the current directory on ``sys.path``, so ``examples.custom_module`` is importable from
the repository root; with the ``mulan-cli`` script set ``PYTHONPATH=.``.)
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor

from mulan.latents import KHotLatent
from mulan.lightning import DiffusionTask
from mulan.lightning.data import EmbeddedDataModule
from mulan.model import Bound
from mulan.networks import UNet
from mulan.processes.schedules import Polynomial


# --8<-- [start:TermLoggingModule]
class TermLoggingModule(DiffusionTask):
    """A :class:`DiffusionTask` that logs each term of the bound per step; can re-weight the diffusion term.

    Args:
        diffusion_weight: multiplies the diffusion term in the training loss only (1.0: the bound).
        log_terms: log ``train/{term}_bpd_step`` for every term each step.
        **kwargs: everything :class:`DiffusionTask` takes (denoiser, process, latent, optimiser, ...).
    """

    def __init__(self, *args: Any, diffusion_weight: float = 1.0, log_terms: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.diffusion_weight, self.log_terms = diffusion_weight, log_terms

    def update_meters(self, stage: str, bound: Bound) -> dict[str, Tensor]:
        bpd = super().update_meters(stage, bound)  # bits/dim per example, by name; the epoch meters have seen them
        if stage == "train" and self.log_terms:
            for name, values in bpd.items():
                self.log(f"train/{name}_bpd_step", values.mean())
        return bpd

    def training_loss(self, bound: Bound) -> Tensor:
        loss = super().training_loss(bound)  # the bound in bits/dim, plus the process's penalties
        if self.diffusion_weight != 1.0:
            loss = loss + (self.diffusion_weight - 1.0) * self.model.bpd(bound.diffusion).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss


# --8<-- [end:TermLoggingModule]


# --8<-- [start:build_module]
def build_module(latent_dim: int = 10) -> TermLoggingModule:
    """A tiny MuLAN for 8x8 digits, built from Python: components are classes (or partials) + options."""
    from functools import partial

    return TermLoggingModule(
        image_shape=(1, 8, 8),
        denoiser=partial(UNet, channels=16, num_blocks=1, dropout=0.0),
        process=partial(Polynomial, hidden=32),
        latent=partial(KHotLatent, m=latent_dim, k=3, channels=8, num_blocks=1),
        diffusion_weight=1.0,
    )


# --8<-- [end:build_module]


def main(max_steps: int = 3) -> dict[str, float]:
    """Train for ``max_steps`` on the embedded digits; return the logged metrics."""
    L.seed_everything(0, verbose=False)
    module = build_module()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=EmbeddedDataModule(source="digits", batch_size=16))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for name in sorted(metrics):
        print(f"{name:<32}{metrics[name]:.4f}")
    return metrics


if __name__ == "__main__":
    main()
