"""What the denoiser predicts: the noise ``eps``, the velocity ``v`` or the data ``x`` (docs: math, section 6b).

For a diagonal process ``x_t = alpha x + sigma eps`` (per dimension, ``alpha^2 + sigma^2 = 1``) each choice is a
change of variables of the same prediction:

    eps:  eps_hat = out
    v:    v = alpha eps - sigma x,   eps_hat = alpha v_hat + sigma x_t       (so eps - eps_hat = alpha (v - v_hat))
    x:    eps_hat = (x_t - alpha x_hat) / sigma

Every process consumes ``eps_hat``, so the bound, the ancestral step and the ODE drift are the same functions of
matched predictions whatever the parameterisation; what changes is how the network's output error is weighted
in training (``v``: ``1/2 sum alpha^2 gamma' (v - v_hat)^2``). Conversions run in float32.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from mulan.processes.base import Marginal


class Parameterisation:
    """Maps the denoiser's output to ``eps_hat`` (:meth:`to_eps`); :meth:`target` is what the output should be."""

    name = "base"

    def to_eps(self, output: Tensor, x_t: Tensor, m: Marginal) -> Tensor:
        """``eps_hat`` from the denoiser's ``output`` at state ``x_t`` (both (B, ...)) and the marginal ``m``."""
        raise NotImplementedError

    def target(self, x: Tensor, eps: Tensor, m: Marginal) -> Tensor:
        """The output an exact denoiser gives for data ``x`` and noise ``eps``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _alpha_sigma(m: Marginal, name: str) -> tuple[Tensor, Tensor]:
    if m.alpha is None or m.sigma is None:
        raise ValueError(
            f"the {name} parameterisation needs a process of the form x_t = alpha x + sigma eps; this process has "
            "no alpha/sigma. Use mulan.parameterisation.Epsilon."
        )
    return m.alpha, m.sigma


class Epsilon(Parameterisation):
    """The network predicts the noise: ``eps_hat = output`` (VDM, MuLAN's ImageNet-32 model)."""

    name = "eps"

    def to_eps(self, output: Tensor, x_t: Tensor, m: Marginal) -> Tensor:
        return output.float()

    def target(self, x: Tensor, eps: Tensor, m: Marginal) -> Tensor:
        return eps


class Velocity(Parameterisation):
    """The network predicts ``v = alpha eps - sigma x`` (MuLAN's CIFAR-10 model); ``eps_hat = alpha v + sigma x_t``."""

    name = "v"

    def to_eps(self, output: Tensor, x_t: Tensor, m: Marginal) -> Tensor:
        alpha, sigma = _alpha_sigma(m, "v")
        return alpha * output.float() + sigma * x_t.float()

    def target(self, x: Tensor, eps: Tensor, m: Marginal) -> Tensor:
        alpha, sigma = _alpha_sigma(m, "v")
        return alpha * eps - sigma * x


class Data(Parameterisation):
    """The network predicts the clean data: ``eps_hat = (x_t - alpha x_hat) / sigma``."""

    name = "x"

    def to_eps(self, output: Tensor, x_t: Tensor, m: Marginal) -> Tensor:
        alpha, sigma = _alpha_sigma(m, "x")
        return (x_t.float() - alpha * output.float()) / sigma

    def target(self, x: Tensor, eps: Tensor, m: Marginal) -> Tensor:
        return x


ParameterisationFactory = Callable[[], Parameterisation]
"""What a config gives: a parameterisation class (``mulan.parameterisation.Velocity``)."""
