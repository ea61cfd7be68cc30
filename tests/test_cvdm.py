"""CVDM (docs: math, section 10d): the conditional schedule, its regulariser, the super-resolution data, and a
conditional fit/test round trip through the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from mulan.cli import build_cli, main
from mulan.figures import superresolution_grid
from mulan.lightning.data import SuperResolutionDataModule
from mulan.lightning.data.superres import downsample
from mulan.model import DiffusionModel
from mulan.networks import UNet
from mulan.processes import CVDM, Context
from mulan.processes.cvdm import SMALL_RATE, warp
from mulan.processes.schedules import GAMMA_MAX, GAMMA_MIN, MonotoneNN
from mulan.time_sampling import CauchyLogSNR

pytestmark = pytest.mark.usefixtures("single_thread")

CONF = Path(__file__).parent / "conf"
SHAPE = (3, 8, 8)


def observed(n: int = 4, seed: int = 0) -> Tensor:
    """Low-resolution inputs y: uint8 (n, 3, 4, 4)."""
    return torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def images(n: int = 4, seed: int = 1) -> Tensor:
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def cvdm(adaptive: bool, seed: int = 0) -> CVDM:
    """A CVDM with a non-linear time network; ``adaptive``: a rate network that reads y (it starts at zero)."""
    torch.manual_seed(seed)
    process = CVDM(SHAPE, 0, features=16, channels=8)
    with torch.no_grad():
        process.time.w1.fill_(0.3)
        process.time.w2.copy_(6 + torch.randn(16))
        process.time.b2.copy_(2 + torch.randn(16))
        process.time.w3.copy_(torch.randn(16))
        if adaptive:
            nn.init.normal_(process.rate.net[-1].weight, std=0.5)
    return process


def conditional_denoiser() -> UNet:
    torch.manual_seed(3)
    net = UNet(SHAPE, 0, channels=8, num_blocks=1, dropout=0.0, condition_channels=3)
    nn.init.normal_(net.conv_out.weight, std=0.05)
    return net


def test_ignoring_y_is_the_unconditional_learned_schedule() -> None:
    """A rate network that outputs zero (as initialised): gamma, gamma' and every term of the bound are those of
    VDM's monotone schedule with fixed endpoints and the same time network, whatever y."""
    process = cvdm(adaptive=False)
    vdm = MonotoneNN(SHAPE, 0, features=16, learn_endpoints=False)
    vdm.load_state_dict({k: v for k, v in process.time.state_dict().items()}, strict=False)
    t = torch.linspace(0, 1, 9)
    for seed in (0, 1):
        ctx = Context(y=observed(9, seed))
        ours, theirs = process(t, ctx), vdm(t)
        torch.testing.assert_close(ours[0], theirs[0].expand_as(ours[0]))
        torch.testing.assert_close(ours[1], theirs[1].expand_as(ours[1]))
    net = conditional_denoiser()
    models = [DiffusionModel(SHAPE, p, net) for p in (process, vdm)]
    g = torch.Generator().manual_seed(5)
    t, eps, eps0 = torch.rand(4, generator=g), torch.randn(4, *SHAPE, generator=g), torch.randn(4, *SHAPE, generator=g)
    a, b = (m(images(), observed(), t=t, eps=eps, recon_noise=eps0) for m in models)
    for name in ("recon", "prior", "diffusion", "latent"):
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_the_schedule_adapts_to_y_between_exact_endpoints() -> None:
    process = cvdm(adaptive=True).double()
    ctx = Context(y=observed(4).double() / 127.5 - 1)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    gamma, dgamma = process.gamma_and_derivative(t.view(-1, 1, 1, 1), ctx)
    assert gamma.std(0).mean() > 0.1  # differs across images ...
    assert gamma[0].std() > 0.1  # ... and across pixels
    h = 1e-6

    def gamma64(times: Tensor) -> Tensor:  # float64 throughout (process.gamma computes in float32)
        return process.gamma_and_derivative(times.view(-1, 1, 1, 1), ctx)[0]

    for end, value in ((0.0, GAMMA_MIN), (1.0, GAMMA_MAX)):
        torch.testing.assert_close(gamma64(torch.full((4,), end)), torch.full_like(gamma, value))
    fd = (gamma64(t + h) - gamma64(t - h)) / (2 * h)
    torch.testing.assert_close(dgamma, fd, rtol=1e-6, atol=1e-6)
    dense = torch.linspace(0, 1, 201, dtype=torch.float64)
    for i in range(4):
        one = Context(y=ctx.y[i : i + 1].expand(201, -1, -1, -1))
        assert (process.gamma_and_derivative(dense.view(-1, 1, 1, 1), one)[1] > 0).all()  # monotone


