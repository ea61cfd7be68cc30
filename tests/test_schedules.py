"""Tests of mulan.schedules: monotonicity, endpoints, analytic dgamma/dt against autograd, dtypes, shapes.

docs: math, section 2: gamma is the negative log-SNR, increasing in t; FixedLinear/Polynomial (and MonotoneNN with
``learn_endpoints=False``) have fixed endpoints gamma_min/gamma_max; dgamma/dt is analytic.
"""

from __future__ import annotations

import math

import pytest
import torch

from mulan.schedules import (
    GAMMA_MAX,
    GAMMA_MIN,
    FixedLinear,
    LearnedScalar,
    MonotoneNN,
    NoiseSchedule,
    Polynomial,
)

pytestmark = pytest.mark.usefixtures("single_thread")


SHAPE = (3, 4, 5)  # non-square, C != H != W
LATENT = 7
SPAN = GAMMA_MAX - GAMMA_MIN


def _perturbed_monotone(learn_endpoints: bool = True, features: int = 64, seed: int = 0) -> MonotoneNN:
    """A MonotoneNN whose interior is clearly non-linear (random, large interior weights)."""
    torch.manual_seed(seed)
    s = MonotoneNN(SHAPE, 0, features=features, learn_endpoints=learn_endpoints)
    with torch.no_grad():
        # steep sigmoids switching near t = 0.2: a step-like, strongly non-linear interior
        s.w1.fill_(0.3)
        s.b1.fill_(-0.7)
        s.w2.copy_(8 + torch.randn(features))
        s.b2.copy_(4.8 + 0.5 * torch.randn(features))
        s.w3.copy_(torch.randn(features))
    return s


def _perturbed_polynomial(reduce: str = "none", latent_dim: int = LATENT, seed: int = 0) -> Polynomial:
    """A Polynomial with random weights everywhere, including a non-zero head_a."""
    torch.manual_seed(seed)
    s = Polynomial(SHAPE, latent_dim, hidden=16, reduce=reduce)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        s.head_a.weight.copy_(torch.randn_like(s.head_a.weight))
        s.head_a.bias.copy_(torch.randn_like(s.head_a.bias) * 2)
    return s


def _learned_scalar() -> LearnedScalar:
    s = LearnedScalar(SHAPE, 0)
    with torch.no_grad():
        s.b.fill_(-9.0)
        s.w.fill_(-11.5)  # |w| is the slope: the sign must not matter
    return s


