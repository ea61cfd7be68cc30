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

from examples import categorical_latent, cosine_schedule, custom_module, pure_torch, small_denoiser  # noqa: E402

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
