"""Tests of mulan.latents: k-hot samples, straight-through gradients, prior, KL terms, Sum-of-Gamma noise,
the Gaussian latent, and gradients into the schedule and encoder of a full MuLAN model (docs: math, section 3)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mulan.latents import GaussianLatent, KHotLatent, NoLatent, khot, log_binomial, sum_of_gamma_noise
from mulan.model import DiffusionModel
from mulan.networks import UNet
from mulan.processes.schedules import Polynomial

pytestmark = pytest.mark.usefixtures("single_thread")


SHAPE = (3, 4, 6)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1], as the model feeds the latent."""
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _khot_latent(noise: str = "sum_of_gamma", m: int = 12, k: int = 4, **kw) -> KHotLatent:
    torch.manual_seed(0)
    return KHotLatent(SHAPE, m=m, k=k, noise=noise, channels=8, num_blocks=1, **kw)


def _randomise_zero_inits(module: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised output layers (ResNet conv2, attention proj) block gradients at initialisation;
    give them random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _assert_khot(z: torch.Tensor, k: int) -> None:
    assert ((z == 0) | (z == 1)).all()
    assert (z.sum(-1) == k).all()


def test_khot_is_top_k_indicator():
    logits = torch.randn(100, 20, generator=torch.Generator().manual_seed(1))
    z = khot(logits, 7)
    assert z.shape == logits.shape and z.dtype == logits.dtype
    _assert_khot(z, 7)
    chosen_min = torch.where(z == 1, logits, torch.inf).min(-1).values
    unchosen_max = torch.where(z == 0, logits, -torch.inf).max(-1).values
    assert (chosen_min > unchosen_max).all()


@pytest.mark.parametrize("noise", ["sum_of_gamma", "gumbel"])
def test_khot_latent_samples_are_k_hot_in_train_mode(noise):
    latent = _khot_latent(noise).train()
    sample = latent(_images(16))
    assert sample.z.shape == (16, 12)
    _assert_khot(sample.z.detach(), 4)
    # the perturbation is random: two calls differ somewhere
    assert not torch.equal(sample.z, latent(_images(16)).z)


def test_straight_through_forward_value_is_exactly_k_hot():
    # Many rows, so that float rounding of a "(hard - soft) + soft" form would show up (1 -> 1 - 2^-24).
    latent = _khot_latent()
    logits = torch.randn(4096, 12, generator=torch.Generator().manual_seed(4)) * 3
    z = latent.straight_through(logits)
    _assert_khot(z.detach(), 4)
    assert torch.equal(z.detach(), khot(logits - logits.mean(-1, keepdim=True), 4))


@pytest.mark.parametrize("deterministic_eval", [False, True])
def test_khot_latent_samples_are_k_hot_in_eval_mode(deterministic_eval):
    latent = _khot_latent(deterministic_eval=deterministic_eval).eval()
    x = _images(16)
    z = latent(x).z.detach()
    _assert_khot(z, 4)
    if deterministic_eval:
        assert torch.equal(z, khot(latent.encoder(x), 4))  # top-k of the unperturbed logits
        assert torch.equal(z, latent(x).z.detach())


@pytest.mark.parametrize("noise", ["sum_of_gamma", "gumbel"])
def test_straight_through_gradient_is_gradient_of_soft_projection(noise):
    latent = _khot_latent(noise).train()
    _randomise_zero_inits(latent)
    params = [p for p in latent.encoder.parameters()]
    x = _images(8, seed=2)
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))

    torch.manual_seed(42)
    z = latent(x).z
    grads = torch.autograd.grad((z * w).sum(), params)

    # the same noise again, with soft = centred(l~) / ||centred(l~)|| written out from docs: math, section 3
    torch.manual_seed(42)
    logits = latent.encoder(x)
    perturbed = latent.perturb(logits)
    centred = perturbed - perturbed.mean(-1, keepdim=True)
    soft = centred / centred.norm(dim=-1, keepdim=True)
    assert torch.equal(khot(centred, 4), z.detach())  # same noise: same hard sample
    soft_grads = torch.autograd.grad((soft * w).sum(), params)

    for g, s in zip(grads, soft_grads, strict=True):
        torch.testing.assert_close(g, s, rtol=1e-5, atol=1e-7)
    assert all(g.abs().max() > 0 for g in grads)  # every encoder parameter gets a non-zero gradient


@pytest.mark.parametrize(("m", "k"), [(10, 3), (50, 15)])
def test_sample_prior_is_uniform_k_hot(m, k):
    latent = KHotLatent(SHAPE, m=m, k=k, channels=8, num_blocks=1)
    torch.manual_seed(7)
    n = 4000
    z = latent.sample_prior(n)
    assert z.shape == (n, m)
    _assert_khot(z, k)
    p = k / m
    freq = z.double().mean(0)
    se = math.sqrt(p * (1 - p) / n)  # ~ 0.007 for both (m, k)
    assert ((freq - p).abs() < 4 * se).all(), (freq - p).abs().max()
    # pairs are (mildly) negatively correlated as for a uniform k-subset: P(both on) = k(k-1)/(m(m-1))
    both = (z[:, 0] * z[:, 1]).double().mean().item()
    q = k * (k - 1) / (m * (m - 1))
    assert abs(both - q) < 4 * math.sqrt(q * (1 - q) / n)


