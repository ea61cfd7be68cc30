"""The auxiliary latent ``z`` of MuLAN: posteriors ``q(z | x)``, priors ``p(z)``, their costs (docs: math, section 3).

A latent is built as ``Latent(image_shape, **options)`` and called on images ``x`` in [-1, 1], (B, C, H, W):
it returns a :class:`LatentSample` with ``z`` (B, m) and two KL costs per example in nats. ``kl`` enters the
bound; ``kl_surrogate`` is what the MuLAN reference code charges, kept to compare with the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.networks import ImageEncoder
from mulan.processes.base import ImageShape
from mulan.utils import warn_once


@dataclass
class LatentSample:
    """``z``: (B, m) or None; ``kl``: (B,) nats in the bound; ``kl_surrogate``: (B,) nats reported beside the bound
    for comparison with the MuLAN reference code, or None for latents without one."""

    z: Tensor | None
    kl: Tensor
    kl_surrogate: Tensor | None = None


class Latent(nn.Module):
    """Base class: ``dim`` is the size of ``z`` (0: none); ``surrogate``: declares that samples carry a surrogate
    cost (``kl_surrogate``). The declaration only lets the model name it in advance (:attr:`DiffusionModel.term_names
    <mulan.model.DiffusionModel.term_names>`): a surrogate that a latent returns without declaring it is still
    reported."""

    dim: int = 0
    surrogate: bool = False

    def forward(self, x: Tensor) -> LatentSample:
        raise NotImplementedError

    def sample_prior(self, batch_size: int, device: torch.device | None = None) -> Tensor | None:
        """``z ~ p(z)``: (B, m), or None without a latent."""
        raise NotImplementedError


class NoLatent(Latent):
    """VDM: no latent; both KL terms are zero."""

    def __init__(self, image_shape: ImageShape) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> LatentSample:
        return LatentSample(None, x.new_zeros(x.shape[0], dtype=torch.float32))

    def sample_prior(self, batch_size: int, device: torch.device | None = None) -> Tensor | None:
        return None


def sum_of_gamma_noise(shape: torch.Size, k: int, tau: float = 10.0, s: int = 10, device=None) -> Tensor:
    """``eta = (tau / k) [sum_{i=1..s} G_i - log s]``, ``G_i ~ Gamma(shape 1/k, scale i/k)``."""
    i = torch.arange(1, s + 1, device=device, dtype=torch.float32)
    gamma = torch.distributions.Gamma(torch.full_like(i, 1.0 / k), k / i)  # rate = 1 / scale
    return (tau / k) * (gamma.sample(shape).sum(-1) - math.log(s))


def khot(logits: Tensor, k: int) -> Tensor:
    """Hard top-``k`` indicator of the last dimension, same shape and dtype as ``logits``."""
    return torch.zeros_like(logits).scatter_(-1, logits.topk(k, dim=-1).indices, 1.0)


def log_binomial(m: int, k: int) -> float:
    """``log C(m, k)`` in nats."""
    return math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1)


LATENT_COST_WARNING_BPD = 0.05
"""A k-hot latent whose honest cost exceeds this many bits/dim (about 1.5% of a natural-image bound of 3-4
bits/dim) is reported at start-up."""


def latent_cost_bpd(m: int, k: int, num_dims: int) -> float:
    """The honest cost ``log C(m, k) / (D ln 2)`` of a k-hot latent, in bits/dim of ``D``-dimensional data."""
    return log_binomial(m, k) / (num_dims * math.log(2))


def warn_if_costly(m: int, k: int, num_dims: int) -> None:
    """Warn when the latent's cost is a noticeable part of the bound (:data:`LATENT_COST_WARNING_BPD`)."""
    cost = latent_cost_bpd(m, k, num_dims)
    if cost > LATENT_COST_WARNING_BPD:
        warn_once(  # once per process, attributed to the user's line (not jsonargparse's)
            f"KHotLatent: a {k}-hot latent of m={m} costs log C({m}, {k}) = {log_binomial(m, k):.2f} nats per image, "
            f"{cost:.3f} bits/dim on these D={num_dims}-dimensional images, which every bound this model reports "
            f"includes. Choose a smaller latent for small images (cost below {LATENT_COST_WARNING_BPD} bits/dim), "
            "e.g. m=16, k=4 for 3x16x16.",
            UserWarning,
        )


