"""Fixed auxiliary-variable diffusions given by their matrices: :class:`FixedAuxiliary` and the paper's named
processes, CLD (:class:`CriticallyDampedLangevin`), :class:`ALDA` and :class:`MALDA` (docs: math, section 11)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mulan.processes.auxiliary.base import AuxiliaryProcess
from mulan.processes.base import GAMMA_MAX, GAMMA_MIN, ImageShape


def _check_matrices(q: Tensor, d: Tensor) -> None:
    """Raise a clear error unless ``q`` is skew-symmetric and ``d`` symmetric positive semi-definite, same size."""
    if q.dim() != 2 or q.shape[0] != q.shape[1] or d.shape != q.shape:
        raise ValueError(
            f"q and d must be square matrices of the same size K + 1 (data coordinate plus K auxiliaries); got "
            f"shapes {tuple(q.shape)} and {tuple(d.shape)}."
        )
    if not torch.allclose(q, -q.T, atol=1e-12):
        raise ValueError(
            f"q must be skew-symmetric (q = -q^T) for N(0, I) to stay stationary; got {q.tolist()}. Put the "
            "dissipative (symmetric) part in d."
        )
    if not torch.allclose(d, d.T, atol=1e-12) or float(torch.linalg.eigvalsh(d).min()) < -1e-12:
        raise ValueError(
            f"d must be symmetric positive semi-definite (it is the diffusion, G G^T = 2 beta d); got {d.tolist()}."
        )


class FixedAuxiliary(AuxiliaryProcess):
    """A fixed process given by its matrices: ``q`` skew-symmetric and ``d`` symmetric PSD, (K+1) x (K+1) lists.

    ``q = [[0.0]]``, ``d = [[0.5]]`` (``K = 0``) is the variance-preserving SDE: with ``time_change="log_snr"``
    exactly VDM's fixed linear schedule. Other options as :class:`AuxiliaryProcess`.
    """

    q: Tensor
    d: Tensor

    def __init__(
        self,
        image_shape: ImageShape,
        latent_dim: int = 0,
        q: Sequence[Sequence[float]] = ((0.0,),),
        d: Sequence[Sequence[float]] = ((0.5,),),
        gamma_min: float = GAMMA_MIN,
        gamma_max: float = GAMMA_MAX,
        aux_init_var: float = 0.01,
        time_change: str = "log_snr",
        beta_min: float = 0.1,
        beta_max: float = 10.0,
    ) -> None:
        q_matrix, d_matrix = torch.tensor(q, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)
        _check_matrices(q_matrix, d_matrix)
        super().__init__(
            image_shape, q_matrix.shape[0] - 1, gamma_min, gamma_max, aux_init_var, time_change, beta_min, beta_max
        )
        self.latent_dim = latent_dim
        self.register_buffer("q", q_matrix, persistent=False)
        self.register_buffer("d", d_matrix, persistent=False)

    def matrices(self) -> tuple[Tensor, Tensor]:
        return self.q.double(), self.d.double()


class CriticallyDampedLangevin(FixedAuxiliary):
    """CLD (Dockhorn et al. 2022) with unit mass: ``K = 1`` (a velocity ``v``), ``dx = beta v dt``,
    ``dv = -beta (x + damping v) dt + sqrt(2 damping beta) dW``: ``Q = [[0, -1], [1, 0]]``, ``D = diag(0, damping)``.
    ``damping = 2`` is critical damping (the double eigenvalue -1 of ``A``)."""

    def __init__(self, image_shape: ImageShape, latent_dim: int = 0, damping: float = 2.0, **options) -> None:
        super().__init__(
            image_shape, latent_dim, q=[[0.0, -1.0], [1.0, 0.0]], d=[[0.0, 0.0], [0.0, damping]], **options
        )


class ALDA(FixedAuxiliary):
    """The paper's "accelerated Langevin" diffusion (ALDA), ``K = 2`` (velocity and acceleration), unit
    constants: ``Q = [[0, -1, 0], [1, 0, -1], [0, 1, 0]]``, ``D = diag(0, 0, 1)``: noise enters only the last
    auxiliary and reaches the data through two couplings."""

    def __init__(self, image_shape: ImageShape, latent_dim: int = 0, **options) -> None:
        q = [[0.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
        super().__init__(image_shape, latent_dim, q=q, d=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], **options)


class MALDA(FixedAuxiliary):
    """The paper's "multivariate accelerated Langevin" diffusion (MALDA), ``K = 2``: every pair of coordinates is
    coupled (``Q_ij = 1`` below and ``-1`` above the diagonal) and both auxiliaries are damped,
    ``D = diag(0, damping, damping)`` (paper: ``damping = 2``)."""

    def __init__(self, image_shape: ImageShape, latent_dim: int = 0, damping: float = 2.0, **options) -> None:
        q = [[0.0, -1.0, -1.0], [1.0, 0.0, -1.0], [1.0, 1.0, 0.0]]
        d = [[0.0, 0.0, 0.0], [0.0, damping, 0.0], [0.0, 0.0, damping]]
        super().__init__(image_shape, latent_dim, q=q, d=d, **options)
