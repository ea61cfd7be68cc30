"""Evaluation (dense ELBO, FID/KID through torch-fidelity's real InceptionV3 code), pictures, predict output."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from mulan.cli import build_cli, main
from mulan.latents import KHotLatent
from mulan.lightning import DiffusionTask
from mulan.lightning.data import EmbeddedDataModule
from mulan.lightning.evaluation import EvaluationCallback
from mulan.lightning.features import resolve_inception_weights
from mulan.lightning.pictures import PicturesCallback
from mulan.likelihood import dense_elbo
from mulan.networks import UNet
from mulan.ode import ODESettings
from mulan.processes.schedules import Polynomial
from mulan.sampling import SAMPLERS, dpm_solver_sample

CONF = Path(__file__).parent / "conf"


def tiny_mulan() -> DiffusionTask:
    torch.manual_seed(0)
    return DiffusionTask(
        image_shape=(1, 8, 8),
        denoiser=partial(UNet, channels=8, num_blocks=1, dropout=0.0),
        process=partial(Polynomial, hidden=8),
        latent=partial(KHotLatent, m=6, k=2, channels=8, num_blocks=1),
        sample_steps=4,
    )


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised InceptionV3 state dict in torch-fidelity's format (the real file can't be fetched)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
        mock.patch.object(fe.torch, "load", return_value={}),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="x")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


def test_missing_inception_weights_fail_at_start_not_after_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth") as exc:
        resolve_inception_weights(None)
    assert str(tmp_path / "hub" / "checkpoints") in str(exc.value)
    module = tiny_mulan()
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[EvaluationCallback(num_images=4, num_samples=4)],
        default_root_dir=tmp_path,
    )
    with pytest.raises(FileNotFoundError):
        trainer.fit(module, datamodule=EmbeddedDataModule(batch_size=8))
    assert trainer.global_step == 0


def test_inception_weights_holding_code_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "weights.pth"
    torch.save({"w": nn.Linear(2, 2)}, evil)  # a pickled module, not a plain state dict
    with pytest.raises(ValueError, match="not a plain InceptionV3 state dict"):
        resolve_inception_weights(str(evil))


def test_fid_and_dense_elbo_through_the_real_inception_code(random_inception_weights: Path, tmp_path: Path) -> None:
    callback = EvaluationCallback(
        num_images=8,
        num_times=4,
        num_samples=8,
        sample_steps=3,
        fid=True,
        kid=True,
        kid_subset_size=4,
        feature_extractor_weights_path=str(random_inception_weights),
        progress=False,
    )
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, callbacks=[callback], limit_test_batches=1, default_root_dir=tmp_path
    )
    trainer.test(tiny_mulan(), datamodule=EmbeddedDataModule(batch_size=8))
    metrics = trainer.callback_metrics
    for name in ("test/fid", "test/kid_mean", "test/dense_bpd", "test/dense_bpd_stderr"):
        assert torch.isfinite(metrics[name]), name
    assert metrics["test/fid"] > 0  # samples of an untrained model differ from digits
    assert type(callback.metrics["fid"].inception).__name__ == "NoTrainInceptionV3"


def test_custom_feature_extractor_gives_zero_fid_for_identical_sets() -> None:
    """FID between a set and itself is 0 with any feature network: checks the wiring of real/fake updates."""

    class Pool(nn.Module):
        num_features = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().mean((2, 3)) + torch.arange(3.0)

    callback = EvaluationCallback(fid=True, feature_extractor=Pool())
    callback.setup(None, tiny_mulan(), "test")
    images = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8)
    callback.metrics["fid"].update(images, real=True)
    callback.metrics["fid"].update(images, real=False)
    assert callback.metrics["fid"].compute().item() == pytest.approx(0.0, abs=1e-3)


def test_dense_elbo_averages_stratified_times_per_image() -> None:
    module = tiny_mulan()
    model = module.model.eval()
    data = EmbeddedDataModule(batch_size=6)
    data.setup("test")
    images = next(iter(data.test_dataloader()))
    torch.manual_seed(0)
    dense = dense_elbo(model, images, num_times=64)
    assert dense.total.shape == (6,)
    assert torch.allclose(dense.latent, torch.full((6,), math.log(math.comb(6, 2))))
    # An unbiased estimate: agrees with the mean of many one-sample estimates within their standard error.
    torch.manual_seed(1)
    single = torch.stack([model(images).total for _ in range(64)])  # (64, 6)
    stderr = single.std(0) / 8
    assert ((dense.total - single.mean(0)).abs() < 5 * stderr + 1e-3).all()


def test_pictures_reach_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="pics")
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[PicturesCallback(num_samples=4, sample_steps=3, num_maps=2)],
    )
    trainer.fit(tiny_mulan(), datamodule=EmbeddedDataModule(batch_size=8))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"samples", "schedule/log_snr_maps", "schedule/snr_variance_across_latents"} <= tags


def test_predict_writes_uint8_samples_and_figures(tmp_path: Path) -> None:
    main(["fit", "--config", str(CONF / "mulan_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    out = tmp_path / "samples"
    calls, original = [], SAMPLERS["dpm_solver_sde"]

    def spy(model, num_samples, **kwargs):
        calls.append(kwargs["steps"])
        return original(model, num_samples, **kwargs)

    with mock.patch.dict(SAMPLERS, {"dpm_solver_sde": spy}):
        cli = build_cli(
            [
                "predict",
                "--ckpt_path",
                str(ckpt),
                "--model.init_args.sampler",
                "dpm_solver_sde",
                "--model.init_args.sample_steps",
                "3",
                "--trainer.logger",
                "false",
                "--trainer.limit_predict_batches",
                "1",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--predict_output_dir",
                str(out),
            ]
        )
    assert cli.model.sample_steps == 3  # a command-line override applies on top of the checkpoint's config
    assert cli.model.sampler == "dpm_solver_sde" and calls == [3]  # the fast sampler, once for the one batch
    assert cli.model.model.latent.dim == 10  # ... which is otherwise the one the checkpoint was trained with
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.dtype == np.uint8 and samples.shape == (16, 1, 8, 8)
    for name in ("samples.png", "schedule_maps.png", "snr_variance.png"):
        assert (out / name).stat().st_size > 0


def test_unknown_sampler_is_named_with_the_choices() -> None:
    with pytest.raises(ValueError, match="sampler must be one of 'ancestral', 'dpm_solver', 'dpm_solver_sde'"):
        DiffusionTask(image_shape=(1, 8, 8), sampler="euler")


@pytest.mark.parametrize("bad", [0.0, -1e-3])
def test_bad_ode_divergence_atol_is_refused_before_any_evaluation(bad: float) -> None:
    with pytest.raises(ValueError, match="ode_divergence_atol must be positive"):
        EvaluationCallback(fid=False, ode_divergence_atol=bad)


@pytest.mark.parametrize("bad", [3, 0])
def test_bad_ode_divergence_samples_are_refused_before_any_evaluation(bad: int) -> None:
    with pytest.raises(ValueError, match="ode_divergence_samples must be an even integer"):
        EvaluationCallback(fid=False, ode_divergence_samples=bad)
    with pytest.raises(ValueError, match="ode_divergence_samples and ode_divergence_atol exclude each other"):
        EvaluationCallback(fid=False, ode_divergence_samples=8, ode_divergence_atol=1.0)


@pytest.mark.parametrize(("probes", "samples"), [(2, None), (1, None), (1, 4)])
def test_ode_likelihood_runs_inside_lightnings_inference_mode(tmp_path: Path, probes: int, samples: int | None) -> None:
    """The ODE bound is logged, and with Hutchinson probes and several draws the importance-weighted estimate
    beside it (below the bound by Jensen), with its estimated bias and the figures' own noise when two probes per
    solve or sampled divergence times let them be estimated. Sampled times add exactly ``M`` evaluations per
    solve to the trajectory's."""
    callback = EvaluationCallback(
        ode_divergence_samples=samples,
        num_images=4,
        num_times=4,
        fid=False,
        ode_images=2,
        ode_draws=2,
        ode_probes=probes,
        ode_rtol=1e-3,
        ode_atol=1e-3,
        progress=False,
    )
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, callbacks=[callback], limit_test_batches=1, default_root_dir=tmp_path
    )
    trainer.test(tiny_mulan(), datamodule=EmbeddedDataModule(batch_size=4))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["test/ode_bpd"]) and metrics["test/ode_nfe"] > 0
    # the bound includes the honest latent cost log C(6, 2) nats, so it can't be below it
    assert metrics["test/ode_bpd"] > math.log(15) / (64 * math.log(2))
    assert metrics["test/ode_iw_bpd"] <= metrics["test/ode_bpd"]
    if probes > 1 or samples:
        assert torch.isfinite(metrics["test/ode_iw_bias_bpd"]) and metrics["test/ode_iw_bias_bpd"] >= 0
        # zero-initialised output layer: the drift is linear, its Jacobian diagonal, so the probes agree exactly;
        # sampled times still differ, since the divergence changes with t
        assert torch.isfinite(metrics["test/ode_noise_bpd"]) and metrics["test/ode_noise_bpd"] >= 0
        assert (metrics["test/ode_noise_bpd"] > 0) == bool(samples)
    else:
        assert "test/ode_iw_bias_bpd" not in metrics and "test/ode_noise_bpd" not in metrics
    if samples:  # dopri5 takes 2 + 6 k evaluations (first derivative, initial step, 6 per step): M more here
        assert all((entry["ode_nfe"] - samples) % 6 == 2 for entry in callback.per_image.values() if "ode_nfe" in entry)


