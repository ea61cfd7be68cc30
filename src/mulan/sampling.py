"""Sampling from a :class:`~mulan.model.DiffusionModel`: ancestral (MATH.md section 5) and by the ODE (6).

Both samplers work element-wise per data dimension, so they serve VDM's scalar schedule and MuLAN's
per-dimension schedule ``gamma(t, z)`` alike. The latent ``z`` is drawn from the prior ``p(z)`` unless given.
The schedule, ``alpha``, ``sigma``, the update rules and the ODE run in float32 (or float64 where asked) with
autocast disabled; only the denoiser may run in lower precision.

**The probability-flow ODE.** The forward process ``x_t = alpha_t x + sigma_t eps`` with
``sigma^2 = sigmoid(gamma)``, ``alpha^2 = sigmoid(-gamma)`` has, per dimension, the marginals of the SDE
``dx = f x dt + g dW`` with

    f   = d log(alpha) / dt = -1/2 sigma^2 gamma'
    g^2 = d(sigma^2)/dt - 2 f sigma^2 = sigma^2 alpha^2 gamma' + sigma^4 gamma' = sigma^2 gamma'

(``gamma' = dgamma/dt``). Its probability-flow ODE ``dx/dt = f x - 1/2 g^2 score`` with the score
``-eps_hat / sigma`` is

    dx/dt = 1/2 sigma_t * gamma'_t * (eps_hat(x, z, t) - sigma_t * x)          (element-wise)

which moves data (t = 0) to noise (t = 1) with the marginals of the forward process.
:func:`probability_flow_drift` implements it; :mod:`mulan.likelihood` integrates it with its divergence."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mulan import elbo
from mulan.model import DiffusionModel
from mulan.utils import float32_region

DECODE_MODES = ("argmax", "sample", None)


@dataclass
class SampleResult:
    """What a sampler returns.

    ``samples``: uint8 (N, C, H, W) when decoded, else the continuous ``x_0`` float (N, C, H, W) in data units
    (about [-1, 1]); ``z``: the latent used, (N, m) or None; ``nfe``: number of denoiser evaluations (one per
    step for the ancestral sampler; the ODE solver's function evaluations for :func:`ode_sample`, shared by
    the whole batch since it is solved as one system).
    """

    samples: Tensor
    z: Tensor | None
    nfe: int


# ----------------------------------------------------------------------------------------------------
# shared helpers


def schedule_at(
    model: DiffusionModel, t: Tensor, z: Tensor | None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``(gamma, dgamma_dt)`` of the model's schedule at times ``t`` (B,), in ``dtype``, autocast off.

    float32 goes through the schedule's own ``forward``; float64 evaluates ``gamma_and_derivative`` on float64
    times (the schedule's parameters stay as they are; the arithmetic in ``t`` is then float64).
    """
    schedule = model.schedule
    if dtype == torch.float32:
        return schedule(t, z)
    with float32_region(t):
        gamma, dgamma = schedule.gamma_and_derivative(t.to(dtype).reshape(-1, 1, 1, 1), z)
    return gamma.to(dtype), dgamma.to(dtype)


def denoise(model: DiffusionModel, x_t: Tensor, gamma: Tensor, z: Tensor | None) -> Tensor:
    """``eps_hat(x_t, gamma, z)`` returned in ``x_t``'s dtype (the input is cast to the denoiser's dtype)."""
    param = next((p for p in model.denoiser.parameters() if p.is_floating_point()), None)
    net_dtype = param.dtype if param is not None else x_t.dtype
    eps_hat = model.denoiser(x_t.to(net_dtype), gamma.to(net_dtype), z)
    return eps_hat.to(x_t.dtype)


def probability_flow_drift(model: DiffusionModel, x: Tensor, t: Tensor, z: Tensor | None) -> Tensor:
    """``dx/dt = 1/2 sigma_t gamma'_t (eps_hat(x, z, t) - sigma_t x)``, element-wise (module docstring).

    ``x``: (B, C, H, W) in float32 or float64; ``t``: scalar or (B,) time in [0, 1]. Returns (B, C, H, W) in
    ``x``'s dtype, data units per unit time. Differentiable in ``x`` (used for the divergence)."""
    t = t.to(x.dtype).expand(x.shape[0]) if t.dim() == 0 else t.to(x.dtype)
    with float32_region(x):
        gamma, dgamma = schedule_at(model, t, z, x.dtype)
        sigma = elbo.alpha_sigma(gamma)[1]
    eps_hat = denoise(model, x, gamma, z)
    with float32_region(x):
        return 0.5 * sigma * dgamma * (eps_hat - sigma * x)


