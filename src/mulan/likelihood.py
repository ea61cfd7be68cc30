"""Likelihood evaluation: the dense ELBO (many stratified times per image) and the probability-flow ODE.

All results are per image, in nats unless a name says bits per dimension (``bpd``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from mulan import elbo, ode
from mulan.elbo import NUM_BINS
from mulan.model import Bound, DiffusionModel
from mulan.processes.base import Context, as_context


@torch.no_grad()
def dense_elbo(
    model: DiffusionModel, images: Tensor, y: Tensor | None = None, num_times: int = 128, chunk_size: int = 1024
) -> Bound:
    """The bound of each image averaged over ``K = num_times`` stratified times ``t_j = (u + j) / K``.

    Each of the ``K`` evaluations draws its own latent, noise and reconstruction noise, so the average is an
    unbiased estimate of the bound with far less variance than one sample. ``images``: uint8 (B, C, H, W); ``y``:
    their conditioning inputs or None. Returns the per-image :class:`~mulan.model.Bound` (each (B,), nats).
    ``chunk_size`` bounds how many (image, time) pairs run at once.
    """
    b = images.shape[0]
    u = torch.rand(b, 1, device=images.device)
    t = ((u + torch.arange(num_times, device=images.device) / num_times) % 1.0).reshape(-1)  # (B K,)
    index = torch.arange(b, device=images.device).repeat_interleave(num_times)
    parts = []
    for rows, times in zip(index.split(chunk_size), t.split(chunk_size), strict=True):
        parts.append(model(images[rows], y=None if y is None else y[rows], t=times))

    def mean(group: str) -> dict[str, Tensor]:
        names = getattr(parts[0], group)
        return {n: torch.cat([getattr(p, group)[n] for p in parts]).view(b, num_times).mean(1) for n in names}

    return Bound(mean("terms"), mean("extras"), mean("penalties"))


def dense_elbo_dataset(model: DiffusionModel, batches: Iterable[Tensor], num_times: int = 128) -> Bound:
    """:func:`dense_elbo` over an iterable of batches (uint8 tensors, or ``(images, y)`` pairs), per image."""
    device = next(model.parameters()).device
    parts = []
    for batch in batches:
        images, y = batch if isinstance(batch, tuple | list) else (batch, None)
        parts.append(dense_elbo(model, images.to(device), None if y is None else y.to(device), num_times))

    def cat(group: str) -> dict[str, Tensor]:
        return {n: torch.cat([getattr(p, group)[n] for p in parts]) for n in getattr(parts[0], group)}

    return Bound(cat("terms"), cat("extras"), cat("penalties"))


# ----------------------------------------------------------------------------------------------------
# Likelihood by the probability-flow ODE (docs: math, section 6)

TRUNCATION = 3.0
"""The dequantiser's truncated normal lives on ``[-TRUNCATION, TRUNCATION]`` standard deviations."""

HALF_BIN = 1.0 / NUM_BINS
"""Half the width ``2 / 256`` of one 8-bit bin in the data units ``[-1, 1]``."""


@dataclass
class ODELogDensity:
    """``log_p``: (B,) continuous log-density ``log p(x_0 | z)`` in nats (density w.r.t. Lebesgue measure on
    the data units ``[-1, 1]^D``); ``x_1``: (B, C, H, W) the encoded noise; ``nfe``: drift evaluations of the
    solve."""

    log_p: Tensor
    x_1: Tensor
    nfe: int


@dataclass
class ODELikelihood:
    """Per-image results of :func:`ode_likelihood`.

    ``nll_nats``: (B,) upper bound on ``-log P(image)`` of the 8-bit data, in nats, including the latent cost;
    ``bpd``: (B,) the same in bits per dimension (``nll_nats / (D ln 2)``); ``latent_nats``: (B,) the latent
    cost included (0 without a latent); ``nfe``: (B,) drift evaluations per ODE solve (mean over the ``K``
    draws of the batched solves the image took part in); ``seconds_per_image``: wall-clock seconds per image
    of the call.
    """

    nll_nats: Tensor
    bpd: Tensor
    latent_nats: Tensor
    nfe: Tensor
    seconds_per_image: float