def _all_schedules() -> list[tuple[str, NoiseSchedule, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, LATENT, generator=g)
    return [
        ("fixed_linear", FixedLinear(SHAPE, 0), None),
        ("learned_scalar", _learned_scalar(), None),
        ("monotone_nn", _perturbed_monotone(learn_endpoints=True), None),
        ("monotone_nn_fixed", _perturbed_monotone(learn_endpoints=False), None),
        ("polynomial", _perturbed_polynomial("none"), z),
        ("polynomial_mean", _perturbed_polynomial("mean"), z),
    ]


SCHEDULES = _all_schedules()
IDS = [name for name, _, _ in SCHEDULES]


def _gamma_on_grid(schedule: NoiseSchedule, z: torch.Tensor | None, n: int = 513) -> torch.Tensor:
    """gamma(t_j, z_b) for every b and every grid time t_j: (B, n, D)."""
    b = 1 if z is None else z.shape[0]
    t = torch.linspace(0, 1, n)
    zz = None if z is None else z.repeat_interleave(n, 0)
    gamma = schedule.gamma(t.repeat(b), zz)
    return gamma.reshape(b, n, -1)


@pytest.mark.parametrize(("name", "schedule", "z"), SCHEDULES, ids=IDS)
def test_gamma_is_monotone_increasing_per_dimension(name, schedule, z):
    gamma = _gamma_on_grid(schedule, z)
    steps = gamma.diff(dim=1)
    # Analytically every step is >= 0. Allow float32 rounding: where the polynomial's terms cancel
    # (f(1) ~ 1e-2 from terms ~1) gamma itself carries errors of ~6e-5 against a float64 evaluation.
    assert (steps >= -1e-4).all(), f"{name}: min step {steps.min().item()}"
    # ... and the schedule really moves: from the first to the last grid point it increases.
    assert (gamma[:, -1] - gamma[:, 0] > 1.0).all()


def test_perturbed_monotone_nn_is_not_linear():
    # Guard for the other tests: the perturbed interior must be visibly non-linear.
    s = _perturbed_monotone(learn_endpoints=False)
    g = s.gamma(torch.tensor([0.0, 0.25, 0.5, 1.0]))
    linear_mid = 0.5 * (g[0] + g[-1])
    assert (g[2] - linear_mid).abs() > 0.5


@pytest.mark.parametrize(("name", "schedule", "z"), SCHEDULES, ids=IDS)
def test_endpoints_method_equals_gamma_at_0_and_1(name, schedule, z):
    b = 6 if z is not None else 4
    g0, g1 = schedule.endpoints(z, b)
    assert g0.dtype == torch.float32 and g1.dtype == torch.float32
    at0 = schedule.gamma(torch.zeros(b), z)
    at1 = schedule.gamma(torch.ones(b), z)
    torch.testing.assert_close(g0.expand_as(at0), at0, rtol=0, atol=2e-5)
    torch.testing.assert_close(g1.expand_as(at1), at1, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["fixed_linear", "monotone_nn_fixed", "polynomial", "polynomial_mean"])
def test_fixed_endpoints_are_gamma_min_and_gamma_max(name):
    _, schedule, z = SCHEDULES[IDS.index(name)]
    assert schedule.fixed_endpoints
    b = 6
    g0 = schedule.gamma(torch.zeros(b), z)
    g1 = schedule.gamma(torch.ones(b), z)
    # for every z and every dimension
    torch.testing.assert_close(g0, torch.full_like(g0, GAMMA_MIN), rtol=0, atol=1e-5)
    torch.testing.assert_close(g1, torch.full_like(g1, GAMMA_MAX), rtol=0, atol=1e-5)


def test_polynomial_endpoints_exact_for_many_random_z():
    s = _perturbed_polynomial("none", seed=3)
    z = torch.randn(64, LATENT, generator=torch.Generator().manual_seed(5)) * 3
    g0 = s.gamma(torch.zeros(64), z)
    g1 = s.gamma(torch.ones(64), z)
    assert g0.shape == (64, *SHAPE)
    assert (g0 == GAMMA_MIN).all()  # f(0) = 0 exactly
    assert (g1 - GAMMA_MAX).abs().max() < 1e-5
    # the coefficients genuinely vary across z and dimensions (otherwise the test is vacuous)
    mid = s.gamma(torch.full((64,), 0.5), z)
    assert mid.flatten(1).std(1).min() > 1e-2 and mid.std(0).min() > 1e-3


def test_monotone_nn_learned_endpoints_are_gamma0_and_gamma0_plus_abs_delta():
    # The normalisation VDM forgot: endpoints depend only on gamma_0 and delta, not the interior weights.
    s = _perturbed_monotone(learn_endpoints=True)
    with torch.no_grad():
        s.gamma_0.fill_(-10.0)
        s.delta.fill_(-12.5)  # |delta| is the span
    g = s.gamma(torch.tensor([0.0, 1.0]))
    assert g[0].item() == pytest.approx(-10.0, abs=2e-5)
    assert g[1].item() == pytest.approx(2.5, abs=2e-5)
    e0, e1 = s.endpoints(None, 3)
    assert torch.allclose(e0, torch.full((3, 1, 1, 1), -10.0)) and torch.allclose(e1, torch.full((3, 1, 1, 1), 2.5))
    # perturb the interior again: endpoints stay put
    with torch.no_grad():
        s.w2.mul_(3.0)
        s.b2.add_(1.0)
        s.w3.mul_(5.0)
        s.w1.fill_(2.0)
        s.b1.fill_(4.0)
    g = s.gamma(torch.tensor([0.0, 1.0]))
    assert g[0].item() == pytest.approx(-10.0, abs=2e-5)
    assert g[1].item() == pytest.approx(2.5, abs=2e-5)


def test_learned_scalar_is_b_plus_abs_w_t():
    s = _learned_scalar()
    t = torch.tensor([0.0, 0.3, 1.0])
    gamma, dgamma = s(t)
    torch.testing.assert_close(gamma.flatten(), -9.0 + 11.5 * t)
    torch.testing.assert_close(dgamma.flatten(), torch.full((3,), 11.5))


def test_fixed_linear_values():
    s = FixedLinear(SHAPE, 0)
    t = torch.tensor([0.0, 0.25, 1.0])
    gamma, dgamma = s(t)
    torch.testing.assert_close(gamma.flatten(), GAMMA_MIN + SPAN * t)
    torch.testing.assert_close(dgamma.flatten(), torch.full((3,), SPAN))


@pytest.mark.parametrize(("name", "schedule", "z"), SCHEDULES, ids=IDS)
def test_dgamma_dt_matches_autograd_per_element(name, schedule, z):
    b = 6
    t = torch.rand(b, generator=torch.Generator().manual_seed(2)) * 0.98 + 0.01
    t[0], t[1] = 0.0, 1.0  # endpoints too
    t.requires_grad_(True)
    gamma, dgamma = schedule(t, z)
    flat = gamma.reshape(b, -1)
    # gamma[b, i] depends on t[b] only, so the gradient of the column sum over b of element i w.r.t. t[b]
    # is d gamma[b, i] / d t[b]: one backward pass per dimension.
    cols = []
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), t, retain_graph=True)
        cols.append(g)
    auto = torch.stack(cols, 1).reshape(gamma.shape)
    dg = dgamma.detach().expand_as(auto)
    scale = dg.abs().max().item()
    torch.testing.assert_close(dg, auto, rtol=1e-4, atol=1e-4 * scale)
    assert (dg >= 0).all()