def test_fid_samples_come_from_the_chosen_sampler(tmp_path: Path) -> None:
    """``sampler="dpm_solver"`` draws FID's samples with DPM-Solver at ``sample_steps``; unknown names are refused."""

    class Pool(nn.Module):
        num_features = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().mean((2, 3)) + torch.randn(x.shape[0], 3)

    with pytest.raises(ValueError, match="sampler must be one of"):
        EvaluationCallback(sampler="euler")
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["steps"])
        return dpm_solver_sample(*args, **kwargs)

    callback = EvaluationCallback(
        num_images=4, num_times=2, num_samples=4, sample_steps=3, sampler="dpm_solver", feature_extractor=Pool()
    )
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, callbacks=[callback], limit_test_batches=1, default_root_dir=tmp_path
    )
    with mock.patch.dict(SAMPLERS, {"dpm_solver": spy}):
        trainer.test(tiny_mulan(), datamodule=EmbeddedDataModule(batch_size=4))
    assert calls == [3] and torch.isfinite(trainer.callback_metrics["test/fid"])


def test_digits_feature_network_separates_digits_from_noise(tmp_path: Path) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from mulan.lightning.features import DigitsFeatures

    path = tmp_path / "digits_features.pt"
    features = DigitsFeatures(str(path))
    assert features.test_accuracy > 0.95  # a real classifier, on held-out digits
    reloaded = DigitsFeatures(str(path), train_if_missing=False)
    data = EmbeddedDataModule(batch_size=180)
    data.setup(None)
    val, test = next(iter(data.val_dataloader())), next(iter(data.test_dataloader()))
    torch.testing.assert_close(reloaded(test), features(test))  # the saved weights round-trip

    def fid(fake: torch.Tensor) -> float:
        metric = FrechetInceptionDistance(feature=features)
        metric.update(test.expand(-1, 3, -1, -1), real=True)
        metric.update(fake.expand(-1, 3, -1, -1), real=False)
        return metric.compute().item()

    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert fid(val) * 5 < fid(noise)  # (FID of two 180-image sets is biased upwards: ~26 here)


