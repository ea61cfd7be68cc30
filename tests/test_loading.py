"""``mulan.lightning.loading.load_task``: from a ``mulan-cli fit`` checkpoint or its export to ``(task, data)``
with the test bound of ``mulan-cli test`` bit for bit; a file naming a foreign class is refused before import."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mulan import export
from mulan.cli import build_cli, main
from mulan.lightning.data import EmbeddedDataModule
from mulan.lightning.loading import load_task
from mulan.lightning.task import DiffusionTask

CONF = Path(__file__).parent / "conf"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
         "false", "--trainer.limit_test_batches", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """MuLAN (tiny) fitted for 4 steps with seed 7 and EMAWeightAveraging (decay 0.5: the average is not the raw
    weights), its export, and the test bound ``mulan-cli test`` gives for it (two test batches)."""
    root = tmp_path_factory.mktemp("loading")
    main(
        ["fit", "--config", str(CONF / "mulan_tiny.yaml"), "--trainer.default_root_dir", str(root),
         "--seed_everything", "7", "--trainer.limit_val_batches", "0",
         "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay=0.5"]
    )  # fmt: skip
    ckpt = sorted(root.rglob("*.ckpt"))[-1]
    exported = export.export(ckpt, root / "model.safetensors")
    cli = build_cli(["test", "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(root), "--seed_everything",
                     "7", *QUIET])  # fmt: skip
    return {"ckpt": ckpt, "file": exported, "bound": cli.model.test_results, "state": cli.model.state_dict()}


def _test_bound(task: DiffusionTask, data: L.LightningDataModule) -> dict[str, tuple[float, float]]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=2)
    trainer.test(task, datamodule=data, verbose=False)
    return task.test_results


def test_a_checkpoint_gives_the_cli_test_bound_bitwise(trained: dict) -> None:
    torch.manual_seed(123)  # not the run's seed: the evaluation draws must come from the checkpoint's
    task, data = load_task(trained["ckpt"])
    assert type(task) is DiffusionTask and not task.training and isinstance(data, EmbeddedDataModule)
    saved = torch.load(trained["ckpt"], weights_only=True)
    raw = saved["current_model_state"]
    for name, value in saved["state_dict"].items():  # the EMA average, as saved
        assert torch.equal(task.state_dict()[name], value), name
    assert any(not torch.equal(task.state_dict()[n], v) for n, v in raw.items())
    assert _test_bound(task, data) == trained["bound"]  # every term: mean and standard error, bit for bit


def test_an_export_gives_the_cli_test_bound_bitwise(trained: dict) -> None:
    torch.manual_seed(12345)  # the export records the run's seed: evaluation draws come from it, not from torch's
    task, data = load_task(trained["file"])
    assert data is not None and data.hparams["source"] == "digits"
    for name, value in trained["state"].items():
        assert torch.equal(task.state_dict()[name], value), name
    assert _test_bound(task, data) == trained["bound"]


def test_loading_leaves_the_callers_random_stream_alone(trained: dict) -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_task(trained["ckpt"])
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("where", ["hyper_parameters", "datamodule_hyper_parameters"])
def test_a_foreign_class_path_is_refused_before_it_is_imported(trained: dict, tmp_path: Path, where: str) -> None:
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    checkpoint[where]["_class_path"] = "this.Something"  # importing `this` prints the Zen of Python
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    sys.modules.pop("this", None)
    with pytest.raises(ValueError, match=r"edited\.ckpt: refusing to import 'this\.Something' \(at _class_path\)"):
        load_task(edited)
    assert "this" not in sys.modules


def test_a_checkpoint_without_a_saved_configuration_is_named(trained: dict, tmp_path: Path) -> None:
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    checkpoint["hyper_parameters"].pop("_class_path")
    edited = tmp_path / "bare.ckpt"
    torch.save(checkpoint, edited)
    with pytest.raises(ValueError, match=r"bare\.ckpt holds no configuration saved by mulan-cli fit"):
        load_task(edited)
