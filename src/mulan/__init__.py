"""mulan: likelihood-trained diffusion models with learned noise processes (MuLAN, VDM and their relatives).

The names below are the stable public API of the pure-torch core. Importing :mod:`mulan` does not import
Lightning; the training wiring lives in :mod:`mulan.lightning` (import it explicitly) and the command line in
:mod:`mulan.cli`.

```python
import mulan

model = mulan.DiffusionModel(
    (1, 8, 8),
    process=mulan.Polynomial((1, 8, 8), latent_dim=10),
    denoiser=mulan.UNet((1, 8, 8), latent_dim=10, channels=16, num_blocks=1),
    latent=mulan.KHotLatent((1, 8, 8), m=10, k=3, channels=8, num_blocks=1),
    parameterisation=mulan.Velocity(),
)
```
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from mulan.elbo import (
    alpha_sigma,
    diffusion_loss,
    discrete_diffusion_loss,
    nats_to_bpd,
    prior_loss,
    reconstruction_loss,
    to_unit_interval,
)
from mulan.latents import GaussianLatent, KHotLatent, Latent, LatentSample, NoLatent, log_binomial
from mulan.likelihood import ODELikelihood, dense_elbo, dense_elbo_dataset, ode_likelihood
from mulan.model import Bound, DiffusionModel
from mulan.networks import UNet
from mulan.parameterisation import Data, Epsilon, Parameterisation, Velocity
from mulan.processes import (
    GAMMA_MAX,
    GAMMA_MIN,
    Context,
    DiagonalProcess,
    FixedLinear,
    ForwardProcess,
    LearnedScalar,
    Marginal,
    MonotoneNN,
    NoiseSchedule,
    Polynomial,
)
from mulan.sampling import SampleResult, ancestral_sample, dpm_solver_sample, ode_sample
from mulan.time_sampling import AntitheticUniform, TimeSampler, antithetic_uniform

try:
    __version__ = version("mulan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    # forward processes and schedules
    "ForwardProcess",
    "DiagonalProcess",
    "Context",
    "Marginal",
    "NoiseSchedule",
    "FixedLinear",
    "LearnedScalar",
    "MonotoneNN",
    "Polynomial",
    "GAMMA_MIN",
    "GAMMA_MAX",
    # latents
    "Latent",
    "LatentSample",
    "NoLatent",
    "KHotLatent",
    "GaussianLatent",
    "log_binomial",
    # denoiser, parameterisation, time sampling, model
    "UNet",
    "Parameterisation",
    "Epsilon",
    "Velocity",
    "Data",
    "TimeSampler",
    "AntitheticUniform",
    "antithetic_uniform",
    "DiffusionModel",
    "Bound",
    # terms of the bound
    "alpha_sigma",
    "to_unit_interval",
    "reconstruction_loss",
    "prior_loss",
    "diffusion_loss",
    "discrete_diffusion_loss",
    "nats_to_bpd",
    # evaluation and sampling
    "dense_elbo",
    "dense_elbo_dataset",
    "ode_likelihood",
    "ODELikelihood",
    "ancestral_sample",
    "dpm_solver_sample",
    "ode_sample",
    "SampleResult",
    "__version__",
]
