"""Sampling from a :class:`~mulan.model.DiffusionModel`: ancestral (docs: math, section 5) and by the ODE (6).

Both samplers go through the model's forward process (:meth:`~mulan.processes.ForwardProcess.ancestral_step`,
:meth:`~mulan.processes.ForwardProcess.ode_drift`), so they serve VDM's scalar schedule, MuLAN's per-dimension
schedule and any other process alike. The latent ``z`` is drawn from the prior ``p(z)`` unless given; a
conditional model takes its conditioning input ``y``. Process arithmetic runs in float32 (or float64 where asked)
with autocast disabled; only the denoiser may run in lower precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from mulan import elbo, ode
from mulan.model import DiffusionModel
from mulan.ode_solver import solve
from mulan.processes.base import Context, Marginal
from mulan.utils import float32_region, module_device, progress_bar


@dataclass
class SampleResult:
    """What a sampler returns.

    ``samples``: uint8 (N, C, H, W) when decoded, else the continuous ``x_0`` (N, *state_shape); ``z``: the latent
    used, (N, m) or None; ``nfe``: denoiser evaluations (one per step for the ancestral sampler; the solver's
    evaluations for :func:`ode_sample`, shared by the batch since it is solved as one system).
    """

    samples: Tensor
    z: Tensor | None
    nfe: int


def prior_latent(
    model: DiffusionModel, num_samples: int, device: torch.device, generator: torch.Generator | None
) -> Tensor | None:
    """``z ~ p(z)`` (N, m) or None. With a ``generator`` the draw is reproducible: the global RNG is forked and
    seeded from the generator, so the latent's own ``sample_prior`` (which uses the global RNG) stays untouched."""
    if generator is None:
        return model.latent.sample_prior(num_samples, device)
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return model.latent.sample_prior(num_samples, device)


def sampling_context(
    model: DiffusionModel,
    num_samples: int,
    z: Tensor | None,
    y: Tensor | None,
    device: torch.device | str | None,
    generator: torch.Generator | None,
) -> tuple[Context, torch.device]:
    """The :class:`Context` of a sampling call (``z`` from the prior unless given) and the device to sample on."""
    device = torch.device(device) if device is not None else module_device(model)
    z = prior_latent(model, num_samples, device, generator) if z is None else z.to(device)
    if y is not None and y.shape[0] != num_samples:
        raise ValueError(f"y has {y.shape[0]} conditioning inputs for {num_samples} samples; give one per sample.")
    return Context(z=z, y=None if y is None else y.to(device)), device


@torch.no_grad()
def ancestral_sample(
    model: DiffusionModel,
    num_samples: int,
    steps: int = 256,
    z: Tensor | None = None,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    decode: str | None = "argmax",
    progress: bool = False,
    device: torch.device | str | None = None,
) -> SampleResult:
    """Ancestral sampling with ``steps`` = T equal steps from t = 1 to t = 0, then the process's decoder.

    ``x_1 ~ p(x_1)``; each step is the process's ``p(x_s | x_t)``; at t = 0 the decoder gives the pixel values
    (``decode="argmax"`` or ``"sample"``), or ``decode=None`` returns the continuous ``x_0``. All randomness comes
    from ``generator`` when given (it must live on the sampling ``device``, default: the model's). The model runs
    in whatever train/eval mode it is in. Returns a :class:`SampleResult` (``nfe = steps``).
    """
    elbo.check_decode_mode(decode)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    ctx, device = sampling_context(model, num_samples, z, y, device, generator)
    process, predict = model.process, model.predictor(ctx)
    x = process.prior_sample(num_samples, ctx, generator).to(device)
    ones = torch.ones(num_samples, device=device)
    with progress_bar(steps, "ancestral sampling", progress) as advance:
        for i in range(steps, 0, -1):
            noise = torch.randn(x.shape, device=device, generator=generator)
            x = process.ancestral_step(x, ones * (i / steps), ones * ((i - 1) / steps), ctx, predict, noise)
            advance(1)
    return SampleResult(process.decode(x, ctx, decode, generator), ctx.z, steps)


