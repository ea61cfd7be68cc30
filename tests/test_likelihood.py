"""Tests of the probability-flow ODE likelihood in mulan.likelihood (docs: math, sections 6 and 7).

- Gaussian data ``x ~ N(0, Sigma)`` with the Bayes-optimal denoiser ``eps_hat = S (A Sigma A + S^2)^-1 x_t``
  (``A = diag(alpha)``, ``S = diag(sigma)``, valid for scalar and per-dimension schedules): the ODE gives
  ``log N(x; 0, Sigma)`` exactly when ``gamma_max`` is large (15: the N(0, I) prior is then the true
  marginal).
- Uniform 8-bit data with its Bayes-optimal denoiser: the dequantised bound is ``8 - log2(Phi(3) - Phi(-3))``
  = 8.0039 bits/dim (the truncated normal's mass inside +-3 sd), checking the nats/bits bookkeeping.
Monte Carlo checks assert ``|estimate - exact| < 4 SE`` (+ a small slack), SE estimated from the samples."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from mulan import elbo, ode
from mulan.latents import KHotLatent, log_binomial
from mulan.likelihood import (
    HALF_BIN,
    dequantisation_scale,
    dequantise,
    importance_weighted,
    ode_likelihood,
    ode_likelihood_dataset,
    ode_log_density,
)
from mulan.model import DiffusionModel
from mulan.networks import UNet
from mulan.ode import ODESettings
from mulan.processes import Context
from mulan.processes.schedules import FixedLinear, NoiseSchedule, Polynomial

pytestmark = pytest.mark.usefixtures("single_thread")


SHAPE = (2, 2, 2)
D = 8
S = torch.logspace(math.log10(0.3), math.log10(2.0), D, dtype=torch.float64)  # anisotropic standard deviations
GAMMA_MAX_LARGE = 15.0


class GaussianDenoiser(nn.Module):
    """Bayes-optimal ``eps_hat = E[eps | x_t] = S (A Sigma A + S^2)^-1 x_t`` for ``x ~ N(0, Sigma)``, where
    ``x_t = A x + S eps`` with diagonal ``A = alpha``, ``S = sigma`` (scalar or per-dimension gamma)."""

    def __init__(self, cov: Tensor) -> None:
        super().__init__()
        self.register_buffer("cov", cov)

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        b, d = x_t.shape[0], self.cov.shape[0]
        gamma = gamma.to(x_t.dtype).expand_as(x_t).reshape(b, d)
        sigma2, alpha = torch.sigmoid(gamma), torch.sigmoid(-gamma).sqrt()
        cov_t = alpha[:, :, None] * self.cov.to(x_t.dtype) * alpha[:, None, :] + torch.diag_embed(sigma2)
        return (sigma2.sqrt() * torch.linalg.solve(cov_t, x_t.reshape(b, d, 1)).squeeze(-1)).view_as(x_t)


def _per_dimension_schedule(seed: int = 0) -> Polynomial:
    torch.manual_seed(seed)
    schedule = Polynomial(SHAPE, 0, gamma_max=GAMMA_MAX_LARGE, hidden=8)
    with torch.no_grad():
        for head in (schedule.head_a, schedule.head_b, schedule.head_c):
            head.weight.normal_(0.0, 1.0)
            head.bias.normal_(0.0, 1.0)
    return schedule


SCHEDULES = {
    "scalar": lambda: FixedLinear(SHAPE, 0, gamma_max=GAMMA_MAX_LARGE),
    "per_dimension": _per_dimension_schedule,
}


def _rotated_covariance(seed: int = 0) -> Tensor:
    """``R diag(S^2) R^T`` with a random rotation: a full covariance (off-diagonal Jacobian of the drift)."""
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return rotation @ torch.diag(S.square()) @ rotation.T


def _gaussian_case(cov: Tensor, schedule: NoiseSchedule, n: int, seed: int) -> tuple[DiffusionModel, Tensor, Tensor]:
    """Model, data (n, *SHAPE) float64 and the exact ``log N(x; 0, cov)`` (n,) in nats."""
    model = DiffusionModel(SHAPE, schedule, GaussianDenoiser(cov))
    normal = torch.distributions.MultivariateNormal(torch.zeros(D, dtype=torch.float64), cov)
    x = _seeded_sample(normal, n, seed)
    return model, x.view(n, *SHAPE), normal.log_prob(x)


def _seeded_sample(normal: torch.distributions.MultivariateNormal, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (normal.scale_tril @ torch.randn(n, D, 1, generator=g, dtype=torch.float64)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# continuous log-density of Gaussian data


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_gaussian_log_density_exact_divergence(kind: str, dtype: torch.dtype) -> None:
    """Exact divergence: ``log N(x; 0, Sigma)`` to 1e-3 nats per dimension, for every example."""
    model, x, exact = _gaussian_case(torch.diag(S.square()), SCHEDULES[kind](), 16, seed=1)
    result = ode_log_density(model, x, dtype=dtype, exact_divergence=True)
    assert result.log_p.dtype == dtype and result.log_p.shape == (16,) and result.x_1.shape == x.shape
    assert ((result.log_p.double() - exact).abs() / D < 1e-3).all()
    assert result.nfe > 10


def test_gaussian_log_density_full_covariance_exact_divergence() -> None:
    """A rotated covariance (non-diagonal Jacobian): the exact trace still gives the exact log-density."""
    model, x, exact = _gaussian_case(_rotated_covariance(), SCHEDULES["per_dimension"](), 16, seed=2)
    result = ode_log_density(model, x, dtype=torch.float64, exact_divergence=True)
    assert ((result.log_p - exact).abs() / D < 1e-3).all()


def test_gaussian_log_density_hutchinson() -> None:
    """Hutchinson (one Rademacher probe per solve) with a full covariance, where the probe estimate is noisy:
    unbiased, i.e. the mean error over 200 examples is within 4 SE (+1e-3 nats/dim), and the per-example
    spread is real (so this does test the estimator, not an exact trace in disguise)."""
    n = 200
    model, x, exact = _gaussian_case(_rotated_covariance(), SCHEDULES["scalar"](), n, seed=3)
    result = ode_log_density(model, x, generator=torch.Generator().manual_seed(4))
    error = result.log_p.double() - exact
    se = error.std() / math.sqrt(n)
    assert error.std() > 0.1
    assert error.mean().abs() < 4 * se + 1e-3 * D, (error.mean(), se)


def test_gaussian_log_density_hutchinson_diagonal_is_exact() -> None:
    """With a diagonal Jacobian, ``v^T J v = tr J`` for every Rademacher ``v``: the estimate is exact."""
    model, x, exact = _gaussian_case(torch.diag(S.square()), SCHEDULES["per_dimension"](), 16, seed=5)
    result = ode_log_density(model, x, generator=torch.Generator().manual_seed(6))
    assert ((result.log_p.double() - exact).abs() / D < 1e-3).all()


def test_several_probes_estimate_their_own_noise() -> None:
    """``P = 4`` probes per solve: still unbiased, and ``log_p_var`` (from the probes' spread) matches the real
    variance of the estimate across examples (ratio within [0.7, 1.4] over 200 examples); one probe cannot
    estimate it (NaN), the exact trace has none (0)."""
    n = 200
    model, x, exact = _gaussian_case(_rotated_covariance(), SCHEDULES["scalar"](), n, seed=3)
    result = ode_log_density(model, x, generator=torch.Generator().manual_seed(4), num_probes=4)
    error = result.log_p.double() - exact
    assert error.mean().abs() < 4 * error.std() / math.sqrt(n) + 1e-3 * D
    ratio = error.var() / result.log_p_var.double().mean()
    assert 0.7 < ratio < 1.4, ratio
    assert torch.isnan(ode_log_density(model, x[:2], generator=torch.Generator().manual_seed(4)).log_p_var).all()
    assert (ode_log_density(model, x[:2], exact_divergence=True).log_p_var == 0).all()


def test_importance_weighting_hutchinson_estimates_is_optimistic() -> None:
    """The reason the headline ODE figure is not importance weighted with Hutchinson probes (docs: math, section
    6): with ``K = 5`` noisy but unbiased estimates of the same ``log p`` (std ~1.6 nats with 2 probes), the
    log-mean-exp overestimates ``log p`` by ~0.9 nats (far beyond 5 SE), while their plain mean stays unbiased;
    the bias reported by :func:`importance_weighted` is of that size (within 25%)."""
    n, k = 200, 5
    model, x, exact = _gaussian_case(_rotated_covariance(), SCHEDULES["scalar"](), n, seed=3)
    result = ode_log_density(model, x.repeat(k, 1, 1, 1), generator=torch.Generator().manual_seed(4), num_probes=2)
    log_p, variance = result.log_p.double().view(k, n), result.log_p_var.double().view(k, n)
    plain = log_p.mean(0) - exact
    assert plain.mean().abs() < 4 * plain.std() / math.sqrt(n) + 1e-3 * D
    log_mean, bias = importance_weighted(log_p, variance)
    excess = log_mean - exact
    assert excess.mean() > 5 * excess.std() / math.sqrt(n) and excess.mean() > 0.5, excess.mean()
    assert abs(bias.mean() / excess.mean() - 1) < 0.25, (bias.mean(), excess.mean())


def test_importance_weighted_arithmetic() -> None:
    """Equal weights: the log-mean-exp is the common value. The bias is the Jensen gap of ``K`` Gaussian errors:
    ``(1 - 1/K) Var / 2`` for small noise; for large noise (sd 15 nats, as Hutchinson's ``log p`` has on the trained
    digits models) about ``sd E[max of K normals] - log K`` (15.90 by a 2e6-sample Monte Carlo), far below
    ``Var / 2``. ``K = 1``: no bias; unknown noise (NaN): unknown bias."""
    log_w = torch.tensor([[1.0, -2.0]]).repeat(4, 1)
    log_mean, bias = importance_weighted(log_w, torch.full((4, 2), 0.01))
    assert torch.allclose(log_mean, torch.tensor([1.0, -2.0]))
    assert torch.allclose(bias, torch.full((2,), 0.75 * 0.01 / 2), rtol=0.05)
    assert abs(importance_weighted(torch.zeros(5, 1), torch.full((5, 1), 225.0))[1].item() - 15.90) < 0.5
    log_mean, bias = importance_weighted(torch.tensor([[0.0, math.log(3.0)]]).T, torch.full((2, 1), math.nan))
    assert torch.allclose(log_mean, torch.tensor([math.log(2.0)])) and torch.isnan(bias).all()
    assert (importance_weighted(log_w[:1], torch.full((1, 2), math.nan))[1] == 0).all()


def test_vectorised_divergence_matches_the_jacobian(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact trace, computed a few basis vectors at a time (several chunks here), is the trace of the full
    Jacobian of a real U-Net's drift; each of several probes gives its own ``v^T J v``."""
    model = _tiny_mulan()
    ctx = model.encode(torch.rand(3, 1, 3, 2) * 2 - 1)[0]
    f = ode.drift(model, ctx)
    x, t = torch.randn(3, 1, 3, 2), torch.tensor(0.3)

    def one(i: int) -> Tensor:  # the Jacobian of example i's drift, alone
        f_i = ode.drift(model, Context(z=ctx.z[i : i + 1]))
        return torch.autograd.functional.jacobian(lambda v: f_i(t, v[None])[0], x[i]).reshape(6, 6)

    jacobian = torch.stack([one(i) for i in range(3)])
    monkeypatch.setattr(ode, "EXACT_TRACE_CHUNK", 4)
    drift, trace = ode.drift_and_divergence(f, t, x, None)
    assert trace.shape == (3, 1) and torch.allclose(drift, f(t, x))
    assert torch.allclose(trace[:, 0], jacobian.diagonal(dim1=1, dim2=2).sum(1), rtol=1e-4, atol=1e-4)
    probes = torch.randint(0, 2, (5, *x.shape), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    _, estimates = ode.drift_and_divergence(f, t, x, probes)
    flat = probes.reshape(5, 3, 6)
    assert estimates.shape == (3, 5)
    assert torch.allclose(estimates, torch.einsum("pbi,bij,pbj->bp", flat, jacobian, flat), rtol=1e-4, atol=1e-4)
    assert (estimates.std(1) > 1e-3).all()  # the probes differ: not the trace five times


# ----------------------------------------------------------------------------------------------------
# dequantisation and the discrete bound


def test_dequantise_inside_bin_and_density() -> None:
    """``x~`` stays inside the pixel's bin and ``log q`` is the truncated-normal density scaled by sigma_0."""
    from scipy.stats import truncnorm

    images = torch.randint(0, 256, (64, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scale = torch.full((64, 1, 1, 1), math.exp(-13.3 / 2))
    x_tilde, log_q = dequantise(images, scale, torch.Generator().manual_seed(1), torch.float64)
    x = elbo.to_unit_interval(images).double()
    assert ((x_tilde - x).abs() <= HALF_BIN).all()
    u = ((x_tilde - x) / scale.double()).numpy()
    assert abs(u.std() - truncnorm.std(-3, 3)) < 0.05 and abs(u.mean()) < 0.05
    expected = truncnorm.logpdf(u, -3, 3).reshape(64, -1).sum(1) - D * math.log(scale[0].item())
    assert torch.allclose(log_q, torch.from_numpy(expected), atol=1e-6)


def test_dequantise_is_truncated_normal_in_distribution() -> None:
    """200k draws: never at or beyond the truncation (a clamp of an untruncated normal would put ~540 there),
    mean and variance of ``u`` as the truncated normal's within 4 SE."""
    from scipy.stats import truncnorm

    n = 200_000
    images = torch.full((n, 1, 1, 1), 128, dtype=torch.uint8)
    scale = torch.full((n, 1, 1, 1), 1e-3)
    x_tilde, _ = dequantise(images, scale, torch.Generator().manual_seed(2), torch.float64)
    u = (x_tilde - elbo.to_unit_interval(images).double()) / 1e-3
    assert (u.abs() < 3 - 1e-6).all()
    sd = truncnorm.std(-3, 3)
    assert abs(u.mean().item()) < 4 * sd / math.sqrt(n)
    assert abs(u.var().item() - sd**2) < 4 * sd**2 * math.sqrt(2 / n)


def test_dequantisation_scale_is_sigma_0_and_stays_in_bin() -> None:
    model = DiffusionModel(SHAPE, FixedLinear(SHAPE, 0), GaussianDenoiser(torch.eye(D)))
    assert torch.allclose(dequantisation_scale(model, None, 3), torch.tensor(math.exp(-13.3 / 2)))
    wide = DiffusionModel(SHAPE, FixedLinear(SHAPE, 0, gamma_min=-8.0), GaussianDenoiser(torch.eye(D)))
    assert torch.allclose(dequantisation_scale(wide, None, 3), torch.tensor(HALF_BIN / 3))


class UniformDenoiser(nn.Module):
    """Bayes-optimal ``eps_hat = (x_t - alpha E[x | x_t]) / sigma`` for x uniform on the 256 bin centres."""

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        gamma = gamma.to(x_t.dtype).expand_as(x_t)
        sigma2, alpha = torch.sigmoid(gamma), torch.sigmoid(-gamma).sqrt()
        centres = ((torch.arange(256, dtype=x_t.dtype) + 0.5) / 128 - 1).to(x_t.device)
        logits = -(x_t[..., None] - alpha[..., None] * centres).square() / (2 * sigma2[..., None])
        mean = (torch.softmax(logits, -1) * centres).sum(-1)
        return (x_t - alpha * mean) / sigma2.sqrt()


def _uniform_expected_bpd() -> float:
    """``8 - log2(Phi(3) - Phi(-3))``: the per-dimension bound when the model's bump ``N(e(k), sigma_0^2)``
    and the dequantiser ``TN(e(k), sigma_0^2)`` differ only by the truncated normal's normaliser."""
    return 8 - math.log2(1 - 2 * torch.special.ndtr(torch.tensor(-3.0, dtype=torch.float64)).item())


@pytest.mark.parametrize("exact_divergence", [True, False])
def test_uniform_8bit_data_gives_8_bits(exact_divergence: bool) -> None:
    """Uniform 8-bit data, 2 dimensions, its Bayes-optimal denoiser: every image costs 8.0039 bits/dim, never
    below the true 8 bits. ``gamma_min = -16`` puts the neighbouring bins' bumps > 20 sd away, so each
    importance weight equals ``P(k) / (Phi(3) - Phi(-3))`` exactly (no Monte Carlo noise)."""
    shape = (1, 1, 2)
    schedule = FixedLinear(shape, 0, gamma_min=-16.0, gamma_max=GAMMA_MAX_LARGE)
    model = DiffusionModel(shape, schedule, UniformDenoiser())
    images = torch.randint(0, 256, (16, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:2] = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2)  # the edge bins too
    result = ode_likelihood(
        model,
        images,
        num_draws=2,
        exact_divergence=exact_divergence,
        generator=torch.Generator().manual_seed(1),
    )
    assert result.bpd.shape == (16,) and torch.allclose(result.nll_nats, result.bpd * 2 * math.log(2))
    assert ((result.bpd - _uniform_expected_bpd()).abs() < 1e-3).all(), result.bpd
    assert (result.bpd > 8).all()
    assert (result.latent_nats == 0).all() and (result.nfe > 10).all() and result.seconds_per_image > 0


def test_uniform_8bit_data_default_gamma_min() -> None:
    """At ``gamma_min = -13.3`` the dequantiser reaches the bin edge (3 sigma_0 = 0.99 half bins), where the
    neighbouring bump makes single importance weights noisy (K = 1 draws can land below 8 bits: only the
    expectation is a bound). The typical image still costs 8.0039 bits/dim and the mean stays >= 8 - 4 SE."""
    shape = (1, 1, 2)
    model = DiffusionModel(shape, FixedLinear(shape, 0, gamma_max=GAMMA_MAX_LARGE), UniformDenoiser())
    images = torch.randint(0, 256, (64, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = ode_likelihood(model, images, exact_divergence=True, generator=torch.Generator().manual_seed(1))
    assert abs(result.bpd.median().item() - _uniform_expected_bpd()) < 1e-3
    assert result.bpd.mean() > 8 - 4 * result.bpd.std() / 8


# ----------------------------------------------------------------------------------------------------
# a real MuLAN model: latent cost, shapes, determinism


def _tiny_mulan() -> DiffusionModel:
    torch.manual_seed(0)
    shape = (1, 3, 2)
    latent = KHotLatent(shape, m=6, k=2, channels=8, num_blocks=1, deterministic_eval=True)
    # no Fourier features: at 2^7 2 pi they make a random network's drift oscillate, and the solve stiff
    denoiser = UNet(shape, 6, channels=8, num_blocks=1, dropout=0.0, fourier_exponents=())
    nn.init.normal_(denoiser.conv_out.weight, std=0.1)
    return DiffusionModel(shape, Polynomial(shape, 6, hidden=8), denoiser, latent).eval()


def test_ode_likelihood_tiny_mulan_adds_latent_cost() -> None:
    """The honest latent cost log C(m, k) is included; seeded runs reproduce; exact and Hutchinson agree
    in the mean; the dataset helper concatenates."""
    model = _tiny_mulan()
    images = torch.randint(0, 256, (3, 1, 3, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    opts = {"rtol": 1e-4, "atol": 1e-4}
    first = ode_likelihood(model, images, generator=torch.Generator().manual_seed(1), **opts)
    again = ode_likelihood(model, images, generator=torch.Generator().manual_seed(1), **opts)
    assert torch.allclose(first.latent_nats, torch.full((3,), log_binomial(6, 2)))
    assert torch.equal(first.nll_nats, again.nll_nats) and torch.isfinite(first.bpd).all()
    assert torch.allclose(first.bpd, first.nll_nats / (6 * math.log(2)))
    # the same computation by hand: z from the (deterministic) encoder, one dequantisation, one solve
    g = torch.Generator().manual_seed(1)
    z = model.latent(elbo.to_unit_interval(images)).z
    x_tilde, log_q = dequantise(images, dequantisation_scale(model, z, 3), g)
    log_p = ode_log_density(model, x_tilde, z, generator=g, **opts).log_p
    assert torch.allclose(first.nll_nats, log_binomial(6, 2) - (log_p - log_q), atol=1e-4)
    exact = ode_likelihood(model, images, exact_divergence=True, generator=torch.Generator().manual_seed(1), **opts)
    # same dequantisation draws, probe vs exact trace: the divergence integral differs only by probe noise
    assert (exact.nll_nats - first.nll_nats).abs().max() < 0.5 * 6
    both = ode_likelihood_dataset(
        model, [images[:2], images[2:]], generator=torch.Generator().manual_seed(1), progress=True, **opts
    )
    assert both.bpd.shape == (3,) and both.seconds_per_image > 0 and both.nfe.shape == (3,)


def test_which_figure_is_the_bound() -> None:
    """Hutchinson probes: the headline is the mean of the single-draw bounds, the importance-weighted figure lies
    below it (Jensen) and is flagged as an estimate, with its bias NaN for one probe and finite for two. Exact
    divergence: the importance-weighted bound is the headline; solving the (image, draw) rows in several smaller
    solves changes nothing but the solver's rounding."""
    model = _tiny_mulan()
    images = torch.randint(0, 256, (3, 1, 3, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    opts = {"rtol": 1e-4, "atol": 1e-4, "num_draws": 3}
    probed = ode_likelihood(model, images, generator=torch.Generator().manual_seed(1), num_probes=2, **opts)
    assert not probed.iw_is_bound and (probed.iw_nll_nats <= probed.nll_nats).all()
    assert torch.isfinite(probed.iw_bias_nats).all() and (probed.iw_bias_nats >= 0).all()
    assert torch.allclose(probed.iw_bpd, probed.iw_nll_nats / (6 * math.log(2)))
    one = ode_likelihood(model, images, generator=torch.Generator().manual_seed(1), **opts)
    assert torch.isnan(one.iw_bias_nats).all()
    # the headline by hand: one dequantisation of all 3 x 3 rows (draw-major), then one solve with one probe
    g = torch.Generator().manual_seed(1)
    z = model.latent(elbo.to_unit_interval(images)).z.repeat(3, 1)
    x_tilde, log_q = dequantise(images.repeat(3, 1, 1, 1), dequantisation_scale(model, z, 9), g)
    log_p = ode_log_density(model, x_tilde, z, generator=g, rtol=1e-4, atol=1e-4).log_p
    assert torch.allclose(one.nll_nats, log_binomial(6, 2) - (log_p - log_q).view(3, 3).mean(0), atol=1e-4)

    exact = ode_likelihood(model, images, exact_divergence=True, generator=torch.Generator().manual_seed(1), **opts)
    assert exact.iw_is_bound and torch.equal(exact.nll_nats, exact.iw_nll_nats) and (exact.iw_bias_nats == 0).all()
    split = ode_likelihood(
        model, images, exact_divergence=True, generator=torch.Generator().manual_seed(1), solve_batch_size=4, **opts
    )
    assert torch.allclose(split.nll_nats, exact.nll_nats, atol=1e-2)
    for bad in ({"num_draws": 0}, {"num_probes": 0}, {"solve_batch_size": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            ode_likelihood(model, images, **bad)


def test_ode_settings_object_and_keywords_give_the_same_bound() -> None:
    """One :class:`~mulan.ode.ODESettings` or its fields as keywords: the same computation, bit for bit; keywords
    replace the settings' fields; a bad field is refused when the settings are made, naming it."""
    model = _tiny_mulan()
    images = torch.randint(0, 256, (3, 1, 3, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fields = {"num_draws": 2, "num_probes": 2, "rtol": 1e-3, "atol": 1e-3, "divergence_samples": 4}
    by_keywords = ode_likelihood(model, images, generator=torch.Generator().manual_seed(1), **fields)
    settings = ODESettings(**fields)
    by_settings = ode_likelihood(model, images, None, settings, generator=torch.Generator().manual_seed(1))
    for name in ("nll_nats", "nll_var_nats", "iw_nll_nats", "iw_bias_nats", "nfe"):
        assert torch.equal(getattr(by_keywords, name), getattr(by_settings, name)), name
    replaced = ode_likelihood(model, images, None, ODESettings(), generator=torch.Generator().manual_seed(1), **fields)
    assert torch.equal(replaced.nll_nats, by_keywords.nll_nats)
    plain = ode_likelihood(model, images, None, settings, generator=torch.Generator().manual_seed(1), num_draws=1)
    assert plain.nll_nats.shape == (3,) and not torch.equal(plain.nll_nats, by_keywords.nll_nats)
    x = elbo.to_unit_interval(images).float()
    ctx = model.latent(elbo.to_unit_interval(images)).z
    density = ode_log_density(model, x, ctx, settings, generator=torch.Generator().manual_seed(2))
    again = ode_log_density(model, x, ctx, generator=torch.Generator().manual_seed(2), **fields)
    assert torch.equal(density.log_p, again.log_p) and density.nfe == again.nfe
    with pytest.raises(ValueError, match="time_variable must be one of"):
        ODESettings(time_variable="sigma")
    with pytest.raises(ValueError, match="num_draws must be at least 1"):
        replace(settings, num_draws=0)
