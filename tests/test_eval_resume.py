"""Resumable evaluation: EvaluationCallback(cache_dir=...) stores per-image dense and ODE results of a test, so a
test interrupted and started again computes only the images it had not finished, with the values and the final
metrics of an uninterrupted test; another model never reuses them. And the ODE stage's ETA lines."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch

from mulan.latents import KHotLatent
from mulan.lightning import DiffusionTask
from mulan.lightning import evaluation as evaluation_module
from mulan.lightning.data import EmbeddedDataModule
from mulan.lightning.evaluation import EvaluationCallback
from mulan.networks import UNet
from mulan.processes.schedules import Polynomial

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH, BATCHES = 4, 3
IMAGES = BATCH * BATCHES


def tiny_mulan() -> DiffusionTask:
    """A random 1x8x8 MuLAN (no Fourier features: a random network's drift is then smooth, the solve short)."""
    torch.manual_seed(0)
    return DiffusionTask(
        image_shape=(1, 8, 8),
        denoiser=partial(UNet, channels=8, num_blocks=1, dropout=0.0, fourier_exponents=()),
        process=partial(Polynomial, hidden=8),
        latent=partial(KHotLatent, m=6, k=2, channels=8, num_blocks=1),
        sample_steps=4,
    ).eval()


class Interrupted(RuntimeError):
    """Stands for a job killed mid-test."""


class Spy:
    """Wraps a function of the evaluation module: counts the images it is given, raises on call ``fail_at``."""

    def __init__(self, fn, fail_at: int | None = None) -> None:
        self.fn, self.fail_at, self.calls, self.images = fn, fail_at, 0, 0

    def __call__(self, model, images, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Interrupted("interrupted")  # like a killed job: nothing after it runs
        self.images += images.shape[0]
        return self.fn(model, images, *args, **kwargs)


def run(
    tmp_path: Path, cache_dir: Path | None, module: DiffusionTask | None = None, fail_at: int | None = None
) -> tuple[EvaluationCallback, dict[str, torch.Tensor], Spy, Spy]:
    """One test of ``module`` (default: the tiny MuLAN) on 12 digits in 3 batches with the dense ELBO and the ODE
    bound of every image; ``fail_at``: the ODE call that interrupts it."""
    callback = EvaluationCallback(
        num_images=IMAGES,
        num_times=4,
        fid=False,
        ode_images=IMAGES,
        ode_rtol=1e-3,
        ode_atol=1e-3,
        cache_dir=None if cache_dir is None else str(cache_dir),
        progress=False,
    )
    trainer = L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        limit_test_batches=BATCHES,
        default_root_dir=tmp_path,
    )
    dense = Spy(evaluation_module.dense_elbo)
    ode = Spy(evaluation_module.ode_likelihood, fail_at)
    with (
        mock.patch.object(evaluation_module, "dense_elbo", dense),
        mock.patch.object(evaluation_module, "ode_likelihood", ode),
    ):
        trainer.test(module or tiny_mulan(), datamodule=EmbeddedDataModule(batch_size=BATCH))
    return callback, dict(trainer.callback_metrics), dense, ode


def values(callback: EvaluationCallback) -> dict[str, dict[str, float]]:
    """The per-image results but the wall-clock seconds (which no two runs share)."""
    return {k: {n: v for n, v in entry.items() if n != "ode_seconds"} for k, entry in callback.per_image.items()}


def test_interrupted_test_resumes_with_the_same_values(tmp_path: Path) -> None:
    """An uninterrupted test and one interrupted during its third batch's ODE solve, then started again with the same
    cache: the restart computes the dense ELBO of no image and the ODE of only the 4 unfinished ones, and every
    per-image value and final metric equals the uninterrupted test's. A third start recomputes nothing."""
    whole, whole_metrics, dense, ode = run(tmp_path, tmp_path / "cache_a")
    assert dense.images == IMAGES and ode.images == IMAGES and len(whole.per_image) == IMAGES

    with pytest.raises(Interrupted):
        run(tmp_path, tmp_path / "cache_b", fail_at=3)  # two batches done; the third's dense ELBO is saved
    resumed, resumed_metrics, dense, ode = run(tmp_path, tmp_path / "cache_b")
    assert dense.images == 0 and ode.images == BATCH and ode.calls == 1
    assert values(resumed) == values(whole)  # bit for bit: cached values and reseeded draws alike
    for name in ("test/dense_bpd", "test/dense_bpd_stderr", "test/ode_bpd", "test/ode_bpd_stderr", "test/ode_nfe"):
        assert torch.equal(resumed_metrics[name], whole_metrics[name]), name
    assert resumed_metrics["test/dense_images"] == IMAGES

    again, _, dense, ode = run(tmp_path, tmp_path / "cache_b")
    assert dense.images == 0 and ode.images == 0 and values(again) == values(whole)
    assert not list((tmp_path / "cache_b").rglob("*.tmp"))  # written atomically: no leftovers


def test_changed_weights_or_settings_do_not_reuse_the_cache(tmp_path: Path) -> None:
    """One weight changed by 1e-4 gives another fingerprint: every image is computed again, in a directory of its
    own (with the same draws, which depend on the run's seed and the images, not on the weights: the values move by
    no more than the change's effect); another ODE tolerance gives another fingerprint too."""
    cache = tmp_path / "cache"
    first, _, _, _ = run(tmp_path, cache)
    module = tiny_mulan()
    with torch.no_grad():
        next(module.model.denoiser.parameters()).view(-1)[0] += 1e-4
    changed, _, dense, ode = run(tmp_path, cache, module=module)
    assert dense.images == IMAGES and ode.images == IMAGES
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert changed.per_image.keys() == first.per_image.keys()
    for key, entry in values(changed).items():
        for name, value in entry.items():
            assert value == pytest.approx(values(first)[key][name], abs=1e-3), (key, name)

    callback = EvaluationCallback(ode_rtol=1e-4, cache_dir=str(cache))
    assert callback._settings("32-true", "test") != first._settings("32-true", "test")


def test_without_cache_dir_nothing_is_written_and_values_are_per_image(tmp_path: Path) -> None:
    """No ``cache_dir``: nothing lands on disk, and the values are those of a test with a cache (the draws are
    seeded from the run's seed and the images' keys either way)."""
    callback, metrics, dense, ode = run(tmp_path, None)
    cached, _, _, _ = run(tmp_path, tmp_path / "cache_c")
    assert values(callback) == values(cached)
    for path in (tmp_path / "cache_c").rglob("*.json"):
        path.unlink()
    assert dense.images == IMAGES and ode.images == IMAGES and len(callback.per_image) == IMAGES
    ode_bpd = torch.tensor([v["ode_bpd"] for v in callback.per_image.values()])
    assert torch.allclose(ode_bpd.mean(), metrics["test/ode_bpd"])
    assert not list(tmp_path.rglob("*.json"))


def test_ode_stage_reports_progress_with_an_eta(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With ``progress``, rank zero logs images done / total and the time left after each ODE batch, and says how
    many came from the cache on a restart."""
    callback = EvaluationCallback(
        num_images=8, num_times=2, fid=False, ode_images=8, ode_rtol=1e-3, ode_atol=1e-3, cache_dir=str(tmp_path / "c")
    )
    for _ in range(2):
        trainer = L.Trainer(
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
            limit_test_batches=2,
            default_root_dir=tmp_path,
        )
        with caplog.at_level(logging.INFO):
            trainer.test(tiny_mulan(), datamodule=EmbeddedDataModule(batch_size=BATCH))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ODE likelihood:")]
    assert lines[0].startswith("ODE likelihood: 4/8 images") and "left" in lines[0]
    assert lines[1].startswith("ODE likelihood: 8/8 images") and "0 s left" in lines[1]
    assert "(4 of this batch from the cache)" in lines[2]
    assert any("found in" in r.getMessage() for r in caplog.records)