def rademacher_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A Rademacher probe (entries +-1 with probability 1/2), shape and dtype of ``x``."""
    bits = torch.randint(0, 2, x.shape, device=x.device, generator=generator)
    return (2 * bits - 1).to(x.dtype)


def standard_normal_log_density(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` summed per example: (B, ...) -> (B,) nats."""
    return -0.5 * (x.square() + math.log(2 * math.pi)).flatten(1).sum(1)


@torch.no_grad()
def ode_log_density(
    model: DiffusionModel,
    x: Tensor,
    ctx: Context | Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dtype: torch.dtype = torch.float32,
    exact_divergence: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> ODELogDensity:
    """``log p(x | ctx)`` of continuous data ``x`` (B, C, H, W) under the probability-flow ODE, in nats.

    Integrates the augmented state ``(x_t, int_0^t div dt)`` from t = 0 (the data end) to t = 1 and returns
    ``log p(x) = log N(x_1; 0, I) + int_0^1 div(drift) dt`` (change of variables: ``d/dt log p_t(x_t) = -div``).
    The divergence is exact (``exact_divergence=True``, ``D`` backward passes per evaluation) or a Hutchinson
    estimate with ONE Rademacher probe drawn from ``generator`` and held fixed for the whole solve: the estimate
    of ``log p(x)`` is then unbiased (up to the solver's error), but not of ``p(x)``. Solver: :func:`mulan.ode.solve`
    (dopri5 at ``rtol``/``atol`` in ``dtype``, TF32 off, autocast off outside the denoiser)."""
    ctx = as_context(ctx)
    x = x.to(dtype)
    probe = None if exact_divergence else rademacher_like(x, generator)
    f = ode.drift(model, ctx)

    def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        velocity, div = ode.drift_and_divergence(f, t, state[0], probe)
        return velocity, div.to(dtype)

    (x_1, integral), nfe = ode.solve(
        augmented, (x, x.new_zeros(x.shape[0])), 0.0, 1.0, rtol, atol, progress, "ODE likelihood"
    )
    return ODELogDensity(standard_normal_log_density(x_1) + integral, x_1, nfe)


def dequantise(
    images: Tensor,
    scale: Tensor,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Truncated-normal dequantisation ``x~ = x + scale u``, ``u ~ TN(0, 1)`` on ``[-3, 3]``; and ``log q``.

    ``images``: uint8 (B, C, H, W); ``x`` their bin centres; ``scale`` broadcastable to them, at most
    ``HALF_BIN / 3`` so that ``x~`` stays inside the pixel's bin. Returns ``x~`` (B, C, H, W) in ``dtype`` and
    ``log q(x~ | x) = sum_i [log phi(u_i) - log(Phi(3) - Phi(-3)) - log scale_i]`` (B,) in nats, a density in
    the same data units as the model's ``p(x~)``."""
    x = elbo.to_unit_interval(images).double()
    lo = torch.special.ndtr(torch.tensor(-TRUNCATION, dtype=torch.float64))
    mass = 1.0 - 2.0 * lo  # Phi(3) - Phi(-3)
    uniform = torch.rand(x.shape, device=x.device, generator=generator, dtype=torch.float64)
    u = torch.special.ndtri(lo + uniform * mass).clamp(-TRUNCATION, TRUNCATION)
    scale = scale.double().expand_as(x)
    x_tilde = (x + scale * u).to(dtype)
    u = ((x_tilde.double() - x) / scale).clamp(-TRUNCATION, TRUNCATION)  # q at the point actually used
    log_q = -0.5 * u.square() - 0.5 * math.log(2 * math.pi) - torch.log(mass) - torch.log(scale)
    return x_tilde, log_q.flatten(1).sum(1).to(dtype)


def dequantisation_scale(model: DiffusionModel, ctx: Context, batch_size: int) -> Tensor:
    """The process's data noise scale at ``t = 0`` (``exp(gamma(0) / 2)`` for a schedule), capped at
    ``HALF_BIN / 3`` so the truncated normal stays inside the bin (the cap is inactive at ``gamma_min = -13.3``,
    where ``3 sigma_0 = 0.00388 < 1/256``). Broadcastable to the data, float32."""
    return model.process.dequantisation_scale(ctx, batch_size).clamp_max(HALF_BIN / TRUNCATION)


@torch.no_grad()
def ode_likelihood(
    model: DiffusionModel,
    images: Tensor,
    y: Tensor | None = None,
    num_draws: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dtype: torch.dtype = torch.float32,
    exact_divergence: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> ODELikelihood:
    """Bits/dim of 8-bit images by the probability-flow ODE with importance-weighted dequantisation.

    For each image (uint8 (B, C, H, W)): draw ``z ~ q(z | x)`` once (``model.latent``; MuLAN's ODE is
    conditioned on ``z``), then ``K = num_draws`` dequantisations ``x~_k ~ q(x~ | x)`` (:func:`dequantise`,
    truncated normal of scale ``sigma_0``, inside the bin), each with its own ODE solve
    (:func:`ode_log_density`, one fixed probe each). Because ``q`` is supported in the pixel's bin,
    ``P(k | z) = int_bin p(x~ | z) dx~ = E_q[p(x~ | z) / q(x~ | x)]``, so by Jensen

        -log P(k) <= -logmeanexp_k [log p(x~_k | z) - log q(x~_k | x)] + kl(x)          (nats)

    with ``kl`` the latent's honest cost (``log C(m, k)`` for a k-hot latent, docs: math, section 3), an upper
    bound on ``KL(q(z | x) || p(z))``. Both densities are in the data units ``[-1, 1]``, so no further offset
    enters: the bin width ``2/256`` is already inside ``log q``. For scale: per dimension ``log2 q`` averages
    ``-log2 sigma_0 - log2(Phi(3) - Phi(-3)) + E[log2 phi(u)] = 9.594 + 0.004 - 2.028 = 7.57`` bits at
    ``gamma_min = -13.3`` (uniform dequantisation over the bin would give exactly ``log2(256/2) = 7`` bits).
    With Hutchinson probes the bound holds in expectation over the probes. ``BPD = nll / (D ln 2)``.

    Call it on a model in eval mode (dropout would make the ODE's right-hand side random). Returns an
    :class:`ODELikelihood`. Solver options as in :func:`ode_log_density`."""
    model.check_images(images)
    start = time.perf_counter()
    ctx, latent_cost, _ = model.encode(elbo.to_unit_interval(images), y)
    scale = dequantisation_scale(model, ctx, images.shape[0])
    log_weights, nfes = [], []
    for _ in range(num_draws):
        x_tilde, log_q = dequantise(images, scale, generator, dtype)
        result = ode_log_density(model, x_tilde, ctx, rtol, atol, dtype, exact_divergence, generator, progress)
        log_weights.append(result.log_p - log_q)
        nfes.append(result.nfe)
    log_mean = torch.logsumexp(torch.stack(log_weights), 0) - math.log(num_draws)
    latent_nats = latent_cost.to(dtype)
    nll = latent_nats - log_mean
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    seconds = (time.perf_counter() - start) / images.shape[0]
    nfe = torch.full_like(nll, sum(nfes) / num_draws)
    return ODELikelihood(nll, elbo.nats_to_bpd(nll, model.num_dims), latent_nats, nfe, seconds)


def ode_likelihood_dataset(model: DiffusionModel, batches: Iterable[Tensor], **options) -> ODELikelihood:
    """:func:`ode_likelihood` over uint8 batches, concatenated per image (``options`` are passed on)."""
    device = next(model.parameters()).device
    parts = [ode_likelihood(model, batch.to(device), **options) for batch in batches]
    total = sum(p.nll_nats.shape[0] for p in parts)
    seconds = sum(p.seconds_per_image * p.nll_nats.shape[0] for p in parts) / total
    names = ("nll_nats", "bpd", "latent_nats", "nfe")
    cat = {name: torch.cat([getattr(p, name) for p in parts]) for name in names}
    return ODELikelihood(**cat, seconds_per_image=seconds)