def test_photo_regions_name_the_photo_and_grid_cell_of_each_crop() -> None:
    from mulan.lightning.features import photo_regions

    labels = photo_regions(16)  # each photo: 26 rows x 40 columns of crops, a 4 x 4 grid of cells over them
    assert labels.shape == (2 * 26 * 40,)
    assert labels[0] == 0 and labels[39] == 3  # china.jpg: top-left crop in cell (0, 0), top-right in (0, 3)
    assert labels[25 * 40] == 12 and labels[1039] == 15  # bottom-left (3, 0), bottom-right (3, 3)
    assert labels[1040] == 16 and labels[-1] == 31  # flower.jpg: cells 16..31
    assert labels[6 * 40 + 9] == 0 and labels[7 * 40 + 10] == 5  # cell edges: rows 26 * k / 4, columns 10 * k
    assert set(labels.bincount().tolist()) == {7 * 10, 6 * 10}  # cells of 7 or 6 rows, 10 columns


def test_photo_feature_network_learns_the_crops_regions_and_separates_photos_from_noise(tmp_path: Path) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from mulan.lightning.features import PhotoFeatures

    path = tmp_path / "photo_features.pt"
    features = PhotoFeatures(str(path), epochs=4)
    assert features.test_accuracy > 0.15  # held-out crops, 32 classes: chance is 1/32
    reloaded = PhotoFeatures(str(path), train_if_missing=False)
    with pytest.raises(FileNotFoundError, match="train_if_missing"):
        PhotoFeatures(str(tmp_path / "missing.pt"), train_if_missing=False)
    data = EmbeddedDataModule(source="photos", batch_size=208)
    data.setup(None)
    val, test = next(iter(data.val_dataloader())), next(iter(data.test_dataloader()))
    torch.testing.assert_close(reloaded(test), features(test))  # the saved weights round-trip

    def fid(fake: torch.Tensor) -> float:
        metric = FrechetInceptionDistance(feature=features)
        metric.update(test, real=True)
        metric.update(fake, real=False)
        return metric.compute().item()

    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shuffled = test.flatten(1)[:, torch.randperm(3 * 16 * 16, generator=torch.Generator().manual_seed(0))]
    assert fid(val) * 5 < fid(noise) and fid(val) * 2 < fid(shuffled.reshape(test.shape))


