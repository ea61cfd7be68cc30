"""Pictures of a model: sample grids, per-image log-SNR maps, how much the schedule adapts to its input.

Pure torch + matplotlib (no Lightning): used by the TensorBoard callback and by ``mulan-cli predict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.utils import make_grid

from mulan.elbo import to_unit_interval
from mulan.model import DiffusionModel
from mulan.processes.base import Context


def image_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """uint8 (N, C, H, W) -> one uint8 grid image (3, H', W'): ``make_grid`` repeats one channel to three."""
    nrow = nrow or max(1, int(math.sqrt(images.shape[0])))
    return make_grid(images.cpu(), nrow=nrow, padding=1, pad_value=255)


@torch.no_grad()
def log_snr_maps(model: DiffusionModel, images: Tensor, times: Sequence[float]) -> Tensor:
    """The learned log-SNR ``-gamma(t, z)`` of each image (its own ``z ~ q(z | x)``), averaged over channels, at each
    of ``times``: (T, N, H, W), float32 on the CPU. ``images``: uint8 (N, C, H, W)."""
    x = to_unit_interval(images)
    ctx = model.encode(x)[0]
    n = images.shape[0]
    maps = [
        (-model.process.marginal(torch.full((n,), float(t), device=x.device), ctx).gamma.expand_as(x)).mean(1)
        for t in times
    ]
    return torch.stack(maps).float().cpu()


def schedule_maps(model: DiffusionModel, images: Tensor, times: Sequence[float] = (0.25, 0.5, 0.75)):
    """Figure: one row per image (the image, then its log-SNR map at each of ``times``), one shared colour scale
    per time so the images compare side by side, and a last row with the spread (standard deviation) of the
    log-SNR across the images at each pixel. Bright = high SNR = still little noise at that ``t``. A scalar
    schedule gives flat maps; a schedule that ignores its latent gives the same map for every image and a zero
    spread. ``images``: uint8 (N, C, H, W) with N small (4-8). Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    maps = log_snr_maps(model, images, times)  # (T, N, H, W)
    n = images.shape[0]
    fig, axes = plt.subplots(n + 1, len(times) + 1, figsize=(1.7 * (len(times) + 1), 1.7 * (n + 1)), squeeze=False)
    for j, t in enumerate(times):
        low, high = maps[j].min().item(), maps[j].max().item()
        for i in range(n):
            im = axes[i, j + 1].imshow(maps[j, i], cmap="magma", vmin=low, vmax=high)
        fig.colorbar(im, ax=axes[:n, j + 1].tolist(), fraction=0.046)
        axes[0, j + 1].set_title(f"log-SNR, t={t}", fontsize=8)
        spread = axes[n, j + 1].imshow(maps[j].std(0), cmap="viridis", vmin=0)
        fig.colorbar(spread, ax=axes[n, j + 1], fraction=0.046)
    for i in range(n):
        picture = images[i].cpu().permute(1, 2, 0)
        axes[i, 0].imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
    axes[0, 0].set_title("image", fontsize=8)
    axes[n, 0].text(0.5, 0.5, "spread\nacross\nimages", ha="center", va="center", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(len(ax.images) > 0)
    return fig


FLAT_SPREAD = 1e-3
"""A log-SNR spread across images below this (nats, any ``t``) means the schedule does not adapt to its input."""


@torch.no_grad()
def log_snr_spread(model: DiffusionModel, images: Tensor, num_times: int = 21):
    """How much the learned log-SNR differs between images, against ``t``.

    For each ``t``, the standard deviation across ``images`` of each dimension's log-SNR, averaged over dimensions
    (what adaptivity changes), beside the standard deviation across dimensions within an image, averaged over
    images (what a per-dimension schedule changes). Returns ``(figure, times (T,), across_images (T,),
    within_images (T,), adaptive)``; ``adaptive`` is False when the spread across images stays below
    :data:`FLAT_SPREAD` at every ``t`` — the schedule then ignores its latent, and the figure says so."""
    import matplotlib.pyplot as plt

    times = torch.linspace(0.0, 1.0, num_times)
    x = to_unit_interval(images)
    ctx = model.encode(x)[0]
    n = images.shape[0]
    across, within = [], []
    for t in times:
        log_snr = -model.process.marginal(torch.full((n,), float(t), device=x.device), ctx).gamma.expand_as(x)
        flat = log_snr.flatten(1).double()
        across.append(flat.std(0).mean().item() if n > 1 else 0.0)
        within.append(flat.std(1).mean().item())
    across_t, within_t = torch.tensor(across), torch.tensor(within)
    adaptive = bool(across_t.max() >= FLAT_SPREAD)
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(times, across_t, label="across images (adaptivity)")
    ax.plot(times, within_t, "--", label="across dimensions, within an image")
    ax.set_xlabel("t")
    ax.set_ylabel("std of log-SNR (nats)")
    title = "Spread of the learned log-SNR" if adaptive else "Flat spread across images: the schedule ignores z"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, times, across_t, within_t, adaptive


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


@torch.no_grad()
def superresolution_grid(
    model: DiffusionModel,
    images: Tensor,
    y: Tensor,
    num_samples: int = 3,
    steps: int = 256,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A grid for a model of ``p(x | y)``: one row per image, the input ``y`` (nearest-neighbour upscaled), then
    ``num_samples`` ancestral samples of ``x`` given it, then the truth ``x``. ``images``: uint8 (N, C, H, W); ``y``:
    uint8 (N, C, h, w). Returns one uint8 grid image (C, H', W')."""
    from mulan.sampling import ancestral_sample

    n = images.shape[0]
    device = next(model.parameters()).device
    repeated = y.to(device).repeat_interleave(num_samples, dim=0)
    samples = ancestral_sample(model, n * num_samples, steps=steps, y=repeated, generator=generator).samples
    upscaled = torch.nn.functional.interpolate(y.float(), size=images.shape[-2:], mode="nearest").to(torch.uint8)
    rows = [
        torch.cat([upscaled[i : i + 1], samples[i * num_samples : (i + 1) * num_samples].cpu(), images[i : i + 1]])
        for i in range(n)
    ]
    return image_grid(torch.cat(rows), nrow=num_samples + 2)