@torch.no_grad()
def dpm_solver_sample(
    model: DiffusionModel,
    num_samples: int,
    steps: int = 32,
    z: Tensor | None = None,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    decode: str | None = "argmax",
    progress: bool = False,
    device: torch.device | str | None = None,
    order: int = 2,
    x_1: Tensor | None = None,
    stochastic: bool = False,
) -> SampleResult:
    """Few-step sampling: DPM-Solver++ (Lu et al. 2022) on the probability-flow ODE (or the reverse SDE), then decode.

    The exponential integrator of the ODE in the data prediction ``x_hat = (x_t - sigma_t eps_hat) / alpha_t``,
    element-wise per dimension, so it serves scalar and per-dimension (MuLAN) schedules alike: with
    ``h = (gamma_t - gamma_s) / 2`` per dimension (the step in ``log(alpha / sigma)``), a step ``t -> s`` is

        x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - exp(-h)) D

    with ``D = x_hat_t`` (``order=1``: DDIM) or the multistep second-order ``D = (1 + 1/(2r)) x_hat_t - x_hat_prev /
    (2r)``, ``r = h_prev / h`` (``order=2``, "2M"; first order on the first step, and on the last when ``steps <
    15``). The linear part of the ODE is integrated exactly, so a few dozen equal steps in ``t`` (equal steps in
    log-SNR for VDM's linear schedules) give samples close to the ODE's, at one denoiser call per step instead of
    the adaptive solver's hundreds to thousands (:func:`ode_sample`). ``x_1 ~ p(x_1)`` unless given;
    ``decode`` as in :func:`ancestral_sample`. Needs a process of the form ``x_t = alpha x + sigma eps``. Returns a
    :class:`SampleResult` (``nfe = steps``).

    ``stochastic=True`` solves the reverse SDE instead (SDE-DPM-Solver++, "2M SDE"), a step being

        x_s = (sigma_s / sigma_t) exp(-h) x_t + alpha_s (1 - exp(-2h)) D + sigma_s sqrt(1 - exp(-2h)) noise

    with ``D`` as above and fresh standard-normal ``noise`` (from ``generator``). Its first-order form is the
    ancestral step ``q(x_s | x_t, x = x_hat_t)`` itself, so ``order=1`` equals :func:`ancestral_sample`; the
    second-order term corrects ``x_hat`` as the deterministic sampler does. The fresh noise at every step
    corrects errors of an imperfect denoiser that the deterministic ODE carries along.
    """
    elbo.check_decode_mode(decode)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (DDIM) or 2 (DPM-Solver++ 2M), got {order}.")
    ctx, device = sampling_context(model, num_samples, z, y, device, generator)
    process, predict = model.process, model.predictor(ctx)
    x = process.prior_sample(num_samples, ctx, generator) if x_1 is None else x_1
    x = x.to(device, torch.float32)
    ones = torch.ones(num_samples, device=device)
    previous: tuple[Tensor, Tensor] | None = None  # (x_hat, h) of the step before

    def marginal(t: float) -> tuple[Marginal, Tensor, Tensor]:
        m = process.marginal(ones * t, ctx)
        if m.alpha is None or m.sigma is None:
            raise ValueError(
                f"{type(process).__name__} is not of the form x_t = alpha x + sigma eps: use ancestral_sample or "
                "ode_sample."
            )
        return m, m.alpha, m.sigma

    m_t, alpha_t, sigma_t = marginal(1.0)
    with progress_bar(steps, "DPM-Solver sampling", progress) as advance:
        for i in range(steps, 0, -1):
            eps_hat = predict(x, m_t)  # the denoiser may run under autocast; the arithmetic below is float32
            with float32_region(x):
                x_hat = (x - sigma_t * eps_hat) / alpha_t
                m_s, alpha_s, sigma_s = marginal((i - 1) / steps)
                h = 0.5 * (m_t.gamma - m_s.gamma)
                data = x_hat
                if order == 2 and previous is not None and not (i == 1 and steps < 15):
                    half_inverse_r = 0.5 * h / previous[1]
                    data = (1 + half_inverse_r) * x_hat - half_inverse_r * previous[0]
                if stochastic:
                    kept = -torch.expm1(-2 * h)  # 1 - exp(-2h) = 1 - SNR_t / SNR_s
                    noise = torch.randn(x.shape, device=device, generator=generator)
                    x = (sigma_s / sigma_t) * torch.exp(-h) * x + alpha_s * kept * data + sigma_s * kept.sqrt() * noise
                else:
                    x = (sigma_s / sigma_t) * x - alpha_s * torch.expm1(-h) * data
            previous, (m_t, alpha_t, sigma_t) = (x_hat, h), (m_s, alpha_s, sigma_s)
            advance(1)
    return SampleResult(process.decode(x, ctx, decode, generator), ctx.z, steps)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "ancestral": ancestral_sample,
    "dpm_solver": dpm_solver_sample,
    "dpm_solver_sde": partial(dpm_solver_sample, stochastic=True),
}
"""The step samplers by name (``sampler:`` in the callbacks): ``model, num_samples, steps=...`` in, a
:class:`SampleResult` out."""


@torch.no_grad()
def ode_encode(
    model: DiffusionModel,
    x_0: Tensor,
    z: Tensor | None = None,
    y: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, int]:
    """Map continuous data ``x_0`` (N, *state_shape) to its code ``x_1`` by the ODE, t = 0 -> 1: ``(x_1, nfe)``."""
    ctx = Context(z=z, y=y)
    return solve(ode.drift(model, ctx), x_0.to(dtype), 0.0, 1.0, rtol, atol)


@torch.no_grad()
def ode_sample(
    model: DiffusionModel,
    num_samples: int,
    z: Tensor | None = None,
    y: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    x_1: Tensor | None = None,
    generator: torch.Generator | None = None,
    decode: str | None = "argmax",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> SampleResult:
    """Deterministic sampling: integrate the probability-flow ODE from t = 1 to t = 0, then decode.

    ``x_1 ~ p(x_1)`` unless given (N, *state_shape). The solver is dopri5 at ``rtol``/``atol`` in ``dtype``
    (float32 or float64). ``decode`` as in :func:`ancestral_sample`. Returns a :class:`SampleResult` whose ``nfe``
    counts the solver's evaluations of the denoiser (each on the whole batch).
    """
    elbo.check_decode_mode(decode)
    ctx, device = sampling_context(model, num_samples, z, y, device, generator)
    if x_1 is None:
        x_1 = model.process.prior_sample(num_samples, ctx, generator)
    x_0, nfe = solve(ode.drift(model, ctx), x_1.to(device, dtype), 1.0, 0.0, rtol, atol, progress, "ODE sampling")
    return SampleResult(model.process.decode(x_0, ctx, decode, generator), ctx.z, nfe)
