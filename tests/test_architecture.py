"""The component interfaces: parameterisations are changes of variables of one prediction, the time sampler's
weights enter the bound, the model's forward pass takes injected noise, and old configurations are told what to
rename."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mulan.cli import main
from mulan.model import DiffusionModel
from mulan.parameterisation import Data, Epsilon, Parameterisation, Velocity
from mulan.processes import Context, Marginal
from mulan.processes.schedules import LearnedScalar, Polynomial
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


# ------------------------------------------------------------------------------------------------ library classes
class _LambdaWarmup(torch.optim.lr_scheduler.LambdaLR):
    """The hand-written ``LinearWarmup`` of earlier versions (a ``LambdaLR``), whose state older checkpoints hold."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 100) -> None:
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        return min(1.0, (step + 1) / max(self.warmup_steps, 1))


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    optimizer, lrs = scheduler.optimizer, []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup_steps", [0, 1, 2, 5, 100])
def test_linear_warmup_is_torch_linear_lr_with_the_closed_form_factor(warmup_steps: int) -> None:
    """``LinearWarmup`` is a ``LinearLR`` whose factor at step ``k`` is ``min(1, (k + 1) / w)``; LinearLR multiplies
    the learning rate step by step, so the values agree to a few units in the last place of a double."""
    from mulan.lightning.optim import LinearWarmup

    base, steps = 2e-4, max(warmup_steps, 1) + 20
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=base)
    scheduler = LinearWarmup(optimizer, warmup_steps=warmup_steps)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LinearLR)
    expected = [base * min(1.0, (k + 1) / max(warmup_steps, 1)) for k in range(steps)]
    assert _lrs(scheduler, steps) == pytest.approx(expected, rel=1e-14, abs=0)


@pytest.mark.parametrize("resume_at", [0, 2, 4, 5, 9])
def test_a_checkpoint_of_the_former_lambda_warmup_resumes_into_linear_warmup(resume_at: int) -> None:
    """The scheduler and optimiser state an older checkpoint holds (the ``LambdaLR`` form, through ``torch.save``
    and ``torch.load(weights_only=True)`` as a checkpoint) loads into today's ``LinearWarmup`` and continues the
    schedule the old class would have followed, at any step of the warm-up or after it."""
    import io

    from mulan.lightning.optim import LinearWarmup

    warmup, total = 5, 14
    old_optimizer = torch.optim.AdamW([nn.Parameter(torch.ones(3))], lr=1e-3)
    old = _LambdaWarmup(old_optimizer, warmup_steps=warmup)
    before = _lrs(old, resume_at)
    buffer = io.BytesIO()
    torch.save({"optimizer": old_optimizer.state_dict(), "lr_scheduler": old.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    reference = _lrs(old, total - resume_at)  # the old run, uninterrupted

    new_optimizer = torch.optim.AdamW([nn.Parameter(torch.ones(3))], lr=1e-3)
    new = LinearWarmup(new_optimizer, warmup_steps=warmup)
    new_optimizer.load_state_dict(saved["optimizer"])
    new.load_state_dict(saved["lr_scheduler"])
    resumed = _lrs(new, total - resume_at)
    assert resumed == pytest.approx(reference, rel=1e-14, abs=0)
    assert before + resumed == pytest.approx([1e-3 * min(1.0, (k + 1) / warmup) for k in range(total)], rel=1e-14)


# ------------------------------------------------------------------------------------------------ one decoder
SPACING = 2.0 / 256
DECODER_GAMMA_0 = math.log(SPACING**2)  # the decoder's standard deviation is one bin


def _decoder_processes() -> dict[str, Any]:
    from mulan.processes import CriticallyDampedLangevin, FixedLinear

    shape = (1, 100, 100)
    return {
        "diagonal": FixedLinear(shape, 0, gamma_min=DECODER_GAMMA_0),
        "auxiliary": CriticallyDampedLangevin(shape, gamma_min=DECODER_GAMMA_0),
    }


@pytest.mark.parametrize("kind", ["diagonal", "auxiliary"])
def test_both_process_families_decode_with_the_256_way_decoder(kind: str) -> None:
    """``decode(x_0, "sample")`` draws ``k`` with ``p(k) ∝ exp(-(z~ - e(k))^2 / (2 exp(gamma_0)))``, ``z~ = x_0 /
    alpha_0``: 10 000 draws at ``z~ = e(127) + 0.3 spacing`` give each of the bins 125..130 the frequency computed
    here in float64 (within 5 standard errors); ``"argmax"`` gives 127; other modes are refused in one line."""
    process = _decoder_processes()[kind]
    alpha_0 = math.sqrt(1.0 / (1.0 + math.exp(DECODER_GAMMA_0)))
    z_tilde = (2 * 127 + 1) / 256 - 1 + 0.3 * SPACING
    state = torch.full((1, *process.state_shape), alpha_0 * z_tilde)
    centres = [(2 * k + 1) / 256 - 1 for k in range(256)]
    weights = [math.exp(-((z_tilde - e) ** 2) / (2 * math.exp(DECODER_GAMMA_0))) for e in centres]
    expected = [w / sum(weights) for w in weights]
    draws = process.decode(state, Context(), "sample", torch.Generator().manual_seed(0))
    assert draws.dtype == torch.uint8 and draws.shape == (1, 1, 100, 100)
    counts = torch.bincount(draws.flatten().long(), minlength=256).double() / draws.numel()
    for k in range(125, 131):
        se = math.sqrt(expected[k] * (1 - expected[k]) / draws.numel())
        assert abs(counts[k].item() - expected[k]) < 5 * se + 1e-12, (k, counts[k].item(), expected[k])
    assert (process.decode(state, Context(), "argmax") == 127).all()
    with pytest.raises(ValueError, match=r"^decode must be 'argmax', 'sample' or None, got 'mean'\.$"):
        process.decode(state, Context(), "mean")
