"""What a run shows as it trains: its progress bar and its learning rate.

:class:`StepProgressBar` is Lightning's rich bar with the training bar's description counting optimiser steps out of
``max_steps`` (``step 120/500``) when the run is budgeted in steps. Lightning's own description is
``Epoch e/max_epochs - 1``, which for a step-budgeted run (``max_epochs: -1``, the shipped configs) reads
``Epoch 19/-2``. ``mulan-cli`` adds it unless the configuration names a progress bar or sets
``trainer.enable_progress_bar: false``.

:class:`OptionalLearningRateMonitor` is Lightning's ``LearningRateMonitor`` (every shipped config logs the learning
rate with it) that stays silent instead of stopping the run when there is no logger
(``--trainer.logger false``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar


def train_description(trainer: L.Trainer) -> str:
    """``step N/max_steps`` (optimiser steps done, of the budget) when ``trainer.max_steps`` is set (> 0); otherwise
    ``epoch E/last epoch`` (counted from 0), or ``epoch E`` when the number of epochs is unbounded."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return f"step {trainer.global_step}/{trainer.max_steps}"
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0:
        return f"epoch {trainer.current_epoch}/{max_epochs - 1}"
    return f"epoch {trainer.current_epoch}"


class StepProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` whose training bar is described by
    :func:`train_description` (``step 120/500``), updated after every training batch. Options as Lightning's."""

    def _describe_training(self, trainer: L.Trainer) -> None:
        if not self.is_enabled or self.progress is None or self.train_progress_bar_id is None:
            return
        text = train_description(trainer)
        style = self.theme.description
        self.progress.update(self.train_progress_bar_id, description=f"[{style}]{text}" if style else text)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._describe_training(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._describe_training(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._describe_training(trainer)


class OptionalLearningRateMonitor(LearningRateMonitor):
    """:class:`~lightning.pytorch.callbacks.LearningRateMonitor` (same options: the learning rate of every
    parameter group, ``lr-AdamW/pg1`` ..., logged every step or epoch) that does nothing when the trainer has no
    logger, where Lightning's refuses to train."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
