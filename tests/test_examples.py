"""The extension examples of docs/extending.md run, and do what the guide says they do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples.*` class paths in the example YAMLs resolve from the repository root
    sys.path.insert(0, str(ROOT))

from examples import (  # noqa: E402
    categorical_latent,
    cosine_schedule,
    custom_module,
    power_time,
    pure_torch,
    score_parameterisation,
    small_denoiser,
)

from mulan.cli import build_cli  # noqa: E402
from mulan.processes import Context  # noqa: E402


def test_custom_module_from_python() -> None:
    metrics = custom_module.main(max_steps=2)
    for term in ("total", "recon", "prior", "diffusion", "latent"):
        assert torch.isfinite(torch.tensor(metrics[f"train/{term}_bpd_step"]))
    # diffusion_weight = 1: the training loss is the bound itself
    assert metrics["train/loss"] == pytest.approx(metrics["train/total_bpd_step"], rel=1e-5)


def test_custom_module_from_yaml(tmp_path: Path) -> None:
    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "examples/custom_module.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_steps",
            "2",
            "--model.init_args.diffusion_weight",
            "2.0",
        ]
    )
    assert type(cli.model) is custom_module.TermLoggingModule
    assert cli.model.diffusion_weight == 2.0
    assert cli.trainer.global_step == 2
    m = cli.trainer.callback_metrics
    assert "train/diffusion_bpd_step" in m and torch.isfinite(m["train/loss"])
    # the configuration saved next to the run names the subclass, so the run can be repeated
    assert "examples.custom_module.TermLoggingModule" in (tmp_path / "config.yaml").read_text()


def test_cosine_schedule_derivative_and_endpoints() -> None:
    schedule = cosine_schedule.CosineSchedule((3, 4, 4), latent_dim=0)
    t = torch.linspace(0.0, 1.0, 257, dtype=torch.float64, requires_grad=True)
    gamma, dgamma = schedule.gamma_and_derivative(t.reshape(-1, 1, 1, 1), Context())
    (autograd,) = torch.autograd.grad(gamma.sum(), t)
    torch.testing.assert_close(dgamma.flatten(), autograd, rtol=1e-9, atol=1e-9)
    assert (dgamma > 0).all()  # monotone
    # the float32 path the model uses: exact endpoints, float32 outputs of shape (B, 1, 1, 1)
    g32, d32 = schedule(torch.tensor([0.0, 0.5, 1.0]))
    assert g32.dtype == d32.dtype == torch.float32 and g32.shape == (3, 1, 1, 1)
    assert g32[0].item() == pytest.approx(schedule.gamma_min, abs=1e-4)
    assert g32[-1].item() == pytest.approx(schedule.gamma_max, abs=1e-4)
    # float32 derivative agrees with autograd through the float32 forward
    t32 = torch.rand(64, requires_grad=True)
    g, d = schedule(t32)
    (auto32,) = torch.autograd.grad(g.sum(), t32)
    torch.testing.assert_close(d.flatten(), auto32, rtol=1e-4, atol=1e-3)


def test_cosine_schedule_main_trains_via_cli() -> None:
    result = cosine_schedule.main()
    assert result["derivative_error"] < 1e-2


def test_categorical_latent() -> None:
    latent = categorical_latent.CategoricalLatent((1, 8, 8), m=6)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    sample = latent(x)
    assert sample.z.shape == (5, 6) and torch.equal(sample.z.sum(1), torch.ones(5))
    assert ((0 <= sample.kl) & (sample.kl <= torch.log(torch.tensor(6.0)) + 1e-6)).all()
    prior = latent.sample_prior(7)
    assert prior.shape == (7, 6) and torch.equal(prior.sum(1), torch.ones(7))
    result = categorical_latent.main(steps=2)
    assert result["encoder_grad"] > 0  # gradients reach the encoder through the straight-through sample


def test_small_denoiser() -> None:
    net = small_denoiser.SmallDenoiser((3, 4, 4), latent_dim=0)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(net(x, torch.zeros(2, 1, 1, 1)), x)  # zero-initialised output layer
    assert torch.isfinite(torch.tensor(small_denoiser.main()["train_bpd"]))


def test_pure_torch_example() -> None:
    result = pure_torch.main(steps=2, batch_size=16)
    parts = sum(result[n] for n in ("recon", "prior", "diffusion", "latent"))
    assert result["total"] == pytest.approx(parts, rel=1e-5)


def test_pure_torch_example_does_not_import_lightning() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import examples.pure_torch;"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True)


@pytest.mark.parametrize(
    ("example", "snippet"),
    [("cosine_schedule", "CosineSchedule"), ("power_time", "PowerTime"), ("score_parameterisation", "Score")],
)
def test_a_new_component_is_at_most_30_lines_plus_one_yaml_block(example: str, snippet: str, tmp_path: Path) -> None:
    """docs/architecture.md promises this: the class between its snippet markers, and a config that trains it."""
    text = (ROOT / "examples" / f"{example}.py").read_text()
    body = text.split(f"# --8<-- [start:{snippet}]")[1].split(f"# --8<-- [end:{snippet}]")[0]
    lines = [ln for ln in body.strip().splitlines() if ln.strip()]
    assert 0 < len(lines) <= 30, len(lines)
    cli = build_cli(
        ["fit", "--config", str(ROOT / f"examples/{example}.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    )
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/bpd_step"])


def test_power_time_and_score_parameterisation_mains() -> None:
    """The two examples that docs/extending.md lists without a test of their own: their ``main()`` runs."""
    assert power_time.main() == pytest.approx(1.0, abs=0.02)  # the weighted mean of 3 t^2, exactly 1 in expectation
    assert score_parameterisation.main()["round_trip_error"] < 1e-5


def test_power_time_is_unbiased() -> None:
    """E_pi[f(t) / pi(t)] = int_0^1 f(t) dt for f(t) = 3 t^2 (exactly 1), within 4 standard errors; the
    proposal does concentrate times near 0."""
    from mulan.processes.schedules import FixedLinear

    t, weight = power_time.PowerTime(3.0)(200_000, FixedLinear((1, 2, 2), 0), None, torch.Generator().manual_seed(0))
    values = weight * 3 * t**2
    assert abs(values.mean().item() - 1.0) < 4 * values.std().item() / len(values) ** 0.5
    assert (t < 0.125).float().mean().item() == pytest.approx(0.5, abs=0.01)  # P(u^3 < 1/8) = 1/2
    with pytest.raises(ValueError, match="power must be positive"):
        power_time.PowerTime(0.0)


def test_score_parameterisation_matches_the_noise_prediction() -> None:
    from mulan.parameterisation import Epsilon
    from mulan.processes import Context
    from mulan.processes.schedules import LearnedScalar

    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(4, 1, 2, 2, generator=g) * 2 - 1, torch.randn(4, 1, 2, 2, generator=g)
    m = LearnedScalar((1, 2, 2), 0).marginal(torch.rand(4, generator=g), Context())
    x_t = m.alpha * x + m.sigma * eps
    score = score_parameterisation.Score()
    torch.testing.assert_close(score.to_eps(score.target(x, eps, m), x_t, m), eps, rtol=1e-5, atol=1e-5)
    out = torch.randn(4, 1, 2, 2, generator=g)  # any score prediction is the noise prediction -sigma * out
    torch.testing.assert_close(score.to_eps(out, x_t, m), Epsilon().to_eps(-m.sigma * out, x_t, m))
