"""The probability-flow ODE of a model: its drift, its time variable, its divergence, and the settings of its
likelihood.

The forward process has, per state coordinate, the marginals of a linear SDE; its probability-flow ODE
``dx/dt = drift(x, t)`` (:meth:`mulan.processes.ForwardProcess.ode_drift`, with the model's noise prediction in
place of the score) moves data (t = 0) to noise (t = 1) with the same marginals (docs: math, section 6).
:mod:`mulan.ode_solver` integrates it; :mod:`mulan.likelihood` turns it into a likelihood, with the options of
:class:`ODESettings`.

The ODE can be integrated in ``t`` or, after a change of time variable, in the normalised mean log-SNR time
``u`` of :class:`LogSNRTime` (``time_variable="log_snr"``; docs: evaluation, "Time variable"). Its divergence is
exact or a Hutchinson estimate (:func:`drift_and_divergence`), integrated by the solver or sampled at stratified
times (:func:`stratified_times`, :func:`sampled_divergence_integral`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mulan.processes.base import Context, ForwardProcess
from mulan.processes.diagonal import DiagonalProcess
from mulan.utils import float32_region


def drift(model: Any, ctx: Context) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(t, x) -> dx/dt`` of ``model``'s probability-flow ODE in the context ``ctx`` (``x``: (B, *state_shape) in
    float32 or float64, ``t``: a scalar or (B,) time). Differentiable in ``x``."""
    predict = model.predictor(ctx)

    def f(t: Tensor, x: Tensor) -> Tensor:
        return model.process.ode_drift(x, t, ctx, predict)

    return f


TIME_VARIABLES = ("t", "log_snr")
"""The variables the probability-flow ODE can be integrated in: the process's time ``t``, or the normalised mean
log-SNR time ``u`` of :class:`LogSNRTime`."""

DEFAULT_TIME_VARIABLE = "t"
"""The integration variable unless told otherwise."""

INVERSION_STEPS = 60
"""Most safeguarded Newton steps :meth:`LogSNRTime.time` takes to invert ``u(t)`` (it stops at rounding level)."""


