"""Checkpoint retention: ``last.ckpt`` is always the newest weights (after every validation and at the end of
training), the best by ``val/bpd`` is kept beside it, and every shipped configuration is set up that way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from mulan.cli import main
from mulan.lightning import LastCheckpoint
from mulan.lightning.task import DiffusionTask

ROOT = Path(__file__).parents[1]
CONF = Path(__file__).parent / "conf"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class WorseningBound(DiffusionTask):
    """Logs ``val/bpd`` = the global step, so every validation is worse than the one before: the best is the first
    validation, and the newest is not the best."""

    def log_dict(self, dictionary, *args, **kwargs) -> None:
        if "val/bpd" in dictionary:
            dictionary = {**dictionary, "val/bpd": float(self.global_step)}
        super().log_dict(dictionary, *args, **kwargs)


def _checkpoint_callbacks(config: Path) -> list[dict]:
    callbacks = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("callbacks") or []
    return [c for c in callbacks if c["class_path"].endswith(("ModelCheckpoint", "LastCheckpoint"))]


def _fit(root: Path, callbacks: list[dict], *extra: str) -> None:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.5}},
        *callbacks,
    ]
    main(
        ["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(root),
         "--trainer.max_steps", "10", "--trainer.val_check_interval", "3", "--trainer.check_val_every_n_epoch", "null",
         "--trainer.limit_val_batches", "1", "--trainer.callbacks", json.dumps(callbacks),
         f"--model.class_path={__name__}.WorseningBound", *extra]
    )  # fmt: skip


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.mark.parametrize("config", ["mulan_cifar.yaml", "demo_photos.yaml"])
def test_last_ckpt_holds_the_final_step_and_the_best_is_kept_beside_it(config: str, tmp_path: Path) -> None:
    """Validations at steps 3, 6, 9, each worse than the one before; training ends at step 10 (no validation there).
    With the shipped configuration's checkpoint callbacks (periodic copies every 4 steps instead of 1M):
    ``last.ckpt`` holds step 10 with the live weights beside the EMA average (saved before the average is copied
    into the model at the end), the best (step 3) is kept, and the periodic copies are steps 4 and 8."""
    callbacks = _checkpoint_callbacks(ROOT / "configs" / config)
    for callback in callbacks:
        if (callback.get("init_args") or {}).get("every_n_train_steps"):
            callback["init_args"]["every_n_train_steps"] = 4
    _fit(tmp_path, callbacks)
    folder = tmp_path / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10
    name = "model.denoiser.conv_in.weight"
    assert not torch.equal(last["state_dict"][name], last["current_model_state"][name])  # average != live weights
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    if config == "mulan_cifar.yaml":
        assert names == ["best-step=3.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"]
        assert [_step(folder / n) for n in names[:3]] == [3, 4, 8]
    else:  # the latest only
        assert names == ["last.ckpt"]


class LastStepSeen(Callback):
    """Records, at the start of every training batch, the step that ``last.ckpt`` holds (0: none yet)."""

    seen: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        LastStepSeen.seen[trainer.global_step] = _step(last) if last.exists() else 0


def test_last_ckpt_is_rewritten_at_every_validation(tmp_path: Path) -> None:
    """While training, ``last.ckpt`` holds the step of the latest validation (3, 6, 9), each worse than the best
    (3), and at the end the final step."""
    LastStepSeen.seen = {}
    callbacks = _checkpoint_callbacks(ROOT / "configs" / "folder.yaml") + [{"class_path": f"{__name__}.LastStepSeen"}]
    _fit(tmp_path, callbacks)
    assert LastStepSeen.seen == {0: 0, 1: 0, 2: 0, 3: 3, 4: 3, 5: 3, 6: 6, 7: 6, 8: 6, 9: 9}
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["best-step=3.ckpt", "last.ckpt"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_keeps_the_newest_and_the_best(config: Path) -> None:
    """Each full configuration (not the fragments meant to go on top of one) has exactly one ``LastCheckpoint``
    and no ``ModelCheckpoint(save_last=...)`` (whose last.ckpt goes stale); a monitored ``ModelCheckpoint``
    monitors ``val/bpd`` (lower is better) and keeps one; every callback is built from the config as the CLI
    builds it."""
    text = yaml.safe_load(config.read_text())
    if "trainer" not in text:
        pytest.skip("a fragment, used on top of a full configuration")
    callbacks = _checkpoint_callbacks(config)
    built = []
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    parsed = parser.parse_object({"callbacks": callbacks})
    built = parser.instantiate_classes(parsed).callbacks
    last = [c for c in built if isinstance(c, LastCheckpoint)]
    assert len(last) == 1 and last[0].save_last is True
    for callback in built:
        if isinstance(callback, ModelCheckpoint) and not isinstance(callback, LastCheckpoint):
            assert not callback.save_last, "ModelCheckpoint(save_last=...) rewrites last.ckpt only on improvement"
            assert callback.monitor == "val/bpd" and callback.mode == "min" and callback.save_top_k == 1
    if "trainer" in text and text["trainer"].get("max_steps", 0) >= 1_000_000:  # the paper runs keep periodic copies
        assert last[0]._every_n_train_steps == 1_000_000 and last[0].save_top_k == -1
