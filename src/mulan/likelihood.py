"""Likelihood evaluation: the dense ELBO (many stratified times per image) and the probability-flow ODE.

All results are per image, in nats unless a name says bits per dimension (``bpd``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mulan import elbo, ode
from mulan.elbo import NUM_BINS
from mulan.model import Bound, DiffusionModel
from mulan.ode import ODESettings, rademacher_like, sampled_divergence_integral, stratified_times
from mulan.ode_solver import solve, solve_at
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
    """What :func:`ode_log_density` returns.

    ``log_p``: (B,) continuous log-density ``log p(x_0 | z)`` in nats (density w.r.t. Lebesgue measure on the data
    units ``[-1, 1]^D``; with auxiliary variables the joint density of the data and the auxiliaries): exact up to
    the solver's error with the exact divergence, else the mean of the ``P`` probes' unbiased estimates (with
    ``divergence_samples``: an unbiased estimate in either case);
    ``log_p_var``: (B,) the variance of that estimate, estimated from the spread of the probes (``sample variance /
    P``; 0 with the exact divergence, NaN with one probe, which shows no spread), or with ``divergence_samples``
    from the spread of neighbouring strata; ``x_1``: (B, *state_shape) the encoded noise; ``nfe``: drift
    evaluations of the solve (with ``divergence_samples``: of the trajectory, plus the divergence's ``M``)."""

    log_p: Tensor
    log_p_var: Tensor
    x_1: Tensor
    nfe: int


@dataclass
class ODELikelihood:
    """Per-image results of :func:`ode_likelihood`, in nats unless the name says bits per dimension.

    ``nll_nats``: (B,) the ODE bound on ``-log P(image)`` of the 8-bit data, latent cost included: the
    importance-weighted bound over the ``K`` dequantisation draws when ``log p`` is exact (the exact divergence
    integrated by the solver), otherwise the mean of the ``K`` single-draw bounds (a bound in expectation over
    draws, probes and sampled times; docs: evaluation);
    ``bpd``: the same in bits per dimension (``nll_nats / (D ln 2)``);
    ``nll_var_nats``: (B,) the estimated variance of one image's ``nll_nats`` over the probes and sampled times,
    given its dequantisation draws (``sum_k Var log p_k / K^2``: every (image, draw) row draws its own times and
    probes, so the draws' estimates are independent; 0 when ``log p`` is exact, NaN with one probe per solve and
    the solver's integral), the ODE's own noise on top of the spread between images;
    ``iw_nll_nats``, ``iw_bpd``: (B,) the importance-weighted form ``latent - logmeanexp_k [log p - log q]``, the
    form of the published MuLAN / i-DODE numbers. It is a bound only when :attr:`iw_is_bound` (``log p``
    exact, or ``K = 1``); with Hutchinson probes or sampled divergence times inside the log-mean-exp it is an
    *estimate*, optimistic by about ``iw_bias_nats`` (Jensen);
    ``iw_bias_nats``: (B,) that bias for the noise of ``log p`` as measured from its estimated variance
    (:func:`importance_weighted`; 0 when :attr:`iw_is_bound`; NaN with one probe per solve and the solver's
    integral, whose spread is unknown);
    ``latent_nats``: (B,) the latent cost included (0 without a latent); ``nfe``: (B,) drift evaluations per ODE
    solve the image took part in (mean over its ``K`` draws); ``seconds_per_image``: wall-clock seconds per image
    of the call.
    """

    nll_nats: Tensor
    bpd: Tensor
    nll_var_nats: Tensor
    iw_nll_nats: Tensor
    iw_bpd: Tensor
    iw_bias_nats: Tensor
    iw_is_bound: bool
    latent_nats: Tensor
    nfe: Tensor
    seconds_per_image: float


def standard_normal_log_density(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` summed per example: (B, ...) -> (B,) nats."""
    return -0.5 * (x.square() + math.log(2 * math.pi)).flatten(1).sum(1)


def _settings(settings: ODESettings | None, options: dict[str, Any]) -> ODESettings:
    """``settings`` (None: :class:`~mulan.ode.ODESettings`'s defaults) with the fields named in ``options`` replaced
    (checked again: a bad value raises here)."""
    return dataclasses.replace(settings or ODESettings(), **options)


@torch.no_grad()
def ode_log_density(
    model: DiffusionModel,
    x: Tensor,
    ctx: Context | Tensor | None = None,
    settings: ODESettings | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **options: Any,
) -> ODELogDensity:
    """``log p(x | ctx)`` of continuous data ``x`` (B, C, H, W) under the probability-flow ODE, in nats.

    For a process with auxiliary variables ``x`` is the whole state at ``t = 0``, (B, *state_shape): the data and
    the auxiliaries' initial values (:meth:`~mulan.processes.ForwardProcess.initial_auxiliaries`), and ``log p`` is
    their joint log-density.

    ``settings`` (:class:`~mulan.ode.ODESettings`; default: its defaults), with any of its fields given by name in
    ``options`` in their place (``rtol=1e-4``); ``num_draws`` and ``solve_batch_size`` are not used here.

    Integrates the augmented state ``(x_t, int_0^t div dt)`` from t = 0 (the data end) to t = 1 and returns
    ``log p(x) = log N(x_1; 0, I) + int_0^1 div(drift) dt`` (change of variables: ``d/dt log p_t(x_t) = -div``).
    The divergence is exact (``exact_divergence=True``, ``D`` vector-Jacobian products per evaluation) or a
    Hutchinson estimate with ``num_probes`` Rademacher probes drawn from ``generator`` and held fixed for the whole
    solve, each integrated on its own: each gives an unbiased estimate of ``log p(x)`` (up to the solver's error;
    not of ``p(x)``), ``log_p`` is their mean and their spread estimates its variance (``log_p_var``). More probes
    cost one more vector-Jacobian product each per evaluation, not another solve. Solver:
    :func:`mulan.ode_solver.solve` (dopri5 at ``rtol``/``atol`` in ``dtype``, TF32 off, autocast off outside the
    denoiser).

    ``time_variable``: ``"t"`` integrates in the process's time; ``"log_snr"`` in the normalised mean log-SNR time
    ``u`` of :class:`mulan.ode.LogSNRTime` (a change of the integration variable only: the same ``log p``, the
    divergence scaled by the same ``dt/du`` as the drift, so it stays exact; ``nfe`` counts the evaluations of
    that solve).

    ``divergence_atol``: the error control of the log-density integral (nats per image and probe). ``None``: the
    same ``rtol``/``atol`` as the state. A number: that absolute tolerance and no relative one (the integral is
    thousands of nats, so ``rtol`` alone would ask for hundredths of a nat). ``math.inf``: not controlled, the
    steps are those the trajectory alone needs and the integral is the dopri5 quadrature on them (docs:
    evaluation, "Error control of the divergence integral").

    ``divergence_samples`` (an even ``M``): the integral by stratified Monte Carlo instead of by the solver
    (:func:`mulan.ode.sampled_divergence_integral`): the trajectory alone is solved at ``rtol``/``atol`` (no
    divergence, no vector-Jacobian product), and the divergence is evaluated at ``M`` times, one uniform in each of
    the strata ``[i/M, (i+1)/M)`` and drawn for each example on its own (:func:`mulan.ode.stratified_times`), at
    the trajectory's dense output (:func:`mulan.ode_solver.solve_at`), with fresh probes at each: the examples'
    estimates are independent.
    ``log_p`` stays an unbiased estimate of ``log p(x)`` up to the trajectory's error, ``log_p_var`` is a
    conservative estimate of its variance (also with one probe) and ``nfe`` counts both the trajectory's
    evaluations and the ``M``."""
    s = _settings(settings, options)
    if tuple(x.shape[1:]) != tuple(model.process.state_shape):
        raise ValueError(
            f"x must be a state of the process, (B, {', '.join(map(str, model.process.state_shape))}); got "
            f"{tuple(x.shape)}. With auxiliary variables, append their initial draw "
            "(process.initial_auxiliaries)."
        )
    ctx = as_context(ctx)
    x = x.to(s.dtype)
    f = ode.drift_in(model, ctx, s.time_variable, x.shape[0], s.dtype, x.device)
    if s.divergence_samples is not None:
        times = stratified_times(s.divergence_samples, x, generator)  # (B, M): each row its own times
        states, x_1, trajectory_nfe = solve_at(f, x, times, s.rtol, s.atol, progress, "ODE trajectory")
        integral, variance = sampled_divergence_integral(
            f, times, states, None if s.exact_divergence else s.num_probes, generator
        )
        log_p = standard_normal_log_density(x_1) + integral
        return ODELogDensity(log_p, variance, x_1, trajectory_nfe + s.divergence_samples)
    probes = None if s.exact_divergence else rademacher_like(x, generator, s.num_probes)

    def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        velocity, div = ode.drift_and_divergence(f, t, state[0], probes)
        return velocity, div.to(s.dtype)

    width = 1 if probes is None else s.num_probes
    rtols, atols = s.tolerances
    (x_1, integrals), nfe = solve(
        augmented, (x, x.new_zeros(x.shape[0], width)), 0.0, 1.0, rtols, atols, progress, "ODE likelihood"
    )
    log_p = standard_normal_log_density(x_1)[:, None] + integrals  # (B, P)
    if probes is None:
        variance = torch.zeros_like(log_p[:, 0])
    elif s.num_probes == 1:
        variance = torch.full_like(log_p[:, 0], math.nan)
    else:
        variance = log_p.var(1) / s.num_probes
    return ODELogDensity(log_p.mean(1), variance, x_1, nfe)


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


JENSEN_SAMPLES = 1024
"""Monte Carlo draws behind :func:`importance_weighted`'s bias estimate."""


def importance_weighted(log_w: Tensor, log_w_var: Tensor) -> tuple[Tensor, Tensor]:
    """``logmeanexp_k log_w`` over the leading dimension of ``log_w`` (K, B), and the optimistic bias it has when
    the ``log_w`` are noisy unbiased estimates with variances ``log_w_var`` (K, B) (Hutchinson's ``log p``).

    The bias is ``E[logmeanexp_k e_k]`` for independent ``e_k ~ N(0, Var_k)``, the Jensen gap at equal importance
    weights, computed by Monte Carlo (:data:`JENSEN_SAMPLES` draws from a fixed seed, so the global random state is
    untouched). It is 0 for ``K = 1``, about ``(1 - 1/K) Var / 2`` for small noise and about ``sd sqrt(2 log K) -
    log K`` for large noise, where the largest draw dominates (docs: math, section 6). Equal weights are what
    noisy weights cannot be told apart from; plugging the noisy weights in instead would underestimate the gap.
    Returns two (B,) tensors."""
    num = log_w.shape[0]
    log_mean = torch.logsumexp(log_w, 0) - math.log(num)
    if num == 1:
        return log_mean, torch.zeros_like(log_mean)
    g = torch.Generator(device=log_w.device).manual_seed(0)
    noise = torch.randn(JENSEN_SAMPLES, num, 1, generator=g, device=log_w.device, dtype=torch.float64)
    noise = noise * log_w_var.double().sqrt()  # (S, K, B): the same draws for every image
    # minus the mean over k, whose expectation is 0: the same gap with far less Monte Carlo noise for small noise
    gap = (torch.logsumexp(noise, 1) - math.log(num) - noise.mean(1)).mean(0)
    return log_mean, gap.to(log_w.dtype)


def _repeat_rows(value: Tensor, times: int, batch_size: int) -> Tensor:
    """``value`` with its batch dimension repeated ``times`` (draw-major), unless it broadcasts over the batch."""
    if value.shape[0] != batch_size:
        return value
    return value.repeat(times, *([1] * (value.dim() - 1)))


@torch.no_grad()
def ode_likelihood(
    model: DiffusionModel,
    images: Tensor,
    y: Tensor | None = None,
    settings: ODESettings | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **options: Any,
) -> ODELikelihood:
    """Bits/dim of 8-bit images by the probability-flow ODE with truncated-normal dequantisation.

    For each image (uint8 (B, C, H, W)): draw ``z ~ q(z | x)`` once (``model.latent``; MuLAN's ODE is
    conditioned on ``z``), then ``K = num_draws`` dequantisations ``x~_k ~ q(x~ | x)`` (:func:`dequantise`,
    truncated normal of scale ``sigma_0``, inside the bin), each with its own log-density
    (:func:`ode_log_density`; the ``B K`` rows are solved together, ``solve_batch_size`` rows per solve, default
    all). Because ``q`` is supported in the pixel's bin, ``P(k | z) = E_q[p(x~ | z) / q(x~ | x)]``, so by Jensen,
    with ``log w_k = log p(x~_k | z) - log q(x~_k | x)`` and ``kl`` the latent's honest cost (``log C(m, k)`` for a
    k-hot latent, docs: math, section 3),

        -log P(k) <= kl - logmeanexp_k log w_k <= kl - mean_k log w_k                  (nats)

    Both right-hand sides are bounds when ``log p`` is exact. With Hutchinson's ``log p`` (an unbiased estimate
    of ``log p``, not of ``p``) only the last one stays a bound in expectation: inside the log-mean-exp the probe
    noise biases the result optimistically by about half its variance (+1.3 nats at ``K = 5`` on an 8-dimensional
    Gaussian). So ``nll_nats`` is the importance-weighted bound with ``exact_divergence=True`` and the mean of the
    single-draw bounds otherwise; the importance-weighted form is always returned too (``iw_nll_nats``), with its
    estimated bias (``iw_bias_nats``, which needs ``num_probes >= 2``). Both densities are in the data units
    ``[-1, 1]``, so no further offset enters: the bin width ``2/256`` is already inside ``log q``. For scale: per
    dimension ``log2 q`` averages ``-log2 sigma_0 - log2(Phi(3) - Phi(-3)) + E[log2 phi(u)] = 9.594 + 0.004 - 2.028
    = 7.57`` bits at ``gamma_min = -13.3``. ``BPD = nll / (D ln 2)``.

    Processes with auxiliary variables (docs: math, section 11e): each draw ``k`` also draws the auxiliaries'
    start ``v_k ~ q(v_0)`` (:meth:`~mulan.processes.ForwardProcess.initial_auxiliaries`), the ODE gives the joint
    ``log p(x~_k, v_k | z)`` and ``log q(v_k)`` joins ``log q``: ``log w_k = log p(x~_k, v_k | z) - log q(x~_k | x)
    - log q(v_k)``. Since ``int p(x~, v | z) dv = p(x~ | z)``, ``P(k | z) = E_q[p(x~, v | z) / (q(x~ | x) q(v))]``
    and the same two bounds hold; ``D`` stays the data's dimension.

    Call it on a model in eval mode (dropout would make the ODE's right-hand side random). Returns an
    :class:`ODELikelihood`. The options are those of ``settings`` (:class:`~mulan.ode.ODESettings`; default: its
    defaults), any of its fields given by name in ``options`` in their place (``num_draws=4, rtol=1e-4``); solver
    options as in :func:`ode_log_density`. The dequantisation, the latent and the bound do not depend on the time
    variable. With ``divergence_samples`` each ``log p`` is an unbiased estimate (sampled times), so ``nll_nats`` is
    the mean of the single-draw bounds even with the exact divergence."""
    model.check_images(images)
    s = _settings(settings, options)
    num_draws, dtype = s.num_draws, s.dtype
    start = time.perf_counter()
    b = images.shape[0]
    ctx, latent_cost, _ = model.encode(elbo.to_unit_interval(images), y)
    scale = _repeat_rows(dequantisation_scale(model, ctx, b), num_draws, b)
    x_tilde, log_q = dequantise(_repeat_rows(images, num_draws, b), scale, generator, dtype)  # row k B + i
    state, log_q_aux = model.process.initial_auxiliaries(x_tilde, generator)
    log_q = log_q + log_q_aux
    z, cond = (None if v is None else _repeat_rows(v, num_draws, b) for v in (ctx.z, ctx.y))
    step = s.solve_batch_size or state.shape[0]
    log_p, log_p_var, nfe = [], [], []
    for rows in torch.arange(state.shape[0], device=images.device).split(step):
        rows_ctx = Context(z=None if z is None else z[rows], y=None if cond is None else cond[rows])
        part = ode_log_density(model, state[rows], rows_ctx, s, generator=generator, progress=progress)
        log_p.append(part.log_p)
        log_p_var.append(part.log_p_var)
        nfe.append(torch.full((rows.numel(),), float(part.nfe), device=images.device))
    log_w = (torch.cat(log_p) - log_q).view(num_draws, b)
    log_w_var = torch.cat(log_p_var).view(num_draws, b)
    latent_nats = latent_cost.to(dtype)
    log_mean, bias = importance_weighted(log_w, log_w_var)
    exact_log_p = s.exact_log_p  # no noise in log p: the log-mean-exp is a bound
    iw_is_bound = exact_log_p or num_draws == 1
    iw_nll = latent_nats - log_mean
    nll = iw_nll if exact_log_p else latent_nats - log_w.mean(0)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    seconds = (time.perf_counter() - start) / b
    return ODELikelihood(
        nll_nats=nll,
        bpd=model.bpd(nll),
        nll_var_nats=torch.zeros_like(nll) if exact_log_p else log_w_var.mean(0) / num_draws,
        iw_nll_nats=iw_nll,
        iw_bpd=model.bpd(iw_nll),
        iw_bias_nats=torch.zeros_like(bias) if iw_is_bound else bias,
        iw_is_bound=iw_is_bound,
        latent_nats=latent_nats,
        nfe=torch.cat(nfe).view(num_draws, b).mean(0).to(dtype),
        seconds_per_image=seconds,
    )


def ode_likelihood_dataset(model: DiffusionModel, batches: Iterable[Tensor], **options) -> ODELikelihood:
    """:func:`ode_likelihood` over uint8 batches, concatenated per image (``options`` are passed on)."""
    device = next(model.parameters()).device
    parts = [ode_likelihood(model, batch.to(device), **options) for batch in batches]
    total = sum(p.nll_nats.shape[0] for p in parts)
    seconds = sum(p.seconds_per_image * p.nll_nats.shape[0] for p in parts) / total
    names = ("nll_nats", "bpd", "nll_var_nats", "iw_nll_nats", "iw_bpd", "iw_bias_nats", "latent_nats", "nfe")
    cat = {name: torch.cat([getattr(p, name) for p in parts]) for name in names}
    return ODELikelihood(**cat, iw_is_bound=parts[0].iw_is_bound, seconds_per_image=seconds)
