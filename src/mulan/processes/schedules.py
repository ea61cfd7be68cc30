"""Noise schedules: ``gamma(t, z)``, the negative log-SNR, and its time derivative (docs: math, section 2).

A schedule is a diagonal forward process (:class:`~mulan.processes.DiagonalProcess`, ``x_t = alpha x + sigma eps``)
built as ``Schedule(image_shape, latent_dim, **options)`` and called as ``schedule(t, ctx) -> (gamma, dgamma_dt)``
with ``t`` of shape ``(B,)`` in ``[0, 1]`` and a :class:`~mulan.processes.Context` whose ``z`` is ``(B, latent_dim)``
(or ``None``). Both outputs are float32 and broadcastable to the data ``(B, C, H, W)``:
``(B, 1, 1, 1)`` for a scalar schedule, ``(B, C, H, W)`` for a multivariate one. ``gamma`` increases in ``t``;
``sigma^2 = sigmoid(gamma)``, ``alpha^2 = sigmoid(-gamma)``, ``SNR = exp(-gamma)``.

All schedules compute in float32 with autocast disabled (docs: math, section 8), and ``dgamma_dt`` is analytic:
no autograd is needed for it in the training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.processes.base import GAMMA_MAX, GAMMA_MIN, Context, ImageShape
from mulan.processes.diagonal import DiagonalProcess

__all__ = [
    "GAMMA_MAX",
    "GAMMA_MIN",
    "FixedLinear",
    "LearnedScalar",
    "MonotoneNN",
    "NoiseSchedule",
    "Polynomial",
    "ScheduleFactory",
]


class NoiseSchedule(DiagonalProcess):
    """Base class of the schedules, built as ``Schedule(image_shape, latent_dim, **options)``.

    ``latent_dim`` is the size of the latent ``z`` the schedule may condition on (0: none). Subclasses implement
    :meth:`gamma_and_derivative` on float32 times (B, 1, 1, 1) and the context ``ctx`` (``ctx.z``: (B, m) or None).
    The endpoints ``gamma(0)``, ``gamma(1)`` are evaluated from the schedule unless the subclass declares
    ``fixed_endpoints = True``, which construction checks
    (:meth:`~mulan.processes.DiagonalProcess.check_fixed_endpoints`).
    """

    def __init__(self, image_shape: ImageShape, latent_dim: int, gamma_min: float, gamma_max: float) -> None:
        super().__init__(image_shape, gamma_min, gamma_max)
        self.latent_dim = latent_dim


class FixedLinear(NoiseSchedule):
    """VDM's fixed linear schedule ``gamma = gamma_min + (gamma_max - gamma_min) t``."""

    fixed_endpoints = True

    def __init__(
        self, image_shape: ImageShape, latent_dim: int, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX
    ) -> None:
        super().__init__(image_shape, latent_dim, gamma_min, gamma_max)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # tracks the device

    def gamma_and_derivative(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        slope = self.gamma_max - self.gamma_min
        return self.gamma_min + slope * t, torch.full_like(t, slope)


class LearnedScalar(NoiseSchedule):
    """VDM's learned linear schedule ``gamma = b + |w| t`` (learned endpoints ``b`` and ``b + |w|``)."""

    fixed_endpoints = False

    def __init__(
        self,
        image_shape: ImageShape,
        latent_dim: int,
        gamma_min: float = GAMMA_MIN,
        gamma_max: float = GAMMA_MAX,
        variance_minimising: bool = False,
    ) -> None:
        super().__init__(image_shape, latent_dim, gamma_min, gamma_max)
        if variance_minimising:  # docs: math, section 10c
            raise ValueError(
                "LearnedScalar: variance_minimising trains a schedule's interior for E[L^2] and its endpoints on the "
                "bound, but b and b + |w| are this linear schedule's endpoints and it has no interior: the bound's "
                "gradient is already all there is. Use mulan.processes.schedules.MonotoneNN with "
                "variance_minimising: true."
            )
        self.b = nn.Parameter(torch.tensor(self.gamma_min))
        self.w = nn.Parameter(torch.tensor(self.gamma_max - self.gamma_min))

    def gamma_and_derivative(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        slope = self.w.float().abs()
        return self.b.float() + slope * t, slope.expand_as(t)


class MonotoneNN(NoiseSchedule):
    """VDM appendix H: ``g(t) = l1(t) + l3(phi(l2(t)))`` with non-negative weights, normalised to its endpoints.

    ``gamma = gamma_0 + (gamma_1 - gamma_0) (g(t) - g(0)) / (g(1) - g(0))`` with learned endpoints
    ``gamma_0`` and ``gamma_1 = gamma_0 + |delta|``. The public VDM code omits this normalisation, so its
    endpoints drift with the interior weights; here they move only when ``gamma_0``, ``delta`` are trained.
    Set ``learn_endpoints=False`` to keep them at ``gamma_min``, ``gamma_max``.

    ``variance_minimising`` (VDM appendix I.2; docs: math, section 10c): the expected diffusion term does not depend on
    the interior ``(g(t) - g(0)) / (g(1) - g(0))``, so its weights are trained to minimise ``E[L^2]`` of the
    per-example diffusion term ``L`` (nats): in the backward pass the interior's gradient from example ``i`` is scaled
    by ``2 L_i``, while the endpoints and the denoiser keep the bound's gradient. The loss values are unchanged.
    """

    def __init__(
        self,
        image_shape: ImageShape,
        latent_dim: int,
        gamma_min: float = GAMMA_MIN,
        gamma_max: float = GAMMA_MAX,
        features: int = 1024,
        learn_endpoints: bool = True,
        variance_minimising: bool = False,
    ) -> None:
        super().__init__(image_shape, latent_dim, gamma_min, gamma_max)
        self.fixed_endpoints = not learn_endpoints  # checked once this constructor returns
        self.variance_minimising = variance_minimising
        self._loss_scale: list[Tensor] | None = None  # 2 L per example, filled once the loss is known
        self.features = features
        self.w1 = nn.Parameter(torch.tensor(1.0))
        self.b1 = nn.Parameter(torch.tensor(0.0))
        self.w2 = nn.Parameter(torch.randn(features))
        self.b2 = nn.Parameter(torch.randn(features))
        self.w3 = nn.Parameter(torch.randn(features) / features)
        self.gamma_0 = nn.Parameter(torch.tensor(self.gamma_min), requires_grad=learn_endpoints)
        self.delta = nn.Parameter(torch.tensor(self.gamma_max - self.gamma_min), requires_grad=learn_endpoints)

    def _unnormalised(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``g(t)`` and ``g'(t)`` for t of shape (N, 1)."""
        w2, w3 = self.w2.float().abs(), self.w3.float().abs()
        h = (2 * t - 1) * w2 + self.b2.float()  # (N, F); input mapped to [-1, 1] as in VDM
        s = torch.sigmoid(h)
        g = self.w1.float().abs() * t + self.b1.float() + (2 * (s - 0.5)) @ w3[:, None]
        dg = self.w1.float().abs() + (2 * s * (1 - s) * 2 * w2) @ w3[:, None]
        return g, dg

    def gamma_and_derivative(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        ends = torch.tensor([[0.0], [1.0]], device=t.device)
        g, dg = self._unnormalised(torch.cat([t.reshape(-1, 1), ends]))
        g_t, dg_t, g0, g1 = g[:-2], dg[:-2], g[-2], g[-1]
        gamma_0, span = self.gamma_0.float(), self.delta.float().abs()
        interior, speed = (g_t - g0) / (g1 - g0), dg_t / (g1 - g0)  # (N, 1), independent of the endpoints
        scale = self._loss_scale
        if scale is not None and interior.requires_grad:  # backward: each example's interior gradient times 2 L_i
            interior.register_hook(lambda grad: grad * scale[0].reshape(-1, 1))
            speed.register_hook(lambda grad: grad * scale[0].reshape(-1, 1))
        return (gamma_0 + span * interior).reshape(t.shape), (span * speed).reshape(t.shape)

    def diffusion_loss(
        self,
        x: Tensor,
        t: Tensor,
        ctx: Context,
        predict: Callable[..., Tensor],
        eps: Tensor | None = None,
        steps: int = 0,
    ) -> Tensor:
        """The diffusion term (B,) nats; with ``variance_minimising`` and gradients on, the interior's gradient is
        that of ``E[L^2]`` (class docstring)."""
        if not (self.variance_minimising and torch.is_grad_enabled()):
            return super().diffusion_loss(x, t, ctx, predict, eps, steps)
        if steps:
            raise ValueError(
                "MonotoneNN: variance_minimising relies on the continuous-time bound not depending on the schedule's "
                "interior; the T-step bound does. Train with timesteps: 0, or set variance_minimising: false."
            )
        scale: list[Tensor] = []
        self._loss_scale = scale
        try:
            loss = super().diffusion_loss(x, t, ctx, predict, eps, steps)
        finally:
            self._loss_scale = None
        scale.append(2 * loss.detach())
        return loss

    def endpoints(self, ctx: Context | None, batch_size: int) -> tuple[Tensor, Tensor]:
        const = torch.ones(batch_size, 1, 1, 1, device=self.w1.device)
        gamma_0 = self.gamma_0.float()
        return const * gamma_0, const * (gamma_0 + self.delta.float().abs())


class Polynomial(NoiseSchedule):
    """MuLAN's multivariate schedule: per-dimension polynomial conditioned on the latent ``z``.

    A network maps ``z`` (B, m) to ``a, b, c`` (each (B, C, H, W)); with
    ``f(t) = a^2 t^5/5 + a b t^4/2 + (b^2 + 2ac) t^3/3 + b c t^2 + c^2 t = int_0^t (a s^2 + b s + c)^2 ds``,
    ``gamma = gamma_min + (gamma_max - gamma_min) f(t) / f(1)`` and
    ``dgamma/dt = (gamma_max - gamma_min) (a t^2 + b t + c)^2 / f(1)``.
    Monotone by construction; ``gamma(0) = gamma_min`` and ``gamma(1) = gamma_max`` exactly for every ``z``.

    Args:
        hidden: width of the two hidden layers (reference: the data dimension ``D``; ``None`` means ``D``). The
            reference head has ``~4 D^2`` parameters; a small ``hidden`` (e.g. 64) makes it linear in ``D``.
        reduce: ``"none"`` (multivariate), or ``"mean"``: the per-dimension ``gamma`` averaged over dimensions
            (the paper's scalar ablation; still adaptive to ``z``).
        init: ``"reference"``: PyTorch's default initialisation with head ``a`` zero (a random polynomial per
            dimension at the start); ``"linear"``: the three output layers start at zero weight (and ``a``, ``b`` at
            zero bias), so every dimension starts on the linear schedule and the head learns departures from it.
        latent_dim: input size; ``0`` means no latent: the network sees a constant input (the paper's
            "multivariate, learned, not adaptive" ablation).
    """

    multivariate = True
    fixed_endpoints = True

    def __init__(
        self,
        image_shape: ImageShape,
        latent_dim: int,
        gamma_min: float = GAMMA_MIN,
        gamma_max: float = GAMMA_MAX,
        hidden: int | None = None,
        reduce: str = "none",
        init: str = "reference",
    ) -> None:
        super().__init__(image_shape, latent_dim, gamma_min, gamma_max)
        if reduce not in ("none", "mean"):
            raise ValueError(f"Polynomial: reduce must be 'none' or 'mean', got {reduce!r}.")
        if init not in ("reference", "linear"):
            raise ValueError(f"Polynomial: init must be 'reference' or 'linear', got {init!r}.")
        self.reduce = reduce
        self.multivariate = reduce == "none"
        dim = math.prod(image_shape)
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(max(latent_dim, 1), hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.head_a, self.head_b, self.head_c = (nn.Linear(hidden, dim) for _ in range(3))
        nn.init.zeros_(self.head_a.weight)
        nn.init.zeros_(self.head_a.bias)
        if init == "linear":
            nn.init.zeros_(self.head_b.weight)
            nn.init.zeros_(self.head_b.bias)
            nn.init.zeros_(self.head_c.weight)

    def coefficients(self, z: Tensor | None, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """``a, b, c`` of shape (B, C, H, W), float32; ``c >= 1e-3``."""
        if self.latent_dim == 0 or z is None:
            z = torch.ones(batch_size, max(self.latent_dim, 1), device=self.head_a.weight.device)
        h = self.net(z.float())
        shape = (-1, *self.image_shape)
        a, b = self.head_a(h).view(shape), self.head_b(h).view(shape)
        c = 1e-3 + F.softplus(self.head_c(h)).view(shape)
        return a, b, c

    def gamma_and_derivative(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        a, b, c = self.coefficients(ctx.z, t.shape[0])
        f_t = _poly_integral(a, b, c, t)
        f_1 = _poly_integral(a, b, c, torch.ones_like(t))
        span = self.gamma_max - self.gamma_min
        gamma = self.gamma_min + span * f_t / f_1
        dgamma = span * (a * t**2 + b * t + c) ** 2 / f_1
        if self.reduce == "mean":
            return gamma.mean((1, 2, 3), keepdim=True), dgamma.mean((1, 2, 3), keepdim=True)
        return gamma, dgamma


def _poly_integral(a: Tensor, b: Tensor, c: Tensor, t: Tensor) -> Tensor:
    """``int_0^t (a s^2 + b s + c)^2 ds``, element-wise (Horner form)."""
    return t * (c**2 + t * (b * c + t * ((b**2 + 2 * a * c) / 3 + t * (a * b / 2 + t * a**2 / 5))))


ScheduleFactory = Callable[[ImageShape, int], NoiseSchedule]
"""What a config gives for a schedule: a class (plus options) called with ``(image_shape, latent_dim)``."""
