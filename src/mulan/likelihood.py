"""Likelihood evaluation: the dense ELBO (many stratified times per image)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from mulan.model import DiffusionModel, ELBOTerms


@torch.no_grad()
def dense_elbo(model: DiffusionModel, images: Tensor, num_times: int = 128, chunk_size: int = 1024) -> ELBOTerms:
    """The bound of each image averaged over ``K = num_times`` stratified times ``t_j = (u + j) / K``.

    Each of the ``K`` evaluations draws its own latent, noise and reconstruction noise, so the average is an
    unbiased estimate of the bound with far less variance than one sample. ``images``: uint8 (B, C, H, W).
    Returns per-image terms (B,) in nats. ``chunk_size`` bounds how many (image, time) pairs run at once.
    """
    b = images.shape[0]
    u = torch.rand(b, 1, device=images.device)
    t = ((u + torch.arange(num_times, device=images.device) / num_times) % 1.0).reshape(-1)  # (B K,)
    repeated = images.repeat_interleave(num_times, dim=0)
    parts = [model(x, t=tt) for x, tt in zip(repeated.split(chunk_size), t.split(chunk_size), strict=True)]
    fields = {name: torch.cat([getattr(p, name) for p in parts]).view(b, num_times).mean(1) for name in _FIELDS}
    return ELBOTerms(**fields)


def dense_elbo_dataset(model: DiffusionModel, batches: Iterable[Tensor], num_times: int = 128) -> ELBOTerms:
    """:func:`dense_elbo` over an iterable of uint8 batches, concatenated per image."""
    device = next(model.parameters()).device
    parts = [dense_elbo(model, batch.to(device), num_times) for batch in batches]
    return ELBOTerms(**{name: torch.cat([getattr(p, name) for p in parts]) for name in _FIELDS})


_FIELDS = ("recon", "prior", "diffusion", "latent", "latent_surrogate")
