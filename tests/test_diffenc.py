"""DiffEnc (docs: math, section 10a): reductions to VDM, the paper's v-form, the Gaussian closed form, the
continuous limit of the exact T-step KL, the loss against the sampler, the weight omega, gradients.

Gaussian data ``x ~ N(0, diag s)`` (variances ``s``) with the linear encoder ``r = k(gamma) x``: per dimension the
state is ``x_t = a x + sigma eps`` with ``a = alpha (b + sigma^2 k)`` (``b = alpha^2`` "shrink", 1 "identity"), and
``l(t) = 1/2 gamma' kappa^2 (eps - eps_hat + q x)^2`` with ``kappa = 1 + sigma^2``, ``q = alpha sigma (k + k') /
kappa`` ("shrink") or ``kappa = 1``, ``q = alpha sigma (alpha^2 k + k')`` ("identity"). The optimal prediction is
``E[eps + q x | x_t]`` and leaves ``E l(t) = 1/2 gamma' kappa^2 sum_i s_i (a - q sigma)^2 / (a^2 s_i + sigma^2)``.
Monte Carlo checks assert ``|estimate - exact| < 4 SE``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mulan import elbo
from mulan.cli import build_cli, main
from mulan.likelihood import dense_elbo
from mulan.model import DiffusionModel
from mulan.networks import UNet
from mulan.parameterisation import Velocity
from mulan.processes import Context, DiffEnc
from mulan.processes.schedules import GAMMA_MAX, GAMMA_MIN, FixedLinear, LearnedScalar, MonotoneNN, Polynomial
from mulan.sampling import ancestral_sample
from mulan.time_sampling import CauchyLogSNR

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (2, 2, 2)
S = torch.logspace(math.log10(0.09), math.log10(9.0), 8, dtype=torch.float64)  # per-dimension variances
IMAGE_SHAPE = (3, 4, 4)


def k_and_slope(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """The test encoder's ``k(gamma) = sigmoid((gamma + 4) / 3) / 2`` and ``dk / dgamma``."""
    u = torch.sigmoid((gamma + 4) / 3)
    return 0.5 * u, 0.5 * u * (1 - u) / 3


class LinearEncoder(nn.Module):
    """``r_phi(x, gamma) = k(gamma) x``: linear in the data, so Gaussian data stays Gaussian."""

    def forward(self, x: Tensor, gamma: Tensor) -> Tensor:
        return k_and_slope(gamma)[0] * x


def coefficients(gamma: Tensor, base: str) -> tuple[Tensor, Tensor, Tensor]:
    """``a`` (data scale of the state), ``kappa``, ``q`` of the module docstring, at noise levels ``gamma``."""
    alpha, sigma = elbo.alpha_sigma(gamma)
    k, dk = k_and_slope(gamma)
    if base == "shrink":
        kappa = 1 + sigma.square()
        return alpha * (alpha.square() + sigma.square() * k), kappa, alpha * sigma * (k + dk) / kappa
    return alpha * (1 + sigma.square() * k), torch.ones_like(gamma), alpha * sigma * (alpha.square() * k + dk)


