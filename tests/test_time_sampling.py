"""Importance-sampled time (docs: math, sections 6c and 10b): Hang & Gu's Laplace and Cauchy proposals on the log-SNR.

Gaussian data ``x ~ N(0, diag s^2)`` with the optimal noise predictor: the expected diffusion term is the closed form
``1/2 sum_i [log(1 + s_i^2 e^-gamma_min) - log(1 + s_i^2 e^-gamma_max)]`` whatever the time density, and the
second moment of one weighted draw is ``int E[l_lambda^2] / p(lambda) dlambda`` with
``l_lambda = 1/2 sum_i v_i chi^2_1``, ``v_i = s_i^2 / (s_i^2 + e^-lambda)`` (float64 quadrature).
Monte Carlo checks assert ``|estimate - exact| < 4 SE``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mulan import elbo
from mulan.model import DiffusionModel
from mulan.processes import Context
from mulan.processes.schedules import GAMMA_MAX, GAMMA_MIN, FixedLinear, LearnedScalar, MonotoneNN, Polynomial
from mulan.time_sampling import AntitheticUniform, CauchyLogSNR, LaplaceLogSNR, LogSNRSampler, TimeSampler

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (2, 2, 2)
S2 = torch.logspace(math.log10(0.09), math.log10(9.0), 8, dtype=torch.float64)  # variances 0.09 .. 9
LO, HI = -GAMMA_MAX, -GAMMA_MIN  # the log-SNR range of the default endpoints
PAPER = {"laplace": LaplaceLogSNR(), "cauchy": CauchyLogSNR()}  # loc 0, scales 0.5 and 1
WIDE = {"laplace": LaplaceLogSNR(8.0, 8.0), "cauchy": CauchyLogSNR(8.0, 8.0)}  # mass where the integrand is


class OptimalDenoiser(nn.Module):
    """``eps_hat = E[eps | x_t] = sigma x_t / (alpha^2 s^2 + sigma^2)``, per dimension (any gamma shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s2", S2.float().view(1, *SHAPE))

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        alpha, sigma = elbo.alpha_sigma(gamma)
        return sigma * x_t / (alpha.square() * self.s2 + sigma.square())


def exact_diffusion() -> float:
    return float(0.5 * (torch.log1p(S2 * math.exp(-GAMMA_MIN)) - torch.log1p(S2 * math.exp(-GAMMA_MAX))).sum())


def exact_variance(sampler: TimeSampler) -> float:
    """Variance of one weighted draw ``l(t) w(t)`` (scalar schedule with the default endpoints), by quadrature."""
    lam = torch.linspace(LO, HI, 400_001, dtype=torch.float64)
    v = S2 / (S2 + torch.exp(-lam)[:, None])
    second = 0.25 * (v.sum(1).square() + 2 * v.square().sum(1))  # E[l_lambda^2]
    if isinstance(sampler, LogSNRSampler):
        lo, hi = torch.tensor(LO, dtype=torch.float64), torch.tensor(HI, dtype=torch.float64)
        density = torch.exp(sampler.mixture_log_density(lam, lo, hi))
    else:  # uniform t on a linear schedule: uniform lambda
        density = torch.full_like(lam, 1 / (HI - LO))
    return float(torch.trapezoid(second / density, lam)) - exact_diffusion() ** 2


def monotone_schedule() -> MonotoneNN:
    """A far-from-linear monotone schedule with the default endpoints: times come from bisection."""
    torch.manual_seed(11)
    s = MonotoneNN(SHAPE, 0, features=32, learn_endpoints=False)
    with torch.no_grad():
        s.w1.fill_(0.3)
        s.w2.copy_(6 + torch.randn(32))
        s.b2.copy_(3.0 + 0.5 * torch.randn(32))
        s.w3.copy_(torch.randn(32))
    assert abs(s.gamma(torch.tensor([0.5])).item() - 0.5 * (GAMMA_MIN + GAMMA_MAX)) > 1.0
    return s


def weighted_terms(process, sampler: TimeSampler, batches: int, batch_size: int = 64, seed: int = 0) -> Tensor:
    """The weighted diffusion term of ``batches`` batches of Gaussian data, each with the sampler's times: (N, B)."""
    model = DiffusionModel(SHAPE, process, OptimalDenoiser(), time_sampler=sampler)
    g = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for _ in range(batches):
            x = (torch.randn(batch_size, 8, generator=g, dtype=torch.float64) * S2.sqrt()).float().view(-1, *SHAPE)
            t, w = sampler(batch_size, model.process, Context(), g)
            term = model.diffusion_term(x, t, None, eps=torch.randn(x.shape, generator=g))
            rows.append(term if w is None else term * w)
    return torch.stack(rows).double()


# ----------------------------------------------------------------------------------------------------
# The proposals themselves


ALL = [*PAPER.values(), *WIDE.values(), LaplaceLogSNR(uniform_fraction=0.3), CauchyLogSNR(2.0, 3.0, 0.5)]


@pytest.mark.parametrize("sampler", ALL, ids=repr)
def test_truncated_mixture_is_a_density_and_its_inverse_cdf_inverts_it(sampler: LogSNRSampler) -> None:
    lo, hi = torch.tensor(LO, dtype=torch.float64), torch.tensor(HI, dtype=torch.float64)
    lam = torch.linspace(LO, HI, 200_001, dtype=torch.float64)
    density = torch.exp(sampler.mixture_log_density(lam, lo, hi))
    cumulative = torch.cumulative_trapezoid(density, lam)
    assert cumulative[-1].item() == pytest.approx(1.0, abs=1e-6)
    u = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    drawn = sampler.mixture_icdf(u, lo.expand(50), hi.expand(50))
    index = torch.searchsorted(lam, drawn).clamp(1, lam.numel() - 1)
    torch.testing.assert_close(cumulative[index - 1], u, atol=2e-4, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "monotone", "polynomial"])
