"""Diagonal Gaussian processes ``x_t = alpha_t x + sigma_t eps`` defined by a noise schedule ``gamma(t)``.

``gamma`` is the negative log-SNR, scalar (VDM) or one value per data dimension (MuLAN), increasing in ``t``;
``sigma^2 = sigmoid(gamma)``, ``alpha^2 = sigmoid(-gamma)`` (docs: math, sections 1-2). A subclass only says what
``gamma(t, context)`` and ``d gamma / d t`` are (:meth:`DiagonalProcess.gamma_and_derivative`); this class turns
them into the terms of the bound (section 4), the ancestral step (section 5) and the probability-flow ODE
(section 6), all element-wise per dimension.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mulan import elbo
from mulan.processes.base import Context, ForwardProcess, ImageShape, Marginal, Predictor, as_context
from mulan.utils import float32_region

ENDPOINT_PROBE_SIZE = 4
"""Contexts in the probe on which a declaration ``fixed_endpoints = True`` is checked at construction."""
ENDPOINT_TOLERANCE = 1e-5
"""Float32 tolerance of that check, relative to ``max(1, |gamma_min|, |gamma_max|)``."""


def _perturb(p: Tensor, generator: torch.Generator) -> Callable[[], None]:
    """Perturb the parameter ``p`` in place, exactly reversibly; return the function that restores it.

    A tensor with a non-zero entry is multiplied by powers of two: a scalar by 2, a vector entry-wise by 2 or 4, a
    matrix or kernel by ``2^(a_i + b_j)`` (``a``, ``b`` random bits over its rows and the rest); dividing by the same
    factors restores it bit for bit. An all-zero tensor (a zero-initialised layer) gets ``0.1 u_i v_j`` (``u``, ``v``
    standard normal), and is restored by zeroing it. Broadcasting keeps the extra memory at the size of a row.
    """

    def normal(n: int) -> Tensor:
        return torch.randn(n, generator=generator).to(p.device, p.dtype)

    def powers_of_two(n: int) -> Tensor:
        return (2.0 ** torch.randint(0, 2, (n,), generator=generator)).to(p.device, p.dtype)

    zero = not bool(torch.count_nonzero(p))
    if p.dim() <= 1:
        factors = [(0.1 * normal(p.numel()) if zero else 2 * powers_of_two(p.numel())).reshape(p.shape)]
    else:
        draw, ones = (normal if zero else powers_of_two), (1,) * (p.dim() - 1)
        factors = [draw(p.shape[0]).view(-1, *ones), draw(p[0].numel()).view(1, *p.shape[1:])]
        factors[0] = 0.1 * factors[0] if zero else factors[0]
    if zero:
        p.add_(factors[0])
    for factor in factors[1:] if zero else factors:
        p.mul_(factor)

    def restore() -> None:
        if zero:
            p.zero_()
            return
        for factor in reversed(factors):
            p.div_(factor)

    return restore


def _checks_endpoints_after(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a constructor so that, once the outermost one has returned, the declared endpoints are checked."""

    @functools.wraps(init)
    def wrapped(self: DiagonalProcess, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self).__init__ is wrapped:  # the constructor of the object's own class: every attribute is set
            self.check_fixed_endpoints()

    wrapped._checks_endpoints = True  # type: ignore[attr-defined]
    return wrapped


