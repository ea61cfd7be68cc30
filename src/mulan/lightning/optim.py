"""The reference optimiser and learning-rate schedule, as classes a config can name and override."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with the VDM/MuLAN defaults: lr 2e-4, betas (0.9, 0.99), eps 1e-8, weight decay 0.01.

    Weight decay applies only to the parameter groups that keep it: the LightningModule puts biases and
    normalisation scales in groups with ``weight_decay = 0``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)


class LinearWarmup(LambdaLR):
    """Linear warm-up from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` optimiser steps, then constant."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 100) -> None:
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        return min(1.0, (step + 1) / max(self.warmup_steps, 1))