def test_draws_are_stratified_in_the_proposal_and_invert_the_schedule(kind: str) -> None:
    """``F(lambda(t_j))`` of one batch are equally spaced mod 1: the inverse CDF, then the exact inverse of gamma."""
    process = {"linear": FixedLinear(SHAPE, 0), "monotone": monotone_schedule(), "polynomial": Polynomial(SHAPE, 0)}
    process = process[kind]
    sampler = CauchyLogSNR(2.0, 3.0, uniform_fraction=0.25)
    t, w = sampler(32, process, Context(), torch.Generator().manual_seed(5))
    assert t.dtype == torch.float32 and w.dtype == torch.float32 and t.shape == w.shape == (32,)
    if kind == "polynomial":  # per-dimension: the proposal lives on the reference linear log-SNR
        lam = -(GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t.double())
    else:
        lam = -process.gamma(t).reshape(-1).double()
    lo, hi = torch.full((32,), LO, dtype=torch.float64), torch.full((32,), HI, dtype=torch.float64)
    grid = torch.linspace(LO, HI, 400_001, dtype=torch.float64)
    cdf = torch.cumulative_trapezoid(torch.exp(sampler.mixture_log_density(grid, lo[:1], hi[:1])), grid)
    u = cdf[torch.searchsorted(grid, lam).clamp(1, grid.numel() - 1) - 1].sort().values
    gaps = torch.diff(u)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 32), atol=2e-4, rtol=0)


def test_weights_carry_no_gradient_of_a_learned_schedule() -> None:
    t, w = WIDE["laplace"](8, LearnedScalar(SHAPE, 0), Context())
    assert not w.requires_grad and not t.requires_grad


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="scale must be positive"):
        LaplaceLogSNR(scale=0.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        CauchyLogSNR(scale=-1.0)
    with pytest.raises(ValueError, match="uniform_fraction"):
        CauchyLogSNR(uniform_fraction=1.5)


# ----------------------------------------------------------------------------------------------------
# The bound stays unbiased; the variance


CASES = [
    ("linear", WIDE["laplace"]),
    ("linear", WIDE["cauchy"]),
    ("linear", PAPER["cauchy"]),
    ("linear", LaplaceLogSNR(uniform_fraction=0.3)),
    ("monotone", WIDE["laplace"]),
    ("monotone", PAPER["cauchy"]),
    ("polynomial", WIDE["cauchy"]),
]


@pytest.mark.parametrize(("kind", "sampler"), CASES, ids=lambda v: repr(v))
def test_expected_weighted_diffusion_term_is_the_uniform_time_one(kind: str, sampler: LogSNRSampler) -> None:
    """On Gaussian data with the optimal denoiser every time density gives the closed form (any schedule with these
    endpoints, per dimension too): the weights ``1 / pi(t)`` are right."""
    torch.manual_seed(0)
    process = {"linear": FixedLinear(SHAPE, 0), "monotone": monotone_schedule(), "polynomial": Polynomial(SHAPE, 0)}
    terms = weighted_terms(process[kind], sampler, batches=100, batch_size=256)
    batch_means = terms.mean(1)  # one estimate per batch: independent across batches
    est, se = batch_means.mean().item(), (batch_means.std() / math.sqrt(batch_means.numel())).item()
    assert abs(est - exact_diffusion()) < 4 * se + 1e-3, (est, exact_diffusion(), se)


@pytest.mark.parametrize("name", ["laplace", "cauchy"])
def test_a_proposal_on_the_integrand_lowers_the_variance_of_the_estimate(name: str) -> None:
    """The variance of one weighted draw matches its quadrature value, which is below the uniform-time one; the
    variance of the batch mean (stratified draws) is lower too."""
    uniform, proposal = exact_variance(AntitheticUniform()), exact_variance(WIDE[name])
    assert proposal < 0.75 * uniform, (proposal, uniform)
    terms = {"uniform": weighted_terms(FixedLinear(SHAPE, 0), AntitheticUniform(), 500, seed=1)}
    terms[name] = weighted_terms(FixedLinear(SHAPE, 0), WIDE[name], 500, seed=1)
    for which, exact in (("uniform", uniform), (name, proposal)):
        assert terms[which].var().item() == pytest.approx(exact, rel=0.1), which
    assert terms[name].mean(1).var() < terms["uniform"].mean(1).var()


def test_the_papers_narrow_proposals_raise_the_variance_of_the_bound() -> None:
    """Centred on log-SNR 0 with thin tails, Hang & Gu's settings leave the bound's integrand (large up to the
    highest log-SNR on continuous data) to rare draws with huge weights: the variance grows by orders of magnitude;
    a uniform share ``rho`` in the mixture bounds the weights by ``1 / rho`` times the uniform ones, hence the second
    moment by ``1 / rho`` times the uniform-time one."""
    uniform = exact_variance(AntitheticUniform())
    assert exact_variance(PAPER["laplace"]) > 1e6 * uniform
    assert exact_variance(PAPER["cauchy"]) > 10 * uniform
    second = exact_variance(LaplaceLogSNR(uniform_fraction=0.5)) + exact_diffusion() ** 2
    assert second <= (uniform + exact_diffusion() ** 2) / 0.5
