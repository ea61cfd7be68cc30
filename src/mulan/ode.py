"""The probability-flow ODE of a model, its divergence and one adaptive solver, shared by sampling and likelihood.

The forward process has, per state coordinate, the marginals of a linear SDE; its probability-flow ODE
``dx/dt = drift(x, t)`` (:meth:`mulan.processes.ForwardProcess.ode_drift`, with the model's noise prediction in
place of the score) moves data (t = 0) to noise (t = 1) with the same marginals (docs: math, section 6).
:func:`solve` integrates any such system with adaptive Dormand-Prince RK45 (``torchdiffeq``'s ``dopri5``) on the
tensors' device, batched, with one step size for the batch controlled by the worst per-example error.

The ODE can be integrated in ``t`` or, after a change of time variable, in the normalised mean log-SNR time
``u`` of :class:`LogSNRTime` (``time_variable="log_snr"``; docs: evaluation, "Time variable").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mulan.processes.base import Context, ForwardProcess
from mulan.processes.diagonal import DiagonalProcess
from mulan.utils import float32_region, progress_bar

State = Any  # a Tensor, or a tuple of Tensors whose first dimension is the batch


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


def per_example_norm(state: Tensor | tuple[Tensor, ...]) -> Tensor:
    """Error norm for a batched solve: the worst per-example RMS over the batch (and over tuple components).

    Every example is then integrated at least as accurately as if it were solved alone at the same tolerance."""
    parts = state if isinstance(state, tuple) else (state,)
    return torch.stack([p.reshape(p.shape[0], -1).square().mean(1).sqrt().max() for p in parts]).max()


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Turn TF32 matmuls/convolutions off (CUDA) for the duration; restore the previous settings after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def solve(
    func: Callable[[Tensor, State], State],
    state: State,
    t_start: float,
    t_end: float,
    rtol: float | tuple[float, ...] = 1e-5,
    atol: float | tuple[float, ...] = 1e-5,
    progress: bool = False,
    description: str = "probability-flow ODE",
) -> tuple[State, int]:
    """Integrate ``d state / dt = func(t, state)`` from ``t_start`` to ``t_end`` (either direction) with dopri5.

    ``state`` is a tensor or a tuple of tensors (batch first) in float32 or float64; the times are in the
    state's dtype. ``rtol``/``atol`` are one number for the whole state or, for a tuple state, one per component
    (``math.inf`` takes a component out of the error control: it is integrated on the steps the others set). TF32
    is off and no autograd graph is kept. Returns ``(state at t_end, number of evaluations)``.
    """
    first = state[0] if isinstance(state, tuple) else state
    times = torch.tensor([t_start, t_end], dtype=first.dtype, device=first.device)
    path, nfe = solve_path(func, state, times, rtol, atol, progress, description)
    end = tuple(p[-1] for p in path) if isinstance(state, tuple) else path[-1]
    return end, nfe


def solve_path(
    func: Callable[[Tensor, State], State],
    state: State,
    times: Tensor,
    rtol: float | tuple[float, ...] = 1e-5,
    atol: float | tuple[float, ...] = 1e-5,
    progress: bool = False,
    description: str = "probability-flow ODE",
) -> tuple[State, int]:
    """:func:`solve` from ``times[0]`` through the monotone ``times`` (N,): the state at each of them, (N, B, ...)
    per component, and the number of evaluations.

    The steps are those :func:`solve` takes from ``times[0]`` to ``times[-1]``: the states at the times in between
    come from dopri5's fourth-order dense output on those steps, so asking for them costs no evaluation and does
    not move a step."""
    from torchdiffeq import odeint

    first = state[0] if isinstance(state, tuple) else state
    times = times.to(dtype=first.dtype, device=first.device)
    t_start = float(times[0])
    nfe, reached, span = 0, 0.0, abs(float(times[-1]) - t_start)
    with progress_bar(span, description, progress) as advance:

        def counted(t: Tensor, y: State) -> State:
            nonlocal nfe, reached
            nfe += 1
            if progress:  # float(t) syncs with the device: only for the bar
                distance = abs(float(t) - t_start)
                if distance > reached:
                    advance(distance - reached)
                    reached = distance
            return func(t, y)

        # per-component tolerances in the state's dtype (torchdiffeq would round them through float32)
        rtols, atols = (
            tuple(torch.tensor(v, dtype=first.dtype) for v in tol) if isinstance(tol, tuple) else tol
            for tol in (rtol, atol)
        )
        with torch.no_grad(), tf32_disabled():
            path = odeint(
                counted, state, times, rtol=rtols, atol=atols, method="dopri5", options={"norm": per_example_norm}
            )
    return path, nfe


def solve_at(
    func: Callable[[Tensor, Tensor], Tensor],
    state: Tensor,
    times: Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
    description: str = "probability-flow ODE",
) -> tuple[Tensor, Tensor, int]:
    """:func:`solve` of a tensor ``state`` (B, ...) from 0 to 1, with each example's state read off at its own times.

    ``times`` (B, M), in ``(0, 1)``: example ``b``'s output times. Returns ``(states, end, nfe)``: ``states`` (M, B,
    ...) with ``states[i, b]`` the state of example ``b`` at ``times[b, i]``, ``end`` (B, ...) the state at ``t = 1``
    and the number of evaluations. The steps are exactly those of :func:`solve` (output times never move a step),
    and each state comes from dopri5's fourth-order dense output on the step that holds its time, the same
    polynomial :func:`solve_path` evaluates (bit for bit when all examples share their times). The pairs are read
    off in time order as the solve passes them, so memory is that of the ``B M`` states returned, not ``B M`` full
    batches."""
    b = state.shape[0]
    if times.dim() != 2 or times.shape[0] != b:
        raise ValueError(f"times must be (B, M) with B = {b}, the state's batch; got {tuple(times.shape)}.")
    try:
        from torchdiffeq._impl.misc import _check_inputs
        from torchdiffeq._impl.odeint import SOLVERS
    except ImportError:  # another torchdiffeq layout: every example's times as output times of one solve (more memory)
        return _solve_at_union(func, state, times, rtol, atol, progress, description)
    flat = times.reshape(-1)
    rows = torch.arange(b, device=state.device).repeat_interleave(times.shape[1])
    nfe, reached = 0, 0.0
    with progress_bar(1.0, description, progress) as advance:

        def counted(t: Tensor, y: Tensor) -> Tensor:
            nonlocal nfe, reached
            nfe += 1
            if progress and float(t) > reached:
                advance(float(t) - reached)
                reached = float(t)
            return func(t, y)

        with torch.no_grad(), tf32_disabled():
            span = torch.tensor([0.0, 1.0], dtype=state.dtype, device=state.device)
            options = {"norm": per_example_norm}
            checked = _check_inputs(counted, state, span, rtol, atol, "dopri5", options, None, SOLVERS)
            _, wrapped, y0, span, rtol_, atol_, method, options, _, _ = checked
            solver = SOLVERS[method](func=wrapped, y0=y0, rtol=rtol_, atol=atol_, **options)
            span = span.to(solver.dtype)
            order = torch.argsort(flat)
            pending = flat[order].to(solver.dtype)
            out = state.new_empty(flat.shape[0], *state.shape[1:])
            solver._before_integrate(span)
            done = 0
            while True:
                rk = solver.rk_state
                reached_pairs = int(torch.searchsorted(pending, rk.t1.reshape(1), right=True))
                if reached_pairs > done:  # the pairs whose times this (accepted) step covers
                    chosen = order[done:reached_pairs]
                    out[chosen] = _interpolate_rows(
                        rk.interp_coeff, rk.t0, rk.t1, pending[done:reached_pairs], rows[chosen]
                    )
                    done = reached_pairs
                if not bool(span[1] > rk.t1):
                    break
                solver.rk_state = solver._adaptive_step(rk)
            end = _interpolate_rows(
                rk.interp_coeff, rk.t0, rk.t1, span[1].expand(b), torch.arange(b, device=state.device)
            )
    return out.view(b, times.shape[1], *state.shape[1:]).transpose(0, 1), end, nfe


def _interpolate_rows(coefficients: list[Tensor], t0: Tensor, t1: Tensor, t: Tensor, rows: Tensor) -> Tensor:
    """dopri5's dense output ``e + d x + c x^2 + b x^3 + a x^4``, ``x = (t - t0) / (t1 - t0)``, of the examples
    ``rows`` (N,) at their times ``t`` (N,): (N, ...). The arithmetic, in this order, of torchdiffeq's scalar-time
    ``_interp_evaluate``."""
    x = ((t - t0) / (t1 - t0)).to(coefficients[0].dtype).view(-1, *([1] * (coefficients[0].dim() - 1)))
    total = coefficients[0][rows] + x * coefficients[1][rows]
    power = x
    for coefficient in coefficients[2:]:
        power = power * x
        total = total + power * coefficient[rows]
    return total


def _solve_at_union(
    func: Callable[[Tensor, Tensor], Tensor],
    state: Tensor,
    times: Tensor,
    rtol: float,
    atol: float,
    progress: bool,
    description: str,
) -> tuple[Tensor, Tensor, int]:
    """:func:`solve_at` through :func:`solve_path` at the sorted union of all examples' times (memory ``B M``
    full batches): for torchdiffeq versions without the solver internals :func:`solve_at` reads."""
    b, m = times.shape
    flat = times.reshape(-1)
    order = torch.argsort(flat)
    grid = torch.cat([flat.new_zeros(1), flat[order], flat.new_ones(1)])
    path, nfe = solve_path(func, state, grid, rtol, atol, progress, description)
    rows = torch.arange(b, device=state.device).repeat_interleave(m)
    out = state.new_empty(b * m, *state.shape[1:])
    out[order] = path[1:-1][torch.arange(b * m, device=state.device), rows[order]]
    return out.view(b, m, *state.shape[1:]).transpose(0, 1), path[-1], nfe
