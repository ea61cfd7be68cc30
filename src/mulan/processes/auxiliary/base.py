"""The general machinery of the auxiliary-variable diffusions (the math: :mod:`mulan.processes.auxiliary`).

:class:`AuxiliaryProcess` turns the matrices ``Q`` and ``D`` of a subclass into the transition kernel
(:class:`Kernel`), the terms of the bound, the ancestral step and the probability-flow ODE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mulan import elbo
from mulan.processes.base import GAMMA_MAX, GAMMA_MIN, Context, ForwardProcess, ImageShape, Marginal, Predictor
from mulan.utils import float32_region

TIME_CHANGES = ("log_snr", "linear_beta")


@dataclass
class Kernel:
    """The coefficients of ``q(y_t | x)`` per data dimension at ``N`` times, float64.

    ``B``, ``beta``: (N,) ``int_0^t beta`` and ``beta(t)``; ``gamma``, ``dgamma``: (N,) the denoiser's noise level
    (:meth:`AuxiliaryProcess.time_change`) and its time derivative; ``phi``: (N, K+1, K+1) ``Phi_t = exp(B A)``;
    ``mean``: (N, K+1) ``a_t`` (the mean is ``a_t x``); ``cov``: (N, K+1, K+1) ``Sigma_t``; ``chol``: its lower
    Cholesky factor ``L_t``.
    """

    B: Tensor
    beta: Tensor
    gamma: Tensor
    dgamma: Tensor
    phi: Tensor
    mean: Tensor
    cov: Tensor
    chol: Tensor

    def expand(self, n: int) -> Kernel:
        """The same kernel for ``n`` equal times (from a kernel computed at one time)."""
        return Kernel(*(v.expand(n, *v.shape[1:]) for v in vars(self).values()))


def _apply(matrix: Tensor, state: Tensor, num_vars: int) -> Tensor:
    """``matrix`` (N, K+1, K+1) applied per data dimension to a state (N, (K+1) C, H, W): same shape as ``state``."""
    blocks = state.unflatten(1, (num_vars, -1))
    return torch.einsum("nij,nj...->ni...", matrix.to(state.dtype), blocks).flatten(1, 2)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of symmetric positive semi-definite matrices (..., k, k), rounding errors that make
    an eigenvalue slightly negative clamped to 0."""
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.mT))
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)) @ vectors.mT


