"""The learned auxiliary-variable diffusion: ``Q`` and ``D`` trained with the bound (docs: math, section 11)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mulan.processes.auxiliary.base import AuxiliaryProcess
from mulan.processes.base import GAMMA_MAX, GAMMA_MIN, ImageShape


class LearnedAuxiliary(AuxiliaryProcess):
    """The learned linear process: ``Q = S - S^T`` (``S`` strictly lower triangular) and ``D = L L^T`` (``L`` lower
    triangular; ``full_diffusion=False``: ``D = diag(l^2)``), so every setting keeps ``N(0, I)`` stationary.

    Initialisation: ``D = init_diffusion I`` plus ``init_scale`` times standard-normal entries below the diagonal of
    ``L``, and ``S`` likewise. ``init_diffusion = 0.5``, small ``init_scale``: every coordinate starts close to an
    independent variance-preserving SDE (the data coordinate close to VDM's fixed linear schedule) and learns its
    couplings; at ``Q = 0`` exactly the couplings' gradients vanish by symmetry (``v -> -v``), hence the random
    start. Other options as :class:`AuxiliaryProcess`.
    """

    _lower: Tensor
    _lower_diag: Tensor

    def __init__(
        self,
        image_shape: ImageShape,
        latent_dim: int = 0,
        num_aux: int = 1,
        full_diffusion: bool = True,
        init_diffusion: float = 0.5,
        init_scale: float = 0.1,
        gamma_min: float = GAMMA_MIN,
        gamma_max: float = GAMMA_MAX,
        aux_init_var: float = 0.01,
        time_change: str = "log_snr",
        beta_min: float = 0.1,
        beta_max: float = 10.0,
    ) -> None:
        super().__init__(image_shape, num_aux, gamma_min, gamma_max, aux_init_var, time_change, beta_min, beta_max)
        if not init_diffusion > 0:
            raise ValueError(
                f"init_diffusion must be positive (D = init_diffusion I at the start), got {init_diffusion}."
            )
        k = self.num_vars
        self.latent_dim, self.full_diffusion = latent_dim, full_diffusion
        self.register_buffer("_lower", torch.tril_indices(k, k, -1), persistent=False)
        self.register_buffer("_lower_diag", torch.tril_indices(k, k, 0), persistent=False)
        self.skew = nn.Parameter(init_scale * torch.randn(k * (k - 1) // 2))
        if full_diffusion:
            rows, cols = self._lower_diag
            init = torch.where(rows == cols, math.sqrt(init_diffusion), init_scale * torch.randn(rows.numel()))
            self.diffusion = nn.Parameter(init)
        else:
            self.diffusion = nn.Parameter(torch.full((k,), math.sqrt(init_diffusion)))

    def matrices(self) -> tuple[Tensor, Tensor]:
        k, device = self.num_vars, self.skew.device
        s = torch.zeros(k, k, dtype=torch.float64, device=device).index_put(
            (self._lower[0], self._lower[1]), self.skew.double()
        )
        if self.full_diffusion:
            rows, cols = self._lower_diag
            factor = torch.zeros(k, k, dtype=torch.float64, device=device).index_put(
                (rows, cols), self.diffusion.double()
            )
            d = factor @ factor.T
        else:
            d = torch.diag(self.diffusion.double().square())
        return s - s.T, d
