"""A custom denoiser: any ``nn.Module`` built as ``Denoiser(image_shape, latent_dim, **options)`` that maps
``(x_t, gamma, z)`` to ``eps_hat`` of the shape of ``x_t``.

``gamma`` is float32 and broadcastable to ``x_t``: ``(B, 1, 1, 1)`` for a scalar schedule, ``(B, C, H, W)``
for a multivariate one (MuLAN). ``z`` is ``(B, latent_dim)`` or ``None``. This one is a small residual CNN
that sees the per-dimension ``gamma`` map as an extra input channel and is modulated (FiLM) by an embedding of
the mean ``gamma`` and ``z``. Use it from YAML with ``examples/small_denoiser.yaml``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.processes import ImageShape
from mulan.processes.schedules import GAMMA_MAX, GAMMA_MIN


# --8<-- [start:SmallDenoiser]
class SmallDenoiser(nn.Module):
    """``eps_hat = x_t + CNN(x_t, gamma map; FiLM(mean gamma, z))``.

    Args:
        image_shape: ``(C, H, W)`` of the data.
        latent_dim: size of ``z`` (0: no latent).
        channels: width of the convolutions.
        depth: number of residual 3x3 convolution blocks.
    """

    def __init__(self, image_shape: ImageShape, latent_dim: int, channels: int = 32, depth: int = 2) -> None:
        super().__init__()
        c = image_shape[0]
        self.latent_dim = latent_dim
        self.embed = nn.Sequential(
            nn.Linear(1 + latent_dim, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, 2 * channels * depth)
        )
        self.conv_in = nn.Conv2d(2 * c, channels, 3, padding=1)  # x_t and the normalised gamma map
        self.blocks = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth))
        self.conv_out = nn.Conv2d(channels, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # starts as eps_hat = x_t, like the VDM U-Net
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        g = (gamma.float() - GAMMA_MIN) / (GAMMA_MAX - GAMMA_MIN)  # about [0, 1]
        cond = [g.flatten(1).mean(1, keepdim=True)]
        if self.latent_dim:
            cond.append(z.float())
        scales_shifts = self.embed(torch.cat(cond, 1)).chunk(2 * len(self.blocks), dim=1)
        h = self.conv_in(torch.cat([x_t, g.expand_as(x_t).to(x_t.dtype)], 1))
        for i, conv in enumerate(self.blocks):
            scale, shift = scales_shifts[2 * i], scales_shifts[2 * i + 1]
            h = h + conv(F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]))
        return x_t + self.conv_out(F.silu(h))


# --8<-- [end:SmallDenoiser]


def main() -> dict[str, float]:
    """Check the output shape, then train MuLAN with this denoiser for 2 steps via the CLI."""
    import tempfile
    from pathlib import Path

    from mulan.cli import build_cli

    net = SmallDenoiser((1, 8, 8), latent_dim=10)
    out = net(torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.rand(4, 10))
    assert out.shape == (4, 1, 8, 8)
    config = Path(__file__).with_name("small_denoiser.yaml")
    with tempfile.TemporaryDirectory() as root:
        cli = build_cli(["fit", "--config", str(config), "--trainer.default_root_dir", root])
    loss = float(cli.trainer.callback_metrics["train/bpd_step"])
    print(f"denoiser {type(cli.model.model.denoiser).__name__}: train bpd after 2 steps {loss:.3f}")
    return {"train_bpd": loss}


if __name__ == "__main__":
    main()