class OptimalDenoiser(nn.Module):
    """``eps_hat = E[eps + q x | x_t] = (sigma + q a s) x_t / (a^2 s + sigma^2)`` per dimension."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("s", S.float().view(1, *SHAPE))

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        a, _, q = coefficients(gamma, self.base)
        sigma = elbo.alpha_sigma(gamma)[1]
        return (sigma + q * a * self.s) * x_t / (a.square() * self.s + sigma.square())


def exact_diffusion(base: str) -> float:
    """``int_0^1 E l(t) dt`` on the fixed linear schedule (float64 quadrature)."""
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    gamma = (GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t)[:, None]
    a, kappa, q = coefficients(gamma, base)
    sigma = elbo.alpha_sigma(gamma)[1]
    per_t = (
        0.5
        * (GAMMA_MAX - GAMMA_MIN)
        * kappa.square()
        * (S * (a - q * sigma).square() / (a.square() * S + sigma.square()))
    )
    return float(torch.trapezoid(per_t.sum(1), t))


def gaussian_process(base: str) -> DiffEnc:
    process = DiffEnc(SHAPE, 0, base=base)
    process.encoder = LinearEncoder()
    return process


def gaussian_batch(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 8, generator=g, dtype=torch.float64) * S.sqrt()).float().view(n, *SHAPE)
    return x, torch.rand(n, generator=g), torch.randn(x.shape, generator=g)


def random_encoder(process: DiffEnc, seed: int = 0) -> DiffEnc:
    """Give the trainable encoder non-zero output weights (it starts at ``r = 0``)."""
    assert process.encoder is not None
    torch.manual_seed(seed)
    for p in process.encoder.parameters():
        nn.init.normal_(p, std=0.3)
    return process


def denoiser(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(IMAGE_SHAPE, 0, channels=8, num_blocks=1, dropout=0.0)
    nn.init.normal_(net.conv_out.weight, std=0.05)  # not the identity-skip it starts as
    return net


def images(n: int = 6, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Exact reductions


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("steps", [0, 10])
def test_an_encoder_that_outputs_zero_on_the_identity_base_is_vdm(trainable: bool, steps: int) -> None:
    """``r_phi = 0`` (a fresh trainable encoder: zero output layer; or none) with ``b = x``: every term is VDM's."""
    net = denoiser()
    vdm = DiffusionModel(IMAGE_SHAPE, LearnedScalar(IMAGE_SHAPE, 0), net, timesteps=steps)
    diffenc = DiffEnc(IMAGE_SHAPE, 0, schedule=LearnedScalar, base="identity", trainable=trainable)
    model = DiffusionModel(IMAGE_SHAPE, diffenc, net, timesteps=steps)
    batch = images()
    g = torch.Generator().manual_seed(1)
    t, eps, eps0 = torch.rand(6, generator=g), torch.randn(6, *IMAGE_SHAPE, generator=g), torch.randn(6, *IMAGE_SHAPE)
    ours, theirs = model(batch, t=t, eps=eps, recon_noise=eps0), vdm(batch, t=t, eps=eps, recon_noise=eps0)
    for name in ("recon", "prior", "diffusion"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_non_trainable_encoder_is_a_reweighted_vdm_loss_on_the_encoded_data() -> None:
    """``x_phi = alpha^2 x``, which the generative model knows: ``l = 1/2 gamma' (1 + sigma^2)^2 ||eps - eps_hat||^2``
    on the encoded data."""
    process = DiffEnc(IMAGE_SHAPE, 0, trainable=False)
    x = elbo.to_unit_interval(images())
    t, eps = torch.rand(6), torch.randn(6, *IMAGE_SHAPE)
    net = denoiser()
    seen = {}

    def predict(x_t: Tensor, m) -> Tensor:
        seen["x_t"] = x_t
        return net(x_t, m.gamma)

    loss = process.diffusion_loss(x, t, Context(), predict, eps)
    gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t.view(-1, 1, 1, 1)
    alpha, sigma = elbo.alpha_sigma(gamma)
    torch.testing.assert_close(seen["x_t"], alpha**3 * x + sigma * eps)
    eps_hat = net(seen["x_t"], gamma)
    expected = elbo.sum_per_example(0.5 * (GAMMA_MAX - GAMMA_MIN) * (1 + sigma.square()) ** 2 * (eps - eps_hat) ** 2)
    torch.testing.assert_close(loss, expected)


def test_the_encoder_slope_is_the_derivative_in_gamma() -> None:
    """Forward-mode ``d r / d gamma`` against central differences (float64)."""
    process = random_encoder(DiffEnc(IMAGE_SHAPE, 0)).double()
    x = elbo.to_unit_interval(images()).double()
    gamma = torch.linspace(-12, 4, 6, dtype=torch.float64).view(-1, 1, 1, 1)
    r, dr = process.residual(x, gamma, derivative=True)
    h = 1e-5
    fd = (process.residual(x, gamma + h)[0] - process.residual(x, gamma - h)[0]) / (2 * h)
    assert dr is not None and dr.abs().max() > 1e-3
    torch.testing.assert_close(dr, fd, rtol=1e-6, atol=1e-8)
    with torch.inference_mode():  # dense_elbo and Lightning's test loop run here
        torch.testing.assert_close(process.residual(x, gamma, derivative=True)[1], dr)


def test_the_velocity_model_trains_the_papers_v_form() -> None:
    """With v-prediction the loss is the paper's
    ``1/2 gamma' alpha^2 ||v - v_hat + sigma (x_hat - x_phi + r + r')||^2``."""
    process = random_encoder(DiffEnc(IMAGE_SHAPE, 0))
    net = denoiser()
    model = DiffusionModel(IMAGE_SHAPE, process, net, parameterisation=Velocity())
    x = elbo.to_unit_interval(images())
    t, eps = torch.rand(6), torch.randn(6, *IMAGE_SHAPE)
    loss = model.diffusion_term(x, t, None, eps)
    gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t.view(-1, 1, 1, 1)
    alpha, sigma = elbo.alpha_sigma(gamma)
    r, dr = process.residual(x, gamma, derivative=True)
    x_phi = alpha.square() * x + sigma.square() * r
    z = alpha * x_phi + sigma * eps
    v, v_hat = alpha * eps - sigma * x_phi, net(z, gamma)
    x_hat = alpha * z - sigma * v_hat
    paper = 0.5 * (GAMMA_MAX - GAMMA_MIN) * alpha.square() * (v - v_hat + sigma * (x_hat - x_phi + r + dr)).square()
    torch.testing.assert_close(loss, elbo.sum_per_example(paper), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Gaussian data: the closed form, and the continuous limit of the exact T-step bound


@pytest.mark.parametrize("base", ["shrink", "identity"])
def test_gaussian_data_with_the_optimal_denoiser_gives_the_closed_form(base: str) -> None:
    model = DiffusionModel(SHAPE, gaussian_process(base), OptimalDenoiser(base))
    x, t, eps = gaussian_batch(40_000, seed=1)
    with torch.no_grad():
        loss = model.diffusion_term(x, t, None, eps).double()
    est, se = loss.mean().item(), (loss.std() / math.sqrt(loss.numel())).item()
    exact = exact_diffusion(base)
    assert abs(est - exact) < 4 * se + 1e-3, (est, exact, se)


@pytest.mark.parametrize("base", ["shrink", "identity"])
def test_the_exact_t_step_bound_tends_to_the_continuous_one(base: str) -> None:
    """Same data, noise and grid times: the T-step KL sum minus the continuous integrand shrinks like 1/T, so the
    continuous formula (encoder slope and generative drift included) is the limit of the exact KL."""
    x, _, eps = gaussian_batch(4096, seed=2)
    gaps = []
    for steps in (100, 1000):
        t = torch.randint(1, steps + 1, (4096,), generator=torch.Generator().manual_seed(3)) / steps
        models = [DiffusionModel(SHAPE, gaussian_process(base), OptimalDenoiser(base), timesteps=T) for T in (steps, 0)]
        with torch.no_grad():
            discrete, continuous = (m.diffusion_term(x, t, None, eps).double() for m in models)
        gaps.append(((discrete - continuous).mean() / continuous.mean()).item())
    limit = (10 * gaps[1] - gaps[0]) / 9  # Richardson: the gap extrapolated to T = infinity
    assert abs(gaps[1]) < 0.15 * abs(gaps[0]) and abs(limit) < 2e-3, (gaps, limit)


def test_the_t_step_loss_is_the_kl_between_the_forward_posterior_and_the_sampler() -> None:
    """``q(x_s | x_t, x)`` has the right marginal; the loss is ``T`` times the Gaussian KL from it to the ancestral
    step's ``p(x_s | x_t)`` (mean with zero noise, standard deviation from unit noise), for any omega."""
    process = random_encoder(DiffEnc(IMAGE_SHAPE, 0, weight=1.7))
    net = denoiser()
    x = elbo.to_unit_interval(images())
    t, s, ctx = torch.full((6,), 0.6), torch.full((6,), 0.5), Context()
    gamma_t, gamma_s = process.gamma(t), process.gamma(s)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = elbo.alpha_sigma(gamma_t), elbo.alpha_sigma(gamma_s)
    mean_t, mean_s = process.encoded_mean(x, gamma_t), process.encoded_mean(x, gamma_s)
    eps = torch.randn_like(x)
    x_t = alpha_t * mean_t + sigma_t * eps
    # the forward posterior is affine in x_t and carries N(alpha_t x_phi(t), sigma_t^2) to N(alpha_s x_phi(s), ...)
    offset, std = process.forward_posterior(x, torch.zeros_like(x), t, s, ctx)
    slope = process.forward_posterior(x, torch.ones_like(x), t, s, ctx)[0] - offset
    torch.testing.assert_close(slope * alpha_t * mean_t + offset, alpha_s * mean_s)
    torch.testing.assert_close(slope.square() * sigma_t.square() + std.square(), sigma_s.square().expand_as(x))

    def predict(z: Tensor, m) -> Tensor:
        return net(z, m.gamma)

    mean_q = process.forward_posterior(x, x_t, t, s, ctx)[0]
    mean_p = process.ancestral_step(x_t, t, s, ctx, predict, torch.zeros_like(x))
    std_p = process.ancestral_step(x_t, t, s, ctx, predict, torch.ones_like(x)) - mean_p
    ratio = (std / std_p).square()  # omega
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.7))
    kl = elbo.sum_per_example(0.5 * (ratio - 1 - ratio.log() + (mean_q - mean_p).square() / std_p.square()))
    with torch.no_grad():
        r_t, r_s = process.residual(x, gamma_t)[0], process.residual(x, gamma_s)[0]
        step = process.step_kl(eps, predict(x_t, process.marginal(t, ctx)), r_t, r_s, gamma_t, gamma_s)
    torch.testing.assert_close(step, kl, rtol=2e-3, atol=1e-3)
    steps = 10  # the loss at t = 0.6 on a 10-step grid is that step's KL, times T
    loss = process.diffusion_loss(x, torch.full((6,), 0.55), ctx, predict, eps, steps=steps)
    torch.testing.assert_close(loss, steps * step, rtol=1e-5, atol=1e-4)


