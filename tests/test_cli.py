"""The command line, end to end on the embedded data set: fit, test from a checkpoint, config round trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mulan.cli import build_cli, main
from mulan.latents import KHotLatent, NoLatent
from mulan.model import BOUND_TERMS
from mulan.processes.schedules import LearnedScalar, Polynomial

CONF = Path(__file__).parent / "conf"


def fit(config: str, root: Path, *extra: str) -> Path:
    """Fit ``config`` for its few steps under ``root``; return the checkpoint written."""
    main(["fit", "--config", str(CONF / config), "--trainer.default_root_dir", str(root), *extra])
    ckpts = sorted(root.rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    return ckpts[-1]


@pytest.mark.parametrize("config", ["vdm_tiny.yaml", "mulan_tiny.yaml"])
def test_fast_dev_run(config: str, tmp_path: Path) -> None:
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONF / config),
            "--trainer.fast_dev_run",
            "true",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert cli.trainer.global_step == 1
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


@pytest.mark.parametrize(
    ("config", "schedule", "latent"),
    [("vdm_tiny.yaml", LearnedScalar, NoLatent), ("mulan_tiny.yaml", Polynomial, KHotLatent)],
)
def test_fit_then_test_from_checkpoint_alone(config: str, schedule: type, latent: type, tmp_path: Path) -> None:
    ckpt = fit(config, tmp_path)
    cli = build_cli(
        [
            "test",
            "--ckpt_path",
            str(ckpt),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    # The model and data were rebuilt from the checkpoint's saved configuration alone ...
    assert isinstance(cli.model.model.process, schedule)
    assert isinstance(cli.model.model.latent, latent)
    assert cli.datamodule.image_shape == (1, 8, 8)
    # ... and carry the trained weights, not a fresh initialisation.
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, value in cli.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)
    results = cli.model.test_results
    parts = sum(results[n][0] for n in ("recon", "prior", "diffusion", "latent"))
    assert results["total"][0] == pytest.approx(parts, rel=1e-5)
    assert results["total"][1] > 0  # a standard error was computed over the test images
    expected_latent = 0.0 if latent is NoLatent else (torch.tensor(120.0).log().item() / (64 * 0.6931471805599453))
    assert results["latent"][0] == pytest.approx(expected_latent, abs=1e-6)  # log C(10, 3) nats over 64 dims


def test_velocity_model_round_trips_through_fit_and_test(tmp_path: Path) -> None:
    from mulan.parameterisation import Velocity

    ckpt = fit("mulan_tiny.yaml", tmp_path, "--model.init_args.parameterisation=mulan.parameterisation.Velocity")
    args = ["test", "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    cli = build_cli([*args, "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(cli.model.model.parameterisation, Velocity)  # rebuilt from the checkpoint alone
    assert all(torch.isfinite(torch.tensor(m)) for m, _ in cli.model.test_results.values())
    with pytest.raises(SystemExit):  # evaluating it as an eps-model would change the bound: refused
        build_cli([*args, "--model.init_args.parameterisation=mulan.parameterisation.Epsilon"])


def test_test_without_checkpoint_refuses(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["test", "--config", str(CONF / "vdm_tiny.yaml")])
    assert exc.value.code == 2
    assert "--ckpt_path" in capsys.readouterr().err


def test_print_config_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONF / "mulan_tiny.yaml"), "--print_config"])
    first = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(printed), "--print_config"])
    assert capsys.readouterr().out == first
    # jsonargparse prints a class by its shortest public import path (mulan.Polynomial)
    assert re.search(r"class_path: mulan\.(schedules\.)?Polynomial", first) and "hidden: 32" in first


def test_misspelt_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONF / "vdm_tiny.yaml").read_text().replace("num_blocks: 1", "num_block: 1"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad)])
    assert "num_block" in capsys.readouterr().err


def test_corrupted_checkpoint_gives_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = fit("vdm_tiny.yaml", tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(SystemExit):
        main(["test", "--ckpt_path", str(truncated)])
    assert "truncated or corrupted" in capsys.readouterr().err


def test_test_after_fit_evaluates_the_ema_weights(tmp_path: Path) -> None:
    cli = build_cli(
        ["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
         "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay=0.5",
         "--model.init_args.optimizer.init_args.lr=0.01", "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
         "--test_after_fit", "true"]
    )  # fmt: skip
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    tested = cli.model.state_dict()
    name = "model.denoiser.conv_in.weight"
    raw, ema = ckpt["current_model_state"][name], ckpt["state_dict"][name]
    assert (raw - ema).abs().max() > 1e-4  # the average differs from the raw weights ...
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(tested[key], value), key  # ... and the test ran on the average
    assert cli.model.test_results["total"][0] > 0


def test_fit_then_test_prints_the_terms_the_baseline_and_where_the_pictures_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's main job ends with one line that sums the bound's named terms, the baseline it is compared with,
    and the folder of test pictures: samples, log-SNR maps of test images, and the spread of the learned log-SNR
    across images, which is zero at t = 0 and 1 (the schedule's endpoints are fixed) and positive in between."""
    cli = build_cli(
        ["fit", "--config", str(CONF / "mulan_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
         "--trainer.callbacks+=mulan.lightning.pictures.PicturesCallback",
         "--trainer.callbacks.every_n_validations=0", "--trainer.callbacks.num_samples=4",
         "--trainer.callbacks.sample_steps=4", "--trainer.callbacks.num_maps=2", "--trainer.callbacks.num_spread=8",
         "--test_after_fit", "true", "--baseline", "VDM, same budget: 9.99 bits/dim"]
    )  # fmt: skip
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("Test bound:"))
    total = float(re.search(r"Test bound: ([\d.]+) bits/dim", line).group(1))  # type: ignore[union-attr]
    terms = {name: float(value) for name, value in re.findall(r"(\w+) ([\d.]+)(?= \+|$)", line.split("=", 1)[1])}
    assert set(terms) == set(BOUND_TERMS)
    assert total == pytest.approx(cli.model.test_results["total"][0], abs=1e-4)
    assert sum(terms.values()) == pytest.approx(total, abs=5e-4)
    assert "Compare with: VDM, same budget: 9.99 bits/dim" in out
    pictures = tmp_path / "pictures"
    assert f"Pictures: {pictures}/" in out
    for name in ["samples.png", "schedule_maps.png", "log_snr_spread.png", "log_snr_spread.txt"]:
        assert (pictures / name).stat().st_size > 0, name
    rows = [r.split("\t") for r in (pictures / "log_snr_spread.txt").read_text().splitlines()[1:-1]]
    across = [float(r[1]) for r in rows]
    assert len(rows) == 21 and across[0] < 1e-4 and across[-1] < 1e-4 and max(across) > 0


def test_saved_hyper_parameters_convert_back_to_the_parsed_model_config() -> None:
    """The hyper-parameters Lightning saves for the model (``_class_path``, ``_instantiator`` and the init args side
    by side) convert back to the ``class_path`` config they were parsed from (less the linked ``image_shape``), and
    the saved dict is left as it was; without ``_class_path`` there is no config."""
    from mulan.lightning.loading import saved_config

    def class_config(hparams: dict) -> dict | None:
        return saved_config(hparams, "the test", leave_out=("image_shape",))

    cli = build_cli(["--config", str(CONF / "mulan_tiny.yaml")], run=False)
    saved = dict(cli.model.hparams)
    assert saved["_instantiator"] == "lightning.pytorch.cli.instantiate_module" and "image_shape" in saved
    before = dict(saved)
    given = cli.config_dump["model"]  # the parsed configuration as LightningCLI saves it (lists, not tuples)
    given["init_args"].pop("image_shape", None)
    assert class_config(saved) == given
    assert saved == before
    assert class_config({key: value for key, value in saved.items() if key != "_class_path"}) is None
