"""The Lightning layer: optimiser groups, warm-up, metrics, bad input, and the pure-torch core's independence."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from mulan.latents import KHotLatent, NoLatent
from mulan.lightning import DiffusionTask
from mulan.lightning.data import EmbeddedDataModule
from mulan.lightning.metrics import MeanStdErr
from mulan.lightning.optim import AdamW, LinearWarmup
from mulan.networks import UNet
from mulan.processes.schedules import FixedLinear, Polynomial

SHAPE = (1, 8, 8)
CONFIGS = Path(__file__).parents[1] / "configs"


def tiny_module(**kwargs) -> DiffusionTask:
    options = {
        "image_shape": SHAPE,
        "denoiser": partial(UNet, channels=16, num_blocks=1, dropout=0.0),
        "process": partial(Polynomial, hidden=16),
        "latent": partial(KHotLatent, m=6, k=2, channels=8, num_blocks=1),
    }
    return DiffusionTask(**{**options, **kwargs})


def test_parameter_groups_exclude_biases_and_norms_from_decay_and_cover_every_parameter() -> None:
    module = tiny_module(process_lr=1e-3, process_weight_decay=0.5)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, AdamW)
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in module.parameters())  # each parameter exactly once
    aux = {id(p) for p in [*module.model.process.parameters(), *module.model.latent.parameters()]}
    for group in optimizer.param_groups:
        is_aux = {id(p) in aux for p in group["params"]}
        assert len(is_aux) == 1  # a group never mixes the denoiser with the schedule/encoder
        vectors = all(p.ndim < 2 for p in group["params"])
        if vectors:
            assert group["weight_decay"] == 0.0  # biases and GroupNorm scales
        else:
            assert group["weight_decay"] == (0.5 if is_aux.pop() else 0.01)
        assert group["initial_lr"] == (1e-3 if id(group["params"][0]) in aux else 2e-4)
    assert optimizer.defaults["betas"] == (0.9, 0.99) and optimizer.defaults["eps"] == 1e-8


@pytest.mark.parametrize("width", [8, None])
def test_process_width_scales_the_learning_rate_of_wide_process_weights(width) -> None:
    """Each process weight of fan-in f > width learns at lr * width / f (before and through the warm-up); narrower
    weights, biases and the latent encoder at the process's lr; the denoiser at the optimiser's; None: one lr."""
    module = tiny_module(process_lr=1e-3, process_width=width)  # Polynomial(hidden=16): fan-ins 6, 16, 16
    optimizer = module.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}  # the warm-up's target
    assert len(lr_of) == sum(1 for _ in module.parameters())
    for name, p in module.model.process.named_parameters():
        fan_in = p[0].numel() if p.ndim >= 2 else 0
        expected = 1e-3 * width / fan_in if width and fan_in > width else 1e-3
        assert lr_of[id(p)] == pytest.approx(expected), name
    assert any(lr_of[id(p)] < 1e-3 for p in module.model.process.parameters()) is (width is not None)
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for p in module.model.latent.parameters())
    assert all(lr_of[id(p)] == pytest.approx(2e-4) for p in module.model.denoiser.parameters())
    warm = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}  # step 0 of the warm-up
    head = module.model.process.head_b
    assert warm[id(head.weight)] / warm[id(head.bias)] == pytest.approx(lr_of[id(head.weight)] / 1e-3)


def test_linear_warmup_then_constant() -> None:
    param = torch.nn.Parameter(torch.zeros(()))
    optimizer = AdamW([param], lr=1.0)
    scheduler = LinearWarmup(optimizer, warmup_steps=4)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])


def test_mean_stderr_metric_matches_numpy_formulas() -> None:
    values = torch.randn(37, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0])
    metric = MeanStdErr(3)
    for chunk in values.split(10):
        metric.update(chunk)
    mean, stderr = metric.compute()
    torch.testing.assert_close(mean.float(), values.mean(0))
    torch.testing.assert_close(stderr.float(), values.std(0) / math.sqrt(37))


def test_training_step_returns_the_mean_total_bpd_and_is_differentiable() -> None:
    torch.manual_seed(0)
    module = tiny_module()
    images = torch.randint(0, 256, (4, *SHAPE), dtype=torch.uint8)
    torch.manual_seed(1)
    loss = module.training_step(images, 0)
    torch.manual_seed(1)
    terms = module.model(images)
    assert loss.item() == pytest.approx((terms.total / (64 * math.log(2))).mean().item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in module.model.process.parameters())


def test_non_finite_loss_stops_with_the_step_named() -> None:
    module = tiny_module(process=FixedLinear, latent=NoLatent)
    with torch.no_grad():
        module.model.denoiser.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss at global step 0"):
        module.training_step(torch.zeros(2, *SHAPE, dtype=torch.uint8), 0)


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.rand(2, *SHAPE), TypeError, "uint8"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ValueError, r"\(B, 1, 8, 8\)"),
        (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), ValueError, "image_shape"),
    ],
)
def test_bad_batches_are_named(images: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tiny_module().training_step(images, 0)


def test_fit_with_trainer_logs_every_term(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module()
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=1,
        val_check_interval=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=EmbeddedDataModule(batch_size=8))
    metrics = trainer.callback_metrics
    for name in (
        "val/bpd",
        "val/recon_bpd",
        "val/prior_bpd",
        "val/diffusion_bpd",
        "val/latent_bpd",
        "val/latent_surrogate_bpd",
        "val/bpd_stderr",
        "train/bpd_step",
    ):
        assert name in metrics and torch.isfinite(metrics[name])
    assert metrics["val/latent_bpd"].item() == pytest.approx(math.log(math.comb(6, 2)) / (64 * math.log(2)))


def test_pure_torch_core_does_not_import_lightning() -> None:
    code = (
        "import sys, mulan, mulan.model, mulan.schedules, mulan.latents, mulan.networks, mulan.elbo, mulan.likelihood,"
        " mulan.sampling, mulan.ode, mulan.processes, mulan.parameterisation, mulan.time_sampling, mulan.data,"
        " mulan.figures;"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules), "
        "'lightning imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _init_args(config: str) -> dict:
    return yaml.safe_load((CONFIGS / config).read_text())


@pytest.mark.parametrize("config", ["vdm_cifar.yaml", "mulan_cifar.yaml", "mulan_imagenet32.yaml"])
def test_paper_configs_carry_the_paper_hyperparameters(config: str) -> None:
    cfg = _init_args(config)
    model = cfg["model"]["init_args"]
    unet = model["denoiser"]["init_args"]
    assert unet["channels"] == (256 if "imagenet" in config else 128)
    assert (unet["num_blocks"], unet["dropout"], unet["attention"], unet["fourier_exponents"]) == (
        32,
        0.1,
        "mid",
        [6, 7],
    )
    opt = model["optimizer"]["init_args"]
    assert (opt["lr"], opt["betas"], opt["eps"], opt["weight_decay"]) == (2e-4, [0.9, 0.99], 1e-8, 0.01)
    assert model["lr_scheduler"]["init_args"]["warmup_steps"] == 100
    ema = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EMAWeightAveraging")]
    assert ema[0]["init_args"]["decay"] == 0.9999
    assert cfg["data"]["init_args"]["batch_size"] == (512 if "imagenet" in config else 128)
    schedule = model["process"]
    if config.startswith("mulan"):
        assert schedule["class_path"] == "mulan.processes.schedules.Polynomial"
        assert (schedule["init_args"]["gamma_min"], schedule["init_args"]["gamma_max"]) == (-13.3, 5.0)
        latent = model["latent"]["init_args"]
        assert (latent["m"], latent["k"]) == (50, 15)
        # the reference trained its CIFAR-10 model on the velocity and its ImageNet-32 model on the noise
        velocity = "mulan.parameterisation.Velocity"
        assert model["parameterisation"] == (velocity if "cifar" in config else "mulan.parameterisation.Epsilon")
    else:
        assert schedule["class_path"] == "mulan.processes.schedules.LearnedScalar"
        assert model["latent"]["class_path"] == "mulan.latents.NoLatent"


def test_mulan_paper_config_builds_and_runs_one_image() -> None:
    """The full-size CIFAR-10 MuLAN model builds from its YAML and gives a finite bound on one image."""
    model = _init_args("mulan_cifar.yaml")["model"]["init_args"]
    unet, latent = model["denoiser"]["init_args"], model["latent"]["init_args"]
    module = DiffusionTask(
        image_shape=(3, 32, 32),
        denoiser=partial(UNet, **unet),
        process=partial(Polynomial, **model["process"]["init_args"]),
        latent=partial(KHotLatent, **latent),
    )
    assert len(module.model.denoiser.down) == 32 and len(module.model.denoiser.up) == 33
    with torch.no_grad():
        terms = module.model(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    assert torch.isfinite(terms.total).all()
    assert terms.latent.item() == pytest.approx(math.log(math.comb(50, 15)), rel=1e-6)


def test_deep_copies_share_the_optimiser_factories() -> None:
    """EMAWeightAveraging deep-copies the module. The optimiser factories LightningCLI builds reference the CLI, its
    Trainer and, under DDP, a thread lock that cannot be copied: copies of the module share them instead."""
    import copy

    from mulan.cli import build_cli

    module = build_cli(["--config", str(Path(__file__).parent / "conf" / "vdm_tiny.yaml")], run=False).model
    twin = copy.deepcopy(module)
    assert twin.optimizer_factory is module.optimizer_factory
    assert twin.lr_scheduler_factory is module.lr_scheduler_factory
    assert twin.model is not module.model  # the model itself is copied
    assert isinstance(twin.configure_optimizers()["optimizer"], AdamW)


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("process_lr", -1e-3, r"process_lr must be positive, got -0.001: .*gradient ascent\. Give a value > 0"),
        ("process_lr", 0.0, r"process_lr must be positive, got 0.0"),
        ("process_lr", float("nan"), r"process_lr must be positive, got nan"),
        ("process_weight_decay", -0.01, r"process_weight_decay must be 0 or more, got -0.01: .*Give a value >= 0"),
        ("process_width", 0, r"process_width must be positive, got 0: .*or null for one rate"),
        ("process_width", -64, r"process_width must be positive, got -64"),
        ("sample_steps", 0, r"sample_steps must be at least 1, got 0: .*Give a positive count"),
    ],
)
def test_bad_numeric_options_are_refused_with_the_fix(option: str, value: float, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        tiny_module(process=FixedLinear, latent=NoLatent, **{option: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "options", [{"process_lr": 1e-6, "process_weight_decay": 0.0, "process_width": 1, "sample_steps": 1}, {}]
)
def test_edge_values_of_the_numeric_options_are_accepted(options: dict) -> None:
    options = options or {"process_lr": None, "process_weight_decay": None, "process_width": None}
    module = tiny_module(process=FixedLinear, latent=NoLatent, **options)
    assert all(getattr(module, name) == value for name, value in options.items())


class Penalised(FixedLinear):
    """FixedLinear with a training-only penalty of 3 nats per image plus the image's mean value."""

    penalty_names = ("extra",)

    def penalties(self, x, ctx):
        return {"extra": 3.0 + x.flatten(1).mean(1)}


