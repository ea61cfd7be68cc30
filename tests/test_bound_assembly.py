"""The bound as the public model assembles it: every term of ``DiffusionModel.forward`` against its exact value.

8-bit images (uint8, through the real forward pass), a MuLAN model (k-hot latent, per-dimension polynomial
schedule with fixed endpoints) and the linear noise predictor that is optimal among linear ones for the images'
second moments ``m_i = E[x_i^2]``: ``eps_hat_i = sigma_i x_t,i / (alpha_i^2 m_i + sigma_i^2)``. For ANY data with those
second moments, and any schedule with endpoints ``gamma_min``, ``gamma_max`` (per dimension too), the expected
diffusion term is exactly ``1/2 sum_i [log(1 + m_i e^-gamma_min) - log(1 + m_i e^-gamma_max)]`` (docs: math,
section 7). The prior term is a closed form of each image; the latent costs ``log C(m, k)``; the reconstruction
term is checked against the full 256-way softmax under the same injected noise. Each check is tight enough that
a 1% change of that term (or dropping it from the total) fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mulan import elbo
from mulan.data import digits_images, resize_uint8
from mulan.latents import KHotLatent
from mulan.model import DiffusionModel
from mulan.processes.schedules import GAMMA_MAX, GAMMA_MIN, Polynomial

SHAPE = (1, 4, 4)
M, K = 6, 2


class LinearOptimal(nn.Module):
    """``eps_hat = sigma x_t / (alpha^2 m + sigma^2)`` per dimension (ignores ``z``)."""

    def __init__(self, second_moment: Tensor) -> None:
        super().__init__()
        self.register_buffer("m", second_moment)

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        alpha2, sigma2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
        return sigma2.sqrt() * x_t / (alpha2 * self.m + sigma2)


@pytest.fixture(scope="module")
def setting() -> tuple[DiffusionModel, Tensor, Tensor]:
    torch.manual_seed(0)
    images = resize_uint8(digits_images()[:400], 4, "bilinear")  # real 8-bit images, (400, 1, 4, 4)
    x = elbo.to_unit_interval(images)
    second_moment = x.square().mean(0)
    process = Polynomial(SHAPE, M, hidden=16)
    with torch.no_grad():
        process.head_a.weight.normal_(0, 0.5)  # a genuinely per-dimension, z-dependent schedule
    latent = KHotLatent(SHAPE, m=M, k=K, channels=8, num_blocks=1)
    model = DiffusionModel(SHAPE, process, LinearOptimal(second_moment), latent).eval()
    return model, images, second_moment


def _exact_diffusion(second_moment: Tensor) -> float:
    m = second_moment.double()
    return 0.5 * (torch.log1p(m * math.exp(-GAMMA_MIN)) - torch.log1p(m * math.exp(-GAMMA_MAX))).sum().item()


def test_diffusion_term_of_forward_is_the_closed_form(setting) -> None:
    model, images, second_moment = setting
    repeats = 250  # 100k (image, time, noise) draws
    with torch.no_grad():
        values = torch.cat([model(images).diffusion for _ in range(repeats)]).double()
    estimate, stderr = values.mean().item(), values.std().item() / math.sqrt(values.numel())
    exact = _exact_diffusion(second_moment)
    assert 4 * stderr < 0.01 * exact  # the test resolves a 1% change of the term
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


def test_prior_latent_reconstruction_and_total_of_forward(setting) -> None:
    model, images, _ = setting
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=g)
    t = torch.rand(images.shape[0], generator=g)
    with torch.no_grad():
        bound = model(images, t=t, recon_noise=noise)
    x = elbo.to_unit_interval(images).double()
    # prior: KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) per dimension, at the fixed endpoint gamma_max
    a2, s2 = torch.sigmoid(torch.tensor(-GAMMA_MAX, dtype=torch.float64)), torch.sigmoid(torch.tensor(GAMMA_MAX))
    prior = (0.5 * (a2 * x.square() + s2.double() - torch.log(s2.double()) - 1)).flatten(1).sum(1)
    torch.testing.assert_close(bound.prior.double(), prior, rtol=1e-5, atol=1e-7)
    # latent: log C(m, k) for every image
    torch.testing.assert_close(
        bound.latent.double(), torch.full_like(prior, math.log(math.comb(M, K))), rtol=1e-6, atol=0
    )
    # reconstruction: the full 256-way softmax of z~ = x + exp(gamma_min / 2) eps_0 at the same eps_0
    z_tilde = x + math.exp(GAMMA_MIN / 2) * noise.double()
    centres = elbo.to_unit_interval(torch.arange(256)).double()
    logits = -(z_tilde.unsqueeze(-1) - centres).square() / (2 * math.exp(GAMMA_MIN))
    log_p = torch.log_softmax(logits, -1).gather(-1, images.long().unsqueeze(-1)).squeeze(-1)
    recon = -log_p.flatten(1).sum(1)
    torch.testing.assert_close(bound.recon.double(), recon, rtol=1e-4, atol=1e-5)
    assert recon.mean() > 1e-2  # so a 1% change (> 1e-4 nats) exceeds the tolerance
    # the total is the sum of exactly these four terms (not the surrogate)
    parts = bound.recon + bound.prior + bound.diffusion + bound.latent
    torch.testing.assert_close(bound.total, parts)
    assert "latent_surrogate" not in bound.terms
