"""Tests of mulan.sampling: the ancestral sampler (docs: math, section 5) and the probability-flow ODE sampler.

Gaussian data ``x ~ N(0, diag(s^2))`` with the Bayes-optimal denoiser makes every answer exact:
- the ancestral sampler is then linear-Gaussian per dimension, so the variance of its ``x_0`` after ``T``
  steps follows an exact recursion (tested at few steps), which tends to ``s^2`` as ``T`` grows (tested at
  many);
- the probability-flow ODE maps ``N(0, I)`` exactly to ``N(0, alpha_0^2 s^2 + sigma_0^2) ~ N(0, s^2)``.
Monte Carlo checks assert ``|estimate - exact| < 4 SE`` with the SE of a variance estimate, ``var sqrt(2/N)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mulan import elbo
from mulan.latents import KHotLatent
from mulan.model import DiffusionModel
from mulan.networks import UNet
from mulan.processes import Context
from mulan.processes.schedules import FixedLinear, NoiseSchedule, Polynomial
from mulan.sampling import SAMPLERS, SampleResult, ancestral_sample, dpm_solver_sample, ode_encode, ode_sample

pytestmark = pytest.mark.usefixtures("single_thread")


SHAPE = (1, 2, 2)
S = torch.tensor([0.3, 0.6, 1.0, 1.7], dtype=torch.float64)  # anisotropic standard deviations


class DiagonalGaussianDenoiser(nn.Module):
    """``eps_hat = E[eps | x_t] = sigma x_t / (alpha^2 s^2 + sigma^2)`` for ``x ~ N(0, diag s^2)``, any
    (scalar or per-dimension) ``gamma``; alpha, sigma computed here independently of mulan.elbo."""

    def __init__(self, s: Tensor) -> None:
        super().__init__()
        self.register_buffer("s2", s.square().view(1, *SHAPE))

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        gamma = gamma.to(x_t.dtype)
        sigma2, alpha2 = torch.sigmoid(gamma), torch.sigmoid(-gamma)
        return sigma2.sqrt() * x_t / (alpha2 * self.s2.to(x_t.dtype) + sigma2)


def _per_dimension_schedule(gamma_max: float = 5.0, seed: int = 0) -> Polynomial:
    """A MuLAN polynomial schedule without latent whose per-dimension curves clearly differ (random heads)."""
    torch.manual_seed(seed)
    schedule = Polynomial(SHAPE, 0, gamma_max=gamma_max, hidden=8)
    with torch.no_grad():
        for head in (schedule.head_a, schedule.head_b, schedule.head_c):
            head.weight.normal_(0.0, 1.0)
            head.bias.normal_(0.0, 1.0)
    return schedule


def _gaussian_model(schedule: NoiseSchedule) -> DiffusionModel:
    return DiffusionModel(SHAPE, schedule, DiagonalGaussianDenoiser(S))


SCHEDULES = {"scalar": lambda: FixedLinear(SHAPE, 0), "per_dimension": _per_dimension_schedule}


def _predicted_ancestral_variance(model: DiffusionModel, steps: int) -> Tensor:
    """Exact variance of the ancestral sampler's ``x_0`` per dimension (4,), float64: with the linear denoiser
    ``eps_hat = k_t x_t`` a step is ``x_s = A x_t + B xi`` with ``A = (alpha_s/alpha_t)(1 - sigma_t c k_t)``,
    ``B^2 = sigma_s^2 c``, so ``Var_s = A^2 Var_t + B^2`` from ``Var_1 = 1``."""
    var = torch.ones(4, dtype=torch.float64)
    for i in range(steps, 0, -1):
        t, s = torch.tensor([i / steps]), torch.tensor([(i - 1) / steps])
        g_t = model.process.gamma(t).double().expand(1, *SHAPE).reshape(4)
        g_s = model.process.gamma(s).double().expand(1, *SHAPE).reshape(4)
        a2_t, a2_s, s2_t, s2_s = (
            torch.sigmoid(-g_t),
            torch.sigmoid(-g_s),
            torch.sigmoid(g_t),
            torch.sigmoid(g_s),
        )
        c = 1 - torch.exp(-g_t) / torch.exp(-g_s)  # 1 - SNR_t / SNR_s
        k = s2_t.sqrt() / (a2_t * S.square() + s2_t)
        a = (a2_s / a2_t).sqrt() * (1 - s2_t.sqrt() * c * k)
        var = a.square() * var + s2_s * c
    return var


def _sample_variance(result: SampleResult) -> Tensor:
    return result.samples.double().reshape(result.samples.shape[0], -1).var(0)


# ----------------------------------------------------------------------------------------------------
# ancestral sampling


@pytest.mark.parametrize("kind", SCHEDULES)
def test_ancestral_variance_follows_exact_recursion(kind: str) -> None:
    """Few steps, many samples: the sample variance equals the exact finite-T variance of the sampler."""
    model, n, steps = _gaussian_model(SCHEDULES[kind]()), 40000, 8
    result = ancestral_sample(model, n, steps=steps, decode=None, generator=torch.Generator().manual_seed(1))
    predicted = _predicted_ancestral_variance(model, steps)
    assert result.samples.dtype == torch.float32 and result.samples.shape == (n, *SHAPE) and result.nfe == steps
    assert ((_sample_variance(result) - predicted).abs() < 4 * predicted * math.sqrt(2 / n)).all()
    assert ((predicted / S.square() - 1).abs() > 0.1).any()  # few steps: visibly different from s^2


@pytest.mark.parametrize("kind", SCHEDULES)
def test_ancestral_many_steps_variance_matches_data(kind: str) -> None:
    """Many steps: the variance of ``x_0`` (before decoding) is ``s_i^2`` per dimension, within 4 SE plus the
    sampler's own O(1/T) bias (computed exactly, below 2% at T = 1024)."""
    model, n, steps = _gaussian_model(SCHEDULES[kind]()), 20000 if kind == "scalar" else 8000, 1024
    predicted = _predicted_ancestral_variance(model, steps)
    assert ((predicted / S.square() - 1).abs() < 0.02).all()
    result = ancestral_sample(model, n, steps=steps, decode=None, generator=torch.Generator().manual_seed(2))
    ratio = _sample_variance(result) / S.square()
    assert ((ratio - 1).abs() < 4 * math.sqrt(2 / n) + 0.02).all(), ratio
    assert result.samples.double().mean(0).abs().max() < 4 * S.max() / math.sqrt(n)


