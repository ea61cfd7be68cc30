"""The probability-flow ODE likelihood integrated in log-SNR time (``time_variable="log_snr"``, mulan.ode.LogSNRTime).

Exact answers: Gaussian data ``x ~ N(0, diag(S^2))`` with the Bayes-optimal denoiser (as in
tests/test_likelihood.py) has ``log p(x) = log N(x; 0, diag(S^2))`` when ``gamma_max`` is large; the log-SNR-time
solve must give it, and the same value as the ``t``-time solve, to 1e-3 nats per dimension, on a nonlinear scalar
schedule and on per-dimension (MuLAN) schedules. On a linear schedule log-SNR time *is* ``t``; on nonlinear ones
the variable removes the schedule's speed, which saves evaluations on the scalar case (per-dimension schedules,
whose dimensions move at different speeds, gain little: see docs/evaluation.md, "Time variable")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mulan import ode, ode_solver
from mulan.latents import KHotLatent
from mulan.likelihood import ODELogDensity, ode_likelihood, ode_log_density
from mulan.model import DiffusionModel
from mulan.networks import UNet
from mulan.processes import Context
from mulan.processes.schedules import FixedLinear, NoiseSchedule, Polynomial
from test_likelihood import GaussianDenoiser  # the Bayes-optimal denoiser of Gaussian data

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (2, 2, 2)
D = 8
S = torch.logspace(math.log10(0.3), math.log10(2.0), D, dtype=torch.float64)  # anisotropic standard deviations
GAMMA_MAX_LARGE = 15.0  # the N(0, I) prior is then the true marginal at t = 1


def _random_polynomial(seed: int, reduce: str) -> Polynomial:
    """MuLAN's polynomial schedule with random heads: far from linear in ``t``; ``reduce="mean"``: scalar."""
    torch.manual_seed(seed)
    schedule = Polynomial(SHAPE, 0, gamma_max=GAMMA_MAX_LARGE, hidden=8, reduce=reduce)
    with torch.no_grad():
        for head in (schedule.head_a, schedule.head_b, schedule.head_c):
            head.weight.normal_(0.0, 1.0)
            head.bias.normal_(0.0, 1.0)
    return schedule


def _gaussian_case(schedule: NoiseSchedule, n: int = 16, seed: int = 1) -> tuple[DiffusionModel, Tensor, Tensor]:
    """Model, data (n, *SHAPE) float64 and the exact ``log N(x; 0, diag(S^2))`` (n,) in nats."""
    model = DiffusionModel(SHAPE, schedule, GaussianDenoiser(torch.diag(S.square())))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * S
    exact = torch.distributions.Normal(torch.zeros(D, dtype=torch.float64), S).log_prob(x).sum(1)
    return model, x.view(n, *SHAPE), exact


def _both(model: DiffusionModel, x: Tensor) -> dict[str, ODELogDensity]:
    return {
        tv: ode_log_density(model, x, dtype=torch.float64, exact_divergence=True, time_variable=tv)
        for tv in ode.TIME_VARIABLES
    }


@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_log_snr_time_gives_the_exact_gaussian_log_density(reduce: str) -> None:
    """Scalar (``reduce="mean"``) and per-dimension polynomial schedules, 3 random ones each, exact divergence:
    log-SNR time gives ``log N(x; 0, Sigma)`` and the ``t``-time value to 1e-3 nats/dim for every example. On the
    scalar schedules it takes fewer evaluations in total, since the schedule's speed is divided out (each solve is
    then the linear schedule's); per-dimension schedules are only checked not to cost more than 10% extra."""
    nfe = {tv: 0 for tv in ode.TIME_VARIABLES}
    for seed in range(3):
        model, x, exact = _gaussian_case(_random_polynomial(seed, reduce))
        results = _both(model, x)
        for tv, result in results.items():
            assert ((result.log_p - exact).abs() / D < 1e-3).all(), (tv, seed)
            nfe[tv] += result.nfe
        assert ((results["log_snr"].log_p - results["t"].log_p).abs() / D < 1e-3).all()
        assert torch.allclose(results["log_snr"].x_1, results["t"].x_1, atol=1e-3)
    if reduce == "mean":
        assert nfe["log_snr"] < nfe["t"], nfe
    else:
        assert nfe["log_snr"] <= 1.1 * nfe["t"], nfe


def test_log_snr_time_is_t_for_a_linear_schedule() -> None:
    """For ``gamma`` linear in ``t`` the normalised log-SNR time is ``t``: ``t(u) = u``, ``dt/du = 1``, and the solve
    is the ``t``-time solve (same evaluations, same ``log p`` to rounding)."""
    model, x, exact = _gaussian_case(FixedLinear(SHAPE, 0, gamma_max=GAMMA_MAX_LARGE))
    results = _both(model, x)
    assert results["log_snr"].nfe == results["t"].nfe
    assert torch.allclose(results["log_snr"].log_p, results["t"].log_p, atol=1e-8)
    assert ((results["log_snr"].log_p - exact).abs() / D < 1e-3).all()
    clock = ode.LogSNRTime(model.process, Context(), 3, torch.float64, torch.device("cpu"))
    u = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    assert torch.allclose(clock.time(u), u, atol=1e-12) and torch.allclose(clock.dt_du(u), torch.ones(3).double())


