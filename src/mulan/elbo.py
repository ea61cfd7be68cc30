"""The terms of the variational bound, per example, in nats (MATH.md section 4).

``L = L_recon + L_prior + L_diff + L_latent``; ``BPD = L / (D ln 2)``. Every function takes float32 tensors
broadcastable to the data ``(B, C, H, W)`` and returns one value per example, shape ``(B,)``, in nats.
Callers run them inside :func:`mulan.utils.float32_region` (the loss never runs in bf16/fp16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_BINS = 256


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """``alpha = sqrt(sigmoid(-gamma))``, ``sigma = sqrt(sigmoid(gamma))``, through ``logsigmoid`` (stable)."""
    return torch.exp(0.5 * F.logsigmoid(-gamma)), torch.exp(0.5 * F.logsigmoid(gamma))


def to_unit_interval(images: Tensor) -> Tensor:
    """uint8 values ``k`` to bin centres ``x = 2 (k + 0.5) / 256 - 1`` in (-1, 1), float32."""
    return (images.float() + 0.5) * (2.0 / NUM_BINS) - 1.0


def bin_centres(device: torch.device | None = None) -> Tensor:
    """The 256 bin centres ``e(v)``, shape (256,)."""
    return to_unit_interval(torch.arange(NUM_BINS, device=device))


def sum_per_example(values: Tensor) -> Tensor:
    """Sum over all but the first dimension: (B, ...) -> (B,)."""
    return values.flatten(1).sum(1)


def decoder_logits(z_tilde: Tensor, gamma_0: Tensor) -> Tensor:
    """Logits of the 256-way decoder ``p(x | z_0)``: ``-(z~ - e(v))^2 / (2 exp(gamma_0))``, shape (..., 256).

    ``z_tilde = z_0 / alpha_0`` (B, C, H, W); ``gamma_0`` broadcastable to it.
    """
    diff = z_tilde.unsqueeze(-1) - bin_centres(z_tilde.device)
    return -0.5 * diff.square() * torch.exp(-gamma_0).unsqueeze(-1)


def reconstruction_loss(images: Tensor, gamma_0: Tensor, noise: Tensor | None = None) -> Tensor:
    """``-log p(x | z_0)`` with ``z~ = x + exp(gamma_0 / 2) eps_0``; ``images`` uint8 (B, C, H, W). (B,) nats."""
    x = to_unit_interval(images)
    noise = torch.randn_like(x) if noise is None else noise
    z_tilde = x + torch.exp(0.5 * gamma_0) * noise
    log_probs = torch.log_softmax(decoder_logits(z_tilde, gamma_0), dim=-1)
    return -sum_per_example(log_probs.gather(-1, images.long().unsqueeze(-1)).squeeze(-1))


def gaussian_reconstruction_loss(x: Tensor, gamma_0: Tensor, noise: Tensor | None = None) -> Tensor:
    """``-log N(x; z_0/alpha_0, exp(gamma_0))`` for continuous data ``x`` (used by the analytic checks). (B,)."""
    noise = torch.randn_like(x) if noise is None else noise
    gamma_0 = gamma_0.expand_as(x)
    return sum_per_example(0.5 * (math.log(2 * math.pi) + gamma_0 + noise.square()))


def prior_loss(x: Tensor, gamma_1: Tensor) -> Tensor:
    """``KL(q(z_1 | x) || N(0, I)) = 1/2 sum [alpha_1^2 x^2 + sigma_1^2 - log sigma_1^2 - 1]``. (B,) nats."""
    gamma_1 = gamma_1.expand_as(x)
    sigma2, log_sigma2 = torch.sigmoid(gamma_1), F.logsigmoid(gamma_1)
    alpha2 = torch.sigmoid(-gamma_1)
    return sum_per_example(0.5 * (alpha2 * x.square() + sigma2 - log_sigma2 - 1.0))


def diffusion_loss(eps: Tensor, eps_hat: Tensor, dgamma_dt: Tensor) -> Tensor:
    """Continuous time: ``1/2 sum_i dgamma_i/dt (eps_i - eps_hat_i)^2``, per-dimension weights. (B,) nats."""
    return sum_per_example(0.5 * dgamma_dt * (eps - eps_hat.float()).square())


def discrete_diffusion_loss(eps: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor, steps: int) -> Tensor:
    """``T`` steps, ``s = t - 1/T``: ``1/2 T sum_i expm1(gamma_t,i - gamma_s,i) (eps_i - eps_hat_i)^2``. (B,)."""
    return sum_per_example(0.5 * steps * torch.expm1(gamma_t - gamma_s) * (eps - eps_hat.float()).square())


def antithetic_times(batch_size: int, device: torch.device | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Low-discrepancy times ``t_j = (u + j / n) mod 1`` with one ``u ~ U[0, 1)`` per call. Shape (B,)."""
    u = torch.rand((), device=device, generator=generator)
    return torch.remainder(u + torch.arange(batch_size, device=device) / batch_size, 1.0)


def discretise_times(t: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Map ``t`` in [0, 1) to the grid ``t = (floor(t T) + 1) / T`` and ``s = t - 1/T``."""
    t_grid = (torch.floor(t * steps) + 1) / steps
    return t_grid, t_grid - 1.0 / steps


def nats_to_bpd(nats: Tensor, num_dims: int) -> Tensor:
    """Nats per example to bits per dimension."""
    return nats / (num_dims * math.log(2.0))