def test_the_weight_omega_adds_a_per_step_constant_and_is_refused_in_continuous_time() -> None:
    x = elbo.to_unit_interval(images())
    t, eps = torch.rand(6), torch.randn(6, *IMAGE_SHAPE)
    net = denoiser()

    def predict(z: Tensor, m) -> Tensor:
        return net(z, m.gamma)

    losses = {}
    for omega in (1.0, 0.6):
        process = random_encoder(DiffEnc(IMAGE_SHAPE, 0, weight=omega))
        losses[omega] = process.diffusion_loss(x, t, Context(), predict, eps, steps=50)
    d = math.prod(IMAGE_SHAPE)
    expected = 0.6 * losses[1.0] + 50 * 0.5 * d * (0.6 - 1 - math.log(0.6))
    torch.testing.assert_close(losses[0.6], expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="continuous-time bound exists only for weight"):
        DiffEnc(IMAGE_SHAPE, 0, weight=0.6).diffusion_loss(x, t, Context(), predict, eps)
    learned = DiffEnc(IMAGE_SHAPE, 0, learn_weight=True)
    learned.diffusion_loss(x, t, Context(), predict, eps, steps=50).mean().backward()
    assert learned.log_weight.grad is not None and learned.log_weight.grad != 0


# ----------------------------------------------------------------------------------------------------
# Training, evaluation, sampling


