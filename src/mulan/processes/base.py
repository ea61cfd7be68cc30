"""The forward-process interface: ``q(x_t | x)`` and everything the bound, the samplers and the ODE need of it.

A forward process maps data ``x`` (B, C, H, W) in [-1, 1] at ``t = 0`` to noise at ``t = 1``. It may condition
on a :class:`Context`: the auxiliary latent ``z ~ q(z | x)`` (MuLAN) and an observed input ``y`` (CVDM). The
model never looks inside a process: it asks for

* :meth:`ForwardProcess.diffusion_loss` (the diffusion term of the bound, given a predictor of the noise),
* :meth:`ForwardProcess.prior_loss` (``KL(q(x_1 | x) || p(x_1))``) and
  :meth:`ForwardProcess.reconstruction_loss` (``-log p(x | x_0)`` of the 8-bit data),
* :meth:`ForwardProcess.prior_sample`, :meth:`ForwardProcess.ancestral_step`,
  :meth:`ForwardProcess.ode_drift`, :meth:`ForwardProcess.decode` and :meth:`ForwardProcess.initial_auxiliaries`
  for sampling and the likelihood.

The *state* ``x_t`` has shape ``(B, *state_shape)``: the image shape for the diagonal processes of VDM and MuLAN,
more channels for processes with auxiliary variables. The denoiser always returns a state-shaped output, which
the model's :mod:`parameterisation <mulan.parameterisation>` turns into the noise prediction ``eps_hat`` that every
process consumes (a :data:`Predictor`). All process arithmetic is float32 with autocast off (the math page,
section "Numerics"); only the denoiser inside a predictor may run in lower precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mulan.utils import module_device

ImageShape = tuple[int, int, int]
GAMMA_MIN = -13.3
"""VDM's ``gamma(0)`` (negative log-SNR at ``t = 0``): the default of every process and the denoiser's scale."""
GAMMA_MAX = 5.0
"""VDM's ``gamma(1)``."""


@dataclass
class Context:
    """What a process and the denoiser may condition on besides ``x_t`` and ``t``.

    ``z``: the auxiliary latent (B, m) or None; ``y``: an observed conditioning input (class labels (B,) or an image
    (B, C', H', W')) or None.
    """

    z: Tensor | None = None
    y: Tensor | None = None


def as_context(ctx: Context | Tensor | None) -> Context:
    """A :class:`Context` from a context, the latent ``z`` alone, or None (an empty context)."""
    if isinstance(ctx, Tensor):
        return Context(z=ctx)
    return ctx if ctx is not None else Context()


@dataclass
class Marginal:
    """Coefficients of ``q(x_t | x)`` at times ``t`` (float32, broadcastable to the state).

    ``gamma``: the negative log-SNR ``log(sigma^2 / alpha^2)`` of the data coordinates: (B, 1, 1, 1) for a scalar
    schedule, (B, C, H, W) for a per-dimension one; the denoiser's noise-level input. ``alpha``, ``sigma``: the
    scale of the data and of the noise in ``x_t = alpha * mean + sigma * eps`` (None for processes that are not of
    that form); ``dgamma``: ``d gamma / d t``.
    """

    gamma: Tensor
    alpha: Tensor | None = None
    sigma: Tensor | None = None
    dgamma: Tensor | None = None


Predictor = Callable[[Tensor, Marginal], Tensor]
"""``predict(x_t, marginal) -> eps_hat``: the model's noise prediction for the state ``x_t`` (float32, like
``x_t``), given the marginal coefficients at the time of ``x_t``."""


