"""The diffusion model as one pure-torch module: latent + forward process + denoiser -> the named terms of the bound.

One training step, and the only way data flows (docs: architecture): uint8 images -> ``x`` in [-1, 1] ->
``z ~ q(z | x)`` (the latent) -> times ``t`` and weights (the time sampler) -> ``x_t ~ q(x_t | x)`` (the process) ->
the denoiser's output -> ``eps_hat`` (the parameterisation) -> the terms of the bound, per example, in nats.
VDM is this model with :class:`~mulan.latents.NoLatent` and a scalar schedule; MuLAN is the same model with a
k-hot latent and the polynomial schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mulan import elbo
from mulan.latents import Latent, NoLatent
from mulan.parameterisation import Epsilon, Parameterisation
from mulan.processes.base import Context, ForwardProcess, ImageShape, Marginal, Predictor, as_context
from mulan.time_sampling import AntitheticUniform, TimeSampler
from mulan.utils import float32_region

BOUND_TERMS = ("recon", "prior", "diffusion", "latent")
"""The terms whose sum is the bound on ``-log P(x)``."""


@dataclass
class Bound:
    """Per-example quantities (each (B,), nats) by name.

    ``terms``: the terms of the bound (:data:`BOUND_TERMS`), whose sum is :attr:`total`; ``extras``: quantities
    reported beside it but not part of it (e.g. the MuLAN reference code's surrogate latent cost,
    ``latent_surrogate``); ``penalties``: training-only regularisers that the training loss adds to the bound
    (not part of it either).
    """

    terms: dict[str, Tensor]
    extras: dict[str, Tensor] = field(default_factory=dict)
    penalties: dict[str, Tensor] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        """The bound on ``-log P(x)`` per example, (B,) nats."""
        values = list(self.terms.values())
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total

    def __getitem__(self, name: str) -> Tensor:
        if name == "total":
            return self.total
        for group in (self.terms, self.extras, self.penalties):
            if name in group:
                return group[name]
        raise KeyError(f"no quantity {name!r} in this bound; it has {', '.join(self.as_dict())}.")

    def __getattr__(self, name: str) -> Tensor:  # bound.diffusion, bound.total, ...
        if name.startswith("__") or name in ("terms", "extras", "penalties"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(str(error)) from None

    def as_dict(self) -> dict[str, Tensor]:
        """Every quantity by name, ``total`` first."""
        return {"total": self.total, **self.terms, **self.extras, **self.penalties}


class DiffusionModel(nn.Module):
    """Variational diffusion model with an optional auxiliary latent and any forward process.

    Args:
        image_shape: ``(C, H, W)`` of the data.
        process: a :class:`~mulan.processes.ForwardProcess` (a noise schedule, for VDM and MuLAN).
        denoiser: maps ``(x_t, gamma, z)`` (and ``y=`` when the data is conditional) to a state-shaped output.
        latent: a :class:`~mulan.latents.Latent`; ``None`` means no latent (VDM).
        parameterisation: what the denoiser's output is (:mod:`mulan.parameterisation`; default the noise).
        time_sampler: the training times and their importance weights (default: antithetic uniform).
        timesteps: ``0`` for the continuous-time loss, ``T > 0`` for the discrete ``T``-step loss.
        channels_last: store the 4-D (convolution) weights in channels-last memory format; convolutions then run on
            NHWC activations end to end (same values; docs: benchmarks).
    """

    def __init__(
        self,
        image_shape: ImageShape,
        process: ForwardProcess,
        denoiser: nn.Module,
        latent: Latent | None = None,
        parameterisation: Parameterisation | None = None,
        time_sampler: TimeSampler | None = None,
        timesteps: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if timesteps < 0:
            raise ValueError(f"timesteps must be 0 (continuous time) or a positive step count, got {timesteps}.")
        self.image_shape: ImageShape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        if tuple(process.image_shape) != self.image_shape:
            raise ValueError(
                f"the process was built for images of shape {tuple(process.image_shape)}, the model for "
                f"{self.image_shape}: build both with the data's (C, H, W)."
            )
        built_for = getattr(denoiser, "image_shape", None)
        if built_for is not None and tuple(built_for) != tuple(process.state_shape):
            raise ValueError(
                f"the denoiser was built for inputs of shape {tuple(built_for)}, but this process's states have shape "
                f"{tuple(process.state_shape)}: build the denoiser with the process's state_shape."
            )
        self.num_dims = math.prod(self.image_shape)
        self.process, self.denoiser = process, denoiser
        self.latent = latent if latent is not None else NoLatent(self.image_shape)
        self.parameterisation = parameterisation or Epsilon()
        self.time_sampler = time_sampler or AntitheticUniform()
        self.timesteps = timesteps
        self.channels_last = channels_last
        if channels_last:
            for p in self.parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)

    @property
    def term_names(self) -> tuple[str, ...]:
        """The names the components declare for what :meth:`forward` returns, in the order of :meth:`Bound.as_dict`:
        ``total``, the terms, ``latent_surrogate`` when the latent declares ``surrogate = True``, the process's
        ``penalty_names``. A bound may carry more (a latent that returns a surrogate without declaring it); the
        Lightning task logs whatever each bound actually carries."""
        extras = ("latent_surrogate",) if self.latent.surrogate else ()
        return ("total", *BOUND_TERMS, *extras, *self.process.penalty_names)

    # ------------------------------------------------------------------------------------------ checks
    def check_images(self, images: Tensor) -> None:
        """Raise a clear error unless ``images`` is a non-empty uint8 batch of shape (B, *image_shape)."""
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            raise TypeError(
                f"expected uint8 images with values 0..255, got {getattr(images, 'dtype', type(images).__name__)}; "
                "the data module must yield raw 8-bit images (the model maps them to [-1, 1] itself)."
            )
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(images.shape)}; "
                "the model's image_shape must match the data (rebuild the model for this data, or pick the data "
                "the model was trained on)."
            )
        if images.shape[0] == 0:
            raise ValueError("got an empty batch (0 images); give at least one image.")

    @staticmethod
    def check_times(t: Tensor, batch_size: int) -> None:
        """Raise a clear error unless ``t`` is (B,) with every value finite and in [0, 1]. Under ``torch.compile``
        only the shape is checked: reading the values on the host would break the graph (and sync the device)."""
        if t.shape != (batch_size,):
            raise ValueError(f"times t must have shape ({batch_size},), one per image; got {tuple(t.shape)}.")
        if torch.compiler.is_compiling():
            return
        if not bool(torch.all((t >= 0) & (t <= 1))):  # NaN fails both comparisons
            raise ValueError(f"times t must lie in [0, 1] (0: data, 1: noise); got min {t.min()}, max {t.max()}.")

    # ------------------------------------------------------------------------------------------ the model
    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Context, Tensor, Tensor | None]:
        """``z ~ q(z | x)`` for ``x`` in [-1, 1]: the :class:`Context` (``z``, ``y``), the latent's cost in the bound
        (B,) nats, and the surrogate cost (B,) or None."""
        sample = self.latent(x)
        return Context(z=sample.z, y=y), sample.kl.float(), sample.kl_surrogate

    def predictor(self, ctx: Context) -> Predictor:
        """``predict(x_t, marginal) -> eps_hat``: the denoiser and the parameterisation for this context."""
        denoiser, parameterisation = self.denoiser, self.parameterisation

        def predict(x_t: Tensor, m: Marginal) -> Tensor:
            param = next(denoiser.parameters(), None)
            dtype = param.dtype if param is not None and param.is_floating_point() else x_t.dtype
            extra = {} if ctx.y is None else {"y": ctx.y}
            output = denoiser(x_t.to(dtype), m.gamma.to(dtype), ctx.z, **extra)  # autocast may run this low
            with float32_region(x_t):
                return parameterisation.to_eps(output, x_t, m).to(x_t.dtype)

        return predict

    def forward(
        self,
        images: Tensor,
        y: Tensor | None = None,
        t: Tensor | None = None,
        eps: Tensor | None = None,
        recon_noise: Tensor | None = None,
    ) -> Bound:
        """One-sample estimate of the bound for uint8 ``images`` (B, C, H, W), per example, in nats.

        ``y``: the conditioning input of conditional data; ``t``: (B,) times in [0, 1] (then uniform, weight 1;
        default: the time sampler's); ``eps``: the noise of ``x_t`` (state-shaped); ``recon_noise``: the noise of
        ``x_0`` in the reconstruction term (image-shaped). Noise not given is drawn.
        """
        self.check_images(images)
        x = elbo.to_unit_interval(images)
        ctx, latent_cost, surrogate = self.encode(x, y)
        if t is None:
            t, weight = self.time_sampler(x.shape[0], self.process, ctx)
        else:
            self.check_times(t, x.shape[0])
            weight = None
        recon = self.process.reconstruction_loss(images, ctx, recon_noise)
        prior = self.process.prior_loss(x, ctx)
        diffusion = self.diffusion_term(x, t, ctx, eps)
        if weight is not None:
            diffusion = diffusion * weight
        terms = {"recon": recon, "prior": prior, "diffusion": diffusion, "latent": latent_cost}
        extras = {} if surrogate is None else {"latent_surrogate": surrogate.float()}
        return Bound(terms, extras, self.process.penalties(x, ctx))

    def diffusion_term(
        self, x: Tensor, t: Tensor, ctx: Context | Tensor | None = None, eps: Tensor | None = None
    ) -> Tensor:
        """The diffusion term (B,) nats of data ``x`` (B, C, H, W) in [-1, 1] (continuous values allowed) at times
        ``t`` (B,): continuous time or ``timesteps`` steps. ``ctx``: a :class:`Context` or the latent ``z``."""
        ctx = as_context(ctx)
        return self.process.diffusion_loss(x, t, ctx, self.predictor(ctx), eps, self.timesteps)

    def bpd(self, nats: Tensor) -> Tensor:
        """Nats per example to bits per dimension of this model's data."""
        return elbo.nats_to_bpd(nats, self.num_dims)


def build_model(
    image_shape: ImageShape,
    denoiser: Callable[..., nn.Module],
    process: Callable[..., ForwardProcess],
    latent: Callable[..., Latent] = NoLatent,
    parameterisation: Callable[[], Parameterisation] = Epsilon,
    time_sampler: Callable[[], TimeSampler] = AntitheticUniform,
    timesteps: int = 0,
    channels_last: bool = False,
) -> DiffusionModel:
    """A :class:`DiffusionModel` from component factories (a class, or a partial of one with its options), as a
    config names them: ``latent(image_shape)``, ``process(image_shape, latent_dim)``,
    ``denoiser(process.state_shape, latent_dim)``, ``parameterisation()``, ``time_sampler()``."""
    image_shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    latent_module = latent(image_shape)
    process_module = process(image_shape, latent_module.dim)
    return DiffusionModel(
        image_shape,
        process=process_module,
        denoiser=denoiser(process_module.state_shape, latent_module.dim),
        latent=latent_module,
        parameterisation=parameterisation(),
        time_sampler=time_sampler(),
        timesteps=timesteps,
        channels_last=channels_last,
    )
