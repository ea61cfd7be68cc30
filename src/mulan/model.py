"""The diffusion model as one pure-torch module: latent + schedule + denoiser -> the terms of the bound.

One training step, and the only way data flows: uint8 images -> ``x`` in [-1, 1] -> ``z ~ q(z | x)`` ->
times ``t`` -> ``gamma(t, z)``, ``dgamma/dt`` -> ``x_t`` -> ``eps_hat(x_t, gamma, z)`` -> loss terms -> BPD.
VDM is this model with :class:`~mulan.latents.NoLatent` and a scalar schedule; MuLAN is the same model with a
k-hot latent and the polynomial schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from mulan import elbo
from mulan.latents import Latent, NoLatent
from mulan.schedules import ImageShape, NoiseSchedule
from mulan.utils import float32_region


@dataclass
class ELBOTerms:
    """Per-example terms of the bound, each (B,) in nats. ``total`` uses the honest latent cost ``latent``."""

    recon: Tensor
    prior: Tensor
    diffusion: Tensor
    latent: Tensor
    latent_surrogate: Tensor

    @property
    def total(self) -> Tensor:
        return self.recon + self.prior + self.diffusion + self.latent

    @property
    def total_surrogate(self) -> Tensor:
        """The bound as the MuLAN reference code computes it (surrogate latent KL): not a valid bound."""
        return self.recon + self.prior + self.diffusion + self.latent_surrogate

    def as_dict(self) -> dict[str, Tensor]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["total"] = self.total
        return out


class DiffusionModel(nn.Module):
    """Variational diffusion model with an optional auxiliary latent and any noise schedule.

    Args:
        image_shape: ``(C, H, W)`` of the data.
        schedule: a :class:`~mulan.schedules.NoiseSchedule`.
        denoiser: maps ``(x_t, gamma, z)`` to ``eps_hat`` (B, C, H, W).
        latent: a :class:`~mulan.latents.Latent`; ``None`` means no latent (VDM).
        timesteps: ``0`` for the continuous-time loss, ``T > 0`` for the discrete ``T``-step loss.
        channels_last: store the 4-D (convolution) weights in channels-last memory format. A convolution with a
            channels-last weight returns a channels-last activation, so from the first convolution on every
            convolution, GroupNorm, SiLU and the attention run on NHWC tensors end to end (oneDNN on CPU,
            tensor-core kernels on GPU). The data, noise and loss stay NCHW, so the random draws and the values
            are those of the default layout (docs/benchmarks.md).
    """

    def __init__(
        self,
        image_shape: ImageShape,
        schedule: NoiseSchedule,
        denoiser: nn.Module,
        latent: Latent | None = None,
        timesteps: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if timesteps < 0:
            raise ValueError(f"timesteps must be 0 (continuous time) or a positive step count, got {timesteps}.")
        self.image_shape: ImageShape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        self.num_dims = math.prod(self.image_shape)
        self.schedule, self.denoiser = schedule, denoiser
        self.latent = latent if latent is not None else NoLatent(self.image_shape)
        self.timesteps = timesteps
        self.channels_last = channels_last
        if channels_last:
            for p in self.parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)

    def check_images(self, images: Tensor) -> None:
        """Raise a clear error unless ``images`` is uint8 of shape (B, *image_shape)."""
        if images.dtype != torch.uint8:
            raise TypeError(
                f"expected uint8 images with values 0..255, got dtype {images.dtype}; the data module must yield "
                "raw 8-bit images (the model maps them to [-1, 1] itself)."
            )
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(images.shape)}; "
                "the model's image_shape must match the data (set model.image_shape or pick the matching data)."
            )

    def forward(self, images: Tensor, t: Tensor | None = None) -> ELBOTerms:
        """One-sample estimate of the bound. ``images``: uint8 (B, C, H, W); ``t``: optional (B,) times."""
        self.check_images(images)
        x = elbo.to_unit_interval(images)
        latent = self.latent(x)
        if t is None:
            t = elbo.antithetic_times(x.shape[0], x.device)
        with float32_region(x):
            gamma_0, gamma_1 = self.schedule.endpoints(latent.z, x.shape[0])
            recon = elbo.reconstruction_loss(images, gamma_0)
            prior = elbo.prior_loss(x, gamma_1)
        diffusion = self.diffusion_term(x, t, latent.z)
        return ELBOTerms(recon, prior, diffusion, latent.kl.float(), latent.kl_surrogate.float())

    def diffusion_term(self, x: Tensor, t: Tensor, z: Tensor | None, eps: Tensor | None = None) -> Tensor:
        """``L_diff`` per example (B,), continuous or ``T``-step depending on ``timesteps``.

        ``x``: (B, C, H, W) in [-1, 1]; ``t``: (B,); ``eps``: optional fixed noise like ``x``.
        """
        eps = torch.randn_like(x) if eps is None else eps
        if self.timesteps:
            t, s = elbo.discretise_times(t, self.timesteps)
            gamma_s = self.schedule.gamma(s, z)
        gamma_t, dgamma_dt = self.schedule(t, z)
        alpha, sigma = elbo.alpha_sigma(gamma_t)
        x_t = alpha * x + sigma * eps
        eps_hat = self.denoiser(x_t, gamma_t, z)  # the only part that autocast may run in low precision
        with float32_region(x):
            if self.timesteps:
                return elbo.discrete_diffusion_loss(eps, eps_hat, gamma_t, gamma_s, self.timesteps)
            return elbo.diffusion_loss(eps, eps_hat, dgamma_dt)

    def bpd(self, nats: Tensor) -> Tensor:
        """Nats per example to bits per dimension of this model's data."""
        return elbo.nats_to_bpd(nats, self.num_dims)
