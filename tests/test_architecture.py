"""The component interfaces: parameterisations are changes of variables of one prediction, the time sampler's
weights enter the bound, the model's forward pass takes injected noise, and old configurations are told what to
rename."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mulan.cli import main
from mulan.model import DiffusionModel
from mulan.parameterisation import Data, Epsilon, Parameterisation, Velocity
from mulan.processes import Context, Marginal
from mulan.schedules import LearnedScalar, Polynomial
from mulan.time_sampling import AntitheticUniform, TimeSampler

SHAPE = (2, 3, 3)
CONF = Path(__file__).parent / "conf"


def _noise_predictor(x_t: Tensor, gamma: Tensor) -> Tensor:
    """A smooth, non-trivial ``eps_hat(x_t, gamma)`` (not the identity; depends on the noise level per dimension)."""
    return torch.tanh(1.3 * x_t + 0.1 * gamma) + 0.2 * torch.sin(x_t * gamma.expand_as(x_t))


class Matched(nn.Module):
    """Outputs, for parameterisation ``p``, the value whose ``eps_hat`` is :func:`_noise_predictor`'s."""

    def __init__(self, parameterisation: Parameterisation) -> None:
        super().__init__()
        self.parameterisation = parameterisation
        self.register_buffer("anchor", torch.zeros(()))

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        eps_hat = _noise_predictor(x_t, gamma)
        alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
        if isinstance(self.parameterisation, Velocity):
            return (eps_hat - sigma * x_t) / alpha
        if isinstance(self.parameterisation, Data):
            return (x_t - sigma * eps_hat) / alpha
        return eps_hat


def _process() -> Polynomial:
    torch.manual_seed(0)
    process = Polynomial(SHAPE, 4, hidden=8)
    with torch.no_grad():
        process.head_a.weight.normal_(0, 0.5)  # a genuinely per-dimension, non-linear schedule
    return process


PARAMETERISATIONS = [Epsilon(), Velocity(), Data()]


@pytest.mark.parametrize("p", PARAMETERISATIONS, ids=lambda p: p.name)
def test_target_round_trips_to_the_noise(p: Parameterisation) -> None:
    g = torch.Generator().manual_seed(1)
    x, eps = torch.rand(5, *SHAPE, generator=g) * 2 - 1, torch.randn(5, *SHAPE, generator=g)
    m = _process().marginal(torch.rand(5, generator=g), Context(z=torch.randn(5, 4, generator=g)))
    x_t = m.alpha * x + m.sigma * eps
    torch.testing.assert_close(p.to_eps(p.target(x, eps, m), x_t, m), eps, rtol=1e-4, atol=1e-4)


def test_matched_predictions_give_the_same_loss_ancestral_step_and_ode_drift() -> None:
    process = _process()
    g = torch.Generator().manual_seed(2)
    x, eps = torch.rand(6, *SHAPE, generator=g) * 2 - 1, torch.randn(6, *SHAPE, generator=g)
    t, z = torch.rand(6, generator=g) * 0.9 + 0.05, torch.randn(6, 4, generator=g)
    noise, ctx = torch.randn(6, *SHAPE, generator=g), Context(z=z)
    results = {}
    for p in PARAMETERISATIONS:
        model = DiffusionModel(SHAPE, process, Matched(p), parameterisation=p)
        predict = model.predictor(ctx)
        with torch.no_grad():
            results[p.name] = (
                model.diffusion_term(x, t, ctx, eps),
                process.ancestral_step(x, t, t - 0.05, ctx, predict, noise),
                process.ode_drift(x, t, ctx, predict),
            )
    for name in ("v", "x"):
        for a, b in zip(results["eps"], results[name], strict=True):
            torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-4)
    # and the loss is the closed form 1/2 sum gamma' (eps - eps_hat)^2 = 1/2 sum alpha^2 gamma' (v - v_hat)^2
    m = process.marginal(t, ctx)
    x_t = m.alpha * x + m.sigma * eps
    v, v_hat = Velocity().target(x, eps, m), Matched(Velocity())(x_t, m.gamma)
    by_hand = 0.5 * (m.alpha**2 * m.dgamma * (v - v_hat) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(results["v"][0], by_hand, rtol=2e-4, atol=2e-4)


def test_velocity_needs_alpha_and_sigma() -> None:
    with pytest.raises(ValueError, match="alpha x \\+ sigma eps.*Epsilon"):
        Velocity().to_eps(torch.zeros(1), torch.zeros(1), Marginal(gamma=torch.zeros(1)))


class HalfWeights(TimeSampler):
    """Uniform times with weight 1/2: the diffusion term must be exactly halved."""

    def __call__(self, batch_size, process, ctx, generator=None):
        t, _ = AntitheticUniform()(batch_size, process, ctx, generator)
        return t, torch.full((batch_size,), 0.5)


def test_time_sampler_weights_multiply_the_diffusion_term_only() -> None:
    images = torch.randint(0, 256, (4, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    terms = {}
    for name, sampler in (("plain", AntitheticUniform()), ("half", HalfWeights())):
        model = DiffusionModel(SHAPE, LearnedScalar(SHAPE, 0), Matched(Epsilon()), time_sampler=sampler)
        torch.manual_seed(4)
        terms[name] = model(images)
    for term in ("recon", "prior", "latent"):
        torch.testing.assert_close(terms["half"][term], terms["plain"][term])
    torch.testing.assert_close(terms["half"].diffusion, 0.5 * terms["plain"].diffusion)


def test_forward_takes_injected_noise_and_checks_times() -> None:
    model = DiffusionModel(SHAPE, LearnedScalar(SHAPE, 0), Matched(Epsilon()))
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8, generator=g)
    t, eps, noise = torch.rand(3, generator=g), torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g)
    torch.manual_seed(0)
    a = model(images, t=t, eps=eps, recon_noise=noise)
    torch.manual_seed(1)  # different global draws: nothing random is left
    b = model(images, t=t, eps=eps, recon_noise=noise)
    for name, value in a.as_dict().items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0)
    for bad in (torch.tensor([0.1, 1.5, 0.2]), torch.tensor([0.1, float("nan"), 0.2]), torch.zeros(2)):
        with pytest.raises(ValueError, match="times t"):
            model(images, t=bad)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("--model.init_args.schedule=mulan.schedules.FixedLinear", "init_args.process"),
        ("--model.init_args.schedule_lr=0.001", "process_lr"),
        ("--model=mulan.lightning.module.DiffusionModule", "mulan.lightning.DiffusionTask"),
    ],
)
def test_an_old_configuration_is_told_what_to_rename(old: str, new: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONF / "vdm_tiny.yaml"), old])
    assert f"-> '{new}'" in capsys.readouterr().err


def test_abbreviated_options_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.max_step", "2"])
    assert "--trainer.max_step" in capsys.readouterr().err


def test_a_denoiser_built_for_another_shape_is_refused() -> None:
    from mulan.networks import UNet

    with pytest.raises(ValueError, match=r"denoiser was built for inputs of shape \(2, 4, 4\).*\(2, 3, 3\)"):
        DiffusionModel(SHAPE, LearnedScalar(SHAPE, 0), UNet((2, 4, 4), 0, channels=8, num_blocks=1))
    with pytest.raises(ValueError, match="empty batch"):
        DiffusionModel(SHAPE, LearnedScalar(SHAPE, 0), Matched(Epsilon()))(torch.zeros(0, *SHAPE, dtype=torch.uint8))
