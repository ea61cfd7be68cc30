"""Render the figures of the documentation with mulan's own code (CPU, a few seconds).

    .venv/bin/python docs/make_figures.py            # writes docs/figures/*.png

Every model here is randomly initialised (seeded): the figures show what the components *can* express and
what the plotting helpers of :mod:`mulan.figures` draw, not trained results.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mulan.figures import schedule_maps, snr_variance  # noqa: E402
from mulan.latents import KHotLatent  # noqa: E402
from mulan.model import DiffusionModel  # noqa: E402
from mulan.networks import UNet  # noqa: E402
from mulan.processes.schedules import FixedLinear, LearnedScalar, MonotoneNN, Polynomial  # noqa: E402

OUT = Path(__file__).parent / "figures"
DPI = 100


def digits(n: int) -> torch.Tensor:
    """The first ``n`` of scikit-learn's 8x8 digits as uint8 (n, 1, 8, 8), like the data module."""
    from sklearn.datasets import load_digits

    values = load_digits().images[:n]
    return torch.from_numpy(np.floor(values * 255.0 / 16.0 + 0.5).astype(np.uint8)).unsqueeze(1)


def schedules_figure() -> None:
    """gamma(t) of the four schedules; the polynomial one for 3 latents x 4 data dimensions."""
    shape = (1, 8, 8)
    t = torch.linspace(0, 1, 201)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    ax = axes[0]
    for name, schedule, style in [
        ("FixedLinear", FixedLinear(shape, 0), "-"),
        ("LearnedScalar (at init)", LearnedScalar(shape, 0), "--"),
        ("MonotoneNN (random init)", MonotoneNN(shape, 0, features=256), "-"),
    ]:
        with torch.no_grad():
            ax.plot(t, schedule.gamma(t).flatten(), style, label=name)
    ax.set_title("scalar schedules (VDM)", fontsize=10)
    ax.set_xlabel("t")
    ax.set_ylabel(r"$\gamma(t)$ = $-\log$ SNR")
    ax.legend(fontsize=8)

    ax = axes[1]
    latent = KHotLatent(shape, m=50, k=15, channels=8, num_blocks=1)
    polynomial = Polynomial(shape, latent.dim, hidden=64)
    with torch.no_grad():  # a non-zero quadratic head, so the curves show the full family
        polynomial.head_a.weight.normal_(0, 0.3)
        z = latent.sample_prior(3)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        dims = [(0, 1, 1), (0, 3, 4), (0, 5, 2), (0, 7, 6)]
        for i in range(3):
            gamma = polynomial.gamma(t, z[i : i + 1].expand(len(t), -1))  # (T, 1, 8, 8)
            for j, d in enumerate(dims):
                ax.plot(
                    t,
                    gamma[:, d[0], d[1], d[2]],
                    color=colours[i],
                    alpha=0.9,
                    lw=1.2,
                    ls=["-", "--", ":", "-."][j],
                    label=f"z{i + 1}" if j == 0 else None,
                )
    ax.set_title("Polynomial (MuLAN): 3 latents z x 4 pixels", fontsize=10)
    ax.set_xlabel("t")
    ax.legend(fontsize=8, title="colour: latent; style: pixel", title_fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.axhline(-13.3, color="grey", lw=0.6)
        ax.axhline(5.0, color="grey", lw=0.6)
    fig.tight_layout()
    fig.savefig(OUT / "schedules.png", dpi=DPI)
    plt.close(fig)


def tiny_mulan() -> DiffusionModel:
    shape = (1, 8, 8)
    latent = KHotLatent(shape, m=50, k=15, channels=8, num_blocks=1)
    schedule = Polynomial(shape, latent.dim, hidden=64)
    with torch.no_grad():
        schedule.head_a.weight.normal_(0, 0.3)
    denoiser = UNet(shape, latent.dim, channels=16, num_blocks=1, dropout=0.0)
    return DiffusionModel(shape, schedule, denoiser, latent).eval()


def model_figures() -> None:
    model = tiny_mulan()
    fig = schedule_maps(model, digits(4))
    fig.savefig(OUT / "schedule_maps.png", dpi=DPI)
    plt.close(fig)
    fig, _, _ = snr_variance(model, num_latents=64, num_times=50)
    fig.savefig(OUT / "snr_variance.png", dpi=DPI)
    plt.close(fig)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    schedules_figure()
    model_figures()
    for path in sorted(OUT.glob("*.png")):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
