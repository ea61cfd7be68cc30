"""Variance-minimising schedule training (VDM appendix I.2; docs: math, sections 4 and 10c).

On Gaussian data ``x ~ N(0, diag s)`` with the optimal noise predictor, the per-example diffusion term at time ``t``
is ``L_t = 1/2 gamma' sum_i v_i chi^2_1`` with ``v_i = s_i / (s_i + e^gamma)``: its mean over ``t`` is the closed
form ``1/2 sum_i [log(1 + s_i e^-gamma_0) - log(1 + s_i e^-gamma_1)]`` for any interior, and its second moment is
``int 1/4 gamma'^2 [(sum v)^2 + 2 sum v^2] dt``, which does depend on the interior.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mulan import elbo
from mulan.model import DiffusionModel
from mulan.processes import Context
from mulan.processes.schedules import GAMMA_MAX, GAMMA_MIN, LearnedScalar, MonotoneNN
from mulan.time_sampling import antithetic_uniform

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (2, 2, 2)
S = torch.logspace(math.log10(0.09), math.log10(9.0), 8, dtype=torch.float64)
INTERIOR = ("w1", "b1", "w2", "b2", "w3")


class OptimalDenoiser(nn.Module):
    """``eps_hat = c E[eps | x_t] = c sigma x_t / (alpha^2 s + sigma^2)``, with a learnable ``c`` (1: optimal)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s", S.float().view(1, *SHAPE))
        self.c = nn.Parameter(torch.tensor(1.0))

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        alpha, sigma = elbo.alpha_sigma(gamma)
        return self.c * sigma * x_t / (alpha.square() * self.s + sigma.square())


def schedule(seed: int, features: int = 4, **options) -> MonotoneNN:
    torch.manual_seed(seed)
    s = MonotoneNN(SHAPE, 0, features=features, **options)
    with torch.no_grad():
        s.w2.copy_(4 * torch.rand(features) + 1)
        s.b2.copy_(2 * torch.randn(features))
        s.w3.copy_(torch.rand(features) + 0.2)
        s.w1.fill_(0.3)
    return s


def moments(process: MonotoneNN) -> tuple[float, float]:
    """``E[L]`` and ``E[L^2]`` of one draw at a uniform time (float64 trapezoid over the schedule's own gamma)."""
    t = torch.linspace(0, 1, 40_001)
    with torch.no_grad():
        gamma, dgamma = (g.reshape(-1).double() for g in process(t))
    v = S / (S + torch.exp(gamma)[:, None])
    first = 0.5 * dgamma * v.sum(1)
    second = 0.25 * dgamma.square() * (v.sum(1).square() + 2 * v.square().sum(1))
    return float(torch.trapezoid(first, t.double())), float(torch.trapezoid(second, t.double()))


def closed_form(gamma_0: float = GAMMA_MIN, gamma_1: float = GAMMA_MAX) -> float:
    return float(0.5 * (torch.log1p(S * math.exp(-gamma_0)) - torch.log1p(S * math.exp(-gamma_1))).sum())


def batch(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 8, generator=g, dtype=torch.float64) * S.sqrt()).float().view(n, *SHAPE)
    return x, antithetic_uniform(n, generator=g), torch.randn(x.shape, generator=g)


def gradients(process: MonotoneNN, net: nn.Module, objective: str) -> dict[str, Tensor]:
    """Gradients of the mean (``"mean"``) or mean square (``"square"``) of the per-example diffusion term."""
    model = DiffusionModel(SHAPE, process, net)
    model.zero_grad()
    x, t, eps = batch(64, seed=3)
    loss = model.diffusion_term(x, t, None, eps)
    (loss.mean() if objective == "mean" else loss.square().mean()).backward()
    grads = {name: p.grad.clone() for name, p in process.named_parameters()}
    grads["c"] = net.c.grad.clone()
    return grads


