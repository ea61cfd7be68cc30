"""The adaptivity pictures measure what they say: log-SNR maps per image, and their spread across images."""

from __future__ import annotations

import matplotlib
import pytest
import torch

import mulan
from mulan.figures import log_snr_maps, log_snr_spread, schedule_maps

matplotlib.use("Agg")
SHAPE = (3, 4, 4)


def _model(latent_dim: int) -> mulan.DiffusionModel:
    torch.manual_seed(0)
    latent = mulan.KHotLatent(SHAPE, m=latent_dim, k=2, channels=8, num_blocks=1) if latent_dim else None
    process = mulan.Polynomial(SHAPE, latent_dim, hidden=16)
    return mulan.DiffusionModel(SHAPE, process, mulan.UNet(SHAPE, latent_dim, channels=8, num_blocks=1), latent)


IMAGES = torch.randint(0, 256, (5, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_maps_are_the_processes_log_snr() -> None:
    model = _model(6)
    torch.manual_seed(2)
    maps = log_snr_maps(model, IMAGES, (0.0, 0.3, 1.0))
    assert maps.shape == (3, 5, 4, 4)
    torch.testing.assert_close(maps[0], torch.full_like(maps[0], 13.3))  # fixed endpoints: -gamma_min ...
    torch.testing.assert_close(maps[2], torch.full_like(maps[2], -5.0))  # ... and -gamma_max for every image
    torch.manual_seed(2)
    ctx = model.encode(mulan.to_unit_interval(IMAGES))[0]
    gamma = model.process.marginal(torch.full((5,), 0.3), ctx).gamma
    torch.testing.assert_close(maps[1], (-gamma).mean(1))
    schedule_maps(model, IMAGES[:3])  # draws without error


@pytest.mark.parametrize(("latent_dim", "adaptive"), [(6, True), (0, False)])
def test_spread_across_images_is_zero_exactly_when_the_schedule_ignores_z(latent_dim: int, adaptive: bool) -> None:
    fig, times, across, within, flag = log_snr_spread(_model(latent_dim), IMAGES, num_times=5)
    assert flag is adaptive
    assert (across.max() > 1e-2) if adaptive else (across.abs().max() < 1e-5)
    assert within[2] > 1e-2  # per-dimension either way
    assert across[0] == pytest.approx(0.0, abs=1e-5) and across[-1] == pytest.approx(0.0, abs=1e-5)  # fixed ends
    assert ("ignores z" in fig.axes[0].get_title()) is not adaptive
