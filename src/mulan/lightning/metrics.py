"""A torchmetrics metric for the mean and standard error of per-example values (bits/dim per term), and the seeds of
evaluation draws."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor
from torchmetrics import Metric


class MeanStdErr(Metric):
    """Mean and standard error of the mean of per-example values, synchronised across processes.

    ``update(values)`` takes (B,) or (B, K) (K quantities at once); ``compute()`` returns ``(mean, stderr)``,
    each of shape () or (K,). The standard error is ``sqrt(var / n)`` with the unbiased sample variance.
    """

    full_state_update = False
    total: Tensor
    total_sq: Tensor
    count: Tensor

    def __init__(self, num_values: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(num_values, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(num_values, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.num_values = num_values

    def update(self, values: Tensor) -> None:
        values = values.detach().double().reshape(values.shape[0], -1)
        self.total += values.sum(0)
        self.total_sq += values.square().sum(0)
        self.count += values.shape[0]

    def compute(self) -> tuple[Tensor, Tensor]:
        n = self.count.clamp_min(1)
        mean = self.total / n
        var = (self.total_sq - n * mean.square()).clamp_min(0) / (n - 1).clamp_min(1)
        stderr = (var / n).sqrt()
        if self.num_values == 1:
            return mean[0], stderr[0]
        return mean, stderr


def evaluation_seed(base_seed: int, *parts: object) -> int:
    """A seed in ``[0, 2^63)`` for evaluation draws: a hash of the run's seed and ``parts`` (stage, loader, batch
    position, what is drawn, ...). The same arguments give the same seed in every process and session (no
    dependence on Python's hash randomisation), and the streams never coincide with training's ``base_seed + 1 +
    draw`` seeds except by a 2^-63 chance."""
    material = "/".join(str(p) for p in (int(base_seed), *parts))
    return int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "little") % 2**63