def test_the_routed_gradient_is_the_gradient_of_the_second_moment() -> None:
    """The interior receives ``d mean(L^2)``, the endpoints and the denoiser ``d mean(L)``: against autograd of each
    objective, and the interior against central differences of ``mean(L^2)``."""
    net = OptimalDenoiser()
    routed = gradients(schedule(0, variance_minimising=True), net, "mean")
    square = gradients(schedule(0), net, "square")
    mean = gradients(schedule(0), net, "mean")
    scale = max(square[name].abs().max().item() for name in INTERIOR)
    for name in INTERIOR:  # (b1 cancels in the normalisation: both are rounding noise there)
        torch.testing.assert_close(routed[name], square[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    for name in ("w2", "b2", "w3"):
        assert not torch.allclose(routed[name], mean[name], rtol=0.1), name  # not the bound's direction
    for name in ("gamma_0", "delta", "c"):
        torch.testing.assert_close(routed[name], mean[name], rtol=1e-5, atol=1e-6, msg=name)
    process = schedule(0)
    model = DiffusionModel(SHAPE, process, net)
    x, t, eps = batch(64, seed=3)

    def second_moment() -> float:
        with torch.no_grad():
            return model.diffusion_term(x, t, None, eps).double().square().mean().item()

    for name, index in (("w1", ()), ("w2", (1,)), ("b2", (2,)), ("w3", (0,))):
        p = getattr(process, name)
        h = 1e-3 * max(1.0, abs(p.data[index].item()))
        with torch.no_grad():
            p.data[index] += h
            up = second_moment()
            p.data[index] -= 2 * h
            down = second_moment()
            p.data[index] += h
        fd = (up - down) / (2 * h)
        assert routed[name][index].item() == pytest.approx(fd, rel=2e-2, abs=1e-3 * abs(fd) + 1e-2), name


def test_the_expected_loss_does_not_move_when_only_the_interior_changes() -> None:
    """Three interiors, the same endpoints: one expected loss (the closed form), different second moments; moving
    an endpoint moves the expectation."""
    results = [moments(schedule(seed)) for seed in (0, 1, 2)]
    for first, _ in results:
        assert first == pytest.approx(closed_form(), rel=1e-4)
    seconds = sorted(second for _, second in results)
    assert seconds[-1] > 1.05 * seconds[0]
    moved = schedule(0)
    with torch.no_grad():
        moved.gamma_0.fill_(GAMMA_MIN + 1.0)
    assert moments(moved)[0] == pytest.approx(closed_form(GAMMA_MIN + 1.0, GAMMA_MAX + 1.0), rel=1e-4)  # delta kept
    assert abs(moments(moved)[0] - closed_form()) > 0.01 * closed_form()


def test_values_are_unchanged_and_only_gradients_are_routed() -> None:
    x, t, eps = batch(16, seed=5)
    net = OptimalDenoiser()
    plain, routed = (
        DiffusionModel(SHAPE, schedule(0, variance_minimising=v), net).diffusion_term(x, t, None, eps)
        for v in (False, True)
    )
    torch.testing.assert_close(plain, routed)
    with torch.no_grad():  # evaluation: no routing state is left behind
        process = schedule(0, variance_minimising=True)
        process.diffusion_loss(x, t, Context(), lambda x_t, m: net(x_t, m.gamma), eps)
        assert process._loss_scale is None


def test_training_the_interior_lowers_the_variance_and_keeps_the_bound() -> None:
    """Adam on the interior alone, through the model's ordinary backward: with the option the variance of one draw
    falls (the bound's own gradient into the interior is only noise: it does not); the expected diffusion term stays
    the closed form either way."""
    variances = {}
    for routed in (True, False):
        process = schedule(0, features=16, learn_endpoints=False, variance_minimising=routed)
        model = DiffusionModel(SHAPE, process, OptimalDenoiser())
        mean_before, second_before = moments(process)
        optimiser = torch.optim.Adam([getattr(process, n) for n in INTERIOR], lr=3e-2)
        for step in range(150):
            x, t, eps = batch(128, seed=100 + step)
            optimiser.zero_grad()
            model.diffusion_term(x, t, None, eps).mean().backward()
            optimiser.step()
        mean_after, second_after = moments(process)
        assert mean_after == pytest.approx(closed_form(), rel=1e-4)
        variances[routed] = (second_before - mean_before**2, second_after - mean_after**2)
    (before, after), (_, plain) = variances[True], variances[False]
    assert after < 0.8 * before and after < plain, variances


def test_refusals_name_the_reason() -> None:
    with pytest.raises(ValueError, match="no interior.*MonotoneNN with variance_minimising"):
        LearnedScalar(SHAPE, 0, variance_minimising=True)
    process = schedule(0, variance_minimising=True)
    x, t, eps = batch(4, seed=0)
    with pytest.raises(ValueError, match="T-step bound does"):
        process.diffusion_loss(x, t, Context(), lambda x_t, m: x_t, eps, steps=10)