class ForwardProcess(nn.Module):
    """Base class of every forward process. Subclasses implement the methods below for their state.

    Attributes:
        image_shape: ``(C, H, W)`` of the data.
        multivariate: ``True`` when the noise level differs across data dimensions (for figures and samplers).
    """

    multivariate: bool = False
    penalty_names: tuple[str, ...] = ()

    def __init__(self, image_shape: ImageShape) -> None:
        super().__init__()
        self.image_shape: ImageShape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))

    @property
    def state_shape(self) -> ImageShape:
        """Shape ``(C', H, W)`` of one state ``x_t`` (the denoiser's input and output); the image shape unless
        overridden (processes with auxiliary variables have more channels)."""
        return self.image_shape

    def marginal(self, t: Tensor, ctx: Context) -> Marginal:
        """Coefficients of ``q(x_t | x)`` at times ``t`` (B,) in [0, 1]."""
        raise NotImplementedError

    def diffusion_loss(
        self, x: Tensor, t: Tensor, ctx: Context, predict: Predictor, eps: Tensor | None = None, steps: int = 0
    ) -> Tensor:
        """The diffusion term of the bound at times ``t`` (B,) for data ``x`` (B, C, H, W): (B,) nats.

        ``eps``: the standard-normal noise of ``x_t`` (state-shaped; drawn when None); ``steps``: 0 for the
        continuous-time term, ``T`` for the ``T``-step one (processes that have no discrete form raise).
        """
        raise NotImplementedError

    def prior_loss(self, x: Tensor, ctx: Context) -> Tensor:
        """``KL(q(x_1 | x) || p(x_1))`` per example: (B,) nats."""
        raise NotImplementedError

    def reconstruction_loss(self, images: Tensor, ctx: Context, noise: Tensor | None = None) -> Tensor:
        """``-log p(images | x_0)`` of uint8 images (B, C, H, W), ``x_0 ~ q(x_0 | x)``: (B,) nats."""
        raise NotImplementedError

    def penalties(self, x: Tensor, ctx: Context) -> dict[str, Tensor]:
        """Training-only regularisers by name (:attr:`penalty_names`), each (B,) nats; not part of the bound."""
        return {}

    def prior_sample(self, num_samples: int, ctx: Context, generator: torch.Generator | None = None) -> Tensor:
        """``x_1 ~ p(x_1)``: (N, *state_shape) float32 on the process's device."""
        raise NotImplementedError

    def ancestral_step(
        self, x_t: Tensor, t: Tensor, s: Tensor, ctx: Context, predict: Predictor, noise: Tensor
    ) -> Tensor:
        """One step ``t -> s < t`` of the generative model ``p(x_s | x_t)``; ``t``, ``s``: (N,). Returns ``x_s``."""
        raise NotImplementedError

    def ode_drift(self, x: Tensor, t: Tensor, ctx: Context, predict: Predictor) -> Tensor:
        """``dx/dt`` of the probability-flow ODE at state ``x`` and times ``t`` (N,), in ``x``'s dtype."""
        raise NotImplementedError

    def decode(
        self, x_0: Tensor, ctx: Context, mode: str | None = "argmax", generator: torch.Generator | None = None
    ) -> Tensor:
        """The data at ``t = 0``: uint8 images (N, C, H, W) from the state ``x_0`` (``mode`` ``"argmax"`` or
        ``"sample"``), or the continuous data coordinates of ``x_0`` for ``mode=None``."""
        raise NotImplementedError

    def initial_auxiliaries(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The ODE likelihood's state at ``t = 0`` for values ``x`` (B, C, H, W) of the data coordinates: ``x`` with
        the auxiliary variables' initial draw ``v_0 ~ q(v_0)`` (from ``generator``) appended, (B, *state_shape) in
        ``x``'s dtype, and ``log q(v_0)`` (B,) nats in ``x``'s dtype. Here, without auxiliaries: ``x`` itself and
        0, drawing nothing (processes with auxiliaries override)."""
        return x, x.new_zeros(x.shape[0])

    def dequantisation_scale(self, ctx: Context, batch_size: int) -> Tensor:
        """Noise scale of ``q(x_0 | x)`` per data dimension (broadcastable to the data), used by the ODE likelihood
        to dequantise inside a bin. Processes without a data-scale noise at ``t = 0`` raise."""
        raise NotImplementedError(f"{type(self).__name__} does not support the probability-flow ODE likelihood.")

    def device(self) -> torch.device:
        """The device of the process's parameters or buffers (CPU when it has neither)."""
        return module_device(self)


ProcessFactory = Callable[[ImageShape, int], ForwardProcess]
"""What a config gives for a process: a class (plus options) called with ``(image_shape, latent_dim)``."""
