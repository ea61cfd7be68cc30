"""Randomness and resuming: every micro-batch, rank and epoch draws its own numbers; a training process killed
with SIGKILL in the middle of an epoch and resumed from its last checkpoint (even with another seed on the command
line) continues exactly as the uninterrupted run; an interrupted checkpoint write leaves the previous file whole."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
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


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
TIMEOUT = 1800
"""Seconds a training process may take: generous, for a loaded 2-core machine (a run takes ~10 s when idle)."""


def _run(root: Path, *extra: str) -> None:
    result = subprocess.run(_command(root, *extra), env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run: STEPS steps, a checkpoint after each."""
    root = tmp_path_factory.mktemp("whole")
    _run(root)
    assert sorted(_losses(root)) == list(range(STEPS))
    return root


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(whole: Path, tmp_path: Path) -> None:
    """The process kills itself (SIGKILL, no clean-up) as step 10 starts, in the middle of the third epoch: the
    kill lands at the same point however loaded the machine is, so nothing here depends on timing."""
    expected = _losses(whole)
    killed = tmp_path / "killed"
    process = subprocess.run(
        _command(killed, "--trainer.callbacks+=sigkill_callback.SigkillAt", "--trainer.callbacks.step=9"),
        env=ENV,
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    saved = sorted(int(p.stem.split("=")[1]) for p in (killed / "ckpt").glob("step=*.ckpt"))
    assert saved == list(range(1, 10))  # killed before the end of training, after step 9's checkpoint
    # every checkpoint file loads whole, and no temporary file is left under a checkpoint's name
    for path in (killed / "ckpt").glob("step=*.ckpt"):
        assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == int(path.stem.split("=")[1])
    strays = [p.name for p in (killed / "ckpt").iterdir() if not p.match("step=*.ckpt")]
    assert len(strays) <= 1 and all(n.startswith(".step=") and n.endswith(".tmp") for n in strays), strays

    resumed = tmp_path / "resumed"
    # from step 9 (the killed run's last checkpoint), in the middle of the third epoch (4 batches each); with
    # another seed on the command line: the run's own seed and data order come back from the checkpoint
    _run(resumed, f"--ckpt_path={killed / 'ckpt' / 'step=9.ckpt'}", "--seed_everything=12345")
    after = _losses(resumed)
    assert sorted(after) == list(range(9, STEPS))
    for step in after:
        assert after[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


def test_two_resumes_in_one_epoch_equal_the_uninterrupted_run(whole: Path, tmp_path: Path) -> None:
    """Resume from step 6 (mid-epoch: batch 2 of 4 of the second epoch), then resume *that* run from its step 7
    (batch 3 of the same epoch): the loader state a resumed process saves must count the batches it skipped, or
    the second resume replays or skips data. Every later loss and the final weights equal the uninterrupted run's."""
    expected = _losses(whole)
    first, second = tmp_path / "first", tmp_path / "second"
    _run(first, f"--ckpt_path={whole / 'ckpt' / 'step=6.ckpt'}", "--trainer.max_steps=8")
    _run(second, f"--ckpt_path={first / 'ckpt' / 'step=7.ckpt'}")
    after = _losses(second)
    assert sorted(after) == list(range(7, STEPS))
    for step in after:
        assert after[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    ours, theirs = _weights(second / "ckpt" / f"step={STEPS}.ckpt"), _weights(whole / "ckpt" / f"step={STEPS}.ckpt")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7), name


class Probe(DiffusionTask):
    def training_step(self, batch, batch_idx):
        with torch.random.fork_rng():
            self.draws.append((self.current_epoch, self.global_step, batch_idx, torch.rand(()).item()))
        return super().training_step(batch, batch_idx)


def _probe_run(tmp_path: Path, accumulate: int, max_steps: int) -> list[tuple[int, int, int, float]]:
    from functools import partial

    from mulan.networks import UNet
    from mulan.processes.schedules import FixedLinear

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