def _tiny_mulan() -> DiffusionModel:
    """A real (randomly initialised) MuLAN model: 2-hot of 6 latent, polynomial schedule, small U-Net."""
    torch.manual_seed(0)
    shape = (2, 4, 3)
    latent = KHotLatent(shape, m=6, k=2, channels=8, num_blocks=1)
    denoiser = UNet(shape, 6, channels=8, num_blocks=1, dropout=0.0)
    nn.init.normal_(denoiser.conv_out.weight, std=0.1)  # make eps_hat depend on the network
    return DiffusionModel(shape, Polynomial(shape, 6, hidden=16), denoiser, latent).eval()


@pytest.mark.parametrize("mode", ["argmax", "sample"])
def test_ancestral_tiny_mulan_shapes_dtype_determinism(mode: str) -> None:
    model = _tiny_mulan()
    first = ancestral_sample(model, 3, steps=5, decode=mode, generator=torch.Generator().manual_seed(3))
    again = ancestral_sample(model, 3, steps=5, decode=mode, generator=torch.Generator().manual_seed(3))
    other = ancestral_sample(model, 3, steps=5, decode=mode, generator=torch.Generator().manual_seed(4))
    assert first.samples.dtype == torch.uint8 and first.samples.shape == (3, 2, 4, 3)
    assert first.z is not None and first.z.shape == (3, 6) and (first.z.sum(1) == 2).all()
    assert ((first.z == 0) | (first.z == 1)).all()
    assert torch.equal(first.samples, again.samples) and torch.equal(first.z, again.z)
    assert not torch.equal(first.samples, other.samples)


def test_ancestral_uses_given_latent() -> None:
    model = _tiny_mulan()
    z = torch.zeros(2, 6)
    z[:, :2] = 1
    result = ancestral_sample(model, 2, steps=3, z=z, generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.z, z)


