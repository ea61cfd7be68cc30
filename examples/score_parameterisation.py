"""A new parameterisation in one class: the denoiser predicts the score ``grad log q(x_t | x) = -eps / sigma``.

Every process consumes ``eps_hat``, so the bound, the samplers and the ODE work unchanged (docs: math,
section 6b); only how the network's error is weighted in training changes. The YAML beside this file trains a
VDM with it:

    python -m mulan fit --config examples/score_parameterisation.yaml        (from the repository root)
"""

from __future__ import annotations

from torch import Tensor

from mulan.parameterisation import Parameterisation
from mulan.processes import Marginal


# --8<-- [start:Score]
class Score(Parameterisation):
    """The network predicts the score ``s = -eps / sigma``: ``eps_hat = -sigma s_hat``."""

    name = "score"

    def to_eps(self, output: Tensor, x_t: Tensor, m: Marginal) -> Tensor:
        assert m.sigma is not None, "Score needs a process of the form x_t = alpha x + sigma eps"
        return -m.sigma * output.float()

    def target(self, x: Tensor, eps: Tensor, m: Marginal) -> Tensor:
        assert m.sigma is not None, "Score needs a process of the form x_t = alpha x + sigma eps"
        return -eps / m.sigma


# --8<-- [end:Score]
