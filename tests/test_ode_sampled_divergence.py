"""The probability-flow ODE likelihood with the divergence integral by stratified sampling (``divergence_samples``).

Exact answers: Gaussian data ``x ~ N(0, Sigma)`` with the Bayes-optimal denoiser has ``log p(x) = log N(x; 0,
Sigma)`` (tests/test_likelihood.py). The sampled integral must be unbiased for it (the mean over independent runs
within Monte Carlo error), its reported variance must not understate the spread between runs, the trajectory must
be the one solved alone (same steps, same ``x_1``; the divergence adds exactly ``M`` evaluations), and the states at
the sampled times must be the trajectory's."""

from __future__ import annotations

import math

import pytest
import torch

from mulan import ode, ode_solver
from mulan.likelihood import ode_likelihood, ode_log_density
from mulan.ode import check_divergence_samples, stratified_times
from mulan.processes import Context
from test_likelihood import SCHEDULES, _gaussian_case, _rotated_covariance, _tiny_mulan

pytestmark = pytest.mark.usefixtures("single_thread")

RUNS = 48


def test_stratified_times_have_one_time_per_stratum_per_example() -> None:
    """Each example gets its own times, one in each stratum, independent of the other examples'."""
    times = stratified_times(16, torch.zeros(3, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert times.shape == (3, 16) and times.dtype == torch.float64
    assert torch.equal(times.mul(16).floor(), torch.arange(16, dtype=torch.float64).expand(3, 16))
    assert (times.diff(dim=1) > 0).all() and (times[0] != times[1]).all()


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_sampled_divergence_keeps_the_trajectorys_steps(schedule: str) -> None:
    """The trajectory is the one solved alone: the same ``x_1`` to 1e-12 with exactly ``M`` more evaluations (the
    divergence's); each example's states at its own times are the solution there to the solver's accuracy, and with
    times shared by every example they are bit for bit :func:`mulan.ode_solver.solve_path`'s dense output."""
    model, x, _ = _gaussian_case(_rotated_covariance(), SCHEDULES[schedule](), n=4, seed=0)
    f = ode.drift_in(model, Context(), "t", x.shape[0], torch.float64, x.device)
    x_1, trajectory_nfe = ode_solver.solve(f, x, 0.0, 1.0)
    result = ode_log_density(
        model, x, dtype=torch.float64, divergence_samples=16, generator=torch.Generator().manual_seed(1)
    )
    assert result.nfe == trajectory_nfe + 16
    assert torch.allclose(result.x_1, x_1, rtol=0.0, atol=1e-12)
    times = stratified_times(16, x, torch.Generator().manual_seed(1))
    states, end, nfe = ode_solver.solve_at(f, x, times)
    tight, _, _ = ode_solver.solve_at(f, x, times, rtol=1e-10, atol=1e-10)
    assert nfe == trajectory_nfe and torch.equal(end, x_1)
    for b, i in ((0, 0), (1, 7), (3, 15)):
        alone, _ = ode_solver.solve(f, x, 0.0, float(times[b, i]), rtol=1e-10, atol=1e-10)
        assert torch.allclose(tight[i, b], alone[b], rtol=0.0, atol=1e-8), (b, i)  # the dense output is the solution
        assert torch.allclose(states[i, b], alone[b], rtol=0.0, atol=2e-3), (b, i)  # to the tolerance's global error
    shared = times[:1].expand(4, -1)
    grid = torch.cat([torch.zeros(1, dtype=x.dtype), shared[0], torch.ones(1, dtype=x.dtype)])
    path, path_nfe = ode_solver.solve_path(f, x, grid)
    states, end, nfe = ode_solver.solve_at(f, x, shared)
    assert nfe == path_nfe and torch.equal(states, path[1:-1]) and torch.equal(end, path[-1])


def test_solve_at_without_the_solver_internals_gives_the_same_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback for another torchdiffeq layout (every example's times as output times of one solve) gives the
    same states, end and evaluations."""
    model, x, _ = _gaussian_case(_rotated_covariance(), SCHEDULES["scalar"](), n=3, seed=0)
    f = ode.drift_in(model, Context(), "t", x.shape[0], torch.float64, x.device)
    times = stratified_times(6, x, torch.Generator().manual_seed(2))
    fast = ode_solver.solve_at(f, x, times)
    slow = ode_solver._solve_at_union(f, x, times, 1e-5, 1e-5, False, "")
    assert fast[2] == slow[2] and torch.equal(fast[1], slow[1])
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("exact_divergence", [True, False])
def test_sampled_divergence_is_unbiased_for_the_gaussian_log_density(exact_divergence: bool) -> None:
    """Full covariance (the drift's Jacobian is not diagonal, so Rademacher probes are noisy), per-dimension
    schedule, 8 strata: over independent runs the mean of ``log p`` is the closed form within 4 standard errors
    for every example, and the mean reported variance is at least 0.7 of the variance between the runs (it is
    conservative in expectation; 0.7 allows for the Monte Carlo error of 48 runs). The runs differ (a fixed grid
    would not), and a left Riemann sum on the same 8 strata is off by 0.19 nats, about 3 of these standard errors:
    4 standard errors (0.24 nats) is the resolution of this check."""
    model, x, exact = _gaussian_case(_rotated_covariance(), SCHEDULES["per_dimension"](), n=4, seed=0)
    errors, variances = [], []
    for run in range(RUNS):
        result = ode_log_density(
            model,
            x,
            dtype=torch.float64,
            exact_divergence=exact_divergence,
            divergence_samples=8,
            generator=torch.Generator().manual_seed(run),
        )
        errors.append(result.log_p - exact)
        variances.append(result.log_p_var)
    error, variance = torch.stack(errors), torch.stack(variances)  # (RUNS, n)
    spread = error.var(0)
    assert (spread.sqrt() > 0.05).all()  # the runs differ: the estimate is random
    assert (error.mean(0).abs() < 4 * (spread / RUNS).sqrt()).all(), (error.mean(0), spread)
    assert (variance.mean(0) > 0.7 * spread).all(), (variance.mean(0), spread)


def test_ode_likelihood_with_sampled_divergence_reports_its_noise() -> None:
    """Through ``ode_likelihood``: ``nll_var_nats`` is known even with one probe, the importance-weighted form over
    ``K = 2`` draws is an estimate (not a bound) even with the exact trace, and the headline is the mean of the
    single-draw bounds."""
    model = _tiny_mulan()
    images = torch.randint(0, 256, (3, 1, 3, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = ode_likelihood(
        model, images, num_draws=2, exact_divergence=True, divergence_samples=4, generator=torch.Generator()
    )
    assert not result.iw_is_bound
    assert torch.isfinite(result.nll_var_nats).all() and (result.nll_var_nats > 0).all()
    assert torch.isfinite(result.iw_bias_nats).all() and (result.iw_bias_nats >= 0).all()
    assert (result.iw_nll_nats <= result.nll_nats + 1e-4).all()  # log-mean-exp >= mean
    one_probe = ode_likelihood(model, images, divergence_samples=4, generator=torch.Generator())
    assert torch.isfinite(one_probe.nll_var_nats).all()
    controlled = ode_likelihood(model, images, generator=torch.Generator())
    assert torch.isnan(controlled.nll_var_nats).all()  # one probe, solver's integral: its noise is unknown


@pytest.mark.parametrize("bad", [0, 3, -2, 2.0, True])
def test_divergence_samples_must_be_an_even_integer(bad) -> None:
    with pytest.raises(ValueError, match="divergence_samples must be an even integer"):
        check_divergence_samples(bad)


def test_divergence_samples_and_divergence_atol_exclude_each_other() -> None:
    model, x, _ = _gaussian_case(_rotated_covariance(), SCHEDULES["scalar"](), n=2, seed=0)
    with pytest.raises(ValueError, match="exclude each other"):
        ode_log_density(model, x, dtype=torch.float64, divergence_samples=8, divergence_atol=math.inf)