def test_decode_recovers_bin_values() -> None:
    """``x_0 = alpha_0 e(k)`` decodes to ``k`` (argmax) for every 8-bit value, and to ``k`` by sampling too
    (the decoder's width ``exp(gamma_min / 2)`` is far below the bin spacing)."""
    shape = (1, 16, 16)
    model = DiffusionModel(shape, FixedLinear(shape, 0), DiagonalGaussianDenoiser(S))
    values = torch.arange(256, dtype=torch.uint8).view(1, *shape)
    alpha_0 = math.sqrt(torch.sigmoid(torch.tensor(13.3)).item())
    x_0 = alpha_0 * elbo.to_unit_interval(values)
    decode = model.process.decode
    assert torch.equal(decode(x_0, Context(), "argmax"), values)
    assert torch.equal(decode(x_0, Context(), "sample", torch.Generator().manual_seed(0)), values)
    assert decode(x_0, Context(), None) is x_0
    with pytest.raises(ValueError):
        decode(x_0, Context(), "mean")


# ----------------------------------------------------------------------------------------------------
# probability-flow ODE sampling


@pytest.mark.parametrize("kind", SCHEDULES)
def test_ode_sample_variance_matches_data(kind: str) -> None:
    """The ODE maps N(0, I) to N(0, alpha_0^2 s^2 + sigma_0^2) = N(0, s^2) (to 1e-5): 4 SE per dimension."""
    model, n = _gaussian_model(SCHEDULES[kind]()), 20000
    result = ode_sample(model, n, decode=None, generator=torch.Generator().manual_seed(5))
    ratio = _sample_variance(result) / S.square()
    assert ((ratio - 1).abs() < 4 * math.sqrt(2 / n)).all(), ratio
    assert result.nfe > 10


