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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan import elbo
from mulan.processes.base import Context, ForwardProcess, ImageShape, Marginal, Predictor
from mulan.utils import float32_region

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0  # VDM's endpoints (mulan.schedules imports this package, so not imported here)
TIME_CHANGES = ("log_snr", "linear_beta")
DECODE_MODES = ("argmax", "sample", None)


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
        if mode not in DECODE_MODES:
            raise ValueError(f"decode must be 'argmax', 'sample' or None, got {mode!r}.")
        data = x_0[:, : self.image_shape[0]]
        if mode is None:
            return data
        with float32_region(x_0):
            gamma_0 = torch.full((1, 1, 1, 1), self.gamma_min, device=x_0.device)
            logits = elbo.decoder_logits(data.float() / self.alpha_0, gamma_0)
            if mode == "argmax":
                values = logits.argmax(-1)
            else:
                probs = torch.softmax(logits, -1).reshape(-1, elbo.NUM_BINS)
                values = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
        return values.to(torch.uint8)

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
