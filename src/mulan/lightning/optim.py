"""The reference optimiser and learning-rate schedule, as classes a config can name and override."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LinearLR


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with the VDM/MuLAN defaults: lr 2e-4, betas (0.9, 0.99), eps 1e-8, weight decay 0.01.

    Weight decay applies only to the parameter groups that keep it: the LightningModule puts biases and
    normalisation scales in groups with ``weight_decay = 0``.

    ``fused=None`` (default) picks torch's fused single-kernel implementation whenever every parameter is a
    floating-point tensor on the CPU or a CUDA device (the same update as the for-each one up to float rounding;
    measured faster on both, docs/benchmarks.md); pass ``fused=False`` (or ``foreach=True``) to opt out.
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
        params = [_materialised(g) for g in params]
        if fused is None and not foreach:
            fused = _fused_supported(params)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)


def _materialised(group: Any) -> Any:
    """A parameter group whose ``params`` is a list (a generator could be read only once)."""
    if isinstance(group, dict):
        ps = group["params"]
        return {**group, "params": [ps] if isinstance(ps, torch.Tensor) else list(ps)}
    return group


def _fused_supported(params: list[Any]) -> bool:
    """Whether torch's fused AdamW accepts these parameters (or parameter groups)."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(tensors) and all(
        isinstance(p, torch.Tensor) and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors
    )


def parameter_groups(parameters: Iterable[torch.nn.Parameter], **options: Any) -> list[dict[str, Any]]:
    """Trainable ``parameters`` as up to two AdamW groups with ``options``: weights (2-D and up; decayed) and
    biases, normalisation scales and other vectors or scalars (``weight_decay = 0``). Empty groups are dropped."""
    params = [p for p in parameters if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], **options},
        {"params": [p for p in params if p.ndim < 2], **options, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class LinearWarmup(LinearLR):
    """Linear warm-up from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` optimiser steps, then constant:
    the factor at step ``k`` is ``min(1, (k + 1) / warmup_steps)``.

    This is ``torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / w, end_factor=1, total_iters=w - 1)``
    (``w = max(warmup_steps, 1)``), whose factor ``1/w + (1 - 1/w) k / (w - 1) = (k + 1) / w`` up to ``k = w - 1``;
    the subclass stays only so that configurations (and checkpoints) can name it with its one option
    ``warmup_steps``. Checkpoints of the earlier ``LambdaLR`` form load into it: both keep ``last_epoch`` and
    ``base_lrs``, and the optimiser's state holds the current learning rate, from which ``LinearLR`` steps on.
    (``LinearLR`` multiplies the rate step by step, so it equals ``lr * min(1, (k + 1) / w)`` to a few units in the
    last place of a double, about 1e-15 relative after 100 steps, where the former closed form was exact.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 100) -> None:
        self.warmup_steps = warmup_steps
        steps = max(warmup_steps, 1)
        super().__init__(optimizer, start_factor=1.0 / steps, end_factor=1.0, total_iters=steps - 1)