@pytest.mark.parametrize("kind", SCHEDULES)
def test_ode_round_trip(kind: str) -> None:
    """Encoding data to x_1 gives N(0, I)-distributed codes, and decoding them back recovers x (float64)."""
    model, n = _gaussian_model(SCHEDULES[kind]()), 2000
    x = (torch.randn(n, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * S).view(n, *SHAPE)
    x_1, nfe = ode_encode(model, x, rtol=1e-8, atol=1e-8, dtype=torch.float64)
    codes_var = x_1.reshape(n, -1).var(0)
    assert ((codes_var - 1).abs() < 4 * math.sqrt(2 / n)).all(), codes_var
    back = ode_sample(model, n, x_1=x_1, rtol=1e-8, atol=1e-8, decode=None, dtype=torch.float64)
    assert back.samples.dtype == torch.float64 and nfe > 10
    assert (back.samples - x).abs().max() < 1e-5


def test_ode_sample_tiny_mulan() -> None:
    model = _tiny_mulan()
    first = ode_sample(model, 2, rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(7))
    again = ode_sample(model, 2, rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(7))
    assert first.samples.dtype == torch.uint8 and first.samples.shape == (2, 2, 4, 3)
    assert (first.z.sum(1) == 2).all() and first.nfe > 0
    assert torch.equal(first.samples, again.samples)


# ----------------------------------------------------------------------------------------------------
# DPM-Solver: few deterministic steps on the same ODE


@pytest.mark.parametrize("kind", SCHEDULES)
def test_dpm_solver_converges_to_the_ode_at_its_order(kind: str) -> None:
    """From the same ``x_1``, DPM-Solver's ``x_0`` tends to the exact ODE solution (dopri5 at 1e-8, float64) as
    the steps double: the error halves for ``order=1`` (DDIM) and quarters for ``order=2``, and at 64 steps the
    second-order sampler is within 2% of the data's scale (per-dimension schedules included)."""
    model = _gaussian_model(SCHEDULES[kind]())
    x_1 = torch.randn(500, *SHAPE, generator=torch.Generator().manual_seed(8))
    exact = ode_sample(model, 500, x_1=x_1.double(), rtol=1e-8, atol=1e-8, decode=None, dtype=torch.float64).samples

    def error(order: int, steps: int) -> float:
        result = dpm_solver_sample(model, 500, steps=steps, order=order, x_1=x_1, decode=None)
        assert result.nfe == steps and result.samples.dtype == torch.float32
        return (result.samples.double() - exact).abs().max().item()

    first, second = [error(1, n) for n in (32, 64)], [error(2, n) for n in (32, 64)]
    assert 1.7 < first[0] / first[1] < 2.3, first
    assert second[0] / second[1] > 3.2, second
    assert second[1] < 0.02 * S.max().item() and second[1] < first[1] / 10


@pytest.mark.parametrize("kind", SCHEDULES)
def test_first_order_sde_dpm_solver_is_the_ancestral_sampler(kind: str) -> None:
    """SDE-DPM-Solver++ of order 1 takes the ancestral step ``q(x_s | x_t, x = x_hat)`` (its coefficients are the
    posterior's, rewritten in ``h``): from the same generator it gives the ancestral sampler's samples."""
    model = _gaussian_model(SCHEDULES[kind]())
    ancestral = ancestral_sample(model, 64, steps=6, decode=None, generator=torch.Generator().manual_seed(11))
    sde = dpm_solver_sample(
        model, 64, steps=6, order=1, stochastic=True, decode=None, generator=torch.Generator().manual_seed(11)
    )
    torch.testing.assert_close(sde.samples, ancestral.samples, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_second_order_sde_dpm_solver_is_closer_to_the_data_than_ancestral(kind: str) -> None:
    """Gaussian data, exact denoiser, 32 steps: the 2M SDE sampler's variance of ``x_0`` is within 40% of the
    ancestral sampler's exact finite-step error of ``s^2`` (measured: about a fifth), plus 4 standard errors."""
    model, n, steps = _gaussian_model(SCHEDULES[kind]()), 20000, 32
    ancestral_error = (_predicted_ancestral_variance(model, steps) / S.square() - 1).abs().max()
    result = dpm_solver_sample(
        model, n, steps=steps, stochastic=True, decode=None, generator=torch.Generator().manual_seed(2)
    )
    error = (_sample_variance(result) / S.square() - 1).abs().max()
    assert ancestral_error > 0.2  # 32 ancestral steps are visibly off
    assert error < 0.4 * ancestral_error + 4 * math.sqrt(2 / n), (error, ancestral_error)


def test_dpm_solver_tiny_mulan_and_bad_options() -> None:
    model = _tiny_mulan()
    first = dpm_solver_sample(model, 3, steps=4, generator=torch.Generator().manual_seed(3))
    again = dpm_solver_sample(model, 3, steps=4, generator=torch.Generator().manual_seed(3))
    assert first.samples.dtype == torch.uint8 and first.samples.shape == (3, 2, 4, 3) and first.nfe == 4
    assert (first.z.sum(1) == 2).all() and torch.equal(first.samples, again.samples)
    sde = [SAMPLERS["dpm_solver_sde"](model, 3, steps=4, generator=torch.Generator().manual_seed(k)) for k in (3, 3, 4)]
    assert torch.equal(sde[0].samples, sde[1].samples) and sde[0].nfe == 4
    assert not torch.equal(sde[0].samples, sde[2].samples)
    for bad in ({"steps": 0}, {"order": 3}, {"decode": "mean"}):
        with pytest.raises(ValueError):
            dpm_solver_sample(model, 1, **bad)


def test_progress_bars_run() -> None:
    """``progress=True`` (a transient rich bar) changes nothing in the results."""
    model = _gaussian_model(FixedLinear(SHAPE, 0))
    quiet = ancestral_sample(model, 4, steps=3, generator=torch.Generator().manual_seed(0), decode=None)
    shown = ancestral_sample(model, 4, steps=3, generator=torch.Generator().manual_seed(0), decode=None, progress=True)
    assert torch.equal(quiet.samples, shown.samples)
    x_1 = torch.randn(4, *SHAPE)
    assert torch.equal(
        ode_sample(model, 4, x_1=x_1, decode=None, progress=True).samples,
        ode_sample(model, 4, x_1=x_1, decode=None).samples,
    )
