"""The probability-flow ODE of a model, its divergence and one adaptive solver, shared by sampling and likelihood.

The forward process has, per state coordinate, the marginals of a linear SDE; its probability-flow ODE
``dx/dt = drift(x, t)`` (:meth:`mulan.processes.ForwardProcess.ode_drift`, with the model's noise prediction in
place of the score) moves data (t = 0) to noise (t = 1) with the same marginals (docs: math, section 6).
:func:`solve` integrates any such system with adaptive Dormand-Prince RK45 (``torchdiffeq``'s ``dopri5``) on the
tensors' device, batched, with one step size for the batch controlled by the worst per-example error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mulan.processes.base import Context
from mulan.utils import progress_bar

State = Any  # a Tensor, or a tuple of Tensors whose first dimension is the batch


def drift(model: Any, ctx: Context) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(t, x) -> dx/dt`` of ``model``'s probability-flow ODE in the context ``ctx`` (``x``: (B, *state_shape) in
    float32 or float64, ``t``: a scalar or (B,) time). Differentiable in ``x``."""
    predict = model.predictor(ctx)

    def f(t: Tensor, x: Tensor) -> Tensor:
        return model.process.ode_drift(x, t, ctx, predict)

    return f


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
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
    description: str = "probability-flow ODE",
) -> tuple[State, int]:
    """Integrate ``d state / dt = func(t, state)`` from ``t_start`` to ``t_end`` (either direction) with dopri5.

    ``state`` is a tensor or a tuple of tensors (batch first) in float32 or float64; the times are in the
    state's dtype. TF32 is off and no autograd graph is kept. Returns ``(state at t_end, number of evaluations)``.
    """
    from torchdiffeq import odeint

    first = state[0] if isinstance(state, tuple) else state
    nfe, reached, span = 0, 0.0, abs(t_end - t_start)
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

        times = torch.tensor([t_start, t_end], dtype=first.dtype, device=first.device)
        with torch.no_grad(), tf32_disabled():
            path = odeint(
                counted, state, times, rtol=rtol, atol=atol, method="dopri5", options={"norm": per_example_norm}
            )
    end = tuple(p[-1] for p in path) if isinstance(state, tuple) else path[-1]
    return end, nfe
