"""Reliability and security: DDP on CPU (distinct per-rank draws, synced metrics, DDP == one process), exact
resume (losses, weights, EMA, optimiser, warm-up), bad input with clear errors, and safe checkpoint loading.

What each test guarantees is listed in docs/reliability.md.
"""

from __future__ import annotations

import ast
import json
import math
import os
import socket
import subprocess
import sys
from functools import partial
from importlib.metadata import version
from pathlib import Path

import lightning as L
import pytest
import tomllib
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from mulan import elbo
from mulan.cli import build_cli, main
from mulan.latents import NoLatent
from mulan.lightning.data import SyntheticDataModule
from mulan.lightning.evaluation import EvaluationCallback
from mulan.lightning.optim import AdamW, LinearWarmup
from mulan.lightning.task import DiffusionTask
from mulan.model import Bound
from mulan.networks import UNet
from mulan.parameterisation import Epsilon
from mulan.processes.schedules import FixedLinear, LearnedScalar
from mulan.time_sampling import AntitheticUniform, antithetic_uniform

ROOT = Path(__file__).parents[1]
CONF = Path(__file__).parent / "conf"
SHAPE = (1, 8, 8)
# What the hyper-parameters of modules built in Python (not from YAML) hold, allowed for weights_only loads.
SAFE = [partial, UNet, LearnedScalar, FixedLinear, NoLatent, AdamW, LinearWarmup, Epsilon, AntitheticUniform]
TRAINER = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def vdm_kwargs(**kwargs) -> dict:
    options = {
        "image_shape": SHAPE,
        "denoiser": partial(UNet, channels=8, num_blocks=1, dropout=0.0),
        "process": LearnedScalar,
        "latent": NoLatent,
    }
    return {**options, **kwargs}


