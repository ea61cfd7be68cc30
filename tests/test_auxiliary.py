"""Tests of the multivariate diffusions with auxiliary variables (mulan.processes.auxiliary; docs: math, section 11).

- The closed-form kernel ``q(y_t | x)`` against a fine stochastic-Heun simulation of the SDE, and ``N(0, I)``
  stationary for any parameters.
- ``K = 0``, ``D = 1/2``: every method and the model's bound equal VDM's fixed linear schedule.
- Gaussian data ``x ~ N(0, s^2)`` with the optimal (linear) noise prediction: the diffusion term equals its closed
  form ``KL(q(y_0 | x) || q_0) - KL(q(y_1 | x) || q_1)`` per example, the prior term its KL.
- The paper's conditional form against the implemented one: their expectations differ by ``-dH(q(y_t | x))/dt``.
- The ancestral step is the exact posterior given the true noise; the ancestral and ODE samplers reproduce the data's
  variance; the ODE drift has the marginals' covariance flow.
- The probability-flow ODE likelihood with the auxiliaries' initial draw in the state: ``K = 0`` gives VDM's
  figures; Gaussian data with the optimal denoiser gives the joint density at t = 0 and an exact bound per draw; a
  tiny U-Net model gives finite bits/dim with VDM's rule for which figure is a bound.
- Gradients reach every learned parameter; fit / test / predict through the CLI; bad input is named.

Monte Carlo checks assert ``|estimate - exact| < 4 SE`` (+ a stated slack), SE estimated from the samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mulan import elbo
from mulan.cli import build_cli, main
from mulan.likelihood import dequantisation_scale, dequantise, ode_likelihood, ode_log_density
from mulan.model import DiffusionModel
from mulan.networks import UNet
from mulan.processes import (
    ALDA,
    MALDA,
    AuxiliaryProcess,
    Context,
    CriticallyDampedLangevin,
    FixedAuxiliary,
    LearnedAuxiliary,
    Marginal,
)
from mulan.processes.auxiliary import Kernel
from mulan.processes.schedules import FixedLinear
from mulan.sampling import ancestral_sample, ode_sample

pytestmark = pytest.mark.usefixtures("single_thread")

CONF = Path(__file__).parent / "conf"
CTX = Context()


def learned(num_aux: int, seed: int, **options) -> LearnedAuxiliary:
    """A learned process with random couplings of order one (far from its initialisation)."""
    torch.manual_seed(seed)
    return LearnedAuxiliary((1, 2, 2), num_aux=num_aux, init_scale=0.7, **options)


PROCESSES: dict[str, Callable[[], AuxiliaryProcess]] = {
    "vp": lambda: FixedAuxiliary((1, 2, 2)),
    "cld": lambda: CriticallyDampedLangevin((1, 2, 2)),
    "malda": lambda: MALDA((1, 2, 2)),
    "learned_2": lambda: learned(2, seed=3),
}


def psd_sqrt(m: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(m)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


# ----------------------------------------------------------------------------------------------------
# the transition kernel and the stationary distribution


def simulate(process: AuxiliaryProcess, y: Tensor, t_end: float, steps: int, seed: int) -> Tensor:
    """Stochastic Heun (weak order 2 for additive noise) for ``dy = beta A y dt + sqrt(2 beta) D^(1/2) dW`` from
    ``t = 0`` to ``t_end``; ``y``: (n, K+1) float64."""
    a, d = (m.detach() for m in process.drift_matrix())
    root = psd_sqrt(d)
    g = torch.Generator().manual_seed(seed)
    h = t_end / steps
    for i in range(steps):
        t0, t1 = torch.tensor([i * h], dtype=torch.float64), torch.tensor([(i + 1) * h], dtype=torch.float64)
        beta0, beta1 = process.time_change(t0)[1].item(), process.time_change(t1)[1].item()
        beta_mid = process.time_change(0.5 * (t0 + t1))[1].item()
        noise = math.sqrt(2 * beta_mid * h) * torch.randn(y.shape, generator=g, dtype=torch.float64) @ root.T
        predicted = y + beta0 * h * y @ a.T + noise
        y = y + 0.5 * h * (beta0 * y @ a.T + beta1 * predicted @ a.T) + noise
    return y


def test_transition_kernel_matches_simulation_of_the_sde() -> None:
    """Random learned ``Q``, ``D`` (K = 2, full ``D``), data ``x = 0.7``, t = 0.8 (B = 1.56):

    - 60 000 simulated ``y_t`` (400 Heun steps; the scheme's own bias is 2e-4 on ``Phi_t``): sample mean and
      covariance equal ``a_t x`` and ``Sigma_t`` within 4 SE (SE of a covariance entry:
      ``sqrt((S_ii S_jj + S_ij^2) / n)``) + 1e-3; a population started at ``N(0, I)`` stays ``N(0, I)``;
    - the moment equations ``m' = beta A m``, ``S' = beta (A S + S A^T + 2 D)`` integrated by RK4 (2000 steps) from
      ``(alpha_0 e_0 x, Sigma_0)`` give the closed form to 1e-7.
    """
    process = learned(2, seed=0)
    n, t_end, x = 60_000, 0.8, 0.7
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        k0, k = process.kernel(torch.zeros(1)), process.kernel(torch.tensor([t_end]))
        a, d = process.drift_matrix()
    y0 = x * k0.mean + torch.randn(n, 3, generator=g, dtype=torch.float64) @ k0.chol[0].T
    both = simulate(process, torch.cat([y0, torch.randn(n // 2, 3, generator=g, dtype=torch.float64)]), t_end, 400, 2)
    y, stationary = both[:n], both[n:]
    mean, cov = x * k.mean[0], k.cov[0]
    mean_se = (cov.diagonal() / n).sqrt()
    assert ((y.mean(0) - mean).abs() < 4 * mean_se + 1e-3).all(), (y.mean(0), mean)
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov.square()) / n).sqrt()
    assert ((torch.cov(y.T) - cov).abs() < 4 * cov_se + 1e-3).all(), (torch.cov(y.T), cov)
    assert (cov - torch.eye(3)).abs().max() > 0.05  # the check is not of a trivial (stationary) covariance
    eye = torch.eye(3, dtype=torch.float64)
    assert ((torch.cov(stationary.T) - eye).abs() < 4 * math.sqrt(2 / (n // 2)) + 1e-3).all()

    def rates(time: float, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        beta = process.time_change(torch.tensor([time], dtype=torch.float64))[1].item()
        return beta * a @ m, beta * (a @ s + s @ a.T + 2 * d)

    m, s, steps = x * k0.mean[0], k0.cov[0], 2000
    h = t_end / steps
    for i in range(steps):
        k1 = rates(i * h, m, s)
        k2 = rates((i + 0.5) * h, m + 0.5 * h * k1[0], s + 0.5 * h * k1[1])
        k3 = rates((i + 0.5) * h, m + 0.5 * h * k2[0], s + 0.5 * h * k2[1])
        k4 = rates((i + 1) * h, m + h * k3[0], s + h * k3[1])
        m = m + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        s = s + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    assert torch.allclose(m, mean, atol=1e-7) and torch.allclose(s, cov, atol=1e-7)


@pytest.mark.parametrize("seed", range(5))
def test_identity_is_stationary_for_any_parameters(seed: int) -> None:
    """For random learned ``Q``, ``D`` (full and diagonal ``D``, K = 1..3): the Lyapunov residual
    ``F + F^T + G G^T`` of ``N(0, I)`` is zero, ``Q`` is skew-symmetric, ``D`` PSD; and over a long horizon
    (``gamma_max = 40``, B(1) = 40) the kernel forgets the data and reaches ``N(0, I)``."""
    process = learned(1 + seed % 3, seed, full_diffusion=seed % 2 == 0, gamma_max=40.0)
    q, d = process.matrices()
    a, _ = process.drift_matrix()
    assert torch.allclose(q, -q.T, atol=1e-15)
    assert torch.linalg.eigvalsh(d).min() > -1e-12
    assert torch.allclose(a + a.T + 2 * d, torch.zeros_like(d), atol=1e-12)
    k = process.kernel(torch.ones(1))
    assert torch.allclose(k.cov[0], torch.eye(process.num_vars, dtype=torch.float64), atol=1e-6)
    assert k.mean.abs().max() < 1e-3


@pytest.mark.parametrize("kind", ["log_snr", "linear_beta"])
def test_time_change_is_consistent(kind: str) -> None:
    """``beta = dB/dt`` and ``dgamma/dt`` match finite differences; for ``K = 0``, ``D = 1/2`` the denoiser's
    ``gamma`` is the data coordinate's own negative log-SNR, and for ``"log_snr"`` VDM's linear schedule."""
    process = FixedAuxiliary((1, 1, 1), time_change=kind)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    B, beta, gamma, dgamma = process.time_change(t)
    assert torch.allclose(beta, (process.time_change(t + h)[0] - process.time_change(t - h)[0]) / (2 * h), rtol=1e-6)
    assert torch.allclose(dgamma, (process.time_change(t + h)[2] - process.time_change(t - h)[2]) / (2 * h), rtol=1e-6)
    assert torch.allclose(-process.data_log_snr(t), gamma, rtol=1e-9, atol=1e-9)
    assert process.time_change(torch.zeros(1, dtype=torch.float64))[2].item() == pytest.approx(process.gamma_min)
    if kind == "log_snr":
        assert torch.allclose(gamma, process.gamma_min + (process.gamma_max - process.gamma_min) * t)


# ----------------------------------------------------------------------------------------------------
# K = 0: VDM


def _wiggly_predictor(y: Tensor, m: Marginal) -> Tensor:
    """Any function of ``(y_t, gamma)``: the two processes must agree for every predictor, not just the optimal."""
    return torch.tanh(0.8 * y + 0.05 * m.gamma) + 0.1 * y.square()


def test_no_auxiliaries_is_vdm_to_float_rounding() -> None:
    """``K = 0``, ``Q = 0``, ``D = 1/2``, log-SNR time change: the same noise level, diffusion term, prior (against
    VDM's formula in float64), reconstruction, ancestral step, ODE drift and decoder as
    :class:`~mulan.schedules.FixedLinear`, to float rounding."""
    shape = (3, 4, 4)
    aux, vdm = FixedAuxiliary(shape), FixedLinear(shape, 0)
    assert aux.state_shape == shape
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, *shape), generator=g, dtype=torch.uint8)
    x = elbo.to_unit_interval(images)
    t = torch.rand(16, generator=g)
    eps, noise = torch.randn(16, *shape, generator=g), torch.randn(16, *shape, generator=g)
    m_aux, m_vdm = aux.marginal(t, CTX), vdm.marginal(t, CTX)
    assert torch.allclose(m_aux.gamma, m_vdm.gamma, rtol=1e-6, atol=1e-6)
    ours, theirs = (
        aux.diffusion_loss(x, t, CTX, _wiggly_predictor, eps),
        vdm.diffusion_loss(x, t, CTX, _wiggly_predictor, eps),
    )
    assert torch.allclose(ours, theirs, rtol=2e-5)
    reference = elbo.prior_loss(x.double(), torch.tensor(vdm.gamma_max, dtype=torch.float64))
    assert torch.allclose(aux.prior_loss(x, CTX).double(), reference, rtol=1e-6)
    assert torch.equal(aux.reconstruction_loss(images, CTX, noise), vdm.reconstruction_loss(images, CTX, noise))
    x_t = torch.randn(16, *shape, generator=g)
    s = (t - 0.1).clamp_min(0)
    ours = aux.ancestral_step(x_t, t, s, CTX, _wiggly_predictor, noise)
    assert torch.allclose(ours, vdm.ancestral_step(x_t, t, s, CTX, _wiggly_predictor, noise), rtol=1e-5, atol=1e-6)
    drift = aux.ode_drift(x_t.double(), t.double(), CTX, _wiggly_predictor)
    assert drift.dtype == torch.float64
    assert torch.allclose(drift, vdm.ode_drift(x_t.double(), t.double(), CTX, _wiggly_predictor), rtol=1e-5)
    assert torch.equal(aux.decode(x_t * 0.5, CTX), vdm.decode(x_t * 0.5, CTX))


def test_no_auxiliaries_model_bound_is_vdms() -> None:
    """The whole model: the same U-Net weights, images, times and noise give the same bound, term by term."""
    shape = (1, 8, 8)
    torch.manual_seed(0)
    unet = UNet(shape, 0, channels=8, num_blocks=1)
    with torch.no_grad():  # a non-trivial network (the output convolution starts at zero)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = DiffusionModel(shape, FixedAuxiliary(shape), unet).eval()
    theirs = DiffusionModel(shape, FixedLinear(shape, 0), unet).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, *shape), generator=g, dtype=torch.uint8)
    t, eps, r = torch.rand(8, generator=g), torch.randn(8, *shape, generator=g), torch.randn(8, *shape, generator=g)
    a, b = ours(images, t=t, eps=eps, recon_noise=r), theirs(images, t=t, eps=eps, recon_noise=r)
    for name in ("recon", "diffusion", "latent"):
        assert torch.allclose(a[name], b[name], rtol=2e-5), name
    assert torch.allclose(a["prior"], b["prior"], rtol=5e-3)  # VDM's float32 formula loses digits here; see above


def test_process_arithmetic_stays_float32_under_autocast() -> None:
    """Under bf16 autocast only the denoiser may run low: the state, the diffusion term and the ancestral step are
    the float32 ones (docs: math, section 8)."""
    process = CriticallyDampedLangevin((1, 4, 4))
    g = torch.Generator().manual_seed(0)
    x, t = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1, torch.rand(8, generator=g)
    eps, y, noise = (torch.randn(8, 2, 4, 4, generator=g) for _ in range(3))
    loss, step = process.diffusion_loss(x, t, CTX, _wiggly_predictor, eps), []
    step.append(process.ancestral_step(y, t, 0.9 * t, CTX, _wiggly_predictor, noise))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_loss = process.diffusion_loss(x, t, CTX, _wiggly_predictor, eps)
        step.append(process.ancestral_step(y, t, 0.9 * t, CTX, _wiggly_predictor, noise))
    assert low_loss.dtype == torch.float32 and torch.equal(low_loss, loss)
    assert step[1].dtype == torch.float32 and torch.equal(step[1], step[0])


# ----------------------------------------------------------------------------------------------------
# Gaussian data with the optimal noise prediction

S_DATA = 0.5


def optimal_eps(process: AuxiliaryProcess, y: Tensor, m: Marginal) -> Tensor:
    """``E[eps | y_t] = L_t^T C_t^-1 y_t`` for ``x ~ N(0, s^2)``: ``C_t = Sigma_t + s^2 a_t a_t^T`` per dimension."""
    t = (m.gamma.double().flatten() - process.gamma_min) / (process.gamma_max - process.gamma_min)
    n = t.numel()
    k = process.kernel(t[:1] if bool((t == t[0]).all()) else t)
    cov = k.cov + S_DATA**2 * k.mean[:, :, None] * k.mean[:, None, :]
    gain = (torch.linalg.inv(cov).mT @ k.chol).mT.expand(n, -1, -1)  # L^T C^-1
    blocks = y.double().unflatten(1, (process.num_vars, -1))
    out = torch.einsum("nij,nj...->ni...", gain, blocks)
    return out.flatten(1, 2).to(y.dtype)


class OptimalDenoiser(nn.Module):
    """:func:`optimal_eps` as a denoiser (input ``gamma`` is the log-SNR time change, so it gives ``t``)."""

    def __init__(self, process: AuxiliaryProcess) -> None:
        super().__init__()
        self.process = [process]  # not a submodule

    def forward(self, y: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        return optimal_eps(self.process[0], y, Marginal(gamma=gamma))


def gaussian_kl(mean: Tensor, cov: Tensor, cov_p: Tensor) -> Tensor:
    """``KL(N(mean, cov) || N(0, cov_p))`` for (..., k) means and (k, k) covariances, float64."""
    k = cov.shape[-1]
    inv = torch.linalg.inv(cov_p)
    quad = torch.einsum("...i,ij,...j->...", mean, inv, mean)
    return 0.5 * (torch.trace(inv @ cov) + quad - k + torch.logdet(cov_p) - torch.logdet(cov))


def closed_form_diffusion_term(process: AuxiliaryProcess, x: Tensor) -> Tensor:
    """``KL(q(y_0 | x) || q_0) - KL(q(y_1 | x) || q_1)`` summed over dimensions, (N,) float64, for ``x ~ N(0, s^2)``."""

    def data_kl(t: float) -> Tensor:
        k = process.kernel(torch.full((1,), t))
        mean = x.double().flatten(1)[:, :, None] * k.mean[0]
        cov_data = k.cov[0] + S_DATA**2 * torch.outer(k.mean[0], k.mean[0])
        return gaussian_kl(mean, k.cov[0], cov_data).sum(1).detach()

    return data_kl(0.0) - data_kl(1.0)


@pytest.mark.parametrize("kind", PROCESSES)
def test_gaussian_data_optimal_score_weight_integrates_to_the_closed_form(kind: str) -> None:
    """The same identity without Monte Carlo: the expectation over ``eps`` of ``1/2 e^T W_t e`` with
    ``e = eps - eps_hat = R eps - b x`` (``R = I - L^T C^-1 L``, ``b = L^T C^-1 a``) is
    ``1/2 [tr(R^T W R) + x^2 b^T W b]``; integrated over ``t`` (composite 8-point Gauss-Legendre, 256 panels) it
    equals the closed form to 1e-6 relative, which pins the weight ``W_t`` (:meth:`diffusion_weight`)."""
    process = PROCESSES[kind]()
    x = S_DATA * torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    nodes, weights = np.polynomial.legendre.leggauss(8)
    panels = 256
    left = torch.arange(panels, dtype=torch.float64)[:, None] / panels
    t = (left + (torch.from_numpy(nodes)[None, :] + 1) / (2 * panels)).reshape(-1)
    w = (torch.from_numpy(weights)[None, :] / (2 * panels)).expand(panels, -1).reshape(-1)
    with torch.no_grad():
        k = process.kernel(t)
        weight = process.diffusion_weight(k)
        cov = k.cov + S_DATA**2 * k.mean[:, :, None] * k.mean[:, None, :]
        gain = k.chol.mT @ torch.linalg.inv(cov)
        r = torch.eye(process.num_vars, dtype=torch.float64) - gain @ k.chol
        b = (gain @ k.mean[:, :, None]).squeeze(-1)
        noise_part = (r.mT @ weight @ r).diagonal(dim1=-2, dim2=-1).sum(-1)
        data_part = torch.einsum("ni,nij,nj->n", b, weight, b)
    squares = x.double().flatten(1).square().sum(1)
    integral = 0.5 * (w @ noise_part * x[0].numel() + w @ data_part * squares)
    exact = closed_form_diffusion_term(process, x)
    assert torch.allclose(integral, exact, rtol=1e-6), (integral, exact)


@pytest.mark.parametrize("kind", PROCESSES)
def test_gaussian_data_optimal_score_diffusion_term_closed_form(kind: str) -> None:
    """Per example, ``E_t,eps[diffusion] = KL(q(y_0|x) || q_0) - KL(q(y_1|x) || q_1)`` with ``q_t = N(0, C_t)`` the
    data's marginal (the Girsanov term is the path KL given ``x`` less its endpoint part; the data-processing step
    ``y_0 -> path`` is free). 64 images of 4 dimensions x 512 stratified times; and the prior term is
    ``KL(q(y_1 | x) || N(0, I))`` exactly."""
    process = PROCESSES[kind]()
    n_x, reps, dims = 64, 512, 4
    g = torch.Generator().manual_seed(0)
    x = S_DATA * torch.randn(n_x, 1, 2, 2, generator=g)
    k1 = process.kernel(torch.ones(1))
    exact = closed_form_diffusion_term(process, x)
    xs = x.repeat_interleave(reps, 0)
    u = torch.rand(n_x, 1, generator=g)
    t = ((u + torch.arange(reps) / reps) % 1.0).reshape(-1).float()
    eps = torch.randn(n_x * reps, *process.state_shape, generator=g)

    def predict(y: Tensor, m: Marginal) -> Tensor:
        return optimal_eps(process, y, m)

    with torch.no_grad():
        estimate = process.diffusion_loss(xs, t, CTX, predict, eps).double().view(n_x, reps).mean(1)
        error = estimate - exact
        se = error.std() / math.sqrt(n_x)
        assert error.mean().abs() < 4 * se + 1e-3 * dims, (error.mean(), se, exact.mean())
        assert exact.mean() > 0.5  # a real amount of information to remove
        mean1 = x.double().flatten(1)[:, :, None] * k1.mean[0]
        prior = gaussian_kl(mean1, k1.cov[0], torch.eye(process.num_vars, dtype=torch.float64)).sum(1)
        assert torch.allclose(process.prior_loss(x, CTX).double(), prior, rtol=1e-5)


@pytest.mark.parametrize("predictor", ["optimal", "arbitrary"])
@pytest.mark.parametrize("kind", ["cld", "learned_2"])
def test_paper_conditional_form_agrees_in_expectation(kind: str, predictor: str) -> None:
    """At t = 0.85, for any predictor: E[paper's integrand conditioned on y_0] - E[implemented integrand]
    = ``-dH(q(y_t | x))/dt`` (from finite differences of ``log det Sigma_t``), so the two bounds (with the paper's
    ``-log pi(y_1)`` and ``log q(y_0 | x)`` terms) agree in expectation. 20 000 draws each; 4 SE + 1e-3 (SE 0.008
    with the optimal predictor, 0.5 with the arbitrary one)."""
    process = PROCESSES[kind]()
    n, dims = 20_000, 4
    g = torch.Generator().manual_seed(0)
    x = S_DATA * torch.randn(1, 1, 2, 2, generator=g).expand(n, -1, -1, -1)
    t = torch.full((n,), 0.85)

    def predict(y: Tensor, m: Marginal) -> Tensor:
        return optimal_eps(process, y, m) if predictor == "optimal" else _wiggly_predictor(y, m)

    with torch.no_grad():
        ours = process.diffusion_loss(x, t, CTX, predict).double()
        paper = process.conditional_diffusion_loss(x, t, CTX, predict).double()
        h = 1e-4
        logdet = [torch.logdet(process.kernel(torch.tensor([0.85 + e], dtype=torch.float64)).cov[0]) for e in (h, -h)]
        entropy_rate = 0.5 * dims * (logdet[0] - logdet[1]) / (2 * h)
    se = math.sqrt(ours.var() / n + paper.var() / n)
    difference = paper.mean() - ours.mean()
    assert (difference + entropy_rate).abs() < 4 * se + 1e-3, (difference, -entropy_rate, se)
    assert entropy_rate.abs() > 10 * se  # the correction is real, not within the noise


# ----------------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("kind", ["cld", "malda", "learned_2"])
def test_ancestral_step_with_true_noise_is_the_exact_posterior(kind: str) -> None:
    """``y_t ~ q(y_t | x)``, one step t = 0.9 -> s = 0.6 given the true ``eps``: ``y_s ~ q(y_s | x)`` exactly, so its
    sample mean and covariance over 100 000 draws are ``a_s x`` and ``Sigma_s`` within 4 SE + 1e-4."""
    process = PROCESSES[kind]()
    process.image_shape = (1, 1, 1)
    n, x = 100_000, 0.6
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(n, process.num_vars, 1, 1, generator=g)
    xs = torch.full((n, 1, 1, 1), x)
    t, s = torch.full((n,), 0.9), torch.full((n,), 0.6)
    with torch.no_grad():
        y_t = process._noisy_state(xs, process.kernel(t), eps)
        y_s = process.ancestral_step(y_t, t, s, CTX, lambda y, m: eps, torch.randn(y_t.shape, generator=g))
        k = process.kernel(s[:1])
    y_s = y_s.double().flatten(1)
    mean, cov = x * k.mean[0], k.cov[0]
    assert ((y_s.mean(0) - mean).abs() < 4 * (cov.diagonal() / n).sqrt() + 1e-4).all(), (y_s.mean(0), mean)
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov.square()) / n).sqrt()
    assert ((torch.cov(y_s.T) - cov).abs() < 4 * cov_se + 1e-4).all(), (torch.cov(y_s.T), cov)


def ancestral_covariance(process: AuxiliaryProcess, steps: int, start: Tensor) -> Tensor:
    """The covariance (K+1, K+1) of the state after ``steps`` ancestral steps from ``N(0, start)`` with the optimal
    prediction: each step is linear, ``y_s = (C_y + C_eps L^T C_t^-1) y_t + P^(1/2) xi``."""
    k = process.kernel(torch.arange(steps + 1, dtype=torch.float64) / steps)
    kt, ks = (Kernel(*(v[rows] for v in vars(k).values())) for rows in (slice(1, None), slice(None, -1)))
    c_y, c_eps, noise = process.posterior(kt, ks)
    data_cov = kt.cov + S_DATA**2 * kt.mean[:, :, None] * kt.mean[:, None, :]
    steps_map = c_y + c_eps @ kt.chol.mT @ torch.linalg.inv(data_cov)
    cov = start
    for i in range(steps - 1, -1, -1):
        cov = steps_map[i] @ cov @ steps_map[i].T + noise[i]
    return cov


@pytest.mark.parametrize("kind", ["cld", "learned_2"])
def test_ancestral_sampler_reproduces_gaussian_data(kind: str) -> None:
    """With the optimal denoiser each ancestral step is linear, so the sampled covariance follows a recursion:

    - from the true marginal at t = 1, the recursion reaches the data's marginal ``C_0`` as the steps grow, at
      first order (max. error below 0.03 at 200 steps, 1/4 to 1/6 of it at 1000);
    - the shared sampler (:func:`~mulan.sampling.ancestral_sample`, 200 steps from ``N(0, I)``, 4 000 samples x 4
      dimensions) gives the recursion's data variance within 4 SE, decoded as ``y_0,data``.
    """
    process = PROCESSES[kind]()
    with torch.no_grad():
        k0, k1 = process.kernel(torch.zeros(1)), process.kernel(torch.ones(1))
        c0, c1 = (k.cov[0] + S_DATA**2 * torch.outer(k.mean[0], k.mean[0]) for k in (k0, k1))
        coarse, fine = ((ancestral_covariance(process, steps, c1) - c0).abs().max() for steps in (200, 1000))
        assert coarse < 0.03 and 0.15 < fine / coarse < 0.25, (coarse, fine)
        expected = ancestral_covariance(process, 200, torch.eye(process.num_vars, dtype=torch.float64))[0, 0]
    model = DiffusionModel((1, 2, 2), process, OptimalDenoiser(process))
    result = ancestral_sample(model, 4000, steps=200, decode=None, generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (4000, 1, 2, 2)
    values = result.samples.double().flatten()
    assert (values.var() - expected).abs() < 4 * expected * math.sqrt(2 / values.numel()), (values.var(), expected)
    images = process.decode(process.prior_sample(3, CTX), CTX, "sample", torch.Generator().manual_seed(1))
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 2, 2)


def test_ode_sampler_reproduces_gaussian_data() -> None:
    """:func:`~mulan.sampling.ode_sample` through CLD's probability-flow drift, with the optimal denoiser and a
    horizon long enough for ``N(0, I)`` to be the marginal at t = 1 (``gamma_max = 12``): 2 000 samples x 4
    dimensions have the data's variance ``s^2`` within 4 SE."""
    process = CriticallyDampedLangevin((1, 2, 2), gamma_max=12.0)
    model = DiffusionModel((1, 2, 2), process, OptimalDenoiser(process))
    result = ode_sample(model, 2000, decode=None, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = result.samples.flatten() / process.alpha_0
    assert (values.var() - S_DATA**2).abs() < 4 * S_DATA**2 * math.sqrt(2 / values.numel()), values.var()


@pytest.mark.parametrize("kind", ["cld", "learned_2"])
def test_ode_drift_moves_the_marginal_covariance(kind: str) -> None:
    """With the optimal prediction the ODE drift is linear, ``dy/dt = M_t y``; the flow of a Gaussian ``N(0, C_t)``
    then has ``dC/dt = M C + C M^T``, which must equal the data marginal's ``dC_t/dt`` (finite differences)."""
    process = PROCESSES[kind]()
    process.image_shape = (1, 1, 1)
    k_vars = process.num_vars
    for t in (0.3, 0.7, 0.95):
        basis = torch.eye(k_vars, dtype=torch.float64).view(k_vars, k_vars, 1, 1)
        times = torch.full((k_vars,), t, dtype=torch.float64)
        with torch.no_grad():
            m = process.ode_drift(basis, times, CTX, lambda y, mm: optimal_eps(process, y, mm)).view(k_vars, k_vars).T

        def cov(time: float) -> Tensor:
            k = process.kernel(torch.tensor([time], dtype=torch.float64))
            return (k.cov[0] + S_DATA**2 * torch.outer(k.mean[0], k.mean[0])).detach()

        h = 1e-5
        flow = m @ cov(t) + cov(t) @ m.T
        assert torch.allclose(flow, (cov(t + h) - cov(t - h)) / (2 * h), rtol=1e-4, atol=1e-6), t


# ----------------------------------------------------------------------------------------------------
# the probability-flow ODE likelihood


def _tiny_unet(state_shape: tuple[int, int, int]) -> UNet:
    """A small random U-Net whose probability-flow ODE solves in a few dozen steps (no Fourier features: they make a
    random network's drift oscillate; the output convolution moved off zero so that the network matters)."""
    torch.manual_seed(0)
    unet = UNet(state_shape, 0, channels=8, num_blocks=1, dropout=0.0, fourier_exponents=())
    nn.init.normal_(unet.conv_out.weight, std=0.1)
    return unet


def test_ode_likelihood_without_auxiliaries_is_vdms() -> None:
    """``K = 0``: the same U-Net, images and generator seed give VDM's ODE figures to float64 rounding (1e-9 nats):
    the dequantisation scale is VDM's ``exp(gamma_min / 2)``, no auxiliary is drawn (so the Hutchinson probes are
    the same draws), and the drift is VDM's. Two dequantisation draws; exact divergence and two probes."""
    shape = (1, 3, 2)
    unet = _tiny_unet(shape)
    aux = DiffusionModel(shape, FixedAuxiliary(shape), unet).eval()
    vdm = DiffusionModel(shape, FixedLinear(shape, 0), unet).eval()
    assert (dequantisation_scale(aux, CTX, 3) == dequantisation_scale(vdm, CTX, 3)).all()  # (1, ...) against (3, ...)
    images = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    opts = {"num_draws": 2, "dtype": torch.float64, "rtol": 1e-4, "atol": 1e-4}
    for divergence in ({"exact_divergence": True}, {"num_probes": 2}):
        ours, theirs = (
            ode_likelihood(m, images, generator=torch.Generator().manual_seed(1), **divergence, **opts)
            for m in (aux, vdm)
        )
        assert torch.equal(ours.nfe, theirs.nfe) and ours.iw_is_bound == theirs.iw_is_bound
        for name in ("nll_nats", "iw_nll_nats", "iw_bias_nats"):
            assert torch.allclose(getattr(ours, name), getattr(theirs, name), rtol=0, atol=1e-9), (divergence, name)


@pytest.mark.parametrize("kind", ["cld", "learned_2"])
def test_gaussian_data_ode_gives_the_joint_density_at_time_zero(kind: str) -> None:
    """Gaussian data, the optimal denoiser, float64, exact divergence (rtol = atol = 1e-7), ``gamma_max = 15`` (the
    data's marginal at t = 1 is then ``N(0, I)`` to 5e-6, so the ODE's model is the data's own flow): 4 values
    ``x`` of the data coordinate of ``y_0``, each with 16 auxiliary draws ``v_0 ~ q(v_0)``. At t = 0 the data
    coordinate and the auxiliaries are independent, ``N(0, sigma_x^2) x q(v_0)`` with
    ``sigma_x^2 = sigma_0^2 + alpha_0^2 s^2``, so ``log p_ODE(x, v_0) = log N(x; 0, sigma_x^2) + log q(v_0)``
    (to 1e-4 nats per data dimension; the residual is the solver's and the horizon's, 3e-5 nats in all at most).
    Hence ``p(v_0 | x) = q(v_0)`` and the bound ``-log p_ODE(x, v_0) + log q(v_0)`` is ``-log N(x; 0, sigma_x^2)``
    for every draw, not only on average: it does not vary with ``v_0`` (spread over the 16 draws < 1e-4 nats)
    while ``log q(v_0)`` varies by nats."""
    process = CriticallyDampedLangevin((1, 2, 2), gamma_max=15.0) if kind == "cld" else learned(2, 3, gamma_max=15.0)
    model = DiffusionModel((1, 2, 2), process, OptimalDenoiser(process))
    with torch.no_grad():
        k0 = process.kernel(torch.zeros(1, dtype=torch.float64))
        k1 = process.kernel(torch.ones(1, dtype=torch.float64))
    data_cov = k1.cov[0] + S_DATA**2 * torch.outer(k1.mean[0], k1.mean[0])
    assert (data_cov - torch.eye(process.num_vars, dtype=torch.float64)).abs().max() < 1e-5
    var_x = (k0.cov[0, 0, 0] + S_DATA**2 * k0.mean[0, 0] ** 2).item()
    n_x, draws, dims = 4, 16, 4
    g = torch.Generator().manual_seed(0)
    x = math.sqrt(var_x) * torch.randn(n_x, 1, 2, 2, generator=g, dtype=torch.float64)
    xs = x.repeat_interleave(draws, 0)
    state, log_q = process.initial_auxiliaries(xs, g)
    assert state.shape == (n_x * draws, *process.state_shape) and torch.equal(state[:, :1], xs)
    result = ode_log_density(model, state, dtype=torch.float64, exact_divergence=True, rtol=1e-7, atol=1e-7)
    log_n = -0.5 * (x.square() / var_x + math.log(2 * math.pi * var_x)).flatten(1).sum(1)
    error = result.log_p - (log_n.repeat_interleave(draws) + log_q)
    assert error.abs().max() < 1e-4 * dims, error.abs().max()
    bound = (-result.log_p + log_q).view(n_x, draws)
    assert (bound.mean(1) + log_n).abs().max() < 1e-4 * dims and bound.std(1).max() < 1e-4, bound
    assert log_q.view(n_x, draws).std(1).min() > 1.0  # the auxiliaries' draw enters for real


def _tiny_auxiliary_model(process: AuxiliaryProcess) -> DiffusionModel:
    return DiffusionModel(process.image_shape, process, _tiny_unet(process.state_shape)).eval()


def test_ode_likelihood_tiny_auxiliary_model() -> None:
    """CLD with a tiny U-Net, 3 images of 6 dimensions, 2 draws: finite bits/dim per *data* dimension; the exact
    divergence gives the importance-weighted bound as the headline (``iw_is_bound``, no bias), Hutchinson with 2
    draws the mean of the single-draw bounds (not ``iw_is_bound``), Hutchinson with 1 draw a bound again. The
    single-draw headline by hand: one dequantisation of the 2 x 3 rows, their auxiliaries drawn next from the same
    generator, one solve with one probe, ``log p - log q(x~ | x) - log q(v_0)``; and it differs from the one without
    ``log q(v_0)`` (the auxiliaries' cost is charged)."""
    model = _tiny_auxiliary_model(CriticallyDampedLangevin((1, 3, 2)))
    images = torch.randint(0, 256, (3, 1, 3, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    opts = {"rtol": 1e-4, "atol": 1e-4, "num_draws": 2}
    exact = ode_likelihood(model, images, exact_divergence=True, generator=torch.Generator().manual_seed(1), **opts)
    assert exact.iw_is_bound and torch.equal(exact.nll_nats, exact.iw_nll_nats) and (exact.iw_bias_nats == 0).all()
    assert torch.isfinite(exact.bpd).all() and torch.allclose(exact.bpd, exact.nll_nats / (6 * math.log(2)))
    probed = ode_likelihood(model, images, generator=torch.Generator().manual_seed(1), **opts)
    assert not probed.iw_is_bound and (probed.iw_nll_nats <= probed.nll_nats).all()
    assert torch.isfinite(probed.bpd).all() and torch.isnan(probed.iw_bias_nats).all()
    g = torch.Generator().manual_seed(1)
    x_tilde, log_q = dequantise(images.repeat(2, 1, 1, 1), dequantisation_scale(model, CTX, 6), g)
    state, log_q_aux = model.process.initial_auxiliaries(x_tilde, g)
    log_p = ode_log_density(model, state, generator=g, rtol=1e-4, atol=1e-4).log_p
    assert torch.allclose(probed.nll_nats, -(log_p - log_q - log_q_aux).view(2, 3).mean(0), atol=1e-4)
    assert (log_q_aux.view(2, 3).mean(0).abs() > 1.0).all()
    single = ode_likelihood(model, images[:1], generator=torch.Generator().manual_seed(1), rtol=1e-4, atol=1e-4)
    assert single.iw_is_bound and torch.isfinite(single.bpd).all()
    with pytest.raises(ValueError, match="initial_auxiliaries"):
        ode_log_density(model, x_tilde)


def test_ode_likelihood_auxiliary_in_log_snr_time() -> None:
    """``time_variable="log_snr"`` integrates in the normalised clock noise level (the marginal's ``gamma``, the
    denoiser's input; strictly increasing): on the paper's ``linear_beta`` clock, where it is not ``t``, a learned
    process (K = 1) gives the same bound as in ``t`` up to the solver's error at 1e-4 (measured 0.009 and 0.005
    nats of 55 and 46; asserted within 0.03)."""
    torch.manual_seed(5)
    process = LearnedAuxiliary((1, 3, 2), num_aux=1, init_scale=0.7, time_change="linear_beta")
    model = _tiny_auxiliary_model(process)
    images = torch.randint(0, 256, (2, 1, 3, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    results = [
        ode_likelihood(
            model,
            images,
            exact_divergence=True,
            generator=torch.Generator().manual_seed(1),
            time_variable=tv,
            rtol=1e-4,
            atol=1e-4,
        )
        for tv in ("t", "log_snr")
    ]
    assert torch.allclose(results[0].nll_nats, results[1].nll_nats, atol=3e-2), [r.nll_nats for r in results]
    assert torch.isfinite(results[0].bpd).all()


# ----------------------------------------------------------------------------------------------------
# learning, the CLI, errors


def test_gradients_reach_every_learned_parameter() -> None:
    """One backward pass of the model's bound gives finite, non-zero gradients to every entry of the process's
    parameters (full and diagonal ``D``) and to the denoiser."""
    shape = (1, 4, 4)
    torch.manual_seed(0)
    for full in (True, False):
        process = LearnedAuxiliary(shape, num_aux=2, full_diffusion=full)
        model = DiffusionModel(shape, process, UNet(process.state_shape, 0, channels=8, num_blocks=1))
        model(torch.randint(0, 256, (8, *shape), dtype=torch.uint8)).total.mean().backward()
        names = [name for name, _ in model.named_parameters() if name.startswith("process.")]
        assert names == ["process.skew", "process.diffusion"]
        for name, p in model.named_parameters():
            if name.startswith("process."):
                assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).all(), (full, name)
        assert any(p.grad is not None and (p.grad != 0).any() for p in model.denoiser.parameters())


def test_fit_test_predict_round_trip_through_the_cli(tmp_path: Path) -> None:
    """``mulan-cli fit`` a learned process (K = 1) on the digits, ``test`` from the checkpoint alone (the learned
    matrices restored; terms sum to the total), ``predict`` uint8 samples of the data's shape."""
    main(["fit", "--config", str(CONF / "aux_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    ckpt = sorted(tmp_path.rglob("*.ckpt"))[-1]
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    cli = build_cli(["test", "--ckpt_path", str(ckpt), *quiet, "--trainer.default_root_dir", str(tmp_path)])
    process = cli.model.model.process
    assert isinstance(process, LearnedAuxiliary) and process.state_shape == (2, 8, 8)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(process.skew, saved["model.process.skew"])
    assert not torch.allclose(saved["model.process.skew"], LearnedAuxiliary((1, 8, 8), 0).skew)
    results = cli.model.test_results
    parts = sum(results[n][0] for n in ("recon", "prior", "diffusion", "latent"))
    assert results["total"][0] == pytest.approx(parts, rel=1e-5) and math.isfinite(parts)
    out = tmp_path / "samples"
    build_cli(
        ["predict", "--ckpt_path", str(ckpt), "--model.init_args.sample_steps", "3", *quiet]
        + ["--trainer.limit_predict_batches", "1", "--trainer.default_root_dir", str(tmp_path)]
        + ["--predict_output_dir", str(out)]
    )
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.dtype == np.uint8 and samples.shape == (16, 1, 8, 8)


def test_named_fixed_processes() -> None:
    """The paper's fixed diffusions have the stated sizes; CLD is ``dx = beta v dt``,
    ``dv = -beta (x + 2 v) dt + sqrt(4 beta) dW`` by default: critically damped (eigenvalue -1 twice)."""
    assert CriticallyDampedLangevin((1, 2, 2)).state_shape == (2, 2, 2)
    assert ALDA((3, 2, 2)).state_shape == (9, 2, 2) and MALDA((3, 2, 2)).num_aux == 2
    a, _ = CriticallyDampedLangevin((1, 1, 1)).drift_matrix()
    assert torch.equal(a, torch.tensor([[0.0, 1.0], [-1.0, -2.0]], dtype=torch.float64))  # dx = beta v dt
    eigenvalues = torch.linalg.eigvals(a)
    assert torch.allclose(eigenvalues.real, torch.full((2,), -1.0, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: FixedAuxiliary((1, 2, 2), q=[[0.0, 1.0], [1.0, 0.0]], d=[[0.0, 0.0], [0.0, 1.0]]), "skew-symmetric"),
        (lambda: FixedAuxiliary((1, 2, 2), q=[[0.0, -1.0], [1.0, 0.0]], d=[[0.0, 0.0], [0.0, -1.0]]), "semi-definite"),
        (lambda: FixedAuxiliary((1, 2, 2), q=[[0.0, -1.0], [1.0, 0.0]], d=[[1.0]]), "same size"),
        (lambda: LearnedAuxiliary((1, 2, 2), num_aux=-1), "num_aux"),
        (lambda: CriticallyDampedLangevin((1, 2, 2), aux_init_var=0.0), "aux_init_var"),
        (lambda: LearnedAuxiliary((1, 2, 2), time_change="cosine"), "time_change"),
        (lambda: CriticallyDampedLangevin((1, 2, 2), gamma_min=5.0, gamma_max=-13.3), "gamma_min"),
    ],
)
def test_bad_options_are_named(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_noise_is_refused_clearly_and_the_ode_likelihood_dequantises_at_sigma_0() -> None:
    """Data-shaped noise and ``timesteps > 0`` are refused by name; the ODE likelihood dequantises
    at the data coordinate's initial noise ``exp(gamma_min / 2)`` (VDM's), inside the bin."""
    process = CriticallyDampedLangevin((1, 2, 2))
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="state-shaped"):
        process.diffusion_loss(x, torch.rand(2), CTX, _wiggly_predictor, torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="timesteps: 0"):
        process.diffusion_loss(x, torch.rand(2), CTX, _wiggly_predictor, steps=10)
    scale = process.dequantisation_scale(CTX, 2)
    assert scale.item() == pytest.approx(math.exp(-13.3 / 2)) and 3 * scale.item() < 1 / 256


@pytest.mark.parametrize(
    ("config", "process", "num_aux"),
    [
        ("aux_cld.yaml", CriticallyDampedLangevin, 1),
        ("aux_alda.yaml", ALDA, 2),
        ("aux_malda.yaml", MALDA, 2),
        ("aux_learned.yaml", LearnedAuxiliary, 1),
        ("aux_cld_digits.yaml", CriticallyDampedLangevin, 1),
        ("aux_learned_digits.yaml", LearnedAuxiliary, 1),
    ],
)
def test_configs_build_the_process_beside_the_vdm_baseline(config: str, process: type, num_aux: int) -> None:
    """Each shipped config builds its process with a denoiser for its states, and differs from its VDM baseline
    (demo_photos_vdm.yaml, or demo_digits_vdm.yaml for the digits) only in the process."""
    import yaml

    configs = Path(__file__).parents[1] / "configs"
    cli = build_cli(["--config", str(configs / config), "--trainer.logger", "false"], run=False)
    built = cli.model.model.process
    assert isinstance(built, process) and built.num_aux == num_aux
    assert cli.model.model.denoiser.image_shape == built.state_shape
    ours = yaml.safe_load((configs / config).read_text())
    base = yaml.safe_load(
        (configs / ("demo_digits_vdm.yaml" if "digits" in config else "demo_photos_vdm.yaml")).read_text()
    )
    for key in ("denoiser", "optimizer", "lr_scheduler"):
        assert ours["model"]["init_args"][key] == base["model"]["init_args"][key], key
    assert ours["data"] == base["data"]
    for key in ("max_steps", "val_check_interval", "precision"):
        assert ours["trainer"][key] == base["trainer"][key], key
