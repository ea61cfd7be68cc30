"""Multivariate diffusions with auxiliary variables (Singhal, Goldstein & Ranganath, ICLR 2023; docs: math, section 11).

Per data dimension the state is ``y = (x, v_1, ..., v_K)``, ``K + 1`` numbers, and every dimension follows the same
linear SDE with ``(K + 1) x (K + 1)`` matrices ``Q`` (skew-symmetric) and ``D`` (symmetric positive semi-definite):

    dy = -beta(t) (Q + D) y dt + sqrt(2 beta(t)) D^(1/2) dW.

For any such ``Q`` and ``D`` the standard normal ``N(0, I)`` is stationary (``F + F^T + G G^T = 0`` with
``F = -beta (Q + D)``, ``G G^T = 2 beta D``): this is the paper's parameterisation (the "complete recipe" for
stationary diffusions), so every learned setting keeps the prior ``p(y_1) = N(0, I)``. With
``A = -(Q + D)`` and ``B(t) = int_0^t beta`` the transition matrix is ``Phi_t = exp(B(t) A)``, and because
``N(0, I)`` is stationary the covariance the process adds to a fixed start is ``I - Phi_t Phi_t^T``.

The process starts from ``q(y_0 | x) = N((alpha_0 x, 0, ..., 0), diag(sigma_0^2, s^2, ..., s^2))``: the data
coordinate noised at ``gamma(0) = gamma_min`` as in VDM (so the reconstruction term is VDM's 256-way decoder) and
the auxiliaries drawn from their initial distribution (variance ``s^2 = aux_init_var``). Hence, per dimension,

    q(y_t | x) = N(a_t x, Sigma_t),   a_t = alpha_0 Phi_t e_0,   Sigma_t = I - Phi_t (I - Sigma_0) Phi_t^T,

and the bound's diffusion term is ``1/2 (eps - eps_hat)^T W_t (eps - eps_hat)`` summed over data dimensions, with
``y_t = a_t x + L_t eps``, ``L_t L_t^T = Sigma_t`` and ``W_t = 2 beta L_t^-1 D L_t^-T`` (the Girsanov form of the
bound with the score ``-L_t^-T eps_hat``; docs: math, section 11b, for why this form and not the paper's
conditional one). All the ``(K + 1) x (K + 1)`` algebra runs in float64 (matrix exponential, Cholesky, solves);
the state-sized arithmetic in float32 (or the ODE's dtype).

The state has ``(K + 1) C`` channels: channels ``[k C, (k + 1) C)`` hold coordinate ``k`` (``0``: the data).

The modules: :mod:`~mulan.processes.auxiliary.base` (:class:`AuxiliaryProcess`, the kernel, the bound's terms, the
ancestral step and the ODE), :mod:`~mulan.processes.auxiliary.fixed` (:class:`FixedAuxiliary`, CLD, ALDA, MALDA)
and :mod:`~mulan.processes.auxiliary.learned` (:class:`LearnedAuxiliary`). Saved configurations name the classes
here (``mulan.processes.auxiliary.CriticallyDampedLangevin``).
"""

from mulan.processes.auxiliary.base import TIME_CHANGES, AuxiliaryProcess, Kernel
from mulan.processes.auxiliary.fixed import ALDA, MALDA, CriticallyDampedLangevin, FixedAuxiliary
from mulan.processes.auxiliary.learned import LearnedAuxiliary

__all__ = [
    "ALDA",
    "MALDA",
    "TIME_CHANGES",
    "AuxiliaryProcess",
    "CriticallyDampedLangevin",
    "FixedAuxiliary",
    "Kernel",
    "LearnedAuxiliary",
]
