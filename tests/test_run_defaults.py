"""What a run shows by default: every shipped config logs the learning rate and writes pictures at test; ``predict
--num_samples N`` draws exactly N samples with an enlarged grid; the latent-cost warning comes once, attributed to the
caller's line; no Lightning tip banners; the training bar counts steps out of ``max_steps``; ``mulan-cli --help``
answers without importing torch or Lightning."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import tomllib
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from PIL import Image
from torch.utils.data import DataLoader

import mulan
import mulan.cli
from mulan.cli import build_cli, main
from mulan.cli.app import LIGHTNING_INFO_LOGGERS, MulanCLI
from mulan.figures import image_grid
from mulan.latents import KHotLatent
from mulan.lightning import DiffusionTask
from mulan.lightning.pictures import PicturesCallback, fixed_count_loader, grid_scale
from mulan.lightning.progress import train_description
from mulan.networks import UNet
from mulan.processes.schedules import Polynomial

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "tests" / "conf" / "mulan_tiny.yaml"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


# ------------------------------------------------------------------------------------------ shipped configs
class _ParseOnly(MulanCLI):
    """The CLI's parser, without building anything."""

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def test_every_shipped_config_logs_the_learning_rate_and_writes_pictures_at_test() -> None:
    runs = [path for path in CONFIGS if "trainer" in yaml.safe_load(path.read_text())]  # not the model fragments
    assert len(runs) >= 15
    parser = _ParseOnly(
        DiffusionTask,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=["--config", str(TINY)],
        run=False,
    ).parser
    missing = []
    for path in runs:
        needs_root = yaml.safe_load(path.read_text())["data"]["class_path"].endswith("ImageFolderDataModule")
        config = parser.parse_args(["--config", str(path), *(["--data.init_args.root=images"] if needs_root else [])])
        callbacks = [(_class(c.class_path), c.get("init_args") or {}) for c in config.trainer.callbacks or []]
        if not any(issubclass(cls, LearningRateMonitor) for cls, _ in callbacks):
            missing.append(f"{path.name}: no LearningRateMonitor")
        if not any(issubclass(cls, PicturesCallback) and args.get("test_pictures", True) for cls, args in callbacks):
            missing.append(f"{path.name}: no PicturesCallback writing pictures at test")
    assert not missing, missing


