"""DiffEnc (Nielsen et al., ICLR 2024): a learned, data- and time-dependent mean of the forward process.

``q(x_t | x) = N(alpha_t x_phi(x, t), sigma_t^2 I)`` with the encoded mean

    x_phi = b(x, gamma) + sigma^2 r_phi(x, gamma),

``b`` the *base* encoder and ``r_phi`` a network (zero for the non-trainable variant). The paper's encoders are the
``"shrink"`` base ``b = alpha^2 x`` (non-trainable: ``x_phi = alpha^2 x``; trainable: ``x_phi = alpha^2 x + sigma^2
r_phi``); the ``"identity"`` base ``b = x`` gives VDM's process when ``r_phi = 0``. The generative model knows the
base but not ``r_phi``: ``p(x_s | x_t)`` is ``q(x_s | x_t, x)`` with the prediction ``x_hat`` of ``x_phi(t)`` in
place of the encoded mean, carried from ``t`` to ``s`` the way the base carries it (``x_hat alpha_s^2 / alpha_t^2``
for ``"shrink"``, ``x_hat`` for ``"identity"``). The encoder is needed for training only.

Continuous time (docs: math, section 10a), with ``r' = d r_phi / d gamma`` (forward-mode autodiff):

    l(t) = 1/2 sum_i gamma' [k (eps - eps_hat) + alpha sigma (c r + r')]_i^2,
    "shrink":   k = 1 + sigma^2,  c = 1;        "identity":  k = 1,  c = alpha^2,

which in terms of ``v = alpha eps - sigma x_phi`` is the paper's ``1/2 gamma' alpha^2 ||v - v_hat + sigma (x_hat -
x_phi + r + r')||^2`` ("shrink"). ``T`` steps: the exact ``T sum KL(q(x_s | x_t, x) || p(x_s | x_t))`` with the
generative variance ``1 / omega`` times the forward one; ``omega != 1`` adds ``D (omega - 1 - log omega) / 2`` per
step, so the continuous-time bound exists only for ``omega = 1`` (the paper's caveat).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from mulan import elbo
from mulan.processes.base import Context, ImageShape, Marginal, Predictor
from mulan.processes.diagonal import DiagonalProcess
from mulan.processes.schedules import FixedLinear
from mulan.utils import float32_region

BASES = ("shrink", "identity")
ScheduleFactory = Callable[[ImageShape, int], DiagonalProcess]


class MeanEncoder(nn.Module):
    """The trainable part ``r_phi(x, gamma)`` of the encoded mean: (B, C, H, W) data and (B, 1, 1, 1) noise levels
    to (B, C, H, W), bounded by ``tanh`` (as the paper's encoder) and zero at initialisation.

    ResNet blocks at full resolution whose feature maps are shifted by an embedding of the normalised ``gamma``; no
    attention, so forward-mode autodiff gives ``d r / d gamma`` in one pass.
    """

    def __init__(
        self, image_shape: ImageShape, gamma_min: float, gamma_max: float, channels: int = 32, num_blocks: int = 2
    ) -> None:
        super().__init__()
        self.gamma_min, self.gamma_max, self.channels = gamma_min, gamma_max, channels
        groups = math.gcd(channels, 8)
        self.embed = nn.Sequential(nn.Linear(channels, 2 * channels), nn.SiLU(), nn.Linear(2 * channels, channels))
        self.conv_in = nn.Conv2d(image_shape[0], channels, 3, padding=1)
        self.norms = nn.ModuleList(nn.GroupNorm(groups, channels) for _ in range(num_blocks))
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_blocks))
        self.shifts = nn.ModuleList(nn.Linear(channels, channels) for _ in range(num_blocks))
        self.norm_out = nn.GroupNorm(groups, channels)
        self.conv_out = conv_out = nn.Conv2d(channels, image_shape[0], 3, padding=1)
        nn.init.zeros_(conv_out.weight)
        nn.init.zeros_(cast(Tensor, conv_out.bias))

    def time_features(self, gamma: Tensor) -> Tensor:
        """Sinusoidal features of the normalised ``gamma`` (B, 1, 1, 1) -> (B, channels)."""
        u = (gamma.reshape(-1, 1) - self.gamma_min) / (self.gamma_max - self.gamma_min)
        half = self.channels // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=gamma.device) / half)
        args = 100.0 * u * freqs
        return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=1), (0, self.channels % 2))

    def forward(self, x: Tensor, gamma: Tensor) -> Tensor:
        emb = self.embed(self.time_features(gamma))
        h = self.conv_in(x)
        for norm, conv, shift in zip(self.norms, self.convs, self.shifts, strict=True):
            h = h + conv(F.silu(norm(h) + shift(emb)[:, :, None, None]))
        return torch.tanh(self.conv_out(F.silu(self.norm_out(h))))


class DiffEnc(DiagonalProcess):
    """DiffEnc's forward process on a diagonal schedule, scalar for the trainable encoder (docs: math, section 10a).

    Args:
        image_shape, latent_dim: as every process (``latent_dim`` is passed on to the schedule).
        schedule: the noise schedule ``gamma(t)`` (a class plus options in a config; default
            :class:`~mulan.processes.schedules.FixedLinear`).
        trainable: ``True``: the encoded mean has the network ``r_phi`` (:class:`MeanEncoder`); ``False``: the
            non-trainable encoder ``x_phi = b(x, gamma)``.
        base: ``"shrink"`` (the paper: ``b = alpha^2 x``) or ``"identity"`` (``b = x``; VDM when ``r_phi = 0``).
        weight: ``omega``, the ratio of the forward to the generative variance of one step (``T`` steps only; the
            continuous-time bound requires 1).
        learn_weight: train ``log omega`` with the bound (``T`` steps only).
        channels, num_blocks: the encoder network's width and depth.
    """

    def __init__(
        self,
        image_shape: ImageShape,
        latent_dim: int,
        schedule: ScheduleFactory | None = None,
        trainable: bool = True,
        base: str = "shrink",
        weight: float = 1.0,
        learn_weight: bool = False,
        channels: int = 32,
        num_blocks: int = 2,
    ) -> None:
        inner = (FixedLinear if schedule is None else schedule)(image_shape, latent_dim)
        super().__init__(image_shape, inner.gamma_min, inner.gamma_max)
        if base not in BASES:
            raise ValueError(f"DiffEnc: base must be 'shrink' or 'identity', got {base!r}.")
        if not weight > 0:
            raise ValueError(f"DiffEnc: weight (omega, a variance ratio) must be positive, got {weight}.")
        if getattr(inner, "variance_minimising", False):
            raise ValueError(
                "DiffEnc: its schedule's variance_minimising option acts on the schedule's own diffusion loss, which "
                "DiffEnc replaces; use the schedule with variance_minimising: false inside DiffEnc."
            )
        if trainable and inner.multivariate:
            raise ValueError(
                f"DiffEnc: the trainable encoder needs a scalar schedule (one gamma per image), but "
                f"{type(inner).__name__} is per-dimension; use a scalar schedule (FixedLinear, LearnedScalar, "
                "MonotoneNN) or trainable: false."
            )
        self.schedule, self.base, self.latent_dim = inner, base, latent_dim
        # the schedule's own declaration, checked when it was built (and again for this process once built)
        self.multivariate, self.fixed_endpoints = inner.multivariate, inner.fixed_endpoints
        self.encoder = (
            MeanEncoder(image_shape, inner.gamma_min, inner.gamma_max, channels, num_blocks) if trainable else None
        )
        self.log_weight = nn.Parameter(torch.tensor(math.log(weight)), requires_grad=learn_weight)

    # ------------------------------------------------------------------------------------------ the schedule
    def gamma_and_derivative(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        return self.schedule.gamma_and_derivative(t, ctx)

    def endpoints(self, ctx: Context | None, batch_size: int) -> tuple[Tensor, Tensor]:
        return self.schedule.endpoints(ctx, batch_size)

    def endpoint_probe(self, batch_size: int, generator: torch.Generator) -> Context:
        return self.schedule.endpoint_probe(batch_size, generator)

    @property
    def weight(self) -> Tensor:
        """``omega``, float32 scalar."""
        return self.log_weight.float().exp()

    # ------------------------------------------------------------------------------------------ the encoder
    def residual(self, x: Tensor, gamma: Tensor, derivative: bool = False) -> tuple[Tensor, Tensor | None]:
        """``r_phi(x, gamma)`` (B, C, H, W) and, with ``derivative``, ``d r_phi / d gamma`` (forward-mode autodiff,
        also under inference mode); zeros for the non-trainable encoder."""
        if self.encoder is None:
            zeros = torch.zeros_like(x)
            return zeros, (zeros if derivative else None)
        if not derivative:
            return self.encoder(x, gamma), None
        if torch.is_inference_mode_enabled():  # inference tensors carry no tangents: compute outside it
            with torch.inference_mode(False):
                return self._with_tangent(x.clone(), gamma.clone())
        return self._with_tangent(x, gamma)

    def _with_tangent(self, x: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
        assert self.encoder is not None
        with forward_ad.dual_level():
            out = self.encoder(x, forward_ad.make_dual(gamma, torch.ones_like(gamma)))
            value, tangent = forward_ad.unpack_dual(out)
        return value, (torch.zeros_like(value) if tangent is None else tangent)

    def mean_shift(self, x: Tensor, r: Tensor, gamma: Tensor) -> Tensor:
        """``x_phi - x``: ``sigma^2 (r - x)`` ("shrink") or ``sigma^2 r`` ("identity"), without cancellation."""
        sigma2 = torch.sigmoid(gamma)
        return sigma2 * (r - x) if self.base == "shrink" else sigma2 * r

    def encoded_mean(self, x: Tensor, gamma: Tensor) -> Tensor:
        """``x_phi(x, gamma)`` for data ``x`` (B, C, H, W) in [-1, 1] at noise levels ``gamma``."""
        return x + self.mean_shift(x, self.residual(x, gamma)[0], gamma)

    def base_ratio(self, gamma_t: Tensor, gamma_s: Tensor) -> Tensor:
        """How the base carries a mean from ``t`` to ``s``: ``alpha_s^2 / alpha_t^2`` ("shrink") or 1."""
        if self.base == "identity":
            return torch.ones_like(gamma_t)
        return torch.exp(F.logsigmoid(-gamma_s) - F.logsigmoid(-gamma_t))

    # ------------------------------------------------------------------------------------------ the bound
    def diffusion_loss(
        self, x: Tensor, t: Tensor, ctx: Context, predict: Predictor, eps: Tensor | None = None, steps: int = 0
    ) -> Tensor:
        """Continuous time: ``1/2 sum gamma' [k (eps - eps_hat) + alpha sigma (c r + r')]^2`` (module docstring);
        ``T`` steps: ``T`` times the KL of one step of the generative model (:meth:`step_kl`). (B,) nats."""
        eps = torch.randn_like(x) if eps is None else eps
        if steps:
            return self._discrete_loss(x, t, ctx, predict, eps, steps)
        if bool(self.log_weight.detach() != 0) or self.log_weight.requires_grad:
            raise ValueError(
                "DiffEnc: the continuous-time bound exists only for weight (omega) = 1: every step of a finer "
                "hierarchy adds D (omega - 1 - log omega) / 2 nats. Set weight: 1.0 and learn_weight: false, or "
                "train with a finite number of steps (the model's timesteps: T)."
            )
        m = self.marginal(t, ctx)
        alpha, sigma, dgamma = m.alpha, m.sigma, m.dgamma
        assert alpha is not None and sigma is not None and dgamma is not None
        r, dr = self.residual(x, m.gamma, derivative=True)
        x_t = alpha * (x + self.mean_shift(x, r, m.gamma)) + sigma * eps
        eps_hat = predict(x_t, m)
        assert dr is not None
        with float32_region(x):
            if self.base == "shrink":
                residual = (1 + sigma.square()) * (eps - eps_hat.float()) + alpha * sigma * (r + dr)
            else:
                residual = (eps - eps_hat.float()) + alpha * sigma * (alpha.square() * r + dr)
            return elbo.sum_per_example(0.5 * dgamma * residual.square())

    def _discrete_loss(self, x: Tensor, t: Tensor, ctx: Context, predict: Predictor, eps: Tensor, steps: int) -> Tensor:
        t, s = elbo.discretise_times(t, steps)
        m = self.marginal(t, ctx)
        assert m.alpha is not None and m.sigma is not None
        gamma_s = self.gamma(s, ctx)
        r_t, r_s = self.residual(x, m.gamma)[0], self.residual(x, gamma_s)[0]
        x_t = m.alpha * (x + self.mean_shift(x, r_t, m.gamma)) + m.sigma * eps
        eps_hat = predict(x_t, m)
        with float32_region(x):
            return steps * self.step_kl(eps, eps_hat.float(), r_t, r_s, m.gamma, gamma_s)

    def step_kl(
        self, eps: Tensor, eps_hat: Tensor, r_t: Tensor, r_s: Tensor, gamma_t: Tensor, gamma_s: Tensor
    ) -> Tensor:
        """``KL(q(x_s | x_t, x) || p(x_s | x_t))`` per example (B,) nats, for ``x_t = alpha_t x_phi(t) + sigma_t eps``.

        With ``c = 1 - SNR_t / SNR_s``, the base ratio ``rho`` and ``x_phi(s) - rho x_phi(t) = sigma_s^2 r_s -
        rho sigma_t^2 r_t`` (the base part cancels), the means differ by ``alpha_s [(c + rho - 1) (x_phi(t) - x_hat)
        + sigma_s^2 r_s - rho sigma_t^2 r_t]``; the forward variance is ``alpha_s^2 c e^gamma_s``, the generative one
        ``1 / omega`` times it.
        """
        c = -torch.expm1(gamma_s - gamma_t)
        rho = self.base_ratio(gamma_t, gamma_s)
        scale = torch.rsqrt(c) * torch.exp(-0.5 * gamma_s)  # 1 / (forward std / alpha_s)
        eps_part = (c + rho - 1) * torch.exp(0.5 * gamma_t) * (eps_hat - eps)  # (c + rho - 1)(x_phi(t) - x_hat)
        encoder_part = torch.sigmoid(gamma_s) * r_s - rho * torch.sigmoid(gamma_t) * r_t
        mean_term = elbo.sum_per_example(0.5 * ((eps_part + encoder_part) * scale).square())
        omega = self.weight
        return omega * mean_term + 0.5 * eps.flatten(1).shape[1] * (omega - 1 - torch.log(omega))

    def forward_posterior(self, x: Tensor, x_t: Tensor, t: Tensor, s: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of ``q(x_s | x_t, x)``: ``(alpha_t sigma_s^2 / (alpha_s sigma_t^2)) x_t +
        alpha_s c x_phi(t) + alpha_s (x_phi(s) - x_phi(t))`` and ``sigma_s sqrt(c)``, so that ``x_s`` has the marginal
        ``N(alpha_s x_phi(s), sigma_s^2)`` whenever ``x_t`` has ``N(alpha_t x_phi(t), sigma_t^2)``."""
        gamma_t, gamma_s = self.gamma(t, ctx), self.gamma(s, ctx)
        (alpha_t, sigma_t), (alpha_s, sigma_s) = elbo.alpha_sigma(gamma_t), elbo.alpha_sigma(gamma_s)
        c = -torch.expm1(gamma_s - gamma_t)
        mean_t, mean_s = self.encoded_mean(x, gamma_t), self.encoded_mean(x, gamma_s)
        mean = alpha_t * sigma_s.square() / (alpha_s * sigma_t.square()) * x_t + alpha_s * (
            c * mean_t + mean_s - mean_t
        )
        return mean, sigma_s * c.sqrt()

    def prior_loss(self, x: Tensor, ctx: Context) -> Tensor:
        gamma_1 = self.endpoints(ctx, x.shape[0])[1]
        with float32_region(x):
            return elbo.prior_loss(self.encoded_mean(x, gamma_1), gamma_1)

    def reconstruction_loss(self, images: Tensor, ctx: Context, noise: Tensor | None = None) -> Tensor:
        """``-log p(x | x_0)`` with ``x_0 / alpha_0 = x_phi(0) + e^(gamma_0 / 2) eps_0``: VDM's decoder, fed the
        encoded mean's offset ``x_phi(0) - x`` as part of the noise."""
        x = elbo.to_unit_interval(images)
        gamma_0 = self.endpoints(ctx, x.shape[0])[0]
        noise = torch.randn_like(x) if noise is None else noise
        with float32_region(x):
            shift = self.mean_shift(x, self.residual(x, gamma_0)[0], gamma_0)
            return elbo.reconstruction_loss(images, gamma_0, noise + shift * torch.exp(-0.5 * gamma_0))

    # ------------------------------------------------------------------------------------------ generation
    def ancestral_step(
        self, x_t: Tensor, t: Tensor, s: Tensor, ctx: Context, predict: Predictor, noise: Tensor
    ) -> Tensor:
        """VDM's step with ``x_hat`` carried by the base: ``+ alpha_s (rho - 1) x_hat``; generative standard deviation
        ``sigma_s sqrt(c / omega)``."""
        m = self.marginal(t, ctx)
        assert m.alpha is not None and m.sigma is not None
        gamma_s = self.gamma(s, ctx)
        eps_hat = predict(x_t, m)
        with float32_region(x_t):
            c = -torch.expm1(gamma_s - m.gamma)
            alpha_s, sigma_s = elbo.alpha_sigma(gamma_s)
            x_hat = (x_t - m.sigma * eps_hat) / m.alpha
            mean = (alpha_s / m.alpha) * (x_t - m.sigma * c * eps_hat) + alpha_s * (
                self.base_ratio(m.gamma, gamma_s) - 1
            ) * x_hat
            return mean + sigma_s * (c.clamp_min(0) / self.weight.detach()).sqrt() * noise

    def ode_drift(self, x: Tensor, t: Tensor, ctx: Context, predict: Predictor) -> Tensor:
        """The probability-flow ODE of the generative model: VDM's ``1/2 sigma gamma' (eps_hat - sigma x)`` plus the
        base's drift ``alpha gamma' d b / d gamma`` at ``x_hat``: ``-sigma^2 gamma' (x - sigma eps_hat)`` ("shrink")."""
        t = t.to(x.dtype).expand(x.shape[0]) if t.dim() == 0 else t.to(x.dtype)
        with float32_region(x):
            gamma, dgamma = (g.to(x.dtype) for g in self.gamma_and_derivative(t.reshape(-1, 1, 1, 1), ctx))
            alpha, sigma = elbo.alpha_sigma(gamma)
        eps_hat = predict(x, Marginal(gamma=gamma, alpha=alpha, sigma=sigma, dgamma=dgamma)).to(x.dtype)
        with float32_region(x):
            drift = 0.5 * sigma * dgamma * (eps_hat - sigma * x)
            if self.base == "shrink":
                drift = drift - sigma.square() * dgamma * (x - sigma * eps_hat)
            return drift
