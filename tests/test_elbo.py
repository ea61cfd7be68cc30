"""Tests of mulan.elbo and the DiffusionModel loss: the analytic checks of docs: math, section 7, and each term.

Monte Carlo checks assert |estimate - exact| < 4 SE (+ a tiny absolute slack), SE estimated from the samples.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mulan import elbo
from mulan.model import DiffusionModel
from mulan.networks import UNet
from mulan.processes.schedules import GAMMA_MAX, GAMMA_MIN, FixedLinear, MonotoneNN, NoiseSchedule, Polynomial
from mulan.time_sampling import antithetic_uniform

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------------
# Gaussian data x ~ N(0, diag(s^2)), D = 8, stored as (N, 2, 2, 2)
# ----------------------------------------------------------------------------------------------------

GAUSS_SHAPE = (2, 2, 2)
S = torch.logspace(math.log10(0.3), math.log10(3.0), 8, dtype=torch.float64)  # 0.3 .. 3, anisotropic


class GaussianOptimalDenoiser(nn.Module):
    """eps_hat = E[eps | x_t] = sigma x_t / (alpha^2 s^2 + sigma^2) for x ~ N(0, diag s^2)."""

    def __init__(self, s: Tensor) -> None:
        super().__init__()
        self.register_buffer("s2", s.float().square().view(1, *GAUSS_SHAPE))

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        alpha, sigma = elbo.alpha_sigma(gamma)
        return sigma * x_t / (alpha.square() * self.s2 + sigma.square())


def _gaussian_data(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 8, generator=g) * S.float()).view(n, *GAUSS_SHAPE)


def _exact_gaussian_diffusion(gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> float:
    """1/2 sum_i [log(1 + s_i^2 e^-gamma_min) - log(1 + s_i^2 e^-gamma_max)] (float64)."""
    s2 = S.square()
    return float(0.5 * (torch.log1p(s2 * math.exp(-gamma_min)) - torch.log1p(s2 * math.exp(-gamma_max))).sum())


def _exact_gaussian_discrete(steps: int) -> float:
    """T-step loss with the optimal denoiser, FixedLinear: 1/2 sum_j expm1(g_tj - g_sj) sum_i mse_i(g_tj).

    E[(eps - eps_hat)^2 | gamma] = s^2 nu / (s^2 nu + 1) with nu = exp(-gamma); t_j = j/T uniformly.
    """
    s2 = S.square()
    j = torch.arange(1, steps + 1, dtype=torch.float64)
    g_t = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * j / steps
    g_s = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * (j - 1) / steps
    nu = torch.exp(-g_t)[:, None]
    mse = (s2 * nu / (s2 * nu + 1)).sum(1)
    # expectation over t uniform on the grid: (1/T) sum_j of (1/2) T expm1(.) mse = (1/2) sum_j expm1(.) mse
    return float(0.5 * (torch.expm1(g_t - g_s) * mse).sum())


def _mean_se(values: Tensor) -> tuple[float, float]:
    v = values.double()
    return v.mean().item(), (v.std() / math.sqrt(v.numel())).item()


def _perturbed_monotone_fixed_ends() -> MonotoneNN:
    torch.manual_seed(11)
    s = MonotoneNN(GAUSS_SHAPE, 0, features=32, learn_endpoints=False)
    with torch.no_grad():
        s.w1.fill_(0.3)
        s.w2.copy_(6 + torch.randn(32))
        s.b2.copy_(3.0 + 0.5 * torch.randn(32))  # switches near t = 0.25: far from linear
        s.w3.copy_(torch.randn(32))
    mid = s.gamma(torch.tensor([0.5])).item()
    assert abs(mid - 0.5 * (GAMMA_MIN + GAMMA_MAX)) > 1.0  # guard: the interior really is non-linear
    return s


@pytest.mark.parametrize("which", ["fixed_linear", "monotone_nn"])
def test_gaussian_diffusion_loss_is_exact_for_any_schedule_with_same_endpoints(which):
    schedule = FixedLinear(GAUSS_SHAPE, 0) if which == "fixed_linear" else _perturbed_monotone_fixed_ends()
    model = DiffusionModel(GAUSS_SHAPE, schedule, GaussianOptimalDenoiser(S))
    n = 40_000
    x = _gaussian_data(n, seed=1)
    g = torch.Generator().manual_seed(2)
    t = torch.rand(n, generator=g)  # i.i.d. times, so the sample SE is the honest SE
    eps = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        loss = model.diffusion_term(x, t, None, eps=eps)
    est, se = _mean_se(loss)
    exact = _exact_gaussian_diffusion()  # 52.72 nats; MC SE ~ 0.2-0.4 nats with n = 40k
    assert abs(est - exact) < 4 * se + 1e-3, (est, exact, se)


def test_gaussian_total_bound_equals_exact_nll_up_to_analytic_residual():
    schedule = FixedLinear(GAUSS_SHAPE, 0)
    model = DiffusionModel(GAUSS_SHAPE, schedule, GaussianOptimalDenoiser(S))
    n = 40_000
    x = _gaussian_data(n, seed=3)
    g = torch.Generator().manual_seed(4)
    t, eps, eps0 = (
        torch.rand(n, generator=g),
        torch.randn(x.shape, generator=g),
        torch.randn(x.shape, generator=g),
    )
    g0, g1 = schedule.endpoints(None, n)
    with torch.no_grad():
        total = (
            elbo.gaussian_reconstruction_loss(x, g0, eps0)
            + elbo.prior_loss(x, g1)
            + model.diffusion_term(x, t, None, eps=eps)
        )
    s2 = S.float().square().view(1, *GAUSS_SHAPE)
    nll = 0.5 * (torch.log(2 * math.pi * s2) + x.square() / s2).flatten(1).sum(1)  # -log N(x; 0, diag s^2)
    # The bound exceeds the NLL by (float64, exact):
    #   1/2 sum log(1 + e^gamma_min / s^2)            (reconstruction at finite gamma_min, ~1e-5 nats)
    # + 1/2 sum [u - 1 - log u], u = sigma_1^2 + alpha_1^2 s^2   (prior mismatch at gamma_max = 5, <= 1.5e-3)
    s2d = S.square()
    a1, v1 = (
        torch.sigmoid(torch.tensor(-GAMMA_MAX, dtype=torch.float64)),
        torch.sigmoid(torch.tensor(GAMMA_MAX, dtype=torch.float64)),
    )
    u = v1 + a1 * s2d
    residual = float(0.5 * torch.log1p(math.exp(GAMMA_MIN) / s2d).sum() + 0.5 * (u - 1 - torch.log(u)).sum())
    assert 0 < residual < 1e-2
    est, se = _mean_se(total - nll)  # SE ~ 0.2 nats (of a ~11-nat bound)
    assert abs(est - residual) < 4 * se + 1e-3, (est, residual, se)
    # and the expected bound itself: E[nll] = 1/2 sum [log(2 pi s^2) + 1]
    exact_nll = float(0.5 * (torch.log(2 * math.pi * s2d) + 1).sum())
    est_total, se_total = _mean_se(total)
    assert abs(est_total - (exact_nll + residual)) < 4 * se_total + 1e-3


# ----------------------------------------------------------------------------------------------------
# Uniform 8-bit data with the Bayes-optimal denoiser: 8.00 bits/dim
# ----------------------------------------------------------------------------------------------------


class UniformBinsOptimalDenoiser(nn.Module):
    """eps_hat = (x_t - alpha E[x | x_t]) / sigma for x uniform on the 256 bin centres, per dimension."""

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        alpha, sigma = elbo.alpha_sigma(gamma)
        e = elbo.bin_centres()
        logits = -(x_t.unsqueeze(-1) - alpha.unsqueeze(-1) * e).square() / (2 * sigma.square().unsqueeze(-1))
        mean_x = (torch.softmax(logits, -1) * e).sum(-1)
        return (x_t - alpha * mean_x) / sigma


def test_uniform_8bit_data_with_bayes_optimal_denoiser_gives_8_bits_per_dim():
    shape = (1, 4, 4)
    model = DiffusionModel(shape, FixedLinear(shape, 0), UniformBinsOptimalDenoiser())
    torch.manual_seed(5)
    chunks = []
    with torch.no_grad():
        for _ in range(12):  # 24k images x 16 dims
            images = torch.randint(0, 256, (2000, *shape), dtype=torch.uint8)
            chunks.append(model.bpd(model(images).total))
    bpd = torch.cat(chunks)
    est, se = _mean_se(bpd)  # antithetic times make this SE conservative; SE ~ 0.04 bpd
    # exact answer 8 + O(1e-5) (prior mismatch at gamma_max = 5)
    assert abs(est - 8.0) < 4 * se + 0.005, (est, se)


# ----------------------------------------------------------------------------------------------------
# Discrete -> continuous
# ----------------------------------------------------------------------------------------------------


def test_discrete_loss_decreases_towards_continuous():
    n = 40_000
    x = _gaussian_data(n, seed=6)
    g = torch.Generator().manual_seed(7)
    u, eps = torch.rand(n, generator=g), torch.randn(x.shape, generator=g)  # common random numbers for all T
    denoiser = GaussianOptimalDenoiser(S)
    estimates = {}
    with torch.no_grad():
        for steps in (2, 8, 32, 256, 0):
            model = DiffusionModel(GAUSS_SHAPE, FixedLinear(GAUSS_SHAPE, 0), denoiser, timesteps=steps)
            estimates[steps] = model.diffusion_term(x, u, None, eps=eps)
    continuous = _exact_gaussian_diffusion()
    exact = {steps: _exact_gaussian_discrete(steps) for steps in (2, 8, 32, 256)}
    # analytic sanity: decreasing in T and above the continuous value
    assert exact[2] > exact[8] > exact[32] > exact[256] > continuous
    for steps in (2, 8, 32, 256):
        est, se = _mean_se(estimates[steps])
        assert abs(est - exact[steps]) < 4 * se + 1e-3, (steps, est, exact[steps], se)
    # Monte Carlo (common random numbers): monotone decrease
    means = [estimates[steps].double().mean().item() for steps in (2, 8, 32, 256)]
    assert means[0] > means[1] > means[2] > means[3], means
    # Convergence to the continuous loss. With gamma_max - gamma_min = 18.3 the T = 256 loss is still
    # 1.78 nats (3.4%) above the continuous 52.72 nats (the gap is O(1/T): 16.9 nats at T = 32), which is
    # ~9 SE here, so compare the paired (common random numbers) gaps with their exact values instead.
    gaps = {}
    for steps in (32, 256):
        diff = estimates[steps] - estimates[0]
        est, se = _mean_se(diff)  # SE ~ 0.008 (T = 256) to 0.07 (T = 32) nats
        assert abs(est - (exact[steps] - continuous)) < 4 * se + 1e-3, (
            steps,
            est,
            exact[steps] - continuous,
            se,
        )
        gaps[steps] = est
    assert 0 < gaps[256] < 0.2 * gaps[32]  # ~ 32/256 = 0.125: first-order convergence
    assert gaps[256] / continuous < 0.05


# ----------------------------------------------------------------------------------------------------
# The terms, against hand computations
# ----------------------------------------------------------------------------------------------------


def test_reconstruction_loss_matches_explicit_loop():
    images = torch.tensor([[[[0, 255], [128, 37]]], [[[1, 254], [127, 200]]]], dtype=torch.uint8)  # (2, 1, 2, 2)
    noise = torch.tensor([[[[0.3, -1.2], [2.0, 0.1]]], [[[-0.5, 0.7], [1.5, -2.2]]]])
    gamma_0 = torch.tensor([-6.0, -8.5]).view(2, 1, 1, 1)  # per example; broad decoder (several bins matter)
    out = elbo.reconstruction_loss(images, gamma_0, noise)
    assert out.shape == (2,)
    for b in range(2):
        g0 = gamma_0[b].item()
        total = 0.0
        for i in range(2):
            for j in range(2):
                k = int(images[b, 0, i, j])
                x = 2 * (k + 0.5) / 256 - 1
                zt = x + math.exp(g0 / 2) * float(noise[b, 0, i, j])
                logits = [-((zt - (2 * (v + 0.5) / 256 - 1)) ** 2) / (2 * math.exp(g0)) for v in range(256)]
                top = max(logits)
                lse = top + math.log(sum(math.exp(lv - top) for lv in logits))
                total -= logits[k] - lse
        assert out[b].item() == pytest.approx(total, rel=1e-4, abs=1e-5)
    # a broad decoder makes this a real test: the loss is not ~0
    assert out[0].item() > 0.1


def test_reconstruction_loss_per_dimension_gamma():
    images = torch.randint(0, 256, (3, 2, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    gamma_0 = torch.linspace(-9, -5, 8).view(1, 2, 2, 2)
    per_dim = elbo.reconstruction_loss(images, gamma_0, noise)
    # the same loss, one dimension at a time with a scalar gamma_0
    expected = torch.zeros(3)
    for idx in range(8):
        c, h, w = (idx // 4, (idx // 2) % 2, idx % 2)
        expected += elbo.reconstruction_loss(
            images[:, c : c + 1, h : h + 1, w : w + 1],
            gamma_0[:, c, h, w].view(1, 1, 1, 1),
            noise[:, c : c + 1, h : h + 1, w : w + 1],
        )
    torch.testing.assert_close(per_dim, expected, rtol=1e-5, atol=1e-5)


def test_prior_loss_is_kl_to_standard_normal():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 2, 3, 2, generator=g) * 2 - 1
    for gamma_1 in (torch.tensor(5.0).view(1, 1, 1, 1), torch.randn(4, 2, 3, 2, generator=g) * 3):
        out = elbo.prior_loss(x, gamma_1.float())
        gd = gamma_1.double().expand_as(x)
        alpha, sigma = torch.sigmoid(-gd).sqrt(), torch.sigmoid(gd).sqrt()
        q = torch.distributions.Normal(alpha * x.double(), sigma)
        p = torch.distributions.Normal(torch.zeros_like(gd), torch.ones_like(gd))
        expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_alpha_sigma_stable_and_exact():
    gamma = torch.linspace(-30, 30, 601)
    alpha, sigma = elbo.alpha_sigma(gamma)
    assert alpha.dtype == torch.float32
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
    assert (alpha > 0).all() and (sigma > 0).all()
    torch.testing.assert_close(alpha.square() + sigma.square(), torch.ones_like(gamma), rtol=0, atol=1e-6)
    gd = gamma.double()
    torch.testing.assert_close(alpha.double(), torch.sigmoid(-gd).sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(sigma.double(), torch.sigmoid(gd).sqrt(), rtol=1e-5, atol=0)


def test_diffusion_loss_per_dimension_hand_computation():
    eps = torch.tensor([0.5, -1.0, 2.0, 0.25]).view(1, 1, 2, 2)
    eps_hat = torch.tensor([0.1, -0.5, 1.0, 1.25]).view(1, 1, 2, 2)
    dgamma = torch.tensor([1.0, 3.0, 10.0, 0.5]).view(1, 1, 2, 2)
    # 1/2 [1*0.16 + 3*0.25 + 10*1 + 0.5*1] = 1/2 * 11.41
    expected = 0.5 * (1.0 * 0.4**2 + 3.0 * 0.5**2 + 10.0 * 1.0**2 + 0.5 * 1.0**2)
    out = elbo.diffusion_loss(eps, eps_hat, dgamma)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_diffusion_loss_scalar_schedule_is_vdm_loss():
    g = torch.Generator().manual_seed(8)
    eps, eps_hat = torch.randn(5, 3, 4, 2, generator=g), torch.randn(5, 3, 4, 2, generator=g)
    dgamma = torch.rand(5, 1, 1, 1, generator=g) * 20
    out = elbo.diffusion_loss(eps, eps_hat, dgamma)
    vdm = 0.5 * dgamma.flatten() * (eps - eps_hat).flatten(1).norm(dim=1).square()
    torch.testing.assert_close(out, vdm, rtol=1e-5, atol=1e-5)


def test_discrete_diffusion_loss_hand_computation():
    eps = torch.tensor([1.0, -2.0]).view(1, 1, 1, 2)
    eps_hat = torch.tensor([0.0, 0.0]).view(1, 1, 1, 2)
    gamma_t = torch.tensor([0.3, -1.0]).view(1, 1, 1, 2)
    gamma_s = torch.tensor([0.1, -1.5]).view(1, 1, 1, 2)
    steps = 10
    expected = 0.5 * steps * (math.expm1(0.2) * 1.0 + math.expm1(0.5) * 4.0)
    out = elbo.discrete_diffusion_loss(eps, eps_hat, gamma_t, gamma_s, steps)
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_gaussian_reconstruction_loss_is_gaussian_nll():
    g = torch.Generator().manual_seed(9)
    x, noise = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    gamma_0 = torch.tensor(-4.0).view(1, 1, 1, 1)
    out = elbo.gaussian_reconstruction_loss(x, gamma_0, noise)
    z_tilde = x + math.exp(-2.0) * noise  # z_0 / alpha_0
    expected = -torch.distributions.Normal(z_tilde.double(), math.exp(-2.0)).log_prob(x.double()).flatten(1).sum(1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# A constant-across-dimensions Polynomial equals the equivalent scalar schedule
# ----------------------------------------------------------------------------------------------------

POLY_A, POLY_B, POLY_C_RAW = 1.3, -1.9, 0.2
POLY_C = 1e-3 + math.log1p(math.exp(POLY_C_RAW))


class ScalarPolynomial(NoiseSchedule):
    """The scalar polynomial schedule of docs: math, section 2 with fixed scalar a, b, c, written by hand."""

    def __init__(self, image_shape, latent_dim):
        super().__init__(image_shape, latent_dim, GAMMA_MIN, GAMMA_MAX)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def gamma_and_derivative(self, t, z):
        a, b, c = POLY_A, POLY_B, POLY_C
        td = t.double()

        def f(u):
            return a * a * u**5 / 5 + a * b * u**4 / 2 + (b * b + 2 * a * c) * u**3 / 3 + b * c * u**2 + c * c * u

        f1 = f(torch.ones_like(td))
        span = self.gamma_max - self.gamma_min
        return (self.gamma_min + span * f(td) / f1).float(), (span * (a * td**2 + b * td + c) ** 2 / f1).float()


def _constant_polynomial(shape, latent_dim):
    s = Polynomial(shape, latent_dim, hidden=8)
    with torch.no_grad():
        for head, value in ((s.head_a, POLY_A), (s.head_b, POLY_B), (s.head_c, POLY_C_RAW)):
            head.weight.zero_()
            head.bias.fill_(value)
    return s


def test_constant_polynomial_loss_equals_scalar_schedule_loss():
    from mulan.latents import KHotLatent

    shape, m = (2, 3, 4), 6
    torch.manual_seed(0)
    # no Fourier features: they amplify the float32 rounding of gamma (~5e-6) by 2^7 2 pi
    denoiser = UNet(shape, m, channels=8, num_blocks=1, dropout=0.0, fourier_exponents=())
    with torch.no_grad():
        denoiser.conv_out.weight.normal_(0, 0.1)  # not the identity: eps_hat depends on gamma and z
    latent = KHotLatent(shape, m=m, k=2, channels=8, num_blocks=1)
    poly = DiffusionModel(shape, _constant_polynomial(shape, m), denoiser, latent)
    scalar = DiffusionModel(shape, ScalarPolynomial(shape, m), denoiser, latent)

    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, *shape, generator=g) * 2 - 1
    t = torch.rand(4, generator=g)
    eps = torch.randn(x.shape, generator=g)
    z = torch.randn(4, m, generator=g)
    with torch.no_grad():
        a = poly.diffusion_term(x, t, z, eps=eps)
        b = scalar.diffusion_term(x, t, z, eps=eps)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a > 0).all()

    images = torch.randint(0, 256, (4, *shape), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        torch.manual_seed(123)
        terms_p = poly(images)
        torch.manual_seed(123)
        terms_s = scalar(images)
    for name in ("recon", "prior", "diffusion", "latent"):
        torch.testing.assert_close(getattr(terms_p, name), getattr(terms_s, name), rtol=1e-4, atol=1e-4)

    # discrete time as well
    poly.timesteps = scalar.timesteps = 16
    with torch.no_grad():
        torch.testing.assert_close(
            poly.diffusion_term(x, t, z, eps=eps),
            scalar.diffusion_term(x, t, z, eps=eps),
            rtol=1e-4,
            atol=1e-4,
        )


# ----------------------------------------------------------------------------------------------------
# Times
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 64])
def test_antithetic_uniform_equally_spaced_mod_1(n):
    for seed in range(5):
        t = antithetic_uniform(n, generator=torch.Generator().manual_seed(seed))
        assert t.shape == (n,)
        assert (t >= 0).all() and (t < 1).all()
        ts = t.double().sort().values
        gaps = torch.cat([ts.diff(), (ts[:1] + 1 - ts[-1:])])
        torch.testing.assert_close(gaps, torch.full_like(gaps, 1.0 / n), rtol=0, atol=1e-6)


def test_antithetic_uniform_offset_is_random():
    firsts = torch.stack([antithetic_uniform(4, generator=torch.Generator().manual_seed(s))[0] for s in range(20)])
    assert firsts.unique().numel() == 20


@pytest.mark.parametrize("steps", [1, 4, 1000])
def test_discretise_times_on_grid(steps):
    u = torch.cat([torch.tensor([0.0, 0.999999]), torch.rand(200, generator=torch.Generator().manual_seed(0))])
    t, s = elbo.discretise_times(u, steps)
    j = t * steps
    torch.testing.assert_close(j, j.round(), rtol=0, atol=1e-3)
    assert (j.round() >= 1).all() and (j.round() <= steps).all()
    torch.testing.assert_close(s, t - 1.0 / steps)
    assert (s <= u + 1e-6).all() and (u < t + 1e-6).all()  # u lies in the interval [s, t)
    assert t[0].item() == pytest.approx(1.0 / steps) and s[0].item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------


def test_check_images_errors_name_the_expected_shape():
    shape = (3, 4, 5)
    model = DiffusionModel(shape, FixedLinear(shape, 0), UNet(shape, 0, channels=8, num_blocks=1))
    model.check_images(torch.zeros(2, 3, 4, 5, dtype=torch.uint8))  # fine
    with pytest.raises(TypeError, match="uint8"):
        model.check_images(torch.zeros(2, 3, 4, 5))
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(2, 3, 4, 5))
    for bad in [(2, 1, 4, 5), (2, 3, 5, 4), (3, 4, 5), (1, 2, 3, 4, 5)]:
        with pytest.raises(ValueError, match=r"\(B, 3, 4, 5\)"):
            model.check_images(torch.zeros(bad, dtype=torch.uint8))