class AuxiliaryProcess(ForwardProcess):
    """Base class of the linear multivariate diffusions with ``K`` auxiliary variables per data dimension.

    Subclasses say what ``Q`` and ``D`` are (:meth:`matrices`); this class turns them into the transition kernel,
    the terms of the bound, the ancestral step and the probability-flow ODE.

    Args:
        image_shape: ``(C, H, W)`` of the data.
        num_aux: ``K``, the auxiliary variables per data dimension (0: a diagonal process like VDM's).
        gamma_min: the data coordinate's negative log-SNR at ``t = 0`` (the initial noise, as VDM's ``gamma_min``).
        gamma_max: with ``time_change="log_snr"``, the end of the time change (below).
        aux_init_var: variance ``s^2`` of the auxiliaries' initial distribution ``N(0, s^2)`` (paper: 0.01).
        time_change: how ``beta(t)`` runs: ``"log_snr"``: ``B(t) = softplus(gamma(t)) - softplus(gamma_min)`` with
            ``gamma(t) = gamma_min + (gamma_max - gamma_min) t``, so that ``K = 0``, ``D = 1/2`` is exactly VDM's
            fixed linear schedule; ``"linear_beta"``: ``beta(t) = beta_min + (beta_max - beta_min) t`` (the paper's).
            For fixed ``Q``, ``D`` the expected bound depends on the time change only through ``B(1)``; its shape
            changes the variance of the estimate.
        beta_min, beta_max: the linear ``beta`` (paper: 0.1 and 10, ``B(1) = 5.05``).

    The denoiser's noise-level input (``Marginal.gamma``, (N, 1, 1, 1)) is ``log(expm1(B) + exp(B + gamma_min))``:
    the data coordinate's negative log-SNR of the ``K = 0``, ``D = 1/2`` process under the same time change (for
    ``"log_snr"``: ``gamma(t)`` itself). It increases strictly with ``t``, unlike the data coordinate's own log-SNR
    in an under-damped process, which oscillates and so cannot tell the denoiser the time.
    """

    def __init__(
        self,
        image_shape: ImageShape,
        num_aux: int,
        gamma_min: float = GAMMA_MIN,
        gamma_max: float = GAMMA_MAX,
        aux_init_var: float = 0.01,
        time_change: str = "log_snr",
        beta_min: float = 0.1,
        beta_max: float = 10.0,
    ) -> None:
        super().__init__(image_shape)
        if num_aux < 0:
            raise ValueError(f"num_aux must be 0 or more auxiliary variables per data dimension, got {num_aux}.")
        if time_change not in TIME_CHANGES:
            raise ValueError(f"time_change must be one of {', '.join(map(repr, TIME_CHANGES))}, got {time_change!r}.")
        if time_change == "log_snr" and not gamma_min < gamma_max:
            raise ValueError(
                f"gamma_min ({gamma_min}) must be smaller than gamma_max ({gamma_max}): the time change runs from "
                "little noise at t = 0 to much at t = 1."
            )
        if time_change == "linear_beta" and not (0 <= beta_min <= beta_max and beta_max > 0):
            raise ValueError(f"need 0 <= beta_min <= beta_max and beta_max > 0, got {beta_min} and {beta_max}.")
        if not aux_init_var > 0:
            raise ValueError(
                f"aux_init_var must be positive, got {aux_init_var}: the auxiliaries' initial distribution "
                "N(0, aux_init_var) needs a density for the bound (paper: 0.01)."
            )
        self.num_aux, self.num_vars = int(num_aux), int(num_aux) + 1
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.aux_init_var, self.time_change_kind = float(aux_init_var), time_change
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # tracks the device

    # ------------------------------------------------------------------------------------------ the SDE
    @property
    def state_shape(self) -> ImageShape:
        c, h, w = self.image_shape
        return (self.num_vars * c, h, w)

    def matrices(self) -> tuple[Tensor, Tensor]:
        """``(Q, D)``: float64 (K+1, K+1), ``Q`` skew-symmetric, ``D`` symmetric PSD. Subclasses implement."""
        raise NotImplementedError

    def drift_matrix(self) -> tuple[Tensor, Tensor]:
        """``(A, D)`` with ``A = -(Q + D)``: the SDE is ``dy = beta A y dt + sqrt(2 beta) D^(1/2) dW``."""
        q, d = self.matrices()
        return -(q + d), d

    def initial_variances(self) -> Tensor:
        """The diagonal of ``Sigma_0``: ``(sigma_0^2, s^2, ..., s^2)``, float64 (K+1,)."""
        variances = torch.full((self.num_vars,), self.aux_init_var, dtype=torch.float64, device=self.device())
        variances[0] = 1.0 / (1.0 + math.exp(-self.gamma_min))
        return variances

    @property
    def alpha_0(self) -> float:
        """The data's scale at ``t = 0``, ``sqrt(sigmoid(-gamma_min))``."""
        return math.sqrt(1.0 / (1.0 + math.exp(self.gamma_min)))

    def time_change(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(B(t), beta(t), gamma(t), dgamma/dt)`` for times ``t`` (N,), float64 (N,) each (class docstring)."""
        t = t.double()
        if self.time_change_kind == "log_snr":
            span = self.gamma_max - self.gamma_min
            gamma = self.gamma_min + span * t
            B = F.softplus(gamma) - math.log1p(math.exp(self.gamma_min))
            return B, torch.sigmoid(gamma) * span, gamma, torch.full_like(t, span)
        slope = self.beta_max - self.beta_min
        B = t * (self.beta_min + 0.5 * slope * t)
        beta = self.beta_min + slope * t
        gamma = torch.logaddexp(torch.log(torch.expm1(B)), B + self.gamma_min)
        return B, beta, gamma, beta * (1 + torch.exp(-gamma))

    def kernel(self, t: Tensor) -> Kernel:
        """``q(y_t | x)`` at times ``t`` (N,) (:class:`Kernel`, float64). Equal times are computed once."""
        t = t.reshape(-1)
        if t.numel() > 1 and bool((t == t[0]).all()):
            return self._kernel(t[:1]).expand(t.numel())
        return self._kernel(t)

    def _kernel(self, t: Tensor) -> Kernel:
        with float32_region(t):
            B, beta, gamma, dgamma = self.time_change(t)
            a, _ = self.drift_matrix()
            phi = torch.linalg.matrix_exp(B[:, None, None] * a)
            keep = 1.0 - self.initial_variances()  # I - Sigma_0, diagonal
            eye = torch.eye(self.num_vars, dtype=torch.float64, device=t.device)
            cov = eye - (phi * keep) @ phi.mT
            cov = 0.5 * (cov + cov.mT)
            mean = self.alpha_0 * phi[:, :, 0]
            return Kernel(B, beta, gamma, dgamma, phi, mean, cov, torch.linalg.cholesky(cov))

    def data_log_snr(self, t: Tensor) -> Tensor:
        """The data coordinate's own log-SNR ``log(a_t,0^2 / Sigma_t,00)`` at times ``t`` (N,), float64 (N,)."""
        k = self._kernel(t.reshape(-1))
        return torch.log(k.mean[:, 0].square()) - torch.log(k.cov[:, 0, 0])

    # ------------------------------------------------------------------------------------------ states
    def _marginal(self, k: Kernel) -> Marginal:
        shape = (-1, 1, 1, 1)
        return Marginal(gamma=k.gamma.float().reshape(shape), dgamma=k.dgamma.float().reshape(shape))

    def marginal(self, t: Tensor, ctx: Context) -> Marginal:
        return self._marginal(self.kernel(t))

    def _noisy_state(self, x: Tensor, k: Kernel, eps: Tensor) -> Tensor:
        """``y_t = a_t x + L_t eps``: data (N, C, H, W), noise state-shaped; float32 state (N, (K+1) C, H, W)."""
        mean = k.mean.float()[:, :, None, None, None] * x.float().unsqueeze(1)
        return mean.flatten(1, 2) + _apply(k.chol.float(), eps.float(), self.num_vars)

    def _check_noise(self, eps: Tensor, x: Tensor) -> None:
        if tuple(eps.shape[1:]) != self.state_shape or eps.shape[0] != x.shape[0]:
            raise ValueError(
                f"eps must be state-shaped, ({x.shape[0]}, {', '.join(map(str, self.state_shape))}) for this process "
                f"with {self.num_aux} auxiliary variables; got {tuple(eps.shape)}."
            )

    # ------------------------------------------------------------------------------------------ the bound
    def diffusion_weight(self, k: Kernel) -> Tensor:
        """``W_t = 2 beta L_t^-1 D L_t^-T``: the continuous-time term is ``1/2 (eps - eps_hat)^T W_t (eps - eps_hat)``
        per data dimension. float64 (N, K+1, K+1)."""
        _, d = self.drift_matrix()
        eye = torch.eye(self.num_vars, dtype=torch.float64, device=k.chol.device).expand_as(k.chol)
        inv = torch.linalg.solve_triangular(k.chol, eye, upper=False)
        return 2 * k.beta[:, None, None] * (inv @ d @ inv.mT)

    def posterior(self, kt: Kernel, ks: Kernel) -> tuple[Tensor, Tensor, Tensor]:
        """``q(y_s | y_t, x)`` for ``s < t`` written in the noise of ``y_t``: mean ``C_y y_t + C_eps eps`` and
        covariance ``P``. Returns ``(C_y, C_eps, P)``, float64 (N, K+1, K+1) each.

        With ``Phi = exp((B(t) - B(s)) A)`` (the mean map of ``q(y_t | y_s)``) and the gain
        ``J = Sigma_s Phi^T Sigma_t^-1``: ``mu_s = Phi^-1 mu_t`` and ``mu_t = y_t - L_t eps``, so the mean
        ``mu_s + J (y_t - Phi mu_s)`` is ``Phi^-1 y_t + (J - Phi^-1) L_t eps``, and ``P = Sigma_s - J Phi Sigma_s``."""
        a, _ = self.drift_matrix()
        step = (kt.B - ks.B)[:, None, None] * a
        phi, phi_inv = torch.linalg.matrix_exp(step), torch.linalg.matrix_exp(-step)
        gain = torch.cholesky_solve(phi @ ks.cov, kt.chol).mT
        cov = ks.cov - gain @ phi @ ks.cov
        return phi_inv, (gain - phi_inv) @ kt.chol, 0.5 * (cov + cov.mT)

    def diffusion_loss(
        self, x: Tensor, t: Tensor, ctx: Context, predict: Predictor, eps: Tensor | None = None, steps: int = 0
    ) -> Tensor:
        """``1/2 sum (eps - eps_hat)^T W_t (eps - eps_hat)`` over data dimensions, ``W_t`` the
        :meth:`diffusion_weight`: (B,) nats. Continuous time only (``steps = 0``)."""
        if steps:
            raise ValueError(
                f"{type(self).__name__} has no T-step bound (the step posterior's covariance is near-singular on fine "
                "grids when D is degenerate, as in CLD); train and evaluate with timesteps: 0 (continuous time)."
            )
        if eps is None:
            eps = torch.randn((x.shape[0], *self.state_shape), device=x.device)
        self._check_noise(eps, x)
        k = self.kernel(t)
        with float32_region(x):  # the state's einsum must not run in an autocast dtype
            y_t = self._noisy_state(x, k, eps)
        eps_hat = predict(y_t, self._marginal(k))
        with float32_region(x):
            weight = self.diffusion_weight(k).float()
            diff = eps.float() - eps_hat.float()
            return 0.5 * elbo.sum_per_example(diff * _apply(weight, diff, self.num_vars))

    def prior_loss(self, x: Tensor, ctx: Context) -> Tensor:
        """``KL(N(a_1 x, Sigma_1) || N(0, I))`` summed over data dimensions:
        ``1/2 [|a_1|^2 sum x^2 + D (tr Sigma_1 - (K+1) - log det Sigma_1)]``. (B,) nats."""
        with float32_region(x):
            k = self._kernel(torch.ones(1, device=x.device))
            cov_part = k.cov.diagonal(dim1=-2, dim2=-1).sum(-1) - self.num_vars - torch.logdet(k.cov)
            scale = k.mean.square().sum(-1)
            return 0.5 * (scale.float() * elbo.sum_per_example(x.float().square()) + x[0].numel() * cov_part.float())

    def reconstruction_loss(self, images: Tensor, ctx: Context, noise: Tensor | None = None) -> Tensor:
        """VDM's 256-way decoder on the data coordinate of ``y_0``, whose noise level is ``gamma_min``. (B,) nats."""
        with float32_region(images):
            gamma_0 = torch.full((1, 1, 1, 1), self.gamma_min, device=images.device)
            return elbo.reconstruction_loss(images, gamma_0, noise)

    def conditional_diffusion_loss(
        self,
        x: Tensor,
        t: Tensor,
        ctx: Context,
        predict: Predictor,
        eps: Tensor | None = None,
        eps_0: Tensor | None = None,
    ) -> Tensor:
        """The paper's integrand, conditioned on a draw ``y_0 ~ q(y_0 | x)``, at times ``t`` (N,) in (0, 1]: (B,) nats.

        ``1/2 |G^T (s_theta - grad log q(y_t | y_0))|^2 - D [1/2 tr(G G^T Sigma_{t|0}^-1) + tr F]``, with
        ``y_t = Phi_t y_0 + L_{t|0} eps``, ``Sigma_{t|0} = I - Phi_t Phi_t^T`` and the model's score
        ``s_theta = -L_t^-T eps_hat``. Its expectation is the bound's integrand (:meth:`diffusion_loss`) minus
        ``d H(q(y_t | x)) / dt``; its variance grows without bound as ``t -> 0`` (``Sigma_{t|0} -> 0``), which is why
        the bound uses the other form (docs: math, section 11). For checks and comparison; not used in training.
        """
        if bool((t <= 0).any()):
            raise ValueError("the conditional form needs t > 0: q(y_t | y_0) has no density at t = 0.")
        n = x.shape[0]
        eps = torch.randn((n, *self.state_shape), device=x.device) if eps is None else eps
        eps_0 = torch.randn((n, *self.state_shape), device=x.device) if eps_0 is None else eps_0
        kt = self.kernel(t)
        eye = torch.eye(self.num_vars, dtype=torch.float64, device=x.device)
        cond_chol = torch.linalg.cholesky(eye - kt.phi @ kt.phi.mT)
        with float32_region(x):
            y_0 = self._noisy_state(x, self._kernel(torch.zeros(1, device=x.device)).expand(n), eps_0)
            y_t = _apply(kt.phi.float(), y_0, self.num_vars) + _apply(cond_chol.float(), eps.float(), self.num_vars)
        eps_hat = predict(y_t, self._marginal(kt))
        with float32_region(x):
            model = _apply(torch.linalg.inv(kt.chol).mT.float(), eps_hat.float(), self.num_vars)
            target = _apply(torch.linalg.inv(cond_chol).mT.float(), eps.float(), self.num_vars)
            a, d = self.drift_matrix()
            ggt = 2 * kt.beta[:, None, None] * d
            diff = target - model  # s_theta - grad log q(y_t | y_0)
            quad = elbo.sum_per_example(diff * _apply(ggt.float(), diff, self.num_vars))
            inv_cond = torch.cholesky_inverse(cond_chol)
            rate = 0.5 * (ggt @ inv_cond).diagonal(dim1=-2, dim2=-1).sum(-1) + kt.beta * a.trace()
            return 0.5 * quad - x[0].numel() * rate.float()

    # ------------------------------------------------------------------------------------------ generation
    def prior_sample(self, num_samples: int, ctx: Context, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn((num_samples, *self.state_shape), device=self.device(), generator=generator)

    def ancestral_step(
        self, x_t: Tensor, t: Tensor, s: Tensor, ctx: Context, predict: Predictor, noise: Tensor
    ) -> Tensor:
        """``y_s ~ N(C_y y_t + C_eps eps_hat, P)``: :meth:`posterior` with the model's ``eps_hat`` for ``eps``."""
        t, s = t.reshape(-1), s.reshape(-1)
        n = t.numel()
        kt = self.kernel(t)
        eps_hat = predict(x_t, self._marginal(kt))
        with float32_region(x_t):
            if n > 1 and bool((t == t[0]).all() & (s == s[0]).all()):  # the samplers' case: one step for all
                c_y, c_eps, cov = self.posterior(self._kernel(t[:1]), self._kernel(s[:1]))
            else:
                c_y, c_eps, cov = self.posterior(kt, self.kernel(s))
            c_y, c_eps, root = (c.expand(n, -1, -1) for c in (c_y, c_eps, _psd_sqrt(cov)))
            out = _apply(c_y, x_t.float(), self.num_vars) + _apply(c_eps, eps_hat.float(), self.num_vars)
            return out + _apply(root, noise.float(), self.num_vars)

    def ode_drift(self, x: Tensor, t: Tensor, ctx: Context, predict: Predictor) -> Tensor:
        """``dy/dt = beta (A y + D L_t^-T eps_hat)`` in ``x``'s dtype: the probability-flow ODE ``F y - G G^T s / 2``
        with the model's score ``s = -L_t^-T eps_hat``."""
        t = t.to(x.dtype).expand(x.shape[0]) if t.dim() == 0 else t.to(x.dtype)
        k = self.kernel(t)
        eps_hat = predict(x, self._marginal(k))
        with float32_region(x):
            a, d = self.drift_matrix()
            beta = k.beta[:, None, None]
            eye = torch.eye(self.num_vars, dtype=torch.float64, device=x.device).expand_as(k.chol)
            score_map = torch.linalg.solve_triangular(k.chol, eye, upper=False).mT  # L_t^-T
            linear = _apply((beta * a).to(x.dtype), x, self.num_vars)
            return linear + _apply((beta * d @ score_map).to(x.dtype), eps_hat.to(x.dtype), self.num_vars)

    def decode(
        self, x_0: Tensor, ctx: Context, mode: str | None = "argmax", generator: torch.Generator | None = None
    ) -> Tensor:
        """The 256-way decoder on the data coordinate: ``z~ = y_0,data / alpha_0``, noise level ``gamma_min``; for
        ``mode=None`` the data coordinate ``y_0,data`` (N, C, H, W) itself."""
        elbo.check_decode_mode(mode)
        data = x_0[:, : self.image_shape[0]]
        if mode is None:
            return data
        with float32_region(x_0):
            gamma_0 = torch.full((1, 1, 1, 1), self.gamma_min, device=x_0.device)
            return elbo.decode_bins(data.float() / self.alpha_0, gamma_0, mode, generator)

    def initial_auxiliaries(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(x, v_0)`` with ``v_0 ~ N(0, s^2 I)`` from ``generator`` (the auxiliaries' initial distribution,
        ``s^2 = aux_init_var``): (B, (K+1) C, H, W) in ``x``'s dtype, channels as the state's; and
        ``log q(v_0) = sum log N(v_0; 0, s^2)`` (B,) nats at the values used (drawn and computed in float64, returned
        in ``x``'s dtype). ``K = 0``: ``x`` and 0, drawing nothing (so the generator's stream is VDM's)."""
        if self.num_aux == 0:
            return super().initial_auxiliaries(x, generator)
        b, c, h, w = x.shape
        v = torch.randn((b, self.num_aux * c, h, w), generator=generator, device=x.device, dtype=torch.float64)
        v = (math.sqrt(self.aux_init_var) * v).to(x.dtype)  # the same draws whatever the dtype
        log_q = -0.5 * (v.double().square() / self.aux_init_var + math.log(2 * math.pi * self.aux_init_var))
        return torch.cat([x, v], 1), log_q.flatten(1).sum(1).to(x.dtype)

    def dequantisation_scale(self, ctx: Context, batch_size: int) -> Tensor:
        """``sigma_0 / alpha_0 = exp(gamma_min / 2)``, the data coordinate's initial noise in data units (as VDM's),
        float32 (1, 1, 1, 1)."""
        return torch.exp(0.5 * torch.full((1, 1, 1, 1), self.gamma_min, device=self.device()))

    def extra_repr(self) -> str:
        return f"num_aux={self.num_aux}, time_change={self.time_change_kind!r}"