# --------------------------------------------------------------------------- fixed draws
def fixed_draws(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Time ``t`` (B,), reconstruction noise and diffusion noise (B, C, H, W), each a function of its own image
    only (a generator seeded by the image's bytes): an example gets the same draws whichever rank, batch or
    position it lands in."""
    ts, noise, eps = [], [], []
    weights = torch.arange(1, images[0].numel() + 1)
    for image in images:
        g = torch.Generator().manual_seed(int((image.long().flatten() * weights).sum()) % 2**31)
        ts.append(torch.rand((), generator=g))
        noise.append(torch.randn(image.shape, generator=g))
        eps.append(torch.randn(image.shape, generator=g))
    return torch.stack(ts), torch.stack(noise), torch.stack(eps)


class FixedDrawModule(DiffusionTask):
    """The module with every random draw a function of the example (see ``fixed_draws``): the bound of a
    set of images is then the same however the images are split over ranks and batches."""

    def bound(self, batch: torch.Tensor) -> Bound:
        t, noise, eps = fixed_draws(batch)
        return self.model(batch, t=t, eps=eps, recon_noise=noise)


class DrawRecordingModule(DiffusionTask):
    """Records, per training step, the seed in force, the times and noise the step draws (replayed from a fork
    of the RNG, then checked against the real loss) and the loss."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.records: list[dict] = []

    def training_step(self, batch, batch_idx):
        with torch.random.fork_rng():
            x = elbo.to_unit_interval(batch)
            t = antithetic_uniform(batch.shape[0])  # the order DiffusionModel.forward draws in (VDM)
            noise, eps = torch.randn_like(x), torch.randn_like(x)
            with torch.no_grad():
                replay = self.model.bpd(self.model(batch, t=t, eps=eps, recon_noise=noise).total).mean()
        seed = torch.initial_seed()
        loss = super().training_step(batch, batch_idx)
        self.records.append(
            {
                "step": self.global_step,
                "rank": self.global_rank,
                "seed": seed,
                "t": t,
                "noise": noise,
                "eps": eps,
                "loss": loss.detach(),
                "replay": replay,
            }
        )
        return loss


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()  # global_step already counts this step


# =========================================================================== 2. resume
def _resume_run(root: Path, max_steps: int, ckpt_path: str | None = None, every: int = 2):
    """A deterministic CPU fit: AdamW + 3-step warm-up + EMA, 4 steps per epoch, validation every epoch."""
    L.seed_everything(0)
    module = DiffusionTask(
        **vdm_kwargs(optimizer=partial(AdamW, lr=1e-3), lr_scheduler=partial(LinearWarmup, warmup_steps=3))
    )
    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        **TRAINER,
        max_steps=max_steps,
        limit_val_batches=1,
        default_root_dir=root,
        callbacks=[EMAWeightAveraging(decay=0.9), checkpoints, recorder],
        deterministic=True,
    )
    data = SyntheticDataModule(SHAPE, num_train=16, num_eval=4, batch_size=4)
    with torch.serialization.safe_globals(SAFE):  # the hyper-parameters hold these factories
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer, recorder.losses


def _assert_same_tree(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=where)
    else:
        assert a == b, where


def test_resume_at_epoch_boundary_continues_exactly(tmp_path: Path) -> None:
    """6 uninterrupted steps vs 4 steps, stop, resume from the step-4 checkpoint (the end of epoch 0) to step
    6: steps 5-6 log the same losses, and the final live weights, EMA weights, AdamW moments and warm-up
    schedule agree to 1e-6 (in practice bit for bit on the CPU). Holds because the module seeds every step
    from (seed, step, rank) and each epoch's shuffle from (seed, epoch), and stores the seed in checkpoints."""
    _, _, full = _resume_run(tmp_path / "full", 6)
    _resume_run(tmp_path / "first", 4)
    _, trainer, resumed = _resume_run(
        tmp_path / "resumed", 6, ckpt_path=str(tmp_path / "first" / "epoch=0-step=4.ckpt")
    )
    assert sorted(resumed) == [5, 6]
    assert resumed == pytest.approx({k: full[k] for k in (5, 6)}, abs=1e-6)
    ends = [torch.load(tmp_path / run / "last.ckpt", weights_only=False) for run in ("full", "resumed")]
    assert ends[0]["global_step"] == ends[1]["global_step"] == 6
    for key in ("state_dict", "current_model_state", "averaging_state", "optimizer_states", "lr_schedulers"):
        _assert_same_tree(ends[0][key], ends[1][key], key)  # EMA weights, live weights, AdamW, warm-up
    assert ends[1]["lr_schedulers"][0]["last_epoch"] == 6
    ema, live = ends[1]["state_dict"], ends[1]["current_model_state"]
    assert any(not torch.equal(ema[k], live[k]) for k in live)  # the EMA really is a different set of weights


# =========================================================================== 1. DDP on the CPU (2 processes, gloo)
class GradRecordingModule(FixedDrawModule):
    """Saves the initial weights, the batch, the loss and the (all-reduced) gradients of the first step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.first_step: dict = {}

    def on_train_start(self) -> None:
        super().on_train_start()
        self.first_step["initial"] = {k: v.clone() for k, v in self.state_dict().items()}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.first_step.update(batch=batch.clone(), loss=loss.detach().clone())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.first_step["grads"] = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


SGD = partial(torch.optim.SGD, lr=0.01)
ONE_STEP = partial(LinearWarmup, warmup_steps=1)


def _ddp_worker(out: str) -> None:
    """One rank of the 2-process run (launched by ``ddp_results``): three fits/tests in one process group."""
    out_dir = Path(out)
    rank = int(os.environ["RANK"])
    ddp = {**TRAINER, "devices": 2, "strategy": "ddp", "enable_checkpointing": False, "default_root_dir": out}
    # (a) ordinary training: which seed, times and noise each rank draws
    L.seed_everything(0)
    module = DrawRecordingModule(**vdm_kwargs(process=FixedLinear))
    L.Trainer(**ddp, max_steps=2, limit_val_batches=0).fit(
        module, datamodule=SyntheticDataModule(SHAPE, num_train=16, batch_size=4)
    )
    torch.save(module.records, out_dir / f"draws_{rank}.pt")
    # (b) one SGD step on a global batch of 8 (4 per rank) with draws fixed per example
    L.seed_everything(0)
    module = GradRecordingModule(**vdm_kwargs(optimizer=SGD, lr_scheduler=ONE_STEP))
    L.Trainer(**ddp, max_steps=1, limit_val_batches=0).fit(
        module, datamodule=SyntheticDataModule(SHAPE, num_train=8, batch_size=4)
    )
    results = {"grad": module.first_step, "final": module.state_dict()}
    # (c) the synced test metric over 12 images (6 per rank), then 11 (the sampler pads one duplicate)
    tester = L.Trainer(**ddp)
    for n in (12, 11):
        tester.test(module, datamodule=SyntheticDataModule(SHAPE, num_eval=n, eval_batch_size=4), verbose=False)
        results[f"test_{n}"] = module.test_results
        results[f"logged_{n}"] = {k: float(v) for k, v in tester.callback_metrics.items() if k.startswith("test/")}
    # (d) the evaluation callback (dense ELBO and ODE bound, per image) over 11 images, one per batch
    callback = _evaluation_callback(out_dir / f"cache_{rank}", ode_images=2)
    L.Trainer(**ddp, callbacks=[callback]).test(module, datamodule=_eval_data(), verbose=False)
    results["per_image"] = callback.per_image
    results["eval_logged"] = {k: float(v) for k, v in callback_metrics(module).items()}
    torch.save(results, out_dir / f"ddp_{rank}.pt")


EVAL_IMAGES = 11


def _evaluation_callback(cache_dir: Path, ode_images: int) -> EvaluationCallback:
    """Dense ELBO of every image and the ODE bound of the first ``ode_images`` (per process), with a cache, so
    each batch's draws come from a seed of its images' keys: one image per batch makes them a function of the
    image alone, whichever rank or position it has."""
    return EvaluationCallback(
        num_images=EVAL_IMAGES,
        num_times=4,
        fid=False,
        ode_images=ode_images,
        ode_rtol=1e-3,
        ode_atol=1e-3,
        cache_dir=str(cache_dir),
        progress=False,
    )


def _eval_data() -> SyntheticDataModule:
    return SyntheticDataModule(SHAPE, num_eval=EVAL_IMAGES, eval_batch_size=1)


def callback_metrics(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.trainer.callback_metrics.items() if "dense" in k or "ode" in k}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs ``_ddp_worker`` as 2 processes (rank 0 and 1) joined by gloo, as a launcher such as torchrun does;
    Lightning sees the environment and uses those processes rather than spawning its own."""
    out = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_reliability as t; t._ddp_worker({str(out)!r})"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    # Generous: on a loaded 2-core machine the four fits/tests of _ddp_worker take minutes, not seconds.
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return {
        "draws": [torch.load(out / f"draws_{r}.pt", weights_only=False) for r in (0, 1)],
        "ddp": [torch.load(out / f"ddp_{r}.pt", weights_only=False) for r in (0, 1)],
    }


def test_ddp_ranks_draw_different_times_and_noise(ddp_results: dict) -> None:
    """With ``seed_every_step`` each (step, rank) runs under its own seed, so the two ranks draw different
    times and noise (and, for MuLAN, latents, drawn from the same generator). Without it both ranks would run
    under the same seed (Lightning seeds every rank alike) and draw the same. The replayed draws are checked
    to be the ones the step used: the loss recomputed with them equals the logged loss."""
    records = {(r["step"], r["rank"]): r for rank in ddp_results["draws"] for r in rank}
    assert sorted(records) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({r["seed"] for r in records.values()}) == 4  # a distinct seed per (step, rank)
    for r in records.values():
        assert r["replay"].item() == pytest.approx(r["loss"].item(), rel=1e-6)
    for step in (0, 1):
        a, b = records[(step, 0)], records[(step, 1)]
        assert not torch.allclose(a["t"], b["t"]) and not torch.allclose(a["eps"], b["eps"])
        assert not torch.allclose(a["noise"], b["noise"])


def _reference_module(state: dict) -> FixedDrawModule:
    module = FixedDrawModule(**vdm_kwargs(optimizer=SGD, lr_scheduler=ONE_STEP))
    module.load_state_dict(state)
    module._base_seed = 0  # the DDP workers' run seed (seed_everything(0)), which evaluation seeds from
    return module


def test_ddp_step_equals_one_process_on_the_global_batch(ddp_results: dict) -> None:
    """Design: every random draw is a function of the example alone (``FixedDrawModule``), so the per-example
    loss does not depend on which rank or batch an example lands in. Rank r computes the mean loss of its 4
    images; DDP averages the gradients over the 2 ranks, which for equal halves is the gradient of the mean
    loss over all 8, what one process computes on the global batch of 8. Tolerance: 1e-6 absolute / 1e-5
    relative (float32 sums in another order)."""
    ranks = [r["grad"] for r in ddp_results["ddp"]]
    images = torch.cat([r["batch"] for r in ranks])
    train = SyntheticDataModule(SHAPE, num_train=8)._load_split("train")
    assert sorted(map(bytes, images.numpy())) == sorted(map(bytes, train.numpy()))  # the halves cover the set
    torch.testing.assert_close(ranks[0]["initial"], ranks[1]["initial"], rtol=0, atol=0)
    module = _reference_module(ranks[0]["initial"])
    loss = module.model.bpd(module.bound(images).total).mean()
    loss.backward()
    assert loss.item() == pytest.approx((ranks[0]["loss"] + ranks[1]["loss"]).item() / 2, rel=1e-6)
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert grads.keys() == ranks[0]["grads"].keys()
    for rank in ranks:
        torch.testing.assert_close(rank["grads"], grads, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # the halves differ: averaging mattered


@pytest.mark.parametrize("n", [12, 11])
def test_ddp_test_metric_equals_one_process(ddp_results: dict, n: int) -> None:
    """The test bound (mean and standard error per term) synced over 2 ranks equals the one-process value over
    the same n images. For n = 11 the DistributedSampler pads rank 1 with a duplicate of image 0; the module
    drops that duplicate, so the count, mean and standard error are those of the 11 real images. What each rank
    logs (``test/bpd``, ``test/bpd_stderr``, ``test/recon_bpd``) is that global value too."""
    module = _reference_module(ddp_results["ddp"][0]["final"])
    images = SyntheticDataModule(SHAPE, num_eval=n)._load_split("test")
    with torch.no_grad():
        bpd = {name: module.model.bpd(value).double() for name, value in module.bound(images).as_dict().items()}
    for rank in ddp_results["ddp"]:
        results = rank[f"test_{n}"]
        assert results.keys() == bpd.keys()
        for name, values in bpd.items():
            mean, stderr = results[name]
            assert mean == pytest.approx(values.mean().item(), rel=1e-6, abs=1e-9)
            assert stderr == pytest.approx((values.std() / math.sqrt(n)).item(), rel=1e-5, abs=1e-9)
        logged = rank[f"logged_{n}"]  # what each rank logs is the global value (float32)
        assert logged["test/bpd"] == pytest.approx(bpd["total"].mean().item(), rel=1e-6)
        assert logged["test/bpd_stderr"] == pytest.approx((bpd["total"].std() / math.sqrt(n)).item(), rel=1e-5)
        assert logged["test/recon_bpd"] == pytest.approx(bpd["recon"].mean().item(), rel=1e-6, abs=1e-9)


def test_ddp_evaluation_callback_counts_every_image_once_with_one_process_values(
    ddp_results: dict, tmp_path: Path
) -> None:
    """The evaluation callback on 2 ranks (11 images: 6 and 5, the unrepeated sampler pads none): the ranks' images
    are disjoint and together the 11 test images; each image's dense bits/dim and ODE figures equal one process's
    values for it (one image per batch: its draws are seeded by its key, so they do not depend on the rank), and the
    logged means, synced over the ranks, are one process's means over the same images (the ODE's over the 4 images
    the ranks solved, 2 each)."""
    ranks = [rank["per_image"] for rank in ddp_results["ddp"]]
    assert [len(r) for r in ranks] == [6, 5] and not ranks[0].keys() & ranks[1].keys()
    module = _reference_module(ddp_results["ddp"][0]["final"])
    callback = _evaluation_callback(tmp_path / "cache", ode_images=4)  # the ranks solved the first 4 test images
    L.Trainer(**TRAINER, callbacks=[callback]).test(module, datamodule=_eval_data(), verbose=False)
    single = callback.per_image
    assert single.keys() == ranks[0].keys() | ranks[1].keys()
    solved = [key for rank in ranks for key, values in rank.items() if "ode_bpd" in values]
    assert sorted(solved) == sorted(key for key, values in single.items() if "ode_bpd" in values)
    for rank in ranks:
        for key, values in rank.items():
            for name, value in values.items():
                if name != "ode_seconds":
                    assert value == pytest.approx(single[key][name], rel=1e-5, abs=1e-6), (key, name)
    dense = torch.tensor([values["dense_bpd"] for values in single.values()], dtype=torch.float64)
    ode = torch.tensor([single[key]["ode_bpd"] for key in solved], dtype=torch.float64)
    for rank in ddp_results["ddp"]:
        logged = rank["eval_logged"]
        assert logged["test/dense_images"] == EVAL_IMAGES
        assert logged["test/dense_bpd"] == pytest.approx(dense.mean().item(), rel=1e-5)
        assert logged["test/dense_bpd_stderr"] == pytest.approx((dense.std() / math.sqrt(11)).item(), rel=1e-4)
        assert logged["test/ode_bpd"] == pytest.approx(ode.mean().item(), rel=1e-5)
    seconds = [rank["eval_logged"]["test/ode_seconds_per_image"] for rank in ddp_results["ddp"]]
    assert seconds[0] == seconds[1] > 0  # each rank's own timing, averaged over the ranks: one figure logged


# =========================================================================== 3. bad input
@pytest.fixture(scope="module")
def vdm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VDM checkpoint trained by the CLI on 8x8 digits (4 steps)."""
    root = tmp_path_factory.mktemp("vdm")
    main(["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(root)])
    return sorted(root.rglob("*.ckpt"))[-1]


def _data(class_path: str, **init_args) -> str:
    return "--data=" + json.dumps({"class_path": class_path, "init_args": init_args})


TEST_ARGS = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def test_checkpoint_tested_on_data_of_another_shape_is_refused(vdm_ckpt: Path) -> None:
    """The U-Net and a scalar schedule would load into a model of any image size and give a bound for
    the wrong data set without complaint: the module compares the checkpoint's image shape with the data's."""
    data = _data("mulan.lightning.data.EmbeddedDataModule", image_size=16)
    with pytest.raises(
        ValueError,
        match=r"trained on images of shape \(1, 8, 8\).*data given now has shape "
        r"\(1, 16, 16\).*leave out --data",
    ):
        build_cli(["test", "--ckpt_path", str(vdm_ckpt), data, *TEST_ARGS])


def test_checkpoint_of_another_model_configuration_is_named(vdm_ckpt: Path, tmp_path: Path) -> None:
    """A VDM checkpoint loaded into a MuLAN module (Python API; mulan-cli rebuilds the model from the
    checkpoint's own hyper-parameters): the error names the checkpoint, the keys and the fix."""
    from mulan.latents import KHotLatent
    from mulan.lightning.data import EmbeddedDataModule
    from mulan.processes.schedules import Polynomial

    module = DiffusionTask(
        **vdm_kwargs(
            process=partial(Polynomial, hidden=8), latent=partial(KHotLatent, m=6, k=2, channels=8, num_blocks=1)
        )
    )
    trainer = L.Trainer(**TRAINER, default_root_dir=tmp_path)
    with pytest.raises(
        RuntimeError,
        match=r"(?s)checkpoint '.*\.ckpt' was trained with a different model "
        r"configuration.*Missing key.*test it without --model",
    ):
        trainer.test(module, datamodule=EmbeddedDataModule(), ckpt_path=str(vdm_ckpt))


class _BadDtypeData(SyntheticDataModule):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__(SHAPE, num_train=8, num_eval=4, batch_size=4)
        self.dtype = dtype

    def _load_split(self, split):
        return super()._load_split(split).to(self.dtype) * (1 if self.dtype.is_floating_point else 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])  # float pixels; integers up to 510
def test_non_uint8_data_is_refused_before_training(dtype: torch.dtype, tmp_path: Path) -> None:
    module = DiffusionTask(**vdm_kwargs())
    trainer = L.Trainer(**TRAINER, max_steps=1, default_root_dir=tmp_path)
    with pytest.raises(TypeError, match=rf"_BadDtypeData: the 'train' split must have dtype torch.uint8, got {dtype}"):
        trainer.fit(module, datamodule=_BadDtypeData(dtype))
    assert trainer.global_step == 0


def test_empty_split_through_the_cli(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"the 'val' split is empty \(0 images\)\. Increase val_fraction"):
        build_cli(
            [
                "fit",
                "--config",
                str(CONF / "vdm_tiny.yaml"),
                "--trainer.default_root_dir",
                str(tmp_path),
                "--data.init_args.val_fraction",
                "0",
            ]
        )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_missing_data_directory_through_the_cli(tmp_path: Path) -> None:
    data = _data("mulan.lightning.data.CIFAR10DataModule", root=str(tmp_path / "nowhere"))
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)CIFAR-10 not found.*nowhere/cifar-10-batches-py/.*"
        r"data_batch_1.*--data.init_args.download true",
    ):
        build_cli(["fit", "--config", str(CONF / "vdm_tiny.yaml"), data, "--trainer.default_root_dir", str(tmp_path)])


