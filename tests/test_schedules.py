"""Tests of mulan.processes.schedules: monotonicity, endpoints, analytic dgamma/dt against autograd, dtypes, shapes.

docs: math, section 2: gamma is the negative log-SNR, increasing in t; FixedLinear/Polynomial (and MonotoneNN with
``learn_endpoints=False``) have fixed endpoints gamma_min/gamma_max; dgamma/dt is analytic.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from mulan.processes.schedules import (
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


# ---------------------------------------------------------------------------------------------- declared endpoints
class ShiftedLinear(NoiseSchedule):
    """A user schedule with learned endpoints ``b`` and ``b + |w|`` that starts away from gamma_min / gamma_max and
    leaves ``fixed_endpoints`` alone, as docs/extending.md says to."""

    def __init__(self, image_shape, latent_dim, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> None:
        super().__init__(image_shape, latent_dim, gamma_min, gamma_max)
        self.b = torch.nn.Parameter(torch.tensor(gamma_min + 1.5))
        self.w = torch.nn.Parameter(torch.tensor(gamma_max - gamma_min - 2.5))

    def gamma_and_derivative(self, t, ctx):
        return self.b + self.w.abs() * t, self.w.abs().expand_as(t)


class ShiftedLinearDeclared(ShiftedLinear):
    fixed_endpoints = False


class ZeroDenoiser(torch.nn.Module):
    def forward(self, x_t, gamma, z=None):
        return torch.zeros_like(x_t)


def test_a_schedule_with_learned_endpoints_that_leaves_fixed_endpoints_alone_gets_its_own_bound() -> None:
    """Every term of the bound is that of the same schedule declaring ``fixed_endpoints = False``, and the
    reconstruction and prior terms are those of its own endpoints, not of the constants gamma_min / gamma_max."""
    from mulan import elbo
    from mulan.model import DiffusionModel

    shape = (1, 4, 4)
    models = [DiffusionModel(shape, cls(shape, 0), ZeroDenoiser()) for cls in (ShiftedLinear, ShiftedLinearDeclared)]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, *shape), generator=g, dtype=torch.uint8)
    t, eps, noise = torch.rand(6, generator=g), torch.randn(6, *shape, generator=g), torch.randn(6, *shape, generator=g)
    silent, declared = (model(images, t=t, eps=eps, recon_noise=noise).as_dict() for model in models)
    assert silent.keys() == declared.keys()
    for name in declared:
        assert torch.equal(silent[name], declared[name]), name
    x = elbo.to_unit_interval(images)
    own_0, own_1 = torch.full((6, 1, 1, 1), GAMMA_MIN + 1.5), torch.full((6, 1, 1, 1), GAMMA_MAX - 1.0)
    torch.testing.assert_close(silent["recon"], elbo.reconstruction_loss(images, own_0, noise))
    torch.testing.assert_close(silent["prior"], elbo.prior_loss(x, own_1))
    assert not torch.allclose(silent["prior"], elbo.prior_loss(x, torch.full_like(own_1, GAMMA_MAX)))


class WrongStart(ShiftedLinear):
    fixed_endpoints = True  # false: gamma(0) = gamma_min + 1.5


class LearnedButDeclared(LearnedScalar):
    fixed_endpoints = True  # false: right at initialisation, but b and |w| are trained


class LatentEnd(NoiseSchedule):
    """gamma(1) = gamma_max + 0.1 mean(z): exact for z = 0 only."""

    fixed_endpoints = True

    def __init__(self, image_shape, latent_dim) -> None:
        super().__init__(image_shape, latent_dim, GAMMA_MIN, GAMMA_MAX)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def gamma_and_derivative(self, t, ctx):
        end = GAMMA_MAX + 0.1 * ctx.z.mean(1).reshape(-1, 1, 1, 1)
        return GAMMA_MIN + (end - GAMMA_MIN) * t, (end - GAMMA_MIN).expand_as(t)


class NeedsY(LatentEnd):
    def gamma_and_derivative(self, t, ctx):
        return GAMMA_MIN + SPAN * t + 0 * ctx.y.float().mean(), torch.full_like(t, SPAN)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: WrongStart(SHAPE, 0), r"WrongStart declares fixed_endpoints = True, but gamma\(0\) is 1.5 away"),
        (
            lambda: LearnedButDeclared(SHAPE, 0),
            r"gamma\(0\) is .* from gamma_min .* trainable parameters perturbed",
        ),
        (lambda: LatentEnd(SHAPE, LATENT), r"gamma\(1\) is .* away from gamma_max = 5.0 on a probe context:"),
        (lambda: NeedsY(SHAPE, LATENT), r"could not be evaluated on the probe context .*override endpoint_probe"),
    ],
    ids=["wrong-at-init", "learned", "depends-on-z", "no-probe-for-y"],
)
def test_a_false_fixed_endpoints_declaration_is_refused_at_construction(build, match) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_the_library_s_fixed_endpoints_pass_the_check_and_leave_weights_and_random_state_as_built(monkeypatch) -> None:
    """Each built-in process that declares fixed endpoints is built; the check then changes neither its parameters
    (restored bit for bit after the perturbation) nor the global random state: the same as a build without it."""
    from mulan.processes import CVDM, DiffEnc
    from mulan.processes.diagonal import DiagonalProcess

    builds = {
        "fixed_linear": lambda: FixedLinear(SHAPE, 0),
        "monotone_nn_fixed": lambda: MonotoneNN(SHAPE, 0, features=16, learn_endpoints=False),
        "polynomial": lambda: Polynomial(SHAPE, LATENT, hidden=16),
        "polynomial_mean": lambda: Polynomial(SHAPE, LATENT, hidden=16, reduce="mean"),
        "polynomial_no_latent": lambda: Polynomial(SHAPE, 0, hidden=16, init="linear"),
        "cvdm": lambda: CVDM(SHAPE, 0, condition_channels=2, features=16, channels=8),
        "diffenc": lambda: DiffEnc(SHAPE, 0, schedule=partial(MonotoneNN, features=16, learn_endpoints=False)),
    }

    def build_all() -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        torch.manual_seed(0)
        states = {}
        for name, build in builds.items():
            process = build()
            assert process.fixed_endpoints, name
            states[name] = {k: v.clone() for k, v in process.state_dict().items()}
        return states, torch.random.get_rng_state()

    checked, rng_checked = build_all()
    monkeypatch.setattr(DiagonalProcess, "check_fixed_endpoints", lambda self: None)
    unchecked, rng_unchecked = build_all()
    assert torch.equal(rng_checked, rng_unchecked)
    for name in builds:
        assert checked[name].keys() == unchecked[name].keys()
        for key in checked[name]:
            assert torch.equal(checked[name][key], unchecked[name][key]), (name, key)