def test_callback_options_become_one_ode_settings_and_the_cache_json_is_format_3s() -> None:
    """The callback's YAML options (``ode_*``) build one :class:`~mulan.ode.ODESettings`, field by field; the
    cache's fingerprint settings keep the callback's option names and values, so caches of format 3 stay valid."""
    callback = EvaluationCallback(
        fid=False,
        num_times=7,
        ode_draws=3,
        ode_probes=2,
        ode_exact_divergence=True,
        ode_rtol=1e-4,
        ode_atol=2e-4,
        ode_divergence_samples=6,
        ode_solve_batch_size=5,
        ode_time_variable="log_snr",
    )
    assert callback.ode_settings == ODESettings(
        num_draws=3,
        num_probes=2,
        exact_divergence=True,
        rtol=1e-4,
        atol=2e-4,
        divergence_samples=6,
        solve_batch_size=5,
        time_variable="log_snr",
    )
    assert callback._settings("32-true", "test") == {
        "format": 3,
        "stage": "test",
        "num_times": 7,
        "ode_draws": 3,
        "ode_probes": 2,
        "ode_exact_divergence": True,
        "ode_rtol": 1e-4,
        "ode_atol": 2e-4,
        "ode_divergence_atol": None,
        "ode_divergence_samples": 6,
        "ode_solve_batch_size": 5,
        "ode_time_variable": "log_snr",
        "precision": "32-true",
    }
    assert EvaluationCallback(fid=False, ode_divergence_atol=0.5).ode_settings.divergence_atol == 0.5


def test_old_callback_paths_name_the_moved_classes() -> None:
    """``mulan.lightning.callbacks`` (the path saved configs name) re-exports the moved names, the same objects."""
    from mulan.lightning import callbacks, evaluation, features, pictures

    assert callbacks.EvaluationCallback is evaluation.EvaluationCallback
    assert callbacks.PicturesCallback is pictures.PicturesCallback
    assert callbacks.SampleWriter is pictures.SampleWriter
    assert callbacks.PICTURES_DIR == pictures.PICTURES_DIR == "pictures"
    assert callbacks.resolve_inception_weights is features.resolve_inception_weights


@pytest.mark.parametrize("scale", [1, 3])
def test_png_grids_are_the_grid_enlarged_pixel_for_pixel(tmp_path: Path, scale: int) -> None:
    """The PNG of a uint8 grid decodes to the grid itself, each pixel a ``scale`` x ``scale`` block, every one of
    the 256 levels exact (``save_image`` goes through floats)."""
    from PIL import Image

    from mulan.figures import image_grid
    from mulan.lightning.pictures import _save_png

    images = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    grid = image_grid(images)  # (3, 19, 19): one channel repeated, white 1-pixel padding
    _save_png(grid, tmp_path / "grid.png", scale=scale)
    decoded = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png"))).permute(2, 0, 1)
    assert decoded.shape == (3, 19 * scale, 19 * scale)
    assert torch.equal(decoded[:, ::scale, ::scale], grid)
    for i in range(scale):
        for j in range(scale):
            assert torch.equal(decoded[:, i::scale, j::scale], grid)
