"""Time samplers: the times ``t`` of a training step and their importance weights (docs: math, sections 4, 6c).

The diffusion term is ``L_diff = E_{t ~ U[0, 1]}[l(t)] = E_{t ~ pi}[l(t) / pi(t)]`` for any density ``pi > 0`` on
``[0, 1]``. A sampler returns ``(t, weight)`` with ``weight = 1 / pi(t)`` (``None`` for uniform times), and the model
multiplies the per-example diffusion term by it, so the estimate stays an unbiased estimate of the bound whatever
the sampler; only its variance changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mulan.processes.base import Context, ForwardProcess


class TimeSampler:
    """Base class: ``sampler(batch_size, process, ctx, generator) -> (t (B,), weight (B,) or None)``."""

    def __call__(
        self,
        batch_size: int,
        process: ForwardProcess,
        ctx: Context,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def antithetic_uniform(
    batch_size: int, device: torch.device | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Low-discrepancy times ``t_j = (u + j / n) mod 1`` with one ``u ~ U[0, 1)`` per call: (B,) in [0, 1)."""
    u = torch.rand((), device=device, generator=generator)
    return torch.remainder(u + torch.arange(batch_size, device=device) / batch_size, 1.0)


class AntitheticUniform(TimeSampler):
    """Uniform times, stratified over the batch (VDM, MuLAN): one ``u`` per step and rank; weight 1."""

    def __call__(self, batch_size, process, ctx, generator=None):
        return antithetic_uniform(batch_size, process.device(), generator), None


TimeSamplerFactory = Callable[[], TimeSampler]
"""What a config gives: a time-sampler class (plus options)."""
