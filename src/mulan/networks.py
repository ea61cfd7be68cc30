"""The VDM U-Net denoiser ``eps_hat(x_t, gamma, z)`` and its building blocks (docs: math, section 9).

No down-sampling: ``num_blocks`` ResNet blocks down, a middle ResNet-attention-ResNet, ``num_blocks + 1``
ResNet blocks up with skip connections, Fourier features of the input, and ``eps_hat = x_t + NN(x_t)`` with a
zero-initialised output convolution. Any ``C x H x W``. The network is conditioned on the mean of ``gamma``
(as a time embedding) and on the latent ``z`` (concatenated to that embedding before the conditioning MLP);
optionally also on the per-dimension ``gamma`` map, given as extra input channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.processes.base import GAMMA_MAX, GAMMA_MIN, ImageShape
from mulan.utils import float32_region


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with at most 32 groups of at least 4 channels (VDM at 128 channels: 32 groups of 4).

    Groups of one channel would normalise away the per-channel conditioning shift of :class:`ResnetBlock`,
    so a narrow network would ignore time and ``z``.
    """
    groups = max(g for g in range(1, min(32, max(channels // 4, 1)) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class FourierFeatures(nn.Module):
    """``sin`` and ``cos`` of ``2^n 2 pi x`` for ``n`` in ``exponents``: (B, C, H, W) -> (B, 2 C len(n), H, W).

    Computed in float32 with autocast off: at ``n = 7`` the arguments reach ``~800`` rad, which bf16 destroys.
    """

    freqs: Tensor

    def __init__(self, exponents: Sequence[int] = (6, 7)) -> None:
        super().__init__()
        freqs = torch.tensor([2.0**n * 2 * math.pi for n in exponents])
        self.register_buffer("freqs", freqs.view(1, 1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        with float32_region(x):
            h = (x.float().unsqueeze(2) * self.freqs).flatten(1, 2)
            return torch.cat([torch.sin(h), torch.cos(h)], dim=1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` (B,) (already scaled, e.g. ``1000 t``) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus a projection of the conditioning vector, GroupNorm-SiLU-dropout-conv (zero init)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.cond = nn.Linear(cond_dim, out_channels) if cond_dim else None
        self.norm2, self.dropout = group_norm(out_channels), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.cond is not None and cond is not None:
            h = h + self.cond(cond)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the ``H W`` positions, residual, zero-initialised output projection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        # (B, HW, 3C) with unit stride along channels: free in channels-last, one small copy otherwise. The
        # fused (flash) CPU/GPU kernels need unit-stride heads; without it SDPA falls back to the slow math path
        # (bmm + softmax, and an (HW x HW) matrix kept for the backward).
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        # back to (B, C, H, W) as a view: channels-last memory, which the 1x1 projection accepts as is
        return x + self.proj(out.transpose(1, 2).unflatten(2, (h, w)))


class UNet(nn.Module):
    """The VDM score network, ``eps_hat = x_t + NN(x_t, gamma, z)``.

    Args:
        image_shape: ``(C, H, W)`` of the data.
        latent_dim: size of ``z`` (0: unconditional).
        channels: width of every block (VDM CIFAR-10: 128).
        num_blocks: ResNet blocks on the way down (VDM: 32); the way up has one more.
        dropout: dropout inside the ResNet blocks (VDM: 0.1).
        attention: ``"mid"`` (VDM) or ``"all"`` (also after every down/up block).
        fourier_exponents: ``n`` of the Fourier features ``2^n 2 pi x_t`` (VDM: 6, 7); empty to disable.
        gamma_conditioning: ``"mean"``: the time embedding sees the mean of ``gamma`` (reference); ``"map"``:
            also the normalised per-dimension ``gamma`` map as extra input channels.
        gamma_min, gamma_max: used to normalise ``gamma`` to a time in [0, 1].
        skip: return ``x_t + NN(x_t)`` (VDM's "base measure", kept by the MuLAN reference for its v-model too);
            ``False``: ``NN(x_t)`` alone.
        condition_channels: channels of an image conditioning input ``y`` (B, C', H', W'), resized to ``H x W`` and
            concatenated to the input (0: none).
        num_classes: number of classes of a label conditioning input ``y`` (B,), embedded into the conditioning
            vector (0: none).
    """

    def __init__(
        self,
        image_shape: ImageShape,
        latent_dim: int,
        channels: int = 128,
        num_blocks: int = 32,
        dropout: float = 0.1,
        attention: str = "mid",
        fourier_exponents: Sequence[int] = (6, 7),
        gamma_conditioning: str = "mean",
        gamma_min: float = GAMMA_MIN,
        gamma_max: float = GAMMA_MAX,
        skip: bool = True,
        condition_channels: int = 0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if attention not in ("mid", "all"):
            raise ValueError(f"attention must be 'mid' or 'all', got {attention!r}.")
        if gamma_conditioning not in ("mean", "map"):
            raise ValueError(f"gamma_conditioning must be 'mean' or 'map', got {gamma_conditioning!r}.")
        in_channels = image_shape[0]
        self.image_shape, self.latent_dim, self.channels = tuple(image_shape), latent_dim, channels
        self.gamma_conditioning, self.gamma_min, self.gamma_max = gamma_conditioning, gamma_min, gamma_max
        self.fourier = FourierFeatures(fourier_exponents) if fourier_exponents else None
        self.skip, self.condition_channels, self.num_classes = skip, condition_channels, num_classes
        n_inputs = in_channels * (1 + 2 * len(fourier_exponents) + (gamma_conditioning == "map")) + condition_channels
        cond_dim = 4 * channels
        self.class_embedding = nn.Embedding(num_classes, cond_dim) if num_classes else None
        self.cond_mlp = nn.Sequential(
            nn.Linear(channels + latent_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim), nn.SiLU()
        )
        self.conv_in = nn.Conv2d(n_inputs, channels, 3, padding=1)

        def block(n_in: int) -> ResnetBlock:
            return ResnetBlock(n_in, channels, cond_dim, dropout)

        def attn() -> nn.Module:
            return AttentionBlock(channels) if attention == "all" else nn.Identity()

        self.down = nn.ModuleList(block(channels) for _ in range(num_blocks))
        self.down_attn = nn.ModuleList(attn() for _ in range(num_blocks))
        self.mid = nn.ModuleList([block(channels), AttentionBlock(channels), block(channels)])
        self.up = nn.ModuleList(block(2 * channels) for _ in range(num_blocks + 1))
        self.up_attn = nn.ModuleList(attn() for _ in range(num_blocks + 1))
        self.norm_out = group_norm(channels)
        self.conv_out = zero_init(nn.Conv2d(channels, in_channels, 3, padding=1))

    def normalised_gamma(self, gamma: Tensor) -> Tensor:
        return (gamma.float() - self.gamma_min) / (self.gamma_max - self.gamma_min)

    def conditioning(self, gamma: Tensor, z: Tensor | None, y: Tensor | None = None) -> Tensor:
        """Time embedding of the mean ``gamma`` (+ ``z``) through the MLP (+ a class embedding): (B, 4 channels)."""
        t = self.normalised_gamma(gamma).flatten(1).mean(1)
        emb = timestep_embedding(1000 * t, self.channels)
        if self.latent_dim:
            if z is None:
                raise ValueError(f"this denoiser was built for a latent of size {self.latent_dim}; got z=None.")
            emb = torch.cat([emb, z.to(emb.dtype)], dim=1)
        cond = self.cond_mlp(emb)
        if self.class_embedding is not None:
            if y is None or y.dim() != 1:
                raise ValueError(
                    f"this denoiser was built for class labels y of shape (B,) ({self.num_classes} classes)."
                )
            cond = cond + self.class_embedding(y.long())
        return cond

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """``x_t``: (B, C, H, W); ``gamma``: (B, 1, 1, 1) or (B, C, H, W); ``z``: (B, m) or None; ``y``: the
        conditioning input (see ``condition_channels``, ``num_classes``) or None -> (B, C, H, W)."""
        cond = self.conditioning(gamma, z, y)
        inputs = [x_t]
        if self.fourier is not None:
            inputs.append(self.fourier(x_t))
        if self.gamma_conditioning == "map":
            inputs.append(self.normalised_gamma(gamma).expand_as(x_t) * 2 - 1)
        if self.condition_channels:
            inputs.append(condition_image(y, x_t, self.condition_channels))
        h = self.conv_in(torch.cat(inputs, dim=1))
        skips = [h]
        for res, attn in zip(self.down, self.down_attn, strict=True):
            h = attn(res(h, cond))
            skips.append(h)
        for layer in self.mid:
            h = layer(h, cond)
        for res, attn in zip(self.up, self.up_attn, strict=True):
            h = attn(res(torch.cat([h, skips.pop()], dim=1), cond))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return x_t + out if self.skip else out


def condition_image(y: Tensor | None, like: Tensor, channels: int) -> Tensor:
    """An image conditioning input ``y`` (B, channels, H', W') resized (bilinear) to ``like``'s (H, W), in its dtype.

    ``y`` is uint8 (mapped to [-1, 1]) or already a float image in [-1, 1]."""
    if y is None or y.dim() != 4 or y.shape[1] != channels:
        shape = None if y is None else tuple(y.shape)
        raise ValueError(f"expected an image conditioning input y of shape (B, {channels}, H', W'), got {shape}.")
    y = (y.float() + 0.5) * (2.0 / 256) - 1.0 if y.dtype == torch.uint8 else y.float()
    if tuple(y.shape[-2:]) != tuple(like.shape[-2:]):
        y = F.interpolate(y, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return y.to(like.dtype)


class ImageEncoder(nn.Module):
    """MuLAN's encoder network: conv-in, ResNet blocks (no down-sampling), ResNet-attention-ResNet,
    conv-out to one channel, flatten, dense to ``outputs`` logits. (B, C, H, W) -> (B, outputs)."""

    def __init__(self, image_shape: ImageShape, outputs: int, channels: int = 64, num_blocks: int = 4) -> None:
        super().__init__()
        c, h, w = image_shape
        self.conv_in = nn.Conv2d(c, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResnetBlock(channels, channels) for _ in range(num_blocks))
        self.mid = nn.ModuleList(
            [ResnetBlock(channels, channels), AttentionBlock(channels), ResnetBlock(channels, channels)]
        )
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)
        self.dense = nn.Linear(h * w, outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for layer in [*self.blocks, *self.mid]:
            h = layer(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.dense(h.flatten(1)).float()


DenoiserFactory = Callable[[ImageShape, int], nn.Module]
"""What a config gives for a denoiser: a class (plus options) called with ``(image_shape, latent_dim)``;
the module maps ``(x_t, gamma, z)`` to ``eps_hat`` of the shape of ``x_t``."""
