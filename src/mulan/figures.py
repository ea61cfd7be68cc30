"""Pictures of a model: sample grids, MuLAN's per-dimension noise-schedule maps, SNR variance across latents.

Pure torch + matplotlib (no Lightning): used by the TensorBoard callback and by ``mulan-cli predict``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.utils import make_grid

from mulan.elbo import to_unit_interval
from mulan.model import DiffusionModel
from mulan.processes.base import Context


def image_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """uint8 (N, C, H, W) -> one uint8 grid image (C', H', W') with C' in {1, 3} kept as is."""
    nrow = nrow or max(1, int(math.sqrt(images.shape[0])))
    return make_grid(images.cpu(), nrow=nrow, padding=1, pad_value=255)


@torch.no_grad()
def schedule_maps(model: DiffusionModel, images: Tensor, times: tuple[float, ...] = (0.25, 0.5, 0.75)):
    """Figure: each row an image and its log-SNR ``-gamma(z, t)`` (mean over channels) at ``times``.

    Bright = high SNR = still little noise at that ``t``; dark = diffused early. For a scalar schedule every
    map is flat. ``images``: uint8 (N, C, H, W) with N small (4-8). Returns a matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    x = to_unit_interval(images)
    ctx = model.encode(x)[0]
    n = images.shape[0]
    fig, axes = plt.subplots(n, len(times) + 1, figsize=(1.8 * (len(times) + 1), 1.8 * n), squeeze=False)
    for j, t in enumerate(times):
        gamma = model.process.marginal(torch.full((n,), t, device=x.device), ctx).gamma.expand_as(x)
        log_snr = (-gamma).mean(1).cpu()  # (N, H, W)
        for i in range(n):
            im = axes[i, j + 1].imshow(log_snr[i], cmap="magma")
            fig.colorbar(im, ax=axes[i, j + 1], fraction=0.046)
            axes[0, j + 1].set_title(f"log-SNR, t={t}", fontsize=8)
    for i in range(n):
        picture = images[i].cpu().permute(1, 2, 0)
        axes[i, 0].imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
        axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


@torch.no_grad()
def snr_variance(model: DiffusionModel, num_latents: int = 64, num_times: int = 50, images: Tensor | None = None):
    """Figure: variance of ``SNR(z, t) = exp(-gamma(z, t))`` across latents, averaged over dimensions, vs ``t``.

    Latents are drawn from the prior, or from ``q(z | x)`` of ``images`` when given. Zero for a schedule that
    does not depend on ``z``. Returns ``(figure, times (T,), variance (T,))``.
    """
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    if images is not None:
        z = model.latent(to_unit_interval(images.to(device))).z
    else:
        z = model.latent.sample_prior(num_latents, device)
    count = z.shape[0] if z is not None else num_latents
    times = torch.linspace(0.0, 1.0, num_times, device=device)
    ctx = Context(z=z)
    variance = torch.stack(
        [torch.exp(-model.process.marginal(t.expand(count), ctx).gamma).var(0).mean() for t in times]
    ).cpu()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(times.cpu(), variance)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("t")
    ax.set_ylabel("Var_z[SNR(z, t)] (mean over dims)")
    ax.set_title("How much the schedule adapts to z", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, times.cpu(), variance
