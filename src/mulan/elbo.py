"""The terms of the variational bound, per example, in nats (docs: math, section 4).

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


_BIN_CENTRES: dict[torch.device, Tensor] = {}


def bin_centres(device: torch.device | None = None) -> Tensor:
    """The 256 bin centres ``e(v)``, shape (256,) (built once per device, not per step; do not modify)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    centres = _BIN_CENTRES.get(device)
    if centres is None:
        centres = _BIN_CENTRES[device] = to_unit_interval(torch.arange(NUM_BINS, device=device))
    return centres


def sum_per_example(values: Tensor) -> Tensor:
    """Sum over all but the first dimension: (B, ...) -> (B,)."""
    return values.flatten(1).sum(1)


def decoder_logits(z_tilde: Tensor, gamma_0: Tensor) -> Tensor:
    """Logits of the 256-way decoder ``p(x | z_0)``: ``-(z~ - e(v))^2 / (2 exp(gamma_0))``, shape (..., 256).

    ``z_tilde = z_0 / alpha_0`` (B, C, H, W); ``gamma_0`` broadcastable to it.
    """
    diff = z_tilde.unsqueeze(-1) - bin_centres(z_tilde.device)
    # ``-0.5 * d^2 * s`` as ``d^2 * (-0.5 s)``: bit-identical (a factor 0.5 is exact), one pass less over (..., 256)
    return diff.square() * (-0.5 * torch.exp(-gamma_0)).unsqueeze(-1)


DECODE_MODES = ("argmax", "sample", None)
"""How samplers and :meth:`~mulan.processes.ForwardProcess.decode` turn the state at ``t = 0`` into data: the most
probable bin, a draw from the decoder, or (``None``) the continuous values themselves."""


def check_decode_mode(mode: str | None) -> None:
    """Refuse a ``decode`` mode that is not one of :data:`DECODE_MODES`, in one line."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be 'argmax', 'sample' or None, got {mode!r}.")


def decode_bins(
    z_tilde: Tensor, gamma_0: Tensor, mode: str | None = "argmax", generator: torch.Generator | None = None
) -> Tensor:
    """The 256-way decoder ``p(x | z_0)`` read out at ``z~ = z_0 / alpha_0`` (N, C, H, W), float32, with
    ``gamma_0`` broadcastable to it: the most probable bin (``mode="argmax"``) or a draw from the decoder
    (``"sample"``, from ``generator``), as uint8 values ``k`` (N, C, H, W). ``mode=None`` is the caller's (it keeps
    the continuous values) and is refused here, as is any other mode."""
    if mode not in ("argmax", "sample"):
        check_decode_mode(mode)
        raise ValueError("decode_bins: mode=None keeps the continuous values; the caller returns them itself.")
    logits = decoder_logits(z_tilde, gamma_0)  # (N, C, H, W, 256)
    if mode == "argmax":
        values = logits.argmax(-1)
    else:
        probs = torch.softmax(logits, -1).reshape(-1, NUM_BINS)
        values = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
    return values.to(torch.uint8)


UNDERFLOW_MARGIN = 110.0
"""Logits more than this below the largest one add exactly 0 to a float32 softmax sum (``exp(-103.98)`` is
below the smallest float32 subnormal), so the decoder may skip them without changing its value."""


def decoder_window(gamma_0: Tensor) -> int | None:
    """Half-width ``W`` (in bins) of the window around the nearest bin outside which every decoder logit is more
    than :data:`UNDERFLOW_MARGIN` below the largest one; ``None`` when the window would not be smaller than 256.

    For a bin ``j`` with ``|j - n| > W`` from the nearest bin ``n`` (spacing ``d = 2/256``):
    ``(z~ - e_j)^2 - (z~ - e_n)^2 >= W (W + 1) d^2`` (``z~`` inside ``[-1, 1]`` or beyond the edge bin), so its
    logit is below the largest by at least ``W (W + 1) d^2 / (2 exp(gamma_0))``; choose ``W`` to make that
    ``>= UNDERFLOW_MARGIN``. At ``gamma_0 = -13.3``: ``W = 3``, seven bins instead of 256.
    """
    largest = float(gamma_0.detach().max())  # one host sync per call on a GPU (negligible against a step)
    if not largest < 0.0:  # nan, or a window as wide as the data range: the full form
        return None
    spacing = 2.0 / NUM_BINS
    ratio = 2 * UNDERFLOW_MARGIN * math.exp(largest) / spacing**2
    half_width = math.ceil((math.sqrt(1 + 4 * ratio) - 1) / 2)
    return half_width if 2 * half_width + 1 < NUM_BINS else None


def reconstruction_loss(images: Tensor, gamma_0: Tensor, noise: Tensor | None = None) -> Tensor:
    """``-log p(x | z_0)`` with ``z~ = x + exp(gamma_0 / 2) eps_0``; ``images`` uint8 (B, C, H, W). (B,) nats.

    The 256-way softmax is evaluated on the few bins around ``z~`` whose logits can reach a float32 sum
    (:func:`decoder_window`): the same value, to float32 rounding, as the full ``log_softmax`` over 256 bins
    (kept as the fallback for large ``gamma_0``), at a fraction of the cost and with the same gradient.

    Under ``torch.compile`` the window's width, which depends on the value of ``gamma_0`` (a host read: a graph
    break and a device sync), is not computed: the compiled graph takes the logsumexp over all 256 bins, which a
    fusing compiler reduces without storing the (..., 256) logits; eager calls are unchanged.
    """
    x = to_unit_interval(images)
    noise = torch.randn_like(x) if noise is None else noise
    z_tilde = x + torch.exp(0.5 * gamma_0) * noise
    if torch.compiler.is_compiling():  # the same value to float32 rounding, in one graph
        logits = decoder_logits(z_tilde, gamma_0)
        return sum_per_example(torch.logsumexp(logits, dim=-1) - (z_tilde - x).square() * (-0.5 * torch.exp(-gamma_0)))
    half_width = decoder_window(gamma_0)
    if half_width is None:
        log_probs = torch.log_softmax(decoder_logits(z_tilde, gamma_0), dim=-1)
        return -sum_per_example(log_probs.gather(-1, images.long().unsqueeze(-1)).squeeze(-1))
    size = 2 * half_width + 1
    with torch.no_grad():
        nearest = ((z_tilde + 1) * (NUM_BINS / 2) - 0.5).round().clamp_(0, NUM_BINS - 1)
        start = (nearest - half_width).clamp_(0, NUM_BINS - size)
        offsets = torch.arange(size, device=x.device, dtype=x.dtype)
        centres = to_unit_interval(start.unsqueeze(-1) + offsets)  # e(v) of the window, as bin_centres computes it
    scale = -0.5 * torch.exp(-gamma_0)
    logits = (z_tilde.unsqueeze(-1) - centres).square() * scale.unsqueeze(-1)
    target = (z_tilde - x).square() * scale  # the logit of the true bin (e(k) = x), inside the window or not
    return sum_per_example(torch.logsumexp(logits, dim=-1) - target)


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


def discretise_times(t: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Map ``t`` in [0, 1) to the grid ``t = (floor(t T) + 1) / T`` and ``s = t - 1/T``."""
    t_grid = (torch.floor(t * steps) + 1) / steps
    return t_grid, t_grid - 1.0 / steps


def nats_to_bpd(nats: Tensor, num_dims: int) -> Tensor:
    """Nats per example to bits per dimension."""
    return nats / (num_dims * math.log(2.0))