def test_training_loss_is_the_bound_plus_its_penalties_and_the_step_returns_it() -> None:
    torch.manual_seed(0)
    module = tiny_module(process=Penalised, latent=NoLatent)
    images = torch.randint(0, 256, (4, *SHAPE), dtype=torch.uint8)
    torch.manual_seed(1)
    bound = module.bound(images)
    nats = bound.total + 3.0 + (images.float() * (2 / 255) - 1).flatten(1).mean(1)  # x in [-1, 1]
    expected = (nats / (64 * math.log(2))).mean()
    torch.testing.assert_close(module.training_loss(bound), expected, rtol=1e-6, atol=1e-6)
    torch.manual_seed(1)
    torch.testing.assert_close(module.training_step(images, 0), expected, rtol=1e-6, atol=1e-6)


class HalfDiffusion(DiffusionTask):
    def training_loss(self, bound):
        return super().training_loss(bound) - 0.5 * self.model.bpd(bound.diffusion).mean()


def test_training_step_uses_an_overridden_training_loss_and_records_every_quantity() -> None:
    torch.manual_seed(0)
    options = {"image_shape": SHAPE, "denoiser": partial(UNet, channels=16, num_blocks=1, dropout=0.0)}
    module = HalfDiffusion(**options, process=Penalised)
    images = torch.randint(0, 256, (4, *SHAPE), dtype=torch.uint8)
    torch.manual_seed(1)
    bound = module.bound(images)
    torch.manual_seed(1)
    loss = module.training_step(images, 0)
    expected = DiffusionTask.training_loss(module, bound) - 0.5 * module.model.bpd(bound.diffusion).mean()
    torch.testing.assert_close(loss, expected)
    # the step recorded every quantity of the bound (the penalty included) in the train meters, once
    for name, value in bound.as_dict().items():
        mean, _ = module.meters[f"train_{name}"].compute()
        torch.testing.assert_close(mean.float(), module.model.bpd(value).mean().detach(), rtol=1e-5, atol=1e-6)


class UndeclaredExtra(NoLatent):
    """A latent that returns a surrogate without declaring ``surrogate = True``."""

    def forward(self, x):
        sample = super().forward(x)
        sample.kl_surrogate = torch.full_like(sample.kl, 2.0)
        return sample


def test_a_quantity_the_components_do_not_declare_gets_its_meter_when_the_bound_carries_it() -> None:
    module = tiny_module(process=FixedLinear, latent=UndeclaredExtra)
    assert "latent_surrogate" not in module.model.term_names and "train_latent_surrogate" not in module.meters
    bpd = module.update_meters("val", module.bound(torch.zeros(3, *SHAPE, dtype=torch.uint8)))
    assert bpd.keys() == {"total", "recon", "prior", "diffusion", "latent", "latent_surrogate"}
    mean, _ = module.meters["val_latent_surrogate"].compute()
    assert mean.item() == pytest.approx(2.0 / (64 * math.log(2)))