@pytest.mark.parametrize("rho", [0.0, SMALL_RATE * 0.999, -SMALL_RATE * 0.999, 0.3, -2.0, 7.5])
def test_the_warp_has_fixed_ends_and_its_derivatives(rho: float) -> None:
    """``u(0) = 0``, ``u(1) = 1``; ``u'``, ``u''`` against differences; the series branch meets the closed form."""
    tau = torch.linspace(0, 1, 101, dtype=torch.float64)
    r = torch.full_like(tau, rho)
    u, du, d2u = warp(tau, r)
    assert u[0].item() == pytest.approx(0.0, abs=1e-12) and u[-1].item() == pytest.approx(1.0, abs=1e-6)
    h = 1e-5
    torch.testing.assert_close(du, (warp(tau + h, r)[0] - warp(tau - h, r)[0]) / (2 * h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d2u, (warp(tau + h, r)[1] - warp(tau - h, r)[1]) / (2 * h), rtol=1e-4, atol=1e-4)
    if rho == 0.0:
        torch.testing.assert_close(u, tau)  # the unconditional schedule, exactly
    r.requires_grad_(True)
    warp(tau, r)[0].sum().backward()
    assert torch.isfinite(r.grad).all()


def test_the_regulariser_is_the_curvature_of_the_signal_fraction_and_not_part_of_the_bound() -> None:
    process = cvdm(adaptive=True).double()
    ctx = Context(y=observed(4))
    t = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=torch.float64)
    h = 1e-4

    def signal(times: Tensor) -> Tensor:
        return torch.sigmoid(-process.gamma_and_derivative(times.view(-1, 1, 1, 1), ctx)[0])

    fd = (signal(t + h) - 2 * signal(t) + signal(t - h)) / h**2
    torch.testing.assert_close(process.signal_curvature(t, ctx), fd, rtol=1e-4, atol=1e-4)
    process = cvdm(adaptive=True)
    model = DiffusionModel(SHAPE, process, conditional_denoiser())
    torch.manual_seed(0)
    bound = model(images(), observed())
    penalty = bound.penalties["schedule_regulariser"]
    assert penalty.shape == (4,) and (penalty > 0).all()
    torch.testing.assert_close(bound.total, sum(bound.terms.values()))  # the total is the bound alone
    assert "schedule_regulariser" in model.term_names


def test_a_missing_or_misshapen_y_is_refused_with_the_fix() -> None:
    process = cvdm(adaptive=False)
    with pytest.raises(ValueError, match="conditions its schedule on an observed image y.*SuperResolutionDataModule"):
        process(torch.rand(2), Context())
    with pytest.raises(ValueError, match=r"shape \(B, 3, h, w\)"):
        process(torch.rand(2), Context(y=torch.zeros(2, 1, 4, 4)))


def test_importance_sampled_times_work_with_the_per_pixel_schedule() -> None:
    model = DiffusionModel(SHAPE, cvdm(adaptive=True), conditional_denoiser(), time_sampler=CauchyLogSNR(4.0, 6.0))
    bound = model(images(), observed())
    assert torch.isfinite(bound.total).all()


def test_super_resolution_pairs_are_block_means() -> None:
    data = SuperResolutionDataModule(factor=2, image_size=8, val_fraction=0.05, test_fraction=0.05)
    data.setup("test")
    x, y = next(iter(data.test_dataloader()))
    assert x.dtype == y.dtype == torch.uint8 and x.shape[1:] == (3, 8, 8) and y.shape[1:] == data.condition_shape
    block = x[0, 1, 2:4, 4:6].double().mean().round()
    assert y[0, 1, 1, 2].item() == block.item()
    torch.testing.assert_close(downsample(x, 2), y)
    with pytest.raises(ValueError, match="factor must be 2 or 4"):
        SuperResolutionDataModule(factor=3)
    with pytest.raises(ValueError, match="multiple of factor"):
        SuperResolutionDataModule(factor=4, image_size=10)


def test_conditional_fit_and_test_round_trip_through_the_cli(tmp_path: Path) -> None:
    """Fit CVDM on 4x super-resolution, then test from the checkpoint alone: the conditional bound on -log p(x | y)
    per term, and a grid of samples given y."""
    main(["fit", "--config", str(CONF / "cvdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    ckpt = sorted(tmp_path.rglob("*.ckpt"))[-1]
    args = ["test", "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    pictures = ["--trainer.callbacks+=mulan.lightning.pictures.PicturesCallback", "--trainer.callbacks.sample_steps=4"]
    cli = build_cli([*args, *pictures, "--trainer.callbacks.num_maps=2", "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(cli.model.model.process, CVDM)
    assert isinstance(cli.datamodule, SuperResolutionDataModule) and cli.datamodule.factor == 4
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, value in cli.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)
    results = cli.model.test_results
    parts = sum(results[n][0] for n in ("recon", "prior", "diffusion", "latent"))
    assert results["total"][0] == pytest.approx(parts, rel=1e-5)
    assert all(torch.isfinite(torch.tensor(m)) for m, _ in results.values())
    assert "schedule_regulariser" in results
    x, y = next(iter(cli.datamodule.test_dataloader()))
    grid = superresolution_grid(cli.model.model.eval(), x[:2], y[:2], num_samples=2, steps=4)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 * 17 + 1, 4 * 17 + 1)
    with Image.open(tmp_path / "pictures" / "conditional_samples.png") as picture:  # 2 rows: y, 3 samples, x; 3x
        assert picture.size == (3 * (5 * 17 + 1), 3 * (2 * 17 + 1))
    assert not (tmp_path / "pictures" / "samples.png").exists()  # no unconditional samples of a p(x | y) model
