"""Are the library's error bars true? Each ± is checked against the spread of repeated runs (docs: evaluation,
"What each ± means"; derivations: math, section 6).

Set-up with exact answers: Gaussian data ``N(0, Sigma)`` with the Bayes-optimal denoiser (tests/test_likelihood.py),
so every estimator below has a fixed expectation per image and its spread over seeds is the estimator's own noise.

- ODE with sampled divergence times and the exact trace: the dequantisation is pinned to the bin centre, so the only
  randomness is the ``M`` stratified times of each (image, draw) row. ``nll_var_nats`` must be at least the variance
  of ``nll_nats`` over repeated runs, per image and for the mean over a solve batch (``K = 1, 4, 8`` draws, several
  images per solve), and no more than the pair estimator's smooth-integrand excess allows (docs: math, section 6).
- Dense ELBO: the standard error ``std / sqrt(n)`` over a batch of identical images equals the spread of the batch
  mean over runs (the images' stratified times are independent).
- One-sample bound with antithetic times (one ``u`` per batch): ``std / sqrt(n)`` over a batch is conservative.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mulan import elbo, likelihood
from mulan.likelihood import dense_elbo, ode_likelihood
from mulan.model import DiffusionModel
from mulan.processes.schedules import FixedLinear
from mulan.time_sampling import antithetic_uniform
from test_likelihood import GAMMA_MAX_LARGE, SHAPE, GaussianDenoiser, _rotated_covariance

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGES = 8  # per solve batch
STRATA = 16
RUNS = 32


def _gaussian_model() -> DiffusionModel:
    return DiffusionModel(
        SHAPE, FixedLinear(SHAPE, 0, gamma_max=GAMMA_MAX_LARGE), GaussianDenoiser(_rotated_covariance())
    )


def _bin_centres(images: Tensor, scale: Tensor, generator=None, dtype: torch.dtype = torch.float32) -> tuple:
    """A dequantiser pinned to the bin centre (``log q = 0``): the runs then differ only in their sampled times."""
    x = elbo.to_unit_interval(images).to(dtype)
    return x, x.new_zeros(x.shape[0])


def ode_runs(num_draws: int, runs: int = RUNS) -> tuple[Tensor, Tensor]:
    """``nll_nats`` and ``nll_var_nats`` of ``runs`` independent calls (seeds 0..runs-1) on the same ``IMAGES``
    images, all rows of a call in one solve: two (runs, IMAGES) tensors."""
    model = _gaussian_model()
    images = torch.randint(0, 256, (IMAGES, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    nll, var = [], []
    for run in range(runs):
        result = ode_likelihood(
            model,
            images,
            num_draws=num_draws,
            exact_divergence=True,
            divergence_samples=STRATA,
            generator=torch.Generator().manual_seed(run),
            dtype=torch.float64,
            rtol=1e-3,
            atol=1e-3,
        )
        nll.append(result.nll_nats.double())
        var.append(result.nll_var_nats.double())
    return torch.stack(nll), torch.stack(var)


def variance_ratios(nll: Tensor, var: Tensor) -> tuple[float, float]:
    """(reported / empirical variance per image, pooled over the images; the same for the mean over the batch)."""
    per_image = (var.mean(0).sum() / nll.var(0).sum()).item()
    batch_mean = (var.sum(1).mean() / IMAGES**2 / nll.mean(1).var()).item()
    return per_image, batch_mean


def check_ode_variance(num_draws: int) -> float:
    """Runs :func:`ode_runs` and asserts the reported variance is at least the empirical one per image (pooled over
    the images) and for the batch mean, and per image at most 7 times it; returns the per-image ratio."""
    nll, var = ode_runs(num_draws)
    assert (nll.var(0) > 0).all()  # the runs differ: the times are random
    per_image, batch_mean = variance_ratios(nll, var)
    assert 1.0 <= per_image <= 7.0, (num_draws, per_image)
    assert batch_mean >= 1.0, (num_draws, batch_mean)
    return per_image


def test_ode_variance_covers_the_spread_of_repeated_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``K = 4`` draws, 8 images per solve, 16 strata, exact trace, 32 runs: per image (pooled over the images) and
    for the batch mean the reported variance is at least the empirical variance (ratio >= 1; measured 3.0 and 2.2),
    and per image at most 7 times it, the pair estimator's excess for an integrand smooth on the strata's scale
    (docs: math, section 6). What fails: dividing by ``K`` once too few or too many (ratio x 4 = 12, or / 4 = 0.75),
    the strata's variance over ``M`` instead of ``M^2`` (x 16), and times shared by the rows of a solve (the draws'
    errors are then one error: the true variance does not fall with ``K``, ratio 0.72)."""
    monkeypatch.setattr(likelihood, "dequantise", _bin_centres)
    check_ode_variance(4)


