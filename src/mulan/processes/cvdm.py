"""CVDM (della Maggiora et al., ICLR 2024): a per-pixel schedule conditioned on the observed input ``y``
(docs: math, section 10d).

For an inverse problem (``x`` given ``y``, e.g. super-resolution) the schedule may read ``y``, which the sampler has,
so adapting the noise to each image costs nothing in the bound (unlike MuLAN's latent). CVDM writes the signal
fraction as ``alpha^2(t, y) = exp(-phi(y) tau(t))``: a per-pixel rate ``phi(y)`` from a network of ``y`` times one
monotone function of time. The library keeps that separable form between fixed endpoints:

    gamma(t, y) = gamma_min + (gamma_max - gamma_min) u,   u = (1 - e^(-rho(y) tau(t))) / (1 - e^(-rho(y))),

``tau`` VDM's monotone network normalised to ``tau(0) = 0``, ``tau(1) = 1``, and ``rho(y)`` (B, C, H, W) a rate per
pixel (``rho > 0``: noise arrives early; ``rho < 0``: late; ``rho = 0``: ``u = tau``). ``gamma`` is monotone in ``t``
and equals ``gamma_min``, ``gamma_max`` at the ends for every ``y`` and pixel, so CVDM's boundary and consistency
penalties hold exactly; what remains of its regulariser is the smoothness term on the signal fraction
``alpha^2 = sigmoid(-gamma)`` (the paper's ``L_gamma`` with one term of its expansion):

    penalty = weight * sum_i (d^2 alpha_i^2 / dt^2)^2,
    d^2 alpha^2 / dt^2 = -alpha^2 sigma^2 [(alpha^2 - sigma^2) gamma'^2 + gamma''],

at one uniform time per example. It is training-only (:meth:`CVDM.penalties`), never part of the bound. With
``rho = 0`` (a rate network that outputs zero, as at initialisation) the schedule is VDM's monotone network with
fixed endpoints, whatever ``y``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.processes.base import Context, ImageShape
from mulan.processes.diagonal import DiagonalProcess

SMALL_RATE = 1e-3
"""Below this ``|rho|`` the warp ``u(tau)`` uses its first-order series (exact at 0; error ``O(rho^2)``)."""


class MonotoneTime(nn.Module):
    """VDM appendix H's ``g(t) = l1(t) + l3(phi(l2(t)))`` (non-negative weights, ``phi(h) = 2 sigmoid(h) - 1``),
    normalised: ``tau = (g(t) - g(0)) / (g(1) - g(0))`` with its first two derivatives. Parameter names are
    :class:`~mulan.processes.schedules.MonotoneNN`'s."""

    def __init__(self, features: int = 1024) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(1.0))
        self.b1 = nn.Parameter(torch.tensor(0.0))
        self.w2 = nn.Parameter(torch.randn(features))
        self.b2 = nn.Parameter(torch.randn(features))
        self.w3 = nn.Parameter(torch.randn(features) / features)

    def unnormalised(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``g``, ``g'``, ``g''`` for times (N, 1)."""
        w2, w3 = self.w2.abs(), self.w3.abs()
        s = torch.sigmoid((2 * t - 1) * w2 + self.b2)  # (N, F); the input mapped to [-1, 1] as in VDM
        slope = s * (1 - s)
        g = self.w1.abs() * t + self.b1 + (2 * s - 1) @ w3[:, None]
        dg = self.w1.abs() + (slope * 4 * w2) @ w3[:, None]
        d2g = (slope * (1 - 2 * s) * 8 * w2.square()) @ w3[:, None]
        return g, dg, d2g

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``tau``, ``tau'``, ``tau''`` for times ``t`` of any shape (B, ...), each shaped like ``t``, in the
        parameters' precision (float32)."""
        ends = torch.tensor([[0.0], [1.0]], device=t.device, dtype=self.w1.dtype)
        g, dg, d2g = self.unnormalised(torch.cat([t.reshape(-1, 1).to(self.w1.dtype), ends]))
        span = g[-1] - g[-2]
        return (
            ((g[:-2] - g[-2]) / span).reshape(t.shape),
            (dg[:-2] / span).reshape(t.shape),
            (d2g[:-2] / span).reshape(t.shape),
        )


class RateNetwork(nn.Module):
    """``rho(y)``: the observed image ``y`` (B, C', h, w) (uint8, or floats in [-1, 1]), resized to the data's
    ``H x W``, to one bounded rate per data dimension (B, C, H, W); zero at initialisation."""

    def __init__(self, image_shape: ImageShape, condition_channels: int, channels: int, max_rate: float) -> None:
        super().__init__()
        self.image_shape, self.condition_channels, self.max_rate = image_shape, condition_channels, max_rate
        first = nn.Conv2d(condition_channels, channels, 3, padding=1)
        last = nn.Conv2d(channels, image_shape[0], 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(cast(Tensor, last.bias))
        self.net = nn.Sequential(first, nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), last)

    def forward(self, y: Tensor | None) -> Tensor:
        if y is None or y.dim() != 4 or y.shape[1] != self.condition_channels:
            shape = None if y is None else tuple(y.shape)
            raise ValueError(
                f"CVDM conditions its schedule on an observed image y of shape (B, {self.condition_channels}, h, w); "
                f"got {shape}. Train it on conditional data (a data module yielding (x, y) pairs, e.g. "
                "mulan.lightning.data.SuperResolutionDataModule) and pass y when sampling."
            )
        dtype = next(self.parameters()).dtype
        y = (y.to(dtype) + 0.5) * (2.0 / 256) - 1.0 if y.dtype == torch.uint8 else y.to(dtype)
        if tuple(y.shape[-2:]) != tuple(self.image_shape[1:]):
            y = F.interpolate(y, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return self.max_rate * torch.tanh(self.net(y) / self.max_rate)


def warp(tau: Tensor, rho: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``u = (1 - e^(-rho tau)) / (1 - e^(-rho))`` and its first two derivatives in ``tau`` (broadcast)."""
    small = rho.abs() < SMALL_RATE
    safe = torch.where(small, torch.ones_like(rho), rho)  # keeps the unused branch (and its gradient) finite
    denominator = torch.expm1(-safe)
    decay = torch.exp(-safe * tau)
    u = torch.where(small, tau * (1 + 0.5 * rho * (1 - tau)), torch.expm1(-safe * tau) / denominator)
    du = torch.where(small, 1 + 0.5 * rho * (1 - 2 * tau), -safe * decay / denominator)
    d2u = torch.where(small, -rho.expand_as(u), safe.square() * decay / denominator)
    return u, du, d2u


class CVDM(DiagonalProcess):
    """CVDM's conditional schedule ``gamma(t, y)`` (module docstring), a per-dimension diagonal process.

    Built as ``CVDM(image_shape, latent_dim, **options)``; ``ctx.y`` must hold the observed image. The latent is
    not used (``latent_dim`` is accepted for the common signature).

    Args:
        condition_channels: channels of ``y``.
        features: width of the monotone time network (VDM: 1024).
        channels: width of the rate network.
        max_rate: bound on ``|rho|`` (``rho = max_rate tanh(net(y) / max_rate)``).
        regulariser_weight: weight of the smoothness penalty (the reference code's ``alpha`` of ``1e-3`` times its
            loss weight 2, rescaled to a sum over dimensions in nats: ``2e-3 ln 2``).
    """

    multivariate = True
    fixed_endpoints = True  # u(0) = 0, u(1) = 1 for every y and parameter value; checked on a probe y at construction
    penalty_names = ("schedule_regulariser",)

    def __init__(
        self,
        image_shape: ImageShape,
        latent_dim: int = 0,
        condition_channels: int = 3,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        features: int = 1024,
        channels: int = 32,
        max_rate: float = 8.0,
        regulariser_weight: float = 2e-3 * 0.6931471805599453,
    ) -> None:
        super().__init__(image_shape, gamma_min, gamma_max)
        if not max_rate > 0 or regulariser_weight < 0:
            raise ValueError(
                f"CVDM: max_rate must be positive and regulariser_weight non-negative, got {max_rate}, "
                f"{regulariser_weight}."
            )
        self.latent_dim, self.regulariser_weight = latent_dim, float(regulariser_weight)
        self.time = MonotoneTime(features)
        self.rate = RateNetwork(self.image_shape, condition_channels, channels, max_rate)

    def endpoint_probe(self, batch_size: int, generator: torch.Generator) -> Context:
        """Random uint8 observed images ``y`` (batch_size, condition_channels, H, W) for the endpoint check."""
        shape = (batch_size, self.rate.condition_channels, *self.image_shape[1:])
        y = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(self.device())
        return Context(y=y)

    def schedule(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        """``gamma``, ``gamma'``, ``gamma''`` (B, C, H, W) at float32 times ``t`` (B, 1, 1, 1)."""
        tau, dtau, d2tau = self.time(t)
        u, du, d2u = warp(tau, self.rate(ctx.y))
        span = self.gamma_max - self.gamma_min
        return self.gamma_min + span * u, span * du * dtau, span * (d2u * dtau.square() + du * d2tau)

    def gamma_and_derivative(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        gamma, dgamma, _ = self.schedule(t, ctx)
        return gamma, dgamma

    def signal_curvature(self, t: Tensor, ctx: Context) -> Tensor:
        """``d^2 alpha^2 / dt^2`` (B, C, H, W) at times ``t`` (B,): CVDM's smoothness target."""
        gamma, dgamma, d2gamma = self.schedule(t.float().reshape(-1, 1, 1, 1), ctx)
        alpha2, sigma2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
        return -alpha2 * sigma2 * ((alpha2 - sigma2) * dgamma.square() + d2gamma)

    def penalties(self, x: Tensor, ctx: Context) -> dict[str, Tensor]:
        """``schedule_regulariser``: ``weight * sum_i (d^2 alpha_i^2 / dt^2)^2`` at stratified uniform times, (B,)."""
        n = x.shape[0]
        t = torch.remainder(torch.rand((), device=x.device) + torch.arange(n, device=x.device) / n, 1.0)
        curvature = self.signal_curvature(t, ctx)
        return {"schedule_regulariser": self.regulariser_weight * curvature.square().flatten(1).sum(1)}