class DiagonalProcess(ForwardProcess):
    """Base class of the schedules: the forward process ``q(x_t | x) = N(alpha_t x, sigma_t^2)`` per dimension.

    Subclasses implement :meth:`gamma_and_derivative`. Calling the process, ``process(t, ctx)``, returns the
    float32 pair ``(gamma, dgamma_dt)``, each broadcastable to the data: (B, 1, 1, 1) for a scalar schedule,
    (B, C, H, W) for a per-dimension one.

    Attributes:
        fixed_endpoints: a subclass's declaration that ``gamma(0) = gamma_min`` and ``gamma(1) = gamma_max`` for
            every context and every value of its trainable parameters; then the reconstruction and prior terms use
            the constants and skip two evaluations of the schedule. Default ``False``: the endpoints are evaluated
            from the schedule, which is right for any schedule. A declaration ``True`` is checked once, when the
            object is built (:meth:`check_fixed_endpoints`), and a schedule that breaks it is refused.
    """

    fixed_endpoints: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_checks_endpoints", False):
            setattr(cls, "__init__", _checks_endpoints_after(init))  # noqa: B010 (mypy: no assignment to a method)

    @_checks_endpoints_after
    def __init__(self, image_shape: ImageShape, gamma_min: float, gamma_max: float) -> None:
        super().__init__(image_shape)
        if not gamma_min < gamma_max:
            raise ValueError(
                f"gamma_min ({gamma_min}) must be smaller than gamma_max ({gamma_max}): gamma is the negative "
                "log-SNR, low (little noise) at t = 0 and high at t = 1."
            )
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

    # ------------------------------------------------------------------------------------------ the schedule
    def gamma_and_derivative(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        """``gamma(t)`` and ``d gamma / d t`` for float32 times ``t`` of shape (B, 1, 1, 1). Subclasses implement."""
        raise NotImplementedError

    def forward(self, t: Tensor, ctx: Context | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``t``: (B,) times in [0, 1]; ``ctx``: a :class:`Context`, or the latent ``z`` alone. Returns float32
        ``(gamma, dgamma_dt)``, autocast off."""
        ctx = as_context(ctx)
        with float32_region(t):
            return self.gamma_and_derivative(t.float().reshape(-1, 1, 1, 1), ctx)

    def gamma(self, t: Tensor, ctx: Context | Tensor | None = None) -> Tensor:
        """``gamma(t)`` alone, shape as :meth:`forward`."""
        return self(t, ctx)[0]

    def endpoint_probe(self, batch_size: int, generator: torch.Generator) -> Context:
        """The contexts on which :meth:`check_fixed_endpoints` evaluates the schedule: ``z`` standard normal
        ``(batch_size, latent_dim)`` when the process has a ``latent_dim`` above 0, no ``y``. A process whose
        schedule reads ``y`` overrides this with a ``y`` it accepts (e.g. :class:`~mulan.processes.CVDM`)."""
        dim = int(getattr(self, "latent_dim", 0) or 0)
        z = torch.randn(batch_size, dim, generator=generator).to(self.device()) if dim else None
        return Context(z=z)

    def check_fixed_endpoints(self) -> None:
        """Refuse a false declaration ``fixed_endpoints = True`` (runs once, at construction).

        On the contexts of :meth:`endpoint_probe`, ``gamma(0)`` must equal ``gamma_min`` and ``gamma(1)`` must equal
        ``gamma_max`` to float32 tolerance (:data:`ENDPOINT_TOLERANCE`), first with the parameters as built, then
        with every trainable parameter perturbed (:func:`_perturb`: rescaled by random powers of two, an all-zero
        tensor filled with small noise; drawn from a fixed seed, the global random state untouched) and then
        restored bit for bit: endpoints that training would move are caught before training. Frozen parameters
        (``requires_grad=False``) and buffers are not perturbed. Skipped for a process that does not declare fixed
        endpoints, or one built on the meta device. Cost: four evaluations of the schedule on 4 contexts and a few
        in-place passes over the trainable parameters, once.
        """
        if not self.fixed_endpoints or any(t.is_meta for t in (*self.parameters(), *self.buffers())):
            return
        name = type(self).__name__
        generator = torch.Generator().manual_seed(0)
        ctx = self.endpoint_probe(ENDPOINT_PROBE_SIZE, generator)
        trainable = [p for p in self.parameters() if p.requires_grad]
        with torch.no_grad():
            self._check_endpoints_on(ctx, name, "")
            restores: list[Callable[[], Any]] = []
            try:
                for p in trainable:
                    restores.append(_perturb(p, generator))
                if trainable:
                    self._check_endpoints_on(ctx, name, " with its trainable parameters perturbed")
            finally:
                for restore in reversed(restores):
                    restore()

    def _check_endpoints_on(self, ctx: Context, name: str, how: str) -> None:
        try:
            zeros = torch.zeros(ENDPOINT_PROBE_SIZE, device=self.device())
            ends = (self.gamma(zeros, ctx), self.gamma(zeros + 1, ctx))
        except Exception as error:
            raise ValueError(
                f"{name} declares fixed_endpoints = True, but its schedule could not be evaluated on the probe context "
                f"({type(error).__name__}: {error}); override endpoint_probe(batch_size, generator) to return a "
                "Context it accepts, or remove the declaration (the endpoints are then evaluated from the schedule)."
            ) from error
        tolerance = ENDPOINT_TOLERANCE * max(1.0, abs(self.gamma_min), abs(self.gamma_max))
        targets = ((0, self.gamma_min, "gamma_min"), (1, self.gamma_max, "gamma_max"))
        for gamma, (t, target, label) in zip(ends, targets, strict=True):
            distance = (gamma.double() - target).abs().max().item()
            if not distance <= tolerance:  # NaN fails too
                off = f"is {distance:.3g} away from" if distance == distance else "is not finite, not"
                raise ValueError(
                    f"{name} declares fixed_endpoints = True, but gamma({t}) {off} {label} = "
                    f"{target} on a probe context{how}: the reconstruction and prior terms would use the constant and "
                    f"misreport the bound. Remove the declaration (the endpoints are then evaluated from the "
                    f"schedule), or make gamma({t}) = {label} for every context and parameter value."
                )

    def endpoints(self, ctx: Context | None, batch_size: int) -> tuple[Tensor, Tensor]:
        """``(gamma(0), gamma(1))``, each broadcastable to the data, float32: the constants ``gamma_min``,
        ``gamma_max`` when the class declares (and construction has checked) ``fixed_endpoints``, else the
        schedule evaluated at ``t = 0`` and ``t = 1``."""
        if self.fixed_endpoints:
            const = torch.ones(batch_size, 1, 1, 1, device=self.device())
            return const * self.gamma_min, const * self.gamma_max
        zeros = torch.zeros(batch_size, device=self.device())
        return self.gamma(zeros, ctx), self.gamma(zeros + 1, ctx)

    def marginal(self, t: Tensor, ctx: Context) -> Marginal:
        gamma, dgamma = self(t, ctx)
        alpha, sigma = elbo.alpha_sigma(gamma)
        return Marginal(gamma=gamma, alpha=alpha, sigma=sigma, dgamma=dgamma)

    def _coefficients(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor, Marginal]:
        """``alpha``, ``sigma``, ``dgamma`` and the :class:`Marginal` holding them (with ``gamma``) at times ``t``."""
        m = self.marginal(t, ctx)
        assert m.alpha is not None and m.sigma is not None and m.dgamma is not None
        return m.alpha, m.sigma, m.dgamma, m

    # ------------------------------------------------------------------------------------------ the bound
    def diffusion_loss(
        self, x: Tensor, t: Tensor, ctx: Context, predict: Predictor, eps: Tensor | None = None, steps: int = 0
    ) -> Tensor:
        """Continuous time: ``1/2 sum_i gamma'_i(t) (eps_i - eps_hat_i)^2``; ``T`` steps: ``t`` moved to the grid
        ``ceil(t T) / T``, ``s = t - 1/T`` and ``1/2 T sum_i expm1(gamma_t,i - gamma_s,i) (eps_i - eps_hat_i)^2``."""
        eps = torch.randn_like(x) if eps is None else eps
        if steps:
            t, s = elbo.discretise_times(t, steps)
            gamma_s = self.gamma(s, ctx)
        alpha, sigma, dgamma, m = self._coefficients(t, ctx)
        x_t = alpha * x + sigma * eps
        eps_hat = predict(x_t, m)
        with float32_region(x):
            if steps:
                return elbo.discrete_diffusion_loss(eps, eps_hat, m.gamma, gamma_s, steps)
            return elbo.diffusion_loss(eps, eps_hat, dgamma)

    def prior_loss(self, x: Tensor, ctx: Context) -> Tensor:
        with float32_region(x):
            return elbo.prior_loss(x, self.endpoints(ctx, x.shape[0])[1])

    def reconstruction_loss(self, images: Tensor, ctx: Context, noise: Tensor | None = None) -> Tensor:
        with float32_region(images):
            return elbo.reconstruction_loss(images, self.endpoints(ctx, images.shape[0])[0], noise)

    # ------------------------------------------------------------------------------------------ generation
    def prior_sample(self, num_samples: int, ctx: Context, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn((num_samples, *self.state_shape), device=self.device(), generator=generator)

    def ancestral_step(
        self, x_t: Tensor, t: Tensor, s: Tensor, ctx: Context, predict: Predictor, noise: Tensor
    ) -> Tensor:
        """``c = -expm1(gamma_s - gamma_t) = 1 - SNR_t / SNR_s`` and, element-wise,
        ``x_s = (alpha_s / alpha_t) (x_t - sigma_t c eps_hat) + sigma_s sqrt(c) noise``."""
        _, sigma_t, _, m = self._coefficients(t, ctx)
        gamma_s = self.gamma(s, ctx)
        eps_hat = predict(x_t, m)
        with float32_region(x_t):
            c = -torch.expm1(gamma_s - m.gamma)
            sigma_s = elbo.alpha_sigma(gamma_s)[1]
            alpha_ratio = torch.exp(0.5 * (F.logsigmoid(-gamma_s) - F.logsigmoid(-m.gamma)))
            return alpha_ratio * (x_t - sigma_t * c * eps_hat) + sigma_s * c.clamp_min(0).sqrt() * noise

    def ode_drift(self, x: Tensor, t: Tensor, ctx: Context, predict: Predictor) -> Tensor:
        """``dx/dt = 1/2 sigma_t gamma'_t (eps_hat - sigma_t x)`` in ``x``'s dtype (float32 or float64): the SDE
        ``dx = f x dt + g dW`` with ``f = -sigma^2 gamma' / 2`` and ``g^2 = sigma^2 gamma'`` has these marginals, and
        its probability-flow ODE is ``f x - g^2 score / 2`` with ``score = -eps_hat / sigma``."""
        t = t.to(x.dtype).expand(x.shape[0]) if t.dim() == 0 else t.to(x.dtype)
        with float32_region(x):
            gamma, dgamma = self.gamma_and_derivative(t.reshape(-1, 1, 1, 1), ctx)
            gamma, dgamma = gamma.to(x.dtype), dgamma.to(x.dtype)
            alpha, sigma = elbo.alpha_sigma(gamma)
        eps_hat = predict(x, Marginal(gamma=gamma, alpha=alpha, sigma=sigma, dgamma=dgamma))
        with float32_region(x):
            return 0.5 * sigma * dgamma * (eps_hat.to(x.dtype) - sigma * x)

    def decode(
        self, x_0: Tensor, ctx: Context, mode: str | None = "argmax", generator: torch.Generator | None = None
    ) -> Tensor:
        """The 256-way decoder ``p(x | x_0)``: ``z~ = x_0 / alpha_0``, logits ``-(z~ - e(v))^2 / (2 e^gamma_0)``."""
        elbo.check_decode_mode(mode)
        if mode is None:
            return x_0
        with float32_region(x_0):
            gamma_0 = self.endpoints(ctx, x_0.shape[0])[0].float()
            alpha_0 = elbo.alpha_sigma(gamma_0)[0]
            return elbo.decode_bins(x_0.float() / alpha_0, gamma_0, mode, generator)

    def dequantisation_scale(self, ctx: Context, batch_size: int) -> Tensor:
        """``sigma_0 / alpha_0 = exp(gamma(0) / 2)``, float32, broadcastable to the data."""
        return torch.exp(0.5 * self.endpoints(ctx, batch_size)[0].float())
