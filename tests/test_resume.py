"""Randomness and resuming: every micro-batch, rank and epoch draws its own numbers; a training process killed
with SIGKILL in the middle of an epoch and resumed from its last checkpoint (even with another seed on the command
line) continues exactly as the uninterrupted run; an interrupted checkpoint write leaves the previous file whole."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from mulan.lightning import DiffusionTask
from mulan.lightning.checkpoint_io import AtomicCheckpointIO
from mulan.lightning.data import SyntheticDataModule

CONF = Path(__file__).parent / "conf"
SHAPE = (1, 8, 8)
STEPS = 14  # 4 batches per epoch: the run crosses three epoch boundaries


def _command(root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mulan",
        "fit",
        "--config",
        str(CONF / "vdm_tiny.yaml"),
        "--data=mulan.lightning.data.SyntheticDataModule",
        "--data.init_args.shape=[1, 8, 8]",
        "--data.init_args.num_train=64",
        "--data.init_args.batch_size=16",
        f"--trainer.max_steps={STEPS}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
        *extra,
    ]


def _losses(root: Path) -> dict[int, float]:
    """``train/bpd_step`` by optimiser step (0-based: the loss of the step that took the model to step n + 1)."""
    out = {}
    for path in root.rglob("metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/bpd_step"):
                    out[int(row["step"])] = float(row["train/bpd_step"])
    return out


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    subprocess.run(_command(whole), check=True, env=ENV, capture_output=True)
    expected = _losses(whole)
    assert sorted(expected) == list(range(STEPS))

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "ckpt" / "step=6.ckpt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = sorted(int(p.stem.split("=")[1]) for p in (killed / "ckpt").glob("step=*.ckpt"))
    last = max(saved)
    assert 6 <= last < STEPS  # killed before the end of training
    # no half-written checkpoint under a checkpoint's name: every checkpoint file loads whole, and the kill leaves at
    # most one stray temporary file (when it landed mid-write), hidden and named .tmp
    for path in (killed / "ckpt").glob("step=*.ckpt"):
        assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == int(path.stem.split("=")[1])
    strays = [p.name for p in (killed / "ckpt").iterdir() if not p.match("step=*.ckpt")]
    assert len(strays) <= 1 and all(n.startswith(".step=") and n.endswith(".tmp") for n in strays), strays

    resumed = tmp_path / "resumed"
    # from step 6, in the middle of the second epoch (4 batches each), whichever later step the kill landed at; with
    # another seed on the command line: the run's own seed and data order come back from the checkpoint
    extra = [f"--ckpt_path={killed / 'ckpt' / 'step=6.ckpt'}", "--seed_everything=12345"]
    subprocess.run(_command(resumed, *extra), check=True, env=ENV, capture_output=True)
    after = _losses(resumed)
    assert sorted(after) == list(range(6, STEPS))
    for step in after:
        assert after[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


class Probe(DiffusionTask):
    def training_step(self, batch, batch_idx):
        with torch.random.fork_rng():
            self.draws.append((self.current_epoch, self.global_step, batch_idx, torch.rand(()).item()))
        return super().training_step(batch, batch_idx)


def _probe_run(tmp_path: Path, accumulate: int, max_steps: int) -> list[tuple[int, int, int, float]]:
    from functools import partial

    from mulan.networks import UNet
    from mulan.schedules import FixedLinear

    torch.manual_seed(0)
    module = Probe(
        image_shape=SHAPE, denoiser=partial(UNet, channels=8, num_blocks=1, dropout=0.0), process=FixedLinear
    )
    module.draws = []
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=SyntheticDataModule(SHAPE, num_train=32, batch_size=8))  # 4 batches per epoch
    return module.draws


def test_every_micro_batch_and_epoch_draws_its_own_numbers(tmp_path: Path) -> None:
    draws = _probe_run(tmp_path, accumulate=2, max_steps=6)  # 12 micro-batches over 3 epochs
    assert len(draws) == 12
    values = [d[3] for d in draws]
    assert len(set(values)) == len(values)  # no two micro-batches (same step, same batch index) share draws
    by_batch_idx = {}
    for _epoch, _, batch_idx, value in draws:
        by_batch_idx.setdefault(batch_idx, []).append(value)
    assert all(len(set(v)) == len(v) for v in by_batch_idx.values())  # batch i of each epoch differs


def test_interrupted_checkpoint_write_leaves_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)

    def interrupted(obj, file, *args, **kwargs):
        file.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # the process is stopped in the middle of the write

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # and no temporary file left behind