@pytest.mark.slow
def test_ode_variance_covers_the_spread_of_repeated_runs_for_every_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """As above for ``K = 1, 4, 8`` (per-image ratios 3.1, 3.0, 2.9; batch mean 3.4, 2.2, 2.4), and the per-image
    ratio is the same for every ``K`` within a factor 2 (a property of the integrand, not of ``K``)."""
    monkeypatch.setattr(likelihood, "dequantise", _bin_centres)
    ratios = [check_ode_variance(k) for k in (1, 4, 8)]
    assert max(ratios) / min(ratios) < 2.0, ratios


def test_ode_rows_are_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Directly: over repeated runs the errors of two images in one solve are uncorrelated (|r| < 0.45 over 32 runs,
    3.5 times the standard error of a zero correlation; times shared by the solve give r of about 1 with the exact
    trace), and so are the errors of two draws of one image (rows of the same solve)."""
    monkeypatch.setattr(likelihood, "dequantise", _bin_centres)
    nll, _ = ode_runs(1)
    errors = nll - nll.mean(0)
    correlation = torch.corrcoef(errors.T)
    off_diagonal = correlation[~torch.eye(IMAGES, dtype=torch.bool)]
    assert off_diagonal.abs().mean() < 0.25 and off_diagonal.abs().max() < 0.6, correlation


def test_dense_elbo_standard_error_matches_repeated_runs() -> None:
    """Dense ELBO (8 stratified times) of 16 identical images, 300 runs: the squared standard error over the batch
    (``var / n``, what the callback reports) averages the variance of the batch mean over runs within 25% (the
    images' times and noise are independent; a shared time offset correlates them and the ratio falls to about
    1/4)."""
    model = _gaussian_model()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1, *SHAPE), dtype=torch.uint8).expand(16, *SHAPE).contiguous()
    totals = torch.stack([dense_elbo(model, images, num_times=8).total.double() for _ in range(300)])
    ratio = (totals.var(1) / 16).mean() / totals.mean(1).var()
    assert 0.75 < ratio < 1.33, ratio


def test_one_sample_bound_standard_error_is_conservative_with_antithetic_times() -> None:
    """The one-sample bound of 16 identical images with antithetic times (one ``u`` per batch, the test stage's
    draws), 400 runs: ``std / sqrt(n)`` over the batch is at least the spread of the batch mean over runs (1.5x here:
    the stratified times repel, so the images' errors are negatively correlated and the batch mean varies less than
    ``std / sqrt(n)`` says; docs: evaluation, "What each ± means"). With independent times the two agree within
    25%."""
    model = _gaussian_model()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1, *SHAPE), dtype=torch.uint8).expand(16, *SHAPE).contiguous()

    def ratio(times) -> float:
        totals = torch.stack([model(images, t=times()).total.double() for _ in range(400)])
        return ((totals.var(1) / 16).mean() / totals.mean(1).var()).item()

    assert ratio(lambda: antithetic_uniform(16)) > 1.2
    assert 0.75 < ratio(lambda: torch.rand(16)) < 1.33


def test_reported_variance_is_the_mean_of_the_draws_over_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arithmetic of ``nll_var_nats``: with ``K`` draws it is ``sum_k Var_k / K^2`` of the rows' own variances
    (recomputed here from :func:`ode_log_density` on the same rows and seed)."""
    monkeypatch.setattr(likelihood, "dequantise", _bin_centres)
    model = _gaussian_model()
    images = torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    options = {"exact_divergence": True, "divergence_samples": 4, "dtype": torch.float64, "rtol": 1e-3, "atol": 1e-3}
    result = ode_likelihood(model, images, num_draws=4, generator=torch.Generator().manual_seed(5), **options)
    x = elbo.to_unit_interval(images.repeat(4, 1, 1, 1)).double()
    rows = likelihood.ode_log_density(model, x, generator=torch.Generator().manual_seed(5), **options)
    expected = rows.log_p_var.view(4, 3).sum(0) / 4**2
    torch.testing.assert_close(result.nll_var_nats.double(), expected.double(), rtol=1e-10, atol=0)
    assert math.isclose(float(result.nll_nats[0]), float(-rows.log_p.view(4, 3)[:, 0].mean()), rel_tol=1e-10)