def test_kl_is_log_binomial_and_surrogate_is_kl_to_uniform():
    m, k = 50, 15
    latent = KHotLatent(SHAPE, m=m, k=k, channels=8, num_blocks=1)
    _randomise_zero_inits(latent, seed=4)
    with torch.no_grad():
        latent.encoder.dense.weight.mul_(20)  # a peaked posterior: surrogate clearly > 0
    x = _images(5, seed=5)
    sample = latent(x)
    exact = math.log(math.comb(50, 15))
    assert exact == pytest.approx(28.44, abs=5e-3)
    assert log_binomial(50, 15) == pytest.approx(exact, rel=1e-12)
    torch.testing.assert_close(sample.kl, torch.full((5,), exact))
    # KL(softmax(l) || Uniform(m)) = sum_j q_j (log q_j + log m), by hand from the encoder logits
    logits = latent.encoder(x).double()
    q = torch.softmax(logits, -1)
    surrogate = (q * (torch.log(q) + math.log(m))).sum(-1)
    torch.testing.assert_close(sample.kl_surrogate.double(), surrogate, rtol=1e-5, atol=1e-6)
    assert (sample.kl_surrogate >= -1e-6).all() and (sample.kl_surrogate <= math.log(m) + 1e-6).all()
    assert (sample.kl_surrogate > 1e-3).all()


def test_no_latent():
    sample = NoLatent(SHAPE)(_images(3))
    assert sample.z is None
    assert torch.equal(sample.kl, torch.zeros(3)) and sample.kl_surrogate is None


@pytest.mark.parametrize(("k", "tau", "s"), [(15, 10.0, 10), (3, 1.0, 5)])
def test_sum_of_gamma_noise_moments(k, tau, s):
    torch.manual_seed(8)
    n = 200_000
    eta = sum_of_gamma_noise(torch.Size([n]), k, tau, s).double()
    assert eta.shape == (n,)
    # eta = (tau/k)[sum_i G_i - log s], G_i ~ Gamma(shape 1/k, scale i/k):
    # E G_i = (1/k)(i/k), Var G_i = (1/k)(i/k)^2
    i = torch.arange(1, s + 1, dtype=torch.float64)
    mean = (tau / k) * ((i / k**2).sum().item() - math.log(s))
    var = (tau / k) ** 2 * ((i / k) ** 2 / k).sum().item()
    est, se = eta.mean().item(), eta.std().item() / math.sqrt(n)  # SE ~ 0.002-0.01
    assert abs(est - mean) < 4 * se + 1e-6, (est, mean, se)
    sq = (eta - est) ** 2
    est_var, se_var = sq.mean().item(), sq.std().item() / math.sqrt(n)
    assert abs(est_var - var) < 4 * se_var + 1e-6, (est_var, var, se_var)


def test_gaussian_latent_kl_and_reparameterisation():
    torch.manual_seed(0)
    latent = GaussianLatent(SHAPE, m=6, channels=8, num_blocks=1)
    _randomise_zero_inits(latent, seed=9)
    x = _images(4, seed=10)
    torch.manual_seed(11)
    sample = latent(x)
    mu, log_var = latent.encoder(x).chunk(2, dim=-1)
    std = torch.exp(0.5 * log_var)
    q = torch.distributions.Normal(mu, std)
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(sample.kl, torch.distributions.kl_divergence(q, p).sum(-1))
    assert (sample.kl > 0).all()
    # z = mu + std * eps with the same noise
    torch.manual_seed(11)
    _ = latent.encoder(x)
    eps = torch.randn_like(mu)
    torch.testing.assert_close(sample.z, mu + std * eps)
    # reparameterised: gradients reach the encoder
    grads = torch.autograd.grad(sample.z.square().sum(), list(latent.encoder.parameters()))
    assert all(g is not None and g.abs().max() > 0 for g in grads)
    assert latent.sample_prior(3).shape == (3, 6)


def test_gradients_reach_schedule_and_encoder_in_full_mulan_model():
    m, k = 10, 3
    torch.manual_seed(0)
    latent = KHotLatent(SHAPE, m=m, k=k, channels=8, num_blocks=1)
    _randomise_zero_inits(latent.encoder, seed=12)
    schedule = Polynomial(SHAPE, m, hidden=16)  # head_a stays at its zero initialisation
    denoiser = UNet(SHAPE, m, channels=16, num_blocks=1, dropout=0.0)
    model = DiffusionModel(SHAPE, schedule, denoiser, latent).train()
    assert schedule.head_a.weight.abs().max() == 0
    images = torch.randint(0, 256, (4, *SHAPE), generator=torch.Generator().manual_seed(13), dtype=torch.uint8)
    torch.manual_seed(14)
    terms = model(images)
    assert terms.total.shape == (4,) and torch.isfinite(terms.total).all()
    terms.total.mean().backward()
    for name, p in [
        *schedule.named_parameters(),
        *(("encoder." + n, p) for n, p in latent.encoder.named_parameters()),
    ]:
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name


def test_latent_cost_warning_names_m_k_d_and_the_cost_for_small_images() -> None:
    with pytest.warns(UserWarning, match=r"m=50.*0\.641 bits/dim.*D=64-dimensional"):
        KHotLatent((1, 8, 8), m=50, k=15, channels=8, num_blocks=1)


def test_no_latent_cost_warning_for_3x32x32() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KHotLatent((3, 32, 32), m=50, k=15, channels=8, num_blocks=1)  # 0.013 bits/dim