@pytest.mark.parametrize(("name", "schedule", "z"), SCHEDULES, ids=IDS)
def test_float32_under_bf16_autocast_and_shapes(name, schedule, z):
    b = 6
    t = torch.linspace(0, 1, b)
    ref_gamma, ref_dgamma = schedule(t, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gamma, dgamma = schedule(t.to(torch.bfloat16) if name == "fixed_linear" else t, z)
        g0, g1 = schedule.endpoints(z, b)
    for out in (gamma, dgamma, g0, g1):
        assert out.dtype == torch.float32
    expected = (b, *SHAPE) if name == "polynomial" else (b, 1, 1, 1)
    assert gamma.shape == expected and dgamma.shape == expected
    if name != "fixed_linear":  # (that one was given bf16 times on purpose)
        # computed in float32: same values as without autocast (bf16 would be off by ~1e-2 relative)
        torch.testing.assert_close(gamma, ref_gamma, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dgamma, ref_dgamma, rtol=1e-6, atol=1e-6)


def test_polynomial_mean_is_mean_of_multivariate():
    full = _perturbed_polynomial("none", seed=4)
    mean = Polynomial(SHAPE, LATENT, hidden=16, reduce="mean")
    mean.load_state_dict(full.state_dict())
    z = torch.randn(5, LATENT)
    t = torch.rand(5)
    g_full, d_full = full(t, z)
    g_mean, d_mean = mean(t, z)
    assert g_mean.shape == (5, 1, 1, 1)
    torch.testing.assert_close(g_mean, g_full.mean((1, 2, 3), keepdim=True))
    torch.testing.assert_close(d_mean, d_full.mean((1, 2, 3), keepdim=True))


def test_polynomial_without_latent_is_the_same_for_all_examples():
    s = _perturbed_polynomial("none", latent_dim=0, seed=6)
    t = torch.full((4,), 0.37)
    gamma, dgamma = s(t, None)
    assert gamma.shape == (4, *SHAPE)
    for i in range(1, 4):
        assert torch.equal(gamma[i], gamma[0]) and torch.equal(dgamma[i], dgamma[0])
    # multivariate: not the same in every dimension
    assert gamma[0].std() > 1e-3
    # different times still give different gamma
    g2 = s.gamma(torch.tensor([0.2, 0.8]), None)
    assert (g2[1] > g2[0]).all()


def _scalar_poly(a: float, b: float, c: float, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand computation, float64, expanded (not Horner) form of docs: math, section 2."""
    t = t.double()

    def f(u):
        return a * a * u**5 / 5 + a * b * u**4 / 2 + (b * b + 2 * a * c) * u**3 / 3 + b * c * u**2 + c * c * u

    f1 = f(torch.ones_like(t))
    return GAMMA_MIN + SPAN * f(t) / f1, SPAN * (a * t**2 + b * t + c) ** 2 / f1


def _constant_polynomial(
    a: float, b: float, c_raw: float, reduce: str = "none", latent_dim: int = LATENT
) -> Polynomial:
    s = Polynomial(SHAPE, latent_dim, hidden=16, reduce=reduce)
    with torch.no_grad():
        for head, value in ((s.head_a, a), (s.head_b, b), (s.head_c, c_raw)):
            head.weight.zero_()
            head.bias.fill_(value)
    return s


@pytest.mark.parametrize("reduce", ["none", "mean"])
def test_polynomial_constant_across_dims_equals_scalar_polynomial(reduce):
    a, b, c_raw = 1.7, -2.3, 0.4
    c = 1e-3 + math.log1p(math.exp(c_raw))  # c = 1e-3 + softplus
    s = _constant_polynomial(a, b, c_raw, reduce)
    z = torch.randn(8, LATENT) * 5  # ignored: the heads have zero weights
    t = torch.linspace(0, 1, 8)
    gamma, dgamma = s(t, z)
    ref_g, ref_d = _scalar_poly(a, b, c, t)
    ref_g, ref_d = ref_g.float().view(-1, 1, 1, 1), ref_d.float().view(-1, 1, 1, 1)
    torch.testing.assert_close(gamma, ref_g.expand_as(gamma), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dgamma, ref_d.expand_as(dgamma), rtol=1e-5, atol=1e-5 * ref_d.abs().max().item())
    # non-linear in t (a, b non-zero): the polynomial is not the linear schedule
    assert (ref_g[4] - (GAMMA_MIN + SPAN * t[4])).abs() > 0.1


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="gamma_min"):
        FixedLinear(SHAPE, 0, gamma_min=5.0, gamma_max=-13.3)
    with pytest.raises(ValueError):
        LearnedScalar(SHAPE, 0, gamma_min=1.0, gamma_max=1.0)
    with pytest.raises(ValueError):
        MonotoneNN(SHAPE, 0, gamma_min=2.0, gamma_max=-2.0, features=8)
    with pytest.raises(ValueError):
        Polynomial(SHAPE, 3, gamma_min=0.0, gamma_max=-1.0)
    with pytest.raises(ValueError, match="reduce"):
        Polynomial(SHAPE, 3, reduce="bogus")