class KHotLatent(Latent):
    """``z`` in ``{0, 1}^m`` with exactly ``k`` ones; prior uniform over all k-hot vectors.

    Training samples perturb the encoder logits with Sum-of-Gamma (default) or Gumbel noise, centre them, and
    take the top-``k`` indicator; gradients flow by "identity with projection":
    ``z = stopgrad(hard - soft) + soft`` with ``soft = l~ / ||l~||``.

    ``kl`` is ``log C(m, k)``: an upper bound on ``KL(q || p)`` for any posterior over k-hot vectors, exact for a
    deterministic one, so the bound stays a bound. ``kl_surrogate`` is the reference code's
    ``KL(softmax(l) || Uniform(m))`` (at most ``log m``), which is not the KL of the k-hot posterior.

    Args:
        noise: ``"sum_of_gamma"`` or ``"gumbel"``: the perturbation while training.
        deterministic_eval: in eval mode take the top-``k`` of the unperturbed logits.
    """

    surrogate = True

    def __init__(
        self,
        image_shape: ImageShape,
        m: int = 50,
        k: int = 15,
        noise: str = "sum_of_gamma",
        tau: float = 10.0,
        s: int = 10,
        channels: int = 64,
        num_blocks: int = 4,
        deterministic_eval: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < k < m:
            raise ValueError(f"KHotLatent: need 0 < k < m for a k-hot latent, got m={m}, k={k}.")
        if noise not in ("sum_of_gamma", "gumbel"):
            raise ValueError(f"KHotLatent: noise must be 'sum_of_gamma' or 'gumbel', got {noise!r}.")
        warn_if_costly(m, k, math.prod(image_shape))
        self.dim, self.k, self.noise, self.tau, self.s = m, k, noise, tau, s
        self.deterministic_eval = deterministic_eval
        self.encoder = ImageEncoder(image_shape, m, channels, num_blocks)

    def perturb(self, logits: Tensor) -> Tensor:
        if self.noise == "gumbel":
            u = torch.rand_like(logits).clamp_(1e-10, 1.0)
            return logits - torch.log(-torch.log(u))
        return logits + sum_of_gamma_noise(logits.shape, self.k, self.tau, self.s, logits.device)

    def straight_through(self, logits: Tensor) -> Tensor:
        """Hard top-k forward, identity-with-projection backward: (B, m) -> (B, m)."""
        centred = logits - logits.mean(-1, keepdim=True)
        soft = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        # hard + (soft - stopgrad(soft)): the gradient of stopgrad(hard - soft) + soft, and a forward value
        # that is exactly the 0/1 indicator ((hard - soft) + soft can round 1 to 1 - 2^-24).
        return khot(centred, self.k) + (soft - soft.detach())

    def forward(self, x: Tensor) -> LatentSample:
        logits = self.encoder(x)
        if self.training or not self.deterministic_eval:
            logits_t = self.perturb(logits)
        else:
            logits_t = logits
        z = self.straight_through(logits_t)
        kl = logits.new_full((x.shape[0],), log_binomial(self.dim, self.k))
        surrogate = (F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1) + math.log(self.dim)
        return LatentSample(z, kl, surrogate)

    def sample_prior(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        return khot(torch.randn(batch_size, self.dim, device=device), self.k)


class GaussianLatent(Latent):
    """``q(z | x) = N(mu(x), diag exp(log_var(x)))``, prior ``N(0, I)``, reparameterised; analytic KL."""

    def __init__(self, image_shape: ImageShape, m: int = 50, channels: int = 64, num_blocks: int = 4) -> None:
        super().__init__()
        self.dim = m
        self.encoder = ImageEncoder(image_shape, 2 * m, channels, num_blocks)

    def forward(self, x: Tensor) -> LatentSample:
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        kl = 0.5 * (mu.square() + log_var.exp() - log_var - 1).sum(-1)
        return LatentSample(z, kl)

    def sample_prior(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        return torch.randn(batch_size, self.dim, device=device)


LatentFactory = Callable[[ImageShape], Latent]
"""What a config gives for a latent: a class (plus options) called with ``image_shape``."""
