"""One adaptive ODE solver for the whole library: Dormand-Prince RK45 (``torchdiffeq``'s ``dopri5``) on the tensors'
device, batched, with one step size for the batch controlled by the worst per-example error, and its dense output
read off at each example's own times.

Pure numerics: it knows nothing of models or processes (:mod:`mulan.ode` builds the probability-flow ODE it
integrates; :mod:`mulan.sampling` and :mod:`mulan.likelihood` call it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from mulan.utils import progress_bar

State = Any  # a Tensor, or a tuple of Tensors whose first dimension is the batch


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