def mean_gamma(process: ForwardProcess, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
    """``gamma_bar(t)``, the mean over the data dimensions of the negative log-SNR ``gamma(t)``, and its derivative
    ``d gamma_bar / dt``: two (B,) tensors in ``t``'s dtype (float32 or float64) for times ``t`` (B,).

    Diagonal processes compute in ``t``'s dtype (as their ODE drift does); other processes through
    :meth:`~mulan.processes.ForwardProcess.marginal` (float32), which must give ``gamma`` and ``dgamma``."""
    if isinstance(process, DiagonalProcess):
        with float32_region(t):
            gamma, dgamma = process.gamma_and_derivative(t.reshape(-1, 1, 1, 1), ctx)
    else:
        m = process.marginal(t, ctx)
        if m.dgamma is None:
            raise ValueError(
                f"{type(process).__name__} gives no d gamma / dt, so the ODE cannot be integrated in log-SNR time; "
                'use time_variable="t".'
            )
        gamma, dgamma = m.gamma, m.dgamma
    gamma = gamma.to(t.dtype).expand(t.shape[0], *gamma.shape[1:])
    dgamma = dgamma.to(t.dtype).expand(t.shape[0], *dgamma.shape[1:])
    return gamma.flatten(1).mean(1), dgamma.flatten(1).mean(1)


class LogSNRTime:
    """The normalised mean log-SNR time ``u = (gamma_bar(t) - gamma_bar(0)) / (gamma_bar(1) - gamma_bar(0))``.

    ``gamma_bar(t)`` is the mean over the data dimensions of ``gamma(t) = -log SNR(t)`` (:func:`mean_gamma`), one
    map per example (a MuLAN schedule depends on the example's latent ``z``). ``u`` runs over ``[0, 1]`` for every
    example whatever its endpoints, so a batch is solved together in ``u``; for a scalar schedule it is the
    log-SNR itself, rescaled, and for a linear one (VDM) it is ``t``. The probability-flow ODE in ``u`` is

        dx/du = (dx/dt)(x, t(u)) * dt/du,      dt/du = (gamma_bar(1) - gamma_bar(0)) / gamma_bar'(t(u)),

    and since ``dt/du`` does not depend on ``x``, its divergence is ``div_x(dx/dt) * dt/du``: the integral of the
    divergence, and so ``log p``, is exactly that of the ``t``-time ODE (a substitution in a 1-d integral), only
    the solver's steps change. ``t(u)`` is found by safeguarded Newton steps on the monotone ``gamma_bar``
    (:meth:`locate`), to rounding level in the solve's dtype.

    Why this variable: one time variable has to serve all dimensions, and the mean log-SNR is the scalar that
    each dimension's log-SNR follows on average; the schedule's own speed ``gamma'(t)`` (learned, and far from
    constant for MuLAN's polynomials) is divided out. Variables in which the linear part ``-sigma^2 gamma' x / 2``
    is integrated exactly (``x / alpha`` against log-SNR or against ``sigma / alpha``) took 1.6-1.9 times *more*
    evaluations on the Gaussian test cases: they trade the well-resolved linear part for a state that grows by
    ``1 / alpha_1`` (docs: evaluation, "Time variable").

    Args:
        process: the forward process (``gamma_bar`` must be strictly increasing on ``(0, 1)``).
        ctx: the context of the batch (its latent selects each example's schedule).
        batch_size: ``B``.
        dtype, device: of the solve.
    """

    def __init__(
        self, process: ForwardProcess, ctx: Context, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.process, self.ctx, self.dtype = process, ctx, dtype
        ends = torch.tensor([0.0, 1.0], dtype=dtype, device=device).repeat_interleave(batch_size)
        with torch.no_grad():
            gamma, _ = mean_gamma(process, ends, _repeat_context(ctx, 2, batch_size))
        self.start, self.end = gamma[:batch_size], gamma[batch_size:]  # (B,) each
        if not bool((self.end > self.start).all()):
            raise ValueError("log-SNR time needs gamma_bar(1) > gamma_bar(0) for every example.")
        self.span = self.end - self.start
        self.batch_size = batch_size
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (u, t(u), dt/du) of the last call

    @torch.no_grad()
    def locate(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``t(u)`` and ``dt/du`` there, each (B,), for a scalar or (B,) ``u`` in ``[0, 1]``.

        Safeguarded Newton on ``gamma_bar(t) = gamma_bar(0) + u span`` within a bracket that starts as ``[0, 1]``
        (a bisection step whenever Newton would leave it), until the step is at rounding level. The first guess is
        ``t = u`` (exact for linear schedules), later ones extrapolate from the previous call (the solver's stages
        are close together), so one or two schedule evaluations usually suffice. ``dt/du = span / gamma_bar'``
        reuses the last evaluation's derivative, with ``gamma_bar'`` floored at ``1e-6 span`` (isolated points where
        every dimension's schedule is flat would make it infinite)."""
        u = u.to(self.dtype).expand(self.batch_size)
        target = self.start + u * self.span
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        guess = u if self._last is None else self._last[1] + (u - self._last[0]) * self._last[2]
        t = guess.clamp(0, 1).clone()
        tolerance = 4 * torch.finfo(self.dtype).eps
        for _ in range(INVERSION_STEPS):
            gamma, dgamma = mean_gamma(self.process, t, self.ctx)
            residual = gamma - target
            lo = torch.where(residual < 0, t, lo)
            hi = torch.where(residual > 0, t, hi)
            newton = t - residual / dgamma
            inside = (newton > lo) & (newton < hi) & (dgamma > 0)
            step = torch.where(inside, newton, 0.5 * (lo + hi)) - t
            t = t + step
            if bool((step.abs() <= tolerance).all()):
                break
        dt_du = self.span / dgamma.clamp_min(1e-6 * self.span)
        self._last = (u, t, dt_du)
        return t, dt_du

    def time(self, u: Tensor) -> Tensor:
        """``t(u)``: (B,) times in ``[0, 1]`` for a scalar or (B,) ``u`` (:meth:`locate`)."""
        return self.locate(u)[0]

    @torch.no_grad()
    def dt_du(self, t: Tensor) -> Tensor:
        """``dt/du = span / gamma_bar'(t)`` at times ``t`` (B,), floored as in :meth:`locate`."""
        _, dgamma = mean_gamma(self.process, t, self.ctx)
        return self.span / dgamma.clamp_min(1e-6 * self.span)

    def wrap(self, f: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """``g(u, x) = f(t(u), x) dt/du``: the ODE ``dx/dt = f(t, x)`` in the variable ``u``."""

        def g(u: Tensor, x: Tensor) -> Tensor:
            t, dt_du = self.locate(u)
            return f(t, x) * dt_du.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

        return g


def _repeat_context(ctx: Context, times: int, batch_size: int) -> Context:
    """``ctx`` with its per-example entries repeated ``times`` (block-major), for evaluating several times at once."""

    def repeat(value: Tensor | None) -> Tensor | None:
        if value is None or value.shape[0] != batch_size:
            return value
        return value.repeat(times, *([1] * (value.dim() - 1)))

    return Context(z=repeat(ctx.z), y=repeat(ctx.y))


def drift_in(
    model: Any, ctx: Context, time_variable: str, batch_size: int, dtype: torch.dtype, device: torch.device
) -> Callable[[Tensor, Tensor], Tensor]:
    """:func:`drift` in the integration variable ``time_variable`` (:data:`TIME_VARIABLES`), on ``[0, 1]`` either
    way: ``"t"`` is :func:`drift` itself; ``"log_snr"`` is it in the normalised mean log-SNR time of
    :class:`LogSNRTime` (``x``: (B, *state_shape) in ``dtype``)."""
    if time_variable not in TIME_VARIABLES:
        raise ValueError(f"time_variable must be one of {', '.join(map(repr, TIME_VARIABLES))}, got {time_variable!r}.")
    f = drift(model, ctx)
    if time_variable == "t":
        return f
    return LogSNRTime(model.process, ctx, batch_size, dtype, device).wrap(f)


EXACT_TRACE_CHUNK = 64
"""How many basis vectors one vectorised backward pass of the exact trace takes (bounds its memory)."""


def drift_and_divergence(
    f: Callable[[Tensor, Tensor], Tensor], t: Tensor, x: Tensor, probes: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The drift ``f(t, x)`` (B, ...) and its divergence ``sum_i d f_i / d x_i``, (B, P).

    ``probes`` (P, B, ...) given: ``P`` Hutchinson estimates ``v_p^T J v_p``, each unbiased, from one
    vector-Jacobian product per probe (vectorised over the probes). ``probes=None``: the exact trace of the
    Jacobian (P = 1), one vector-Jacobian product per dimension, vectorised :data:`EXACT_TRACE_CHUNK` at a time
    (small states only; it assumes examples do not interact in the denoiser, as they do not in eval mode).
    Several probes and the exact trace batch the backward passes with ``torch.vmap``
    (``is_grads_batched``), which every built-in denoiser supports."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(t, x)
        if probes is not None:
            if probes.shape[0] == 1:
                (vjp,) = torch.autograd.grad(out, x, probes[0])
                return out.detach(), (vjp * probes[0]).flatten(1).sum(1, keepdim=True)
            (vjps,) = torch.autograd.grad(out, x, probes, is_grads_batched=True)
            return out.detach(), (vjps * probes).flatten(2).sum(2).T
        dims = x[0].numel()
        trace = x.new_zeros(x.shape[0])
        for index in torch.arange(dims, device=x.device).split(EXACT_TRACE_CHUNK):
            basis = F.one_hot(index, dims).to(x.dtype)  # (n, D)
            basis = basis[:, None].expand(-1, x.shape[0], -1).reshape(-1, *x.shape)  # (n, B, ...)
            (rows,) = torch.autograd.grad(out, x, basis, retain_graph=True, is_grads_batched=True)
            trace = trace + rows.flatten(2)[torch.arange(index.numel(), device=x.device), :, index].sum(0)
    return out.detach(), trace[:, None]


def rademacher_like(x: Tensor, generator: torch.Generator | None = None, num: int | None = None) -> Tensor:
    """A Rademacher probe (entries +-1 with probability 1/2), shape and dtype of ``x``; ``num`` of them stacked
    in a leading dimension, (num, *x.shape), when ``num`` is given."""
    shape = x.shape if num is None else (num, *x.shape)
    bits = torch.randint(0, 2, shape, device=x.device, generator=generator)
    return (2 * bits - 1).to(x.dtype)


def stratified_times(num: int, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each of the ``B = x.shape[0]`` examples its own ``num`` increasing times in ``(0, 1)``, one uniform in
    each stratum ``[i/num, (i+1)/num)``, independent between examples: (B, num) in ``x``'s dtype and device, from
    ``generator`` (on that device). Independent times make the examples' estimates independent (docs: math,
    section 6), so their spread is an honest error bar."""
    offsets = torch.rand(x.shape[0], num, device=x.device, generator=generator, dtype=x.dtype)
    times = (torch.arange(num, device=x.device, dtype=x.dtype) + offsets) / num
    eps = torch.finfo(x.dtype).eps  # strictly inside (0, 1)
    return times.clamp(eps, 1 - eps)


def sampled_divergence_integral(
    f: Callable[[Tensor, Tensor], Tensor],
    times: Tensor,
    states: Tensor,
    num_probes: int | None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Stratified Monte Carlo estimate of ``int_0^1 div f(x(t), t) dt`` along each example's solved trajectory, in
    nats.

    ``times`` (B, M): each example's own time per stratum ``[i/M, (i+1)/M)`` (:func:`stratified_times`), ``M``
    even; ``states`` (M, B, ...): the trajectories there (:func:`mulan.ode_solver.solve_at`). At each time the
    divergence is the exact trace (``num_probes=None``) or the mean of ``num_probes`` fresh Rademacher probes'
    Hutchinson estimates (fresh per example too), so the mean of the ``M`` values is unbiased for the integral along
    the trajectory, whatever the divergence does between the solver's steps. Its variance ``(1/M^2) sum_i Var d_i``
    is estimated from the pairs of neighbouring strata, ``(1/M^2) sum_j (d_2j - d_2j+1)^2``, whose expectation is
    that plus the squared differences of the pairs' means: conservative (docs: math, section 6). With each example's
    own times and probes the examples' estimates are independent, so the variance of a mean over examples is the
    mean of these over their count. Returns the estimate and that variance, two (B,) tensors."""
    values = []
    for t, x in zip(times.T, states, strict=True):
        probes = None if num_probes is None else rademacher_like(x, generator, num_probes)
        _, div = drift_and_divergence(f, t, x, probes)
        values.append(div.mean(1).to(x.dtype))
    d = torch.stack(values, 1)  # (B, M)
    num = d.shape[1]
    variance = (d[:, 0::2] - d[:, 1::2]).square().sum(1) / num**2
    return d.mean(1), variance


def check_divergence_samples(
    divergence_samples: int | None, divergence_atol: float | None = None, prefix: str = ""
) -> None:
    """Refuse a ``divergence_samples`` that is not an even number of at least 2, or one given with a
    ``divergence_atol`` (the sampled integral is not solved, so it has no tolerance). ``prefix``: of the option
    names in the message (``"ode_"`` for the callback's)."""
    name = f"{prefix}divergence_samples"
    if divergence_samples is None:
        return
    if isinstance(divergence_samples, bool) or not isinstance(divergence_samples, int):
        raise ValueError(f"{name} must be an even integer >= 2 or None, got {divergence_samples!r}.")
    if divergence_samples < 2 or divergence_samples % 2:
        raise ValueError(
            f"{name} must be an even integer >= 2 (its strata are paired to estimate the variance), "
            f"got {divergence_samples}."
        )
    if divergence_atol is not None:
        raise ValueError(
            f"{name} and {prefix}divergence_atol exclude each other: a sampled divergence integral is not "
            "solved, so it has no tolerance. Set one of them."
        )


def check_divergence_options(
    time_variable: str, divergence_atol: float | None, divergence_samples: int | None, prefix: str = ""
) -> None:
    """Refuse an unknown ``time_variable``, a ``divergence_atol`` that is not positive (``math.inf``: not
    controlled) and a bad ``divergence_samples`` (:func:`check_divergence_samples`), with the option names
    ``prefix`` + name (``"ode_"``: the :class:`~mulan.lightning.evaluation.EvaluationCallback`'s)."""
    if time_variable not in TIME_VARIABLES:
        choices = ", ".join(map(repr, TIME_VARIABLES))
        raise ValueError(f"{prefix}time_variable must be one of {choices}, got {time_variable!r}.")
    if divergence_atol is not None and not divergence_atol > 0:
        raise ValueError(
            f"{prefix}divergence_atol must be positive (inf: not controlled) or None, got {divergence_atol}."
        )
    check_divergence_samples(divergence_samples, divergence_atol, prefix)


@dataclass(frozen=True)
class ODESettings:
    """How the probability-flow ODE likelihood is computed (:func:`mulan.likelihood.ode_likelihood`,
    :func:`~mulan.likelihood.ode_log_density`); checked when made. The evaluation callback builds one from its
    ``ode_*`` options (``ode_draws`` is ``num_draws``, ``ode_probes`` is ``num_probes``, the others keep their
    names after the prefix).

    Args:
        num_draws: truncated-normal dequantisation draws ``K`` per image (not used by ``ode_log_density``).
        num_probes: Hutchinson probes ``P`` per solve, held fixed for the solve (``>= 2`` estimates their noise).
        exact_divergence: the exact trace instead of the probes (``D`` vector-Jacobian products per evaluation).
        rtol, atol: the dopri5 solver's tolerances on the state.
        divergence_atol: the log-density integral's own absolute tolerance in nats (None: ``rtol``/``atol`` like
            the state; ``math.inf``: not error-controlled; docs: evaluation, "Error control of the divergence
            integral").
        divergence_samples: an even ``M``: the integral by stratified sampling at ``M`` times on the trajectory
            solved alone (None: solved with the state).
        time_variable: the integration variable, one of :data:`TIME_VARIABLES`.
        dtype: of the solve (float32 or float64).
        solve_batch_size: (image, draw) rows per solve (None: all at once; not used by ``ode_log_density``).
    """

    num_draws: int = 1
    num_probes: int = 1
    exact_divergence: bool = False
    rtol: float = 1e-5
    atol: float = 1e-5
    divergence_atol: float | None = None
    divergence_samples: int | None = None
    time_variable: str = DEFAULT_TIME_VARIABLE
    dtype: torch.dtype = torch.float32
    solve_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_draws", "num_probes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.solve_batch_size is not None and self.solve_batch_size < 1:
            raise ValueError(
                f"solve_batch_size must be at least 1 (or None: all rows at once), got {self.solve_batch_size}."
            )
        check_divergence_options(self.time_variable, self.divergence_atol, self.divergence_samples)

    @property
    def exact_log_p(self) -> bool:
        """Whether ``log p`` has no estimator noise: the exact divergence integrated by the solver."""
        return self.exact_divergence and self.divergence_samples is None

    @property
    def tolerances(self) -> tuple[float | tuple[float, float], float | tuple[float, float]]:
        """``(rtol, atol)`` of the augmented state ``(x, log-density integral)``: one pair for both, or with
        ``divergence_atol`` one per component (the integral: that absolute tolerance and no relative one, since it
        is thousands of nats and ``rtol`` alone would ask for hundredths of a nat)."""
        if self.divergence_atol is None:
            return self.rtol, self.atol
        return (self.rtol, 0.0), (self.atol, self.divergence_atol)