def test_log_snr_time_inverts_each_examples_mean_gamma() -> None:
    """Per-dimension schedules conditioned on a latent: ``t(u)`` puts each example's mean ``gamma`` at
    ``gamma_min + u (gamma_max - gamma_min)`` (to rounding, float32 and float64), and ``dt/du`` is the inverse of
    the mean speed, checked by finite differences."""
    torch.manual_seed(0)
    schedule = Polynomial(SHAPE, 4, hidden=8)
    with torch.no_grad():
        for head in (schedule.head_a, schedule.head_b, schedule.head_c):
            head.weight.normal_(0.0, 1.0)
    ctx = Context(z=torch.randn(5, 4))
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        clock = ode.LogSNRTime(schedule, ctx, 5, dtype, torch.device("cpu"))
        u = torch.linspace(0, 1, 5, dtype=dtype)
        t = clock.time(u)
        gamma_bar, _ = ode.mean_gamma(schedule, t, ctx)
        target = schedule.gamma_min + u * (schedule.gamma_max - schedule.gamma_min)
        assert ((gamma_bar - target).abs() < tol * 20).all(), gamma_bar - target
        assert t[0].abs() < tol and (t[-1] - 1).abs() < tol
    clock = ode.LogSNRTime(schedule, ctx, 5, torch.float64, torch.device("cpu"))
    u, h = torch.full((5,), 0.4, dtype=torch.float64), 1e-6
    finite = (clock.time(u + h) - clock.time(u - h)) / (2 * h)
    assert torch.allclose(clock.dt_du(clock.time(u)), finite, rtol=1e-5)


def test_ode_likelihood_log_snr_time_keeps_the_bound_logic() -> None:
    """A real (tiny, random) MuLAN model with the same seeded dequantisation and probes: the bound in log-SNR time
    equals the ``t``-time one up to the solver's tolerance (the integrand is only re-parametrised), the latent
    cost is unchanged, and an unknown variable is refused."""
    torch.manual_seed(0)
    shape = (1, 3, 2)
    latent = KHotLatent(shape, m=6, k=2, channels=8, num_blocks=1, deterministic_eval=True)
    denoiser = UNet(shape, 6, channels=8, num_blocks=1, dropout=0.0, fourier_exponents=())
    nn.init.normal_(denoiser.conv_out.weight, std=0.1)
    model = DiffusionModel(shape, Polynomial(shape, 6, hidden=8), denoiser, latent).eval()
    images = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    results = {
        tv: ode_likelihood(
            model,
            images,
            num_draws=2,
            exact_divergence=True,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(1),
            time_variable=tv,
        )
        for tv in ode.TIME_VARIABLES
    }
    assert torch.allclose(results["log_snr"].nll_nats, results["t"].nll_nats, atol=1e-3 * 6)
    assert torch.equal(results["log_snr"].latent_nats, results["t"].latent_nats)
    assert results["log_snr"].iw_is_bound and (results["log_snr"].nfe > 10).all()
    with pytest.raises(ValueError, match="time_variable must be one of"):
        ode_likelihood(model, images, time_variable="sigma")


@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_uncontrolled_divergence_integral_takes_the_trajectorys_steps(reduce: str) -> None:
    """``divergence_atol=inf``: the solve takes exactly the steps of the trajectory solved alone (same NFE, same
    ``x_1``) and still gives ``log N(x; 0, Sigma)`` to 1e-3 nats/dim; the default (the integral controlled like
    the state) takes at least as many, and a tight ``divergence_atol`` more than the trajectory alone."""
    model, x, exact = _gaussian_case(_random_polynomial(0, reduce))
    free = ode_log_density(model, x, dtype=torch.float64, exact_divergence=True, divergence_atol=math.inf)
    f = ode.drift_in(model, Context(), "t", x.shape[0], torch.float64, x.device)
    x_1, trajectory_nfe = ode_solver.solve(f, x, 0.0, 1.0)
    assert free.nfe == trajectory_nfe
    assert torch.allclose(free.x_1, x_1, rtol=0.0, atol=1e-12)
    assert ((free.log_p - exact).abs() / D < 1e-3).all()
    controlled = ode_log_density(model, x, dtype=torch.float64, exact_divergence=True)
    assert controlled.nfe >= free.nfe
    tight = ode_log_density(model, x, dtype=torch.float64, exact_divergence=True, divergence_atol=1e-9)
    assert tight.nfe > free.nfe
    assert ((tight.log_p - exact).abs() / D < 1e-3).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_divergence_atol_must_be_positive(bad: float) -> None:
    model, x, _ = _gaussian_case(FixedLinear(SHAPE, 0, gamma_max=GAMMA_MAX_LARGE), n=2)
    with pytest.raises(ValueError, match="divergence_atol must be positive"):
        ode_log_density(model, x, dtype=torch.float64, divergence_atol=bad)
