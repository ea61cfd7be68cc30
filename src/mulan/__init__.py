"""mulan: likelihood-trained diffusion models with learned noise processes (MuLAN, VDM and their relatives).

The names below are the stable public API of the pure-torch core. Importing :mod:`mulan` does not import
Lightning, nor torch: each name's module is imported when the name is first used (``mulan.KHotLatent``,
``from mulan import KHotLatent``). The training wiring lives in :mod:`mulan.lightning` (import it explicitly) and
the command line in :mod:`mulan.cli`.

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

import importlib
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (PEP 562): `import mulan` does not import torch
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

_HOMES: dict[str, str] = {
    **dict.fromkeys(
        [
            "alpha_sigma",
            "diffusion_loss",
            "discrete_diffusion_loss",
            "nats_to_bpd",
            "prior_loss",
            "reconstruction_loss",
            "to_unit_interval",
        ],
        "mulan.elbo",
    ),
    **dict.fromkeys(
        ["GaussianLatent", "KHotLatent", "Latent", "LatentSample", "NoLatent", "log_binomial"], "mulan.latents"
    ),
    **dict.fromkeys(["ODELikelihood", "dense_elbo", "dense_elbo_dataset", "ode_likelihood"], "mulan.likelihood"),
    **dict.fromkeys(["Bound", "DiffusionModel"], "mulan.model"),
    **dict.fromkeys(["UNet"], "mulan.networks"),
    **dict.fromkeys(["Data", "Epsilon", "Parameterisation", "Velocity"], "mulan.parameterisation"),
    **dict.fromkeys(
        [
            "GAMMA_MAX",
            "GAMMA_MIN",
            "Context",
            "DiagonalProcess",
            "FixedLinear",
            "ForwardProcess",
            "LearnedScalar",
            "Marginal",
            "MonotoneNN",
            "NoiseSchedule",
            "Polynomial",
        ],
        "mulan.processes",
    ),
    **dict.fromkeys(["SampleResult", "ancestral_sample", "dpm_solver_sample", "ode_sample"], "mulan.sampling"),
    **dict.fromkeys(["AntitheticUniform", "TimeSampler", "antithetic_uniform"], "mulan.time_sampling"),
}
"""Where each public name lives: ``mulan.X`` imports its module the first time ``X`` is used, so that
``import mulan`` (and ``mulan-cli --help``, which imports it) stays fast and does not import torch."""


def __getattr__(name: str) -> Any:
    """A public name from its module (imported now, then cached on the package); a submodule (``mulan.elbo``) by
    its name."""
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


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
