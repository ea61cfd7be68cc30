"""Time samplers: the times ``t`` of a training step and their importance weights (docs: math, sections 4, 6c).

The diffusion term is ``L_diff = E_{t ~ U[0, 1]}[l(t)] = E_{t ~ pi}[l(t) / pi(t)]`` for any density ``pi > 0`` on
``[0, 1]``. A sampler returns ``(t, weight)`` with ``weight = 1 / pi(t)`` (``None`` for uniform times), and the model
multiplies the per-example diffusion term by it, so the estimate stays an unbiased estimate of the bound whatever
the sampler; only its variance changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from mulan.processes.base import Context, ForwardProcess

if TYPE_CHECKING:
    from mulan.processes.diagonal import DiagonalProcess


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


# ----------------------------------------------------------------------------------------------------
# Importance-sampled time: proposals on the log-SNR (Hang & Gu, "Improved Noise Schedule for Diffusion Training")

INVERSION_STEPS = 40
"""Bisection steps of the numeric inversions (``t`` from ``gamma``, ``lambda`` from a mixture's CDF): the bracket
shrinks to ``2^-40`` of its width, far below float32 resolution."""


class LogSNRSampler(TimeSampler):
    """Times whose log-SNR ``lambda = -gamma`` follows a proposal ``p`` truncated to the process's range, with the
    weights ``1 / pi(t)`` that keep the diffusion term an unbiased estimate of the bound (docs: math, 6c and 10b).

    Draws are stratified: ``u_j = (u + j / B) mod 1`` (one ``u`` per call), pushed through the inverse CDF of the
    truncated proposal (mixed with ``uniform_fraction`` of the uniform density on the same range). Then:

    * a scalar diagonal process (VDM's schedules, DiffEnc): ``t = gamma^-1(-lambda)`` per example (closed form for
      the linear schedules, bisection otherwise), range ``[-gamma(1), -gamma(0)]`` from the process's endpoints,
      ``pi(t) = p(lambda(t)) gamma'(t)``: the weighted term is ``1/2 ||eps - eps_hat||^2 / p(lambda)``;
    * any other process (per-dimension schedules: MuLAN, CVDM): one ``t`` serves every dimension, so the proposal
      is placed on the reference linear log-SNR ``lambda_ref(t) = -(gamma_min + (gamma_max - gamma_min) t)`` and
      ``pi(t) = p(lambda_ref(t)) (gamma_max - gamma_min)`` is used directly.

    The weights are detached: ``t`` is a draw from the current proposal, and ``E_pi[grad l(t) / pi(t)]`` is the
    gradient of the bound. Subclasses give the untruncated ``log_density``, ``cdf`` and ``icdf`` (float64).

    Args:
        uniform_fraction: weight ``rho`` of the uniform density in the defensive mixture
            ``(1 - rho) p + rho U[lambda_min, lambda_max]``: every weight stays below ``1 / rho`` times the weight of a
            uniformly drawn log-SNR (``1 / rho`` itself for the linear schedules and the reference line, where uniform
            log-SNR is uniform time), whatever the proposal's tails (0: the pure proposal).
    """

    def __init__(self, uniform_fraction: float = 0.0) -> None:
        if not 0.0 <= uniform_fraction <= 1.0:
            raise ValueError(f"uniform_fraction must lie in [0, 1], got {uniform_fraction}.")
        self.uniform_fraction = float(uniform_fraction)

    # ------------------------------------------------------------------------------ the untruncated proposal
    def log_density(self, lam: Tensor) -> Tensor:
        """``log p(lambda)`` of the untruncated proposal, float64."""
        raise NotImplementedError

    def cdf(self, lam: Tensor) -> Tensor:
        """``P(Lambda <= lambda)`` of the untruncated proposal, float64."""
        raise NotImplementedError

    def icdf(self, p: Tensor) -> Tensor:
        """The inverse of :meth:`cdf` for ``p`` in (0, 1), float64."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ truncated and mixed
    def mixture_log_density(self, lam: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """``log`` of ``(1 - rho) p(lambda) / (F(hi) - F(lo)) + rho / (hi - lo)`` on ``[lo, hi]``, float64."""
        log_p = self.log_density(lam) - torch.log(self.cdf(hi) - self.cdf(lo))
        rho = self.uniform_fraction
        if rho == 0.0:
            return log_p
        log_u = -torch.log(hi - lo)
        if rho == 1.0:
            return log_u
        return torch.logaddexp(log_p + math.log1p(-rho), log_u + math.log(rho))

    def mixture_icdf(self, u: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """``lambda`` with mixture CDF ``u`` on ``[lo, hi]`` (closed form, or bisection when mixed), float64."""
        f_lo, f_hi = self.cdf(lo), self.cdf(hi)
        rho = self.uniform_fraction
        if rho == 0.0:
            return self.icdf(f_lo + u * (f_hi - f_lo)).clamp(lo, hi)
        if rho == 1.0:
            return lo + u * (hi - lo)

        def mixture_cdf(lam: Tensor) -> Tensor:
            return rho * (lam - lo) / (hi - lo) + (1 - rho) * (self.cdf(lam) - f_lo) / (f_hi - f_lo)

        return bisect(mixture_cdf, u, lo.expand_as(u).clone(), hi.expand_as(u).clone())

    # ------------------------------------------------------------------------------ times and weights
    def __call__(self, batch_size, process, ctx, generator=None):
        device = process.device()
        u = antithetic_uniform(batch_size, device, generator).double()
        with torch.no_grad():
            if _is_scalar_diagonal(process):
                return self._scalar_times(u, cast("DiagonalProcess", process), ctx)
            return self._reference_times(u, process)

    def _scalar_times(self, u: Tensor, process: DiagonalProcess, ctx: Context) -> tuple[Tensor, Tensor]:
        """Times of a scalar schedule: ``t = gamma^-1(-lambda)``, weight ``1 / (p(lambda(t)) gamma'(t))``."""
        gamma_0, gamma_1 = (g.reshape(-1).double().expand(u.shape[0]) for g in process.endpoints(ctx, u.shape[0]))
        lo, hi = -gamma_1, -gamma_0
        target = -self.mixture_icdf(u, lo, hi)  # gamma values, (B,)
        t = invert_gamma(process, ctx, target, gamma_0, gamma_1)
        gamma, dgamma = (g.reshape(-1).double() for g in process(t, ctx))
        log_pi = self.mixture_log_density(-gamma, lo, hi) + torch.log(dgamma)
        return t, torch.exp(-log_pi).float()

    def _reference_times(self, u: Tensor, process: ForwardProcess) -> tuple[Tensor, Tensor]:
        """Times of any other process: the proposal on the reference linear log-SNR between its gamma range."""
        gamma_min = float(getattr(process, "gamma_min", GAMMA_RANGE[0]))
        gamma_max = float(getattr(process, "gamma_max", GAMMA_RANGE[1]))
        lo = torch.full_like(u, -gamma_max)
        hi = torch.full_like(u, -gamma_min)
        lam = self.mixture_icdf(u, lo, hi)
        t = ((-lam - gamma_min) / (gamma_max - gamma_min)).clamp(0.0, 1.0).float()
        lam_t = -(gamma_min + (gamma_max - gamma_min) * t.double())
        log_pi = self.mixture_log_density(lam_t, lo, hi) + math.log(gamma_max - gamma_min)
        return t, torch.exp(-log_pi).float()


GAMMA_RANGE = (-13.3, 5.0)
"""``(gamma_min, gamma_max)`` of the reference log-SNR for processes that name none (the library's defaults)."""


class LaplaceLogSNR(LogSNRSampler):
    """Hang & Gu's Laplace proposal ``p(lambda) = exp(-|lambda - loc| / scale) / (2 scale)`` on the log-SNR.

    The paper's setting, ``loc = 0``, ``scale = 0.5``, concentrates the draws where signal and noise are balanced;
    under the bound's weights ``1 / pi`` its thin tails make rare draws carry enormous weights wherever the bound's
    integrand is not small (docs: learned processes), so a wide scale or a ``uniform_fraction`` is advised.
    """

    def __init__(self, loc: float = 0.0, scale: float = 0.5, uniform_fraction: float = 0.0) -> None:
        super().__init__(uniform_fraction)
        if not scale > 0:
            raise ValueError(f"LaplaceLogSNR: scale must be positive, got {scale}.")
        self.loc, self.scale = float(loc), float(scale)

    def log_density(self, lam: Tensor) -> Tensor:
        return -(lam - self.loc).abs() / self.scale - math.log(2 * self.scale)

    def cdf(self, lam: Tensor) -> Tensor:
        z = (lam - self.loc) / self.scale
        return torch.where(z < 0, 0.5 * torch.exp(z.clamp(max=0)), 1 - 0.5 * torch.exp(-z.clamp(min=0)))

    def icdf(self, p: Tensor) -> Tensor:
        below = self.loc + self.scale * torch.log(2 * p.clamp(max=0.5))
        above = self.loc - self.scale * torch.log(2 * (1 - p).clamp(max=0.5))
        return torch.where(p < 0.5, below, above)

    def __repr__(self) -> str:
        return f"LaplaceLogSNR(loc={self.loc}, scale={self.scale}, uniform_fraction={self.uniform_fraction})"


class CauchyLogSNR(LogSNRSampler):
    """Hang & Gu's Cauchy proposal ``p(lambda) = scale / (pi ((lambda - loc)^2 + scale^2))`` on the log-SNR.

    The paper's setting is ``loc = 0``, ``scale = 1``; its polynomial tails keep the weights moderate where the
    Laplace proposal's explode.
    """

    def __init__(self, loc: float = 0.0, scale: float = 1.0, uniform_fraction: float = 0.0) -> None:
        super().__init__(uniform_fraction)
        if not scale > 0:
            raise ValueError(f"CauchyLogSNR: scale must be positive, got {scale}.")
        self.loc, self.scale = float(loc), float(scale)

    def log_density(self, lam: Tensor) -> Tensor:
        return math.log(self.scale / math.pi) - torch.log((lam - self.loc).square() + self.scale**2)

    def cdf(self, lam: Tensor) -> Tensor:
        return 0.5 + torch.atan((lam - self.loc) / self.scale) / math.pi

    def icdf(self, p: Tensor) -> Tensor:
        return self.loc + self.scale * torch.tan(math.pi * (p - 0.5))

    def __repr__(self) -> str:
        return f"CauchyLogSNR(loc={self.loc}, scale={self.scale}, uniform_fraction={self.uniform_fraction})"


def bisect(f: Callable[[Tensor], Tensor], target: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Per element, the ``x`` in ``[lo, hi]`` with ``f(x) = target`` for a non-decreasing ``f`` (bisection)."""
    for _ in range(INVERSION_STEPS):
        mid = 0.5 * (lo + hi)
        below = f(mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def invert_gamma(process: DiagonalProcess, ctx: Context, target: Tensor, gamma_0: Tensor, gamma_1: Tensor) -> Tensor:
    """Times (B,) float32 with ``gamma(t) = target`` (B,) for a scalar diagonal process; ``gamma_0``, ``gamma_1``: its
    endpoints (B,). Closed form for the linear schedules, bisection on ``t`` otherwise."""
    from mulan.processes.schedules import FixedLinear, LearnedScalar

    if isinstance(process, FixedLinear | LearnedScalar):
        return ((target - gamma_0) / (gamma_1 - gamma_0)).clamp(0.0, 1.0).float()

    def gamma(t: Tensor) -> Tensor:
        return process(t.float(), ctx)[0].reshape(-1).double()

    zeros = torch.zeros_like(target)
    return bisect(gamma, target, zeros, zeros + 1).float()


def _is_scalar_diagonal(process: ForwardProcess) -> bool:
    """``True`` for a diagonal process whose ``gamma`` is one number per example (invertible in ``t``)."""
    from mulan.processes.diagonal import DiagonalProcess

    return isinstance(process, DiagonalProcess) and not process.multivariate