def prior_latent(
    model: DiffusionModel, num_samples: int, device: torch.device, generator: torch.Generator | None
) -> Tensor | None:
    """``z ~ p(z)`` (N, m) or None. With a ``generator`` the draw is reproducible: the global RNG is forked
    and seeded from the generator, so the latent's own ``sample_prior`` (which uses the global RNG) stays
    untouched."""
    if generator is None:
        return model.latent.sample_prior(num_samples, device)
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return model.latent.sample_prior(num_samples, device)


def decode_images(
    model: DiffusionModel,
    x_0: Tensor,
    z: Tensor | None,
    mode: str | None = "argmax",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Map ``x_0`` (N, C, H, W) through the 256-way decoder ``p(x | z_0)`` (MATH.md section 4).

    ``z~ = x_0 / alpha_0``, logits ``-(z~ - e(v))^2 / (2 exp(gamma_0))``. ``mode``: ``"argmax"`` (the most
    likely value), ``"sample"`` (a draw from the decoder), or ``None`` (return ``x_0`` unchanged). Returns
    uint8 (N, C, H, W) values 0..255 (or ``x_0``)."""
    if mode is None:
        return x_0
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be 'argmax', 'sample' or None, got {mode!r}.")
    with float32_region(x_0):
        gamma_0 = model.schedule.endpoints(z, x_0.shape[0])[0].float()
        alpha_0 = elbo.alpha_sigma(gamma_0)[0]
        logits = elbo.decoder_logits(x_0.float() / alpha_0, gamma_0)  # (N, C, H, W, 256)
        if mode == "argmax":
            values = logits.argmax(-1)
        else:
            probs = torch.softmax(logits, -1).reshape(-1, elbo.NUM_BINS)
            values = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
    return values.to(torch.uint8)


@contextlib.contextmanager
def progress_bar(total: float, description: str, enabled: bool) -> Iterator[Callable[..., None]]:
    """A transient ``rich`` progress bar; yields ``advance(amount)`` (a no-op when ``enabled`` is False)."""
    if not enabled:
        yield lambda amount=1.0: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda amount=1.0: bar.advance(task, amount)


def _check_decode(mode: str | None) -> None:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be 'argmax', 'sample' or None, got {mode!r}.")


def _model_device(model: DiffusionModel) -> torch.device:
    tensor: Tensor | None = next(model.parameters(), None)
    tensor = tensor if tensor is not None else next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# ancestral sampling (MATH.md section 5)


def ancestral_step(
    model: DiffusionModel, x_t: Tensor, gamma_t: Tensor, gamma_s: Tensor, z: Tensor | None, noise: Tensor
) -> Tensor:
    """One step ``t -> s < t`` of ``p(x_s | x_t)``, element-wise per dimension.

    ``c = -expm1(gamma_s - gamma_t) = 1 - SNR_t / SNR_s`` and

        x_s = (alpha_s / alpha_t) (x_t - sigma_t c eps_hat) + sigma_s sqrt(c) noise

    ``x_t``, ``noise``: float32 (N, C, H, W); ``gamma_t``, ``gamma_s``: float32, broadcastable to ``x_t``.
    Returns float32 (N, C, H, W).
    """
    eps_hat = denoise(model, x_t, gamma_t, z)
    with float32_region(x_t):
        c = -torch.expm1(gamma_s - gamma_t)
        sigma_t, sigma_s = elbo.alpha_sigma(gamma_t)[1], elbo.alpha_sigma(gamma_s)[1]
        alpha_ratio = torch.exp(0.5 * (F.logsigmoid(-gamma_s) - F.logsigmoid(-gamma_t)))
        return alpha_ratio * (x_t - sigma_t * c * eps_hat) + sigma_s * c.clamp_min(0).sqrt() * noise


@torch.no_grad()
def ancestral_sample(
    model: DiffusionModel,
    num_samples: int,
    steps: int = 256,
    z: Tensor | None = None,
    generator: torch.Generator | None = None,
    decode: str | None = "argmax",
    progress: bool = False,
    device: torch.device | str | None = None,
) -> SampleResult:
    """Ancestral sampling with ``steps`` = T equal steps from t = 1 to t = 0, then the 256-way decoder.

    ``z ~ p(z)`` unless given (N, m); ``x_1 ~ N(0, I)``; each step is :func:`ancestral_step`; at t = 0 the
    decoder gives the pixel values (``decode="argmax"`` or ``"sample"``), or ``decode=None`` returns the
    continuous ``x_0`` (float32). All randomness comes from ``generator`` when given (reproducible). The model
    runs in whatever train/eval mode it is in. ``generator`` must live on the sampling ``device`` (default:
    the model's). Returns a :class:`SampleResult` (``nfe = steps``).
    """
    _check_decode(decode)
    device = torch.device(device) if device is not None else _model_device(model)
    z = prior_latent(model, num_samples, device, generator) if z is None else z.to(device)
    shape = (num_samples, *model.image_shape)
    x = torch.randn(shape, device=device, generator=generator)
    ones = torch.ones(num_samples, device=device)
    gamma_t = schedule_at(model, ones, z)[0]
    with progress_bar(steps, "ancestral sampling", progress) as advance:
        for i in range(steps, 0, -1):
            gamma_s = schedule_at(model, ones * ((i - 1) / steps), z)[0]
            noise = torch.randn(shape, device=device, generator=generator)
            x = ancestral_step(model, x, gamma_t, gamma_s, z, noise)
            gamma_t = gamma_s
            advance(1)
    return SampleResult(decode_images(model, x, z, decode, generator), z, steps)


# ----------------------------------------------------------------------------------------------------
# probability-flow ODE sampling (MATH.md section 6)


def integrate_probability_flow(
    model: DiffusionModel,
    x: Tensor,
    z: Tensor | None,
    t_start: float,
    t_end: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> tuple[Tensor, int]:
    """Solve the probability-flow ODE from ``t_start`` to ``t_end`` (either direction) with dopri5.

    ``x``: (N, C, H, W) at ``t_start``. ``t_start = 0, t_end = 1`` encodes data to noise; ``1 -> 0`` samples.
    The solver (``torchdiffeq.odeint``, adaptive RK45 "dopri5") runs batched on ``x``'s device with one step
    size for the batch, whose error is the worst per-example RMS error. Returns ``(x_end, nfe)``: the state at
    ``t_end`` in ``dtype`` and the number of drift evaluations.
    """
    from torchdiffeq import odeint

    nfe = 0
    span = abs(t_end - t_start)

    with progress_bar(span, "probability-flow ODE", progress) as advance:
        reached = 0.0  # the furthest distance from t_start evaluated so far (the bar's position)

        def func(t: Tensor, state: Tensor) -> Tensor:
            nonlocal nfe, reached
            nfe += 1
            distance = abs(float(t) - t_start) if progress else 0.0  # float(t) syncs: only for the bar
            if distance > reached:
                advance(distance - reached)
                reached = distance
            return probability_flow_drift(model, state, t, z)

        times = torch.tensor([t_start, t_end], dtype=dtype, device=x.device)
        with torch.no_grad(), tf32_disabled():
            path = odeint(
                func,
                x.to(dtype),
                times,
                rtol=rtol,
                atol=atol,
                method="dopri5",
                options={"norm": per_example_norm},
            )
    return path[-1], nfe


def per_example_norm(state: Tensor | tuple[Tensor, ...]) -> Tensor:
    """Error norm for a batched solve: the worst per-example RMS over the batch (and over tuple components).

    Every example is then integrated at least as accurately as if it were solved alone at the same tolerance.
    """
    parts = state if isinstance(state, tuple) else (state,)
    return torch.stack([p.reshape(p.shape[0], -1).square().mean(1).sqrt().max() for p in parts]).max()


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Turn TF32 matmuls/convolutions off (CUDA) for the duration; restore the previous settings after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@torch.no_grad()
def ode_encode(
    model: DiffusionModel,
    x_0: Tensor,
    z: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, int]:
    """Map continuous data ``x_0`` (N, C, H, W) to its code ``x_1`` by the ODE, t = 0 -> 1: ``(x_1, nfe)``."""
    return integrate_probability_flow(model, x_0, z, 0.0, 1.0, rtol, atol, dtype)


@torch.no_grad()
def ode_sample(
    model: DiffusionModel,
    num_samples: int,
    z: Tensor | None = None,
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

    ``z ~ p(z)`` unless given; ``x_1 ~ N(0, I)`` unless given (N, C, H, W). The solver is dopri5 at
    ``rtol``/``atol`` in ``dtype`` (float32 or float64). ``decode`` as in :func:`ancestral_sample` (``None``
    returns the continuous ``x_0`` in ``dtype``). Returns a :class:`SampleResult` whose ``nfe`` counts the
    solver's evaluations of the denoiser (each on the whole batch).
    """
    _check_decode(decode)
    device = torch.device(device) if device is not None else _model_device(model)
    z = prior_latent(model, num_samples, device, generator) if z is None else z.to(device)
    if x_1 is None:
        x_1 = torch.randn((num_samples, *model.image_shape), device=device, generator=generator)
    x_0, nfe = integrate_probability_flow(model, x_1.to(device), z, 1.0, 0.0, rtol, atol, dtype, progress)
    return SampleResult(decode_images(model, x_0, z, decode, generator), z, nfe)