def test_misspelt_class_path_is_named(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(CONF / "vdm_tiny.yaml"),
                "--model.init_args.process.class_path",
                "mulan.schedules.LearnedScaler",
            ]
        )
    assert "LearnedScaler" in capsys.readouterr().err


class NaNAtStep2(DiffusionTask):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            with torch.no_grad():
                self.model.denoiser.conv_out.bias.fill_(float("nan"))
        return super().training_step(batch, batch_idx)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    module = NaNAtStep2(**vdm_kwargs())
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(**TRAINER, max_steps=5, limit_val_batches=0, callbacks=[checkpoints])
    with pytest.raises(FloatingPointError, match="non-finite loss at global step 2"):
        trainer.fit(module, datamodule=SyntheticDataModule(SHAPE, num_train=16, batch_size=4))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    with torch.serialization.safe_globals(SAFE):
        saved = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=True, map_location="cpu")
    assert saved["global_step"] == 2 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    good = DiffusionTask(**vdm_kwargs())
    good.load_state_dict(saved["state_dict"])  # intact: every key, every shape
    assert torch.isfinite(good.bound(torch.zeros(2, *SHAPE, dtype=torch.uint8)).total).all()


# =========================================================================== 4. security
def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in sorted((ROOT / "src" / "mulan").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                target = ast.unparse(func)
                if called == name and (name != "load" or target == "torch.load"):
                    found.append((path, node))
    return found


def test_every_checkpoint_load_in_src_passes_weights_only_true() -> None:
    calls = _calls("load") + _calls("load_from_checkpoint")
    assert calls, "no torch.load call found: the scan is broken"
    for path, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, (
            f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)} must pass weights_only=True"
        )


def test_dependency_spec_excludes_the_malicious_lightning_releases() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = [d for d in deps if d.replace(" ", "").startswith("lightning") and not d.startswith("lightning-")]
    assert len(spec) == 1
    specifiers = SpecifierSet(spec[0][len("lightning") :])
    for bad in ("2.6.2", "2.6.3"):
        assert Version(bad) not in specifiers
    assert Version(version("lightning")) in specifiers
    assert Version(version("lightning")) not in (Version("2.6.2"), Version("2.6.3"))
