"""A new noise schedule in one class: a cosine schedule with exactly fixed endpoints.

The cosine schedule of Nichol & Dhariwal sets ``alpha_t = cos(theta)``, ``sigma_t = sin(theta)``, so
``gamma = -log SNR = 2 log tan(theta)``. Letting ``theta`` run linearly from ``theta_min`` to ``theta_max``,
chosen so that ``gamma(0) = gamma_min`` and ``gamma(1) = gamma_max``, gives

    gamma(t)    = 2 log tan(theta(t)),    theta(t) = theta_min + (theta_max - theta_min) t
    dgamma/dt   = 4 (theta_max - theta_min) / sin(2 theta(t))

Because the endpoints are fixed, the reconstruction and prior terms are the same as for any other schedule
with those endpoints; the class declares it (``fixed_endpoints = True``, which construction checks), so the bound
uses the constants. Only the diffusion term changes. Use it from YAML with
``examples/cosine_schedule.yaml``::

    python -m mulan fit --config examples/cosine_schedule.yaml
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mulan.processes import Context, ImageShape
from mulan.processes.schedules import GAMMA_MAX, GAMMA_MIN, NoiseSchedule


# --8<-- [start:CosineSchedule]
class CosineSchedule(NoiseSchedule):
    """Scalar cosine schedule ``gamma = 2 log tan(theta(t))`` between fixed endpoints (not learned).

    Args:
        image_shape: ``(C, H, W)`` of the data (unused: the schedule is scalar, but every schedule takes it).
        latent_dim: size of ``z`` (unused: the schedule does not adapt to ``z``).
        gamma_min, gamma_max: ``gamma(0)`` and ``gamma(1)``.
    """

    multivariate = False
    fixed_endpoints = True  # gamma(0) = gamma_min and gamma(1) = gamma_max exactly (checked when built)

    def __init__(
        self,
        image_shape: ImageShape,
        latent_dim: int,
        gamma_min: float = GAMMA_MIN,
        gamma_max: float = GAMMA_MAX,
    ) -> None:
        super().__init__(image_shape, latent_dim, gamma_min, gamma_max)
        # tan(theta) = exp(gamma / 2)  <=>  theta = atan(exp(gamma / 2))
        self.theta_min = math.atan(math.exp(self.gamma_min / 2))
        self.theta_max = math.atan(math.exp(self.gamma_max / 2))
        # A schedule without parameters needs a buffer so that `endpoints` finds the device.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def gamma_and_derivative(self, t: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        # t: float32 (B, 1, 1, 1); the base class has disabled autocast.
        span = self.theta_max - self.theta_min
        theta = self.theta_min + span * t
        gamma = 2 * torch.log(torch.tan(theta))
        dgamma_dt = 4 * span / torch.sin(2 * theta)
        return gamma, dgamma_dt


# --8<-- [end:CosineSchedule]


def main() -> dict[str, float]:
    """Check the endpoints and the derivative; train a tiny VDM with this schedule for 2 steps via the CLI."""
    import tempfile
    from pathlib import Path

    schedule = CosineSchedule((1, 8, 8), latent_dim=0)
    t = torch.linspace(0, 1, 101, requires_grad=True)
    gamma, dgamma = schedule(t)
    (autograd,) = torch.autograd.grad(gamma.sum(), t)
    error = (autograd - dgamma.flatten()).abs().max().item()
    print(f"gamma(0) = {gamma[0].item():.4f}, gamma(1) = {gamma[-1].item():.4f}")
    print(f"max |dgamma/dt - autograd| = {error:.2e}")

    from mulan.cli import main as cli

    config = Path(__file__).with_name("cosine_schedule.yaml")
    with tempfile.TemporaryDirectory() as root:
        cli(["fit", "--config", str(config), "--trainer.default_root_dir", root, "--trainer.max_steps", "2"])
    return {"gamma_0": gamma[0].item(), "gamma_1": gamma[-1].item(), "derivative_error": error}


if __name__ == "__main__":
    main()