def test_gradients_reach_the_encoder_and_evaluation_runs_under_inference_mode() -> None:
    process = random_encoder(DiffEnc(IMAGE_SHAPE, 0, schedule=LearnedScalar, channels=8, num_blocks=1))
    model = DiffusionModel(IMAGE_SHAPE, process, denoiser())
    model(images()).total.mean().backward()
    assert process.encoder is not None
    for name, p in process.encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.inference_mode():
        bound = dense_elbo(model, images(), num_times=4)
    assert torch.isfinite(bound.total).all()
    samples = ancestral_sample(model, 2, steps=4, generator=torch.Generator().manual_seed(0)).samples
    assert samples.dtype == torch.uint8 and samples.shape == (2, *IMAGE_SHAPE)


def test_the_ode_drift_carries_the_gaussian_marginal() -> None:
    """Non-trainable "shrink" on Gaussian data: ``x_t = alpha^3 x + sigma eps`` and the optimal prediction is
    ``E[eps | x_t]``; the drift is linear, ``k(t) x``, and ``d Var / dt = 2 k Var`` with
    ``Var = alpha^6 s + sigma^2``."""
    process = DiffEnc(SHAPE, 0, schedule=FixedLinear, trainable=False)
    s = S.view(1, *SHAPE)

    def predict(x_t: Tensor, m) -> Tensor:
        alpha, sigma = elbo.alpha_sigma(m.gamma)
        return sigma * x_t / (alpha**6 * s + sigma.square())

    def variance(t: float) -> Tensor:
        alpha, sigma = elbo.alpha_sigma(torch.tensor(GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t, dtype=torch.float64))
        return alpha**6 * s + sigma.square()

    for t in (0.2, 0.5, 0.8):
        k = process.ode_drift(torch.ones(1, *SHAPE, dtype=torch.float64), torch.tensor([t]), Context(), predict)
        h = 1e-6
        dvar = (variance(t + h) - variance(t - h)) / (2 * h)
        torch.testing.assert_close(2 * k * variance(t), dvar, rtol=1e-5, atol=1e-8)


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="base must be 'shrink' or 'identity'"):
        DiffEnc(SHAPE, 0, base="mean")
    with pytest.raises(ValueError, match="weight .* must be positive"):
        DiffEnc(SHAPE, 0, weight=0.0)
    with pytest.raises(ValueError, match="trainable encoder needs a scalar schedule"):
        DiffEnc(SHAPE, 0, schedule=Polynomial)
    with pytest.raises(ValueError, match="variance_minimising: false inside DiffEnc"):
        DiffEnc(SHAPE, 0, schedule=lambda shape, m: MonotoneNN(shape, m, features=4, variance_minimising=True))


def test_fit_and_test_round_trip_through_the_cli(tmp_path: Path) -> None:
    """DiffEnc on a learned schedule with importance-sampled times, from a config; tested from the checkpoint."""
    config = Path(__file__).parent / "conf" / "diffenc_tiny.yaml"
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    ckpt = sorted(tmp_path.rglob("*.ckpt"))[-1]
    args = ["test", "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    cli = build_cli([*args, "--trainer.default_root_dir", str(tmp_path)])
    process = cli.model.model.process
    assert isinstance(process, DiffEnc) and isinstance(process.schedule, LearnedScalar)
    assert isinstance(cli.model.model.time_sampler, CauchyLogSNR)
    results = cli.model.test_results
    parts = sum(results[n][0] for n in ("recon", "prior", "diffusion", "latent"))
    assert results["total"][0] == pytest.approx(parts, rel=1e-5) and 0 < results["total"][0] < 20