# ------------------------------------------------------------------------------------------ one tiny fit
@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny fit with the progress bar on; everything it printed or logged (after Lightning's own filters)."""
    folder = tmp_path_factory.mktemp("fit")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli = build_cli(
                [
                    "fit",
                    "--config",
                    str(TINY),
                    "--trainer.enable_progress_bar",
                    "true",
                    "--trainer.default_root_dir",
                    str(folder),
                ]
            )
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return {"cli": cli, "text": "\n".join([*records, out.getvalue(), err.getvalue()]), "dir": folder}


def test_a_fit_shows_no_lightning_tip_banners(fitted: dict[str, Any]) -> None:
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in fitted["text"]  # Lightning's info is captured ...
    assert "Tip" not in fitted["text"]  # ... but not its tips
    for name in LIGHTNING_INFO_LOGGERS:  # and the filter went away with the CLI: a library user's logging is theirs
        assert logging.getLogger(name).filters == []


def test_the_training_bar_counts_steps_out_of_max_steps(fitted: dict[str, Any]) -> None:
    bar = fitted["cli"].trainer.progress_bar_callback
    descriptions = [task.description for task in bar.progress.tasks]
    assert "step 4/4" in descriptions, descriptions


@pytest.mark.parametrize(
    ("max_steps", "max_epochs", "expected"),
    [(500, -1, "step 120/500"), (-1, 10, "epoch 3/9"), (-1, -1, "epoch 3"), (500, 10, "step 120/500")],
)
def test_the_training_description(max_steps: int, max_epochs: int, expected: str) -> None:
    class Trainer:
        global_step, current_epoch = 120, 3

    trainer = Trainer()
    trainer.max_steps, trainer.max_epochs = max_steps, max_epochs  # type: ignore[attr-defined]
    assert train_description(trainer) == expected  # type: ignore[arg-type]


def test_predict_draws_exactly_num_samples_with_an_enlarged_grid(fitted: dict[str, Any]) -> None:
    ckpt = next(fitted["dir"].rglob("*.ckpt"))
    out = fitted["dir"] / "samples"
    num_samples = 190  # the test split has 180 images, in batches of 16: 190 = 11 * 16 + 14
    main(
        [
            "predict",
            "--ckpt_path",
            str(ckpt),
            *QUIET,
            "--model.init_args.sample_steps",
            "2",
            "--trainer.default_root_dir",
            str(fitted["dir"]),
            "--num_samples",
            str(num_samples),
            "--predict_output_dir",
            str(out),
        ]
    )
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (num_samples, 1, 8, 8) and samples.dtype == np.uint8
    raw = image_grid(torch.from_numpy(samples))  # (3, 136, 118)
    scale = grid_scale(raw.shape[-2], raw.shape[-1])
    assert scale == 3  # the smallest whole factor that takes 118 px to 256 or more
    png = torch.from_numpy(np.array(Image.open(out / "samples.png").convert("RGB"))).permute(2, 0, 1)
    assert png.shape == (3, 136 * scale, 118 * scale)
    assert torch.equal(png, raw.repeat_interleave(scale, -2).repeat_interleave(scale, -1))  # nearest, no blur


@pytest.mark.parametrize(
    ("height", "width", "scale"), [(35, 52, 8), (37, 37, 7), (256, 300, 1), (600, 600, 1), (10, 1000, 4)]
)
def test_grid_scale_is_the_smallest_whole_factor_reaching_256_within_4096(height: int, width: int, scale: int) -> None:
    assert grid_scale(height, width) == scale


def _tiny_task() -> DiffusionTask:
    torch.manual_seed(0)
    return DiffusionTask(
        image_shape=(1, 8, 8),
        denoiser=partial(UNet, channels=8, num_blocks=1, dropout=0.0),
        process=partial(Polynomial, hidden=8),
        latent=partial(KHotLatent, m=6, k=2, channels=8, num_blocks=1),
        sample_steps=2,
    )


def test_a_fixed_count_loader_cycles_the_data_in_its_batch_size() -> None:
    data = torch.arange(5 * 64, dtype=torch.uint8).view(5, 1, 8, 8)
    loader = fixed_count_loader(DataLoader(data, batch_size=3), 11)
    batches = list(loader)
    assert [b.shape[0] for b in batches] == [3, 3, 3, 2]
    assert torch.equal(torch.cat(batches), data[torch.arange(11) % 5])
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        fixed_count_loader(DataLoader(data, batch_size=3), 0)


def test_predict_draws_the_same_samples_whatever_ran_before() -> None:
    """Each predict batch is seeded from the run's seed and its position, not from the global random state."""
    task = _tiny_task()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(torch.zeros(6, 1, 8, 8, dtype=torch.uint8), batch_size=4)
    first = torch.cat(trainer.predict(task, loader))  # type: ignore[arg-type]
    torch.rand(100)  # anything else drawn in between
    second = torch.cat(trainer.predict(task, loader))  # type: ignore[arg-type]
    assert first.shape == (6, 1, 8, 8) and torch.equal(first, second)
    assert not torch.equal(first[:2], first[4:])  # the batches draw apart


# ------------------------------------------------------------------------------------------ warnings
def test_the_latent_cost_warning_comes_once_from_the_callers_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Python's own once-per-location would hide a repeat
        for _ in range(2):
            KHotLatent((1, 8, 8), m=10, k=3, channels=8, num_blocks=1)  # 0.108 bits/dim: warned
        for _ in range(2):
            build_cli(["--config", str(TINY), *QUIET], run=False)  # the same latent, through jsonargparse
    costly = [w for w in caught if "KHotLatent: a 3-hot latent of m=10" in str(w.message)]
    assert len(costly) == 1, [str(w.message) for w in caught]
    assert Path(costly[0].filename) == Path(__file__)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    filters = pyproject["tool"]["pytest"]["ini_options"]["filterwarnings"]
    pattern = next(f.split(":")[1] for f in filters if f.startswith("ignore:KHotLatent"))
    assert re.match(pattern, str(costly[0].message), re.IGNORECASE)  # the test suite's filter still silences it


def test_a_cli_build_attributes_the_warning_to_the_callers_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_cli(["--config", str(TINY), *QUIET, "--model.init_args.latent.init_args.m", "11"], run=False)
    costly = [w for w in caught if "KHotLatent: a 3-hot latent of m=11" in str(w.message)]
    assert len(costly) == 1 and Path(costly[0].filename) == Path(__file__)


# ------------------------------------------------------------------------------------------ help, lazily
def test_top_level_help_imports_neither_torch_nor_lightning() -> None:
    code = (
        "import sys\n"
        "from mulan.cli import main\n"
        "for args in (['--help'], ['-h'], ['--version'], []):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exit:\n"
        "        print('exit', exit.code)\n"
        "print('loaded', sorted(m for m in ('torch', 'lightning', 'jsonargparse') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.count("mulan-cli SUBCOMMAND --help lists its options") == 3  # --help, -h, no arguments
    assert f"mulan-cli {mulan.__version__}" in run.stdout
    assert "exit 2" in run.stdout and "error: give a subcommand: fit, validate, test, predict" in run.stderr
    assert run.stdout.strip().endswith("loaded []")


def test_the_static_help_names_every_subcommand_of_lightning_cli() -> None:
    assert list(mulan.cli.SUBCOMMANDS) == list(LightningCLI.subcommands())
    usage = mulan.cli.TOP_LEVEL_HELP.splitlines()[0]
    assert "{" + ",".join(LightningCLI.subcommands()) + "}" in usage
    for name in LightningCLI.subcommands():
        assert re.search(rf"^  {name} +\S", mulan.cli.TOP_LEVEL_HELP, re.MULTILINE), name


def test_every_public_name_is_importable_lazily() -> None:
    for package in (mulan, mulan.cli):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
        assert set(package.__all__) <= set(dir(package))
    assert mulan.KHotLatent is KHotLatent and mulan.cli.MulanCLI is MulanCLI
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        mulan.nope  # noqa: B018
