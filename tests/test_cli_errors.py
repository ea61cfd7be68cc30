"""mulan-cli: resume paths checked before Lightning reads them, no silent model swap, nothing overwritten, option
values checked before anything is written, one-line errors, rank-zero summaries and the class allowlist."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mulan.checkpoints import read_export, write_export
from mulan.cli import main

CONF = Path(__file__).parent / "conf"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


class Payload:
    """Unpickling it calls ``Path.touch(target)``."""

    target = ""

    def __reduce__(self):
        return (Path.touch, (Path(Payload.target),))


def _fit(root: Path, config: str = "vdm_tiny.yaml", *extra: str) -> Path:
    main(["fit", "--config", str(CONF / config), "--trainer.default_root_dir", str(root), *extra])
    return (
        root / "checkpoints" / "last.ckpt"
        if (root / "checkpoints" / "last.ckpt").exists()
        else sorted(root.rglob("*.ckpt"))[-1]
    )


def _one_error_line(capsys: pytest.CaptureFixture, exc: pytest.ExceptionInfo) -> str:
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("INFO", "Seed"))]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def vdm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vdm")
    return _fit(root, "vdm_tiny.yaml", "--trainer.callbacks=mulan.lightning.LastCheckpoint")


# ------------------------------------------------------------------------------------------ 3. unsafe resumes
@pytest.mark.parametrize("how", ["fit last", "fit path", "test", "validate", "predict"])
def test_a_planted_unsafe_checkpoint_is_refused_on_every_path(how: str, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "payload_ran"
    Payload.target = str(marker)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    planted = folder / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}, "global_step": 0}, planted)
    subcommand, _, kind = how.partition(" ")
    ckpt = "last" if kind == "last" else str(planted)
    args = [subcommand, "--ckpt_path", ckpt, "--trainer.default_root_dir", str(tmp_path)]
    if subcommand == "fit":
        args += ["--config", str(CONF / "vdm_tiny.yaml"), "--trainer.callbacks=mulan.lightning.LastCheckpoint"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    line = _one_error_line(capsys, exc)
    assert "refused as unsafe" in line and str(planted) in line
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ 4. no silent swap
def test_fit_resuming_a_checkpoint_of_another_model_is_refused(vdm: Path, tmp_path: Path, capsys) -> None:
    for ckpt in (str(vdm), "last"):
        root = tmp_path / ckpt.replace("/", "_")
        if ckpt == "last":  # the VDM's last.ckpt in the folder a MuLAN config resumes from
            (root / "checkpoints").mkdir(parents=True)
            (root / "checkpoints" / "last.ckpt").write_bytes(vdm.read_bytes())
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--config", str(CONF / "mulan_tiny.yaml"), "--ckpt_path", ckpt, "--trainer.default_root_dir",
                  str(root), "--trainer.callbacks=mulan.lightning.LastCheckpoint"])  # fmt: skip
        line = _one_error_line(capsys, exc)
        assert "differ from those saved in" in line and "fit would train another model" in line
        assert "process.class_path: 'mulan.LearnedScalar' in the checkpoint -> 'mulan.Polynomial' given" in line
        assert "latent.class_path: 'mulan.NoLatent' in the checkpoint -> 'mulan.KHotLatent' given" in line
        assert not (root / "config.yaml").exists()


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("--model.init_args.latent=mulan.latents.KHotLatent", "model.init_args.latent.class_path"),
        ("--model.init_args.timesteps=10", "model.init_args.timesteps: 0 in the checkpoint -> 10 given"),
        ("--model.init_args.process=mulan.schedules.FixedLinear", "model.init_args.process.class_path"),
        ("--model.init_args.process.init_args.gamma_min=-12", "model.init_args.process.init_args.gamma_min: -13.3"),
        ("--model.init_args.denoiser.init_args.channels=8", "model.init_args.denoiser.init_args.channels: 16"),
        ("--model.init_args.parameterisation=mulan.parameterisation.Velocity", "model.init_args.parameterisation"),
    ],
)
def test_every_option_that_defines_the_bound_is_refused_at_test(vdm: Path, option: str, named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["test", "--ckpt_path", str(vdm), option, *QUIET])
    line = _one_error_line(capsys, exc)
    assert "so the bound would not be the trained model's" in line and named in line


def test_the_time_sampler_only_changes_the_variance_so_test_may_change_it(vdm: Path, tmp_path: Path) -> None:
    from mulan.cli import build_cli
    from mulan.time_sampling import CauchyLogSNR

    cli = build_cli(["test", "--ckpt_path", str(vdm), "--model.init_args.time_sampler=mulan.time_sampling.CauchyLogSNR",
                     *QUIET, "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert isinstance(cli.model.model.time_sampler, CauchyLogSNR)


def test_a_resumed_fit_keeps_the_earlier_config(tmp_path: Path, capsys) -> None:
    args = ["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.callbacks=mulan.lightning.LastCheckpoint"]  # fmt: skip
    main(args)
    earlier = (tmp_path / "config.yaml").read_text()
    main([*args, "--ckpt_path", "last", "--trainer.max_steps", "6"])
    assert (tmp_path / "config.yaml").read_text() == earlier
    resumed = (tmp_path / "config-resume-1.yaml").read_text()
    assert "max_steps: 6" in resumed and "ckpt_path: " + str(tmp_path / "checkpoints" / "last.ckpt") in resumed
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--model.init_args.optimizer.init_args.lr=-1", "invalid optimiser option: Invalid learning rate: -1.0"),
        ("--model.init_args.optimizer.init_args.weight_decay=-0.1", "Invalid weight_decay value: -0.1"),
        ("--model.init_args.optimizer.init_args.betas=[0.9, 1.5]", "Invalid beta parameter at index 1: 1.5"),
    ],
)
def test_invalid_optimiser_values_fail_before_anything_is_written(option, message, tmp_path, capsys) -> None:
    args = ["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main([*args, option])
    assert message in _one_error_line(capsys, exc)
    assert not list(tmp_path.iterdir())  # no config.yaml, no checkpoint: the corrected rerun is not refused
    main(args)
    assert (tmp_path / "config.yaml").exists()


# ------------------------------------------------------------------------------------------ 5. one-line errors
def test_errors_are_the_library_s_outermost_message_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """A corrupt PNG (PIL raises AttributeError/SyntaxError inside): the data module's message, not PIL's."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8), 10 * i, dtype=np.uint8)).save(folder / f"img_{i}.png")
    data = (folder / "img_0.png").read_bytes()
    (folder / "img_0.png").write_bytes(data[:40] + b"\x00" * 8 + data[48:])
    args = ["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
            '--data={"class_path": "mulan.lightning.data.ImageFolderDataModule", "init_args": {"root": "'
            + str(folder) + '", "batch_size": 2}}']  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(args)
    line = _one_error_line(capsys, exc)
    assert "cannot read the image" in line and "img_0.png" in line and "unexpected" not in line
    monkeypatch.setenv("MULAN_DEBUG", "1")  # the traceback, with the debug flag
    with pytest.raises(ValueError, match="cannot read the image"):
        main(args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.denoiser.init_args.num_block=1"],
         "error: model.init_args.denoiser: Option 'num_block' is not accepted"),
        (["--trainer.max_steps=abc"], "error: trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
        (["--trainer.default_root_dir={blocked}/run"], "cannot write the run's output to"),
        (["--model.init_args.latent.init_args.k=20"], "error: KHotLatent: need 0 < k < m"),
    ],
)  # fmt: skip
def test_usage_and_setup_errors_are_one_line(args, message, tmp_path: Path, capsys) -> None:
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    args = [a.replace("{blocked}", str(blocked)) for a in args]
    config = "mulan_tiny.yaml" if "latent" in args[0] else "vdm_tiny.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONF / config), *args])
    assert message in _one_error_line(capsys, exc)


def test_an_unexpected_error_is_one_line_with_the_debug_hint(monkeypatch, tmp_path: Path, capsys) -> None:
    from mulan.lightning.task import DiffusionTask

    def broken(self, *args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(DiffusionTask, "training_step", broken)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    assert _one_error_line(capsys, exc) == (
        "error: KeyError: 'a bug' (unexpected; rerun with MULAN_DEBUG=1 (or --debug) to see the traceback)"
    )
    with pytest.raises(KeyError):
        main(["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "b"),
              "--debug"])  # fmt: skip


def test_a_checkpoint_without_a_saved_configuration_says_so(tmp_path: Path, capsys) -> None:
    """A Lightning checkpoint not written by mulan-cli (no saved ``_class_path``): one line saying so, not
    jsonargparse's "the following arguments are required: test.data"."""
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}, "global_step": 0}, path)
    with pytest.raises(SystemExit) as exc:
        main(["test", "--ckpt_path", str(path)])
    line = _one_error_line(capsys, exc)
    assert "holds no model configuration saved by mulan-cli fit" in line and "--config" in line


# ------------------------------------------------------------------------------------------ 8. rank zero
def test_only_rank_zero_prints_the_summary(tmp_path: Path, capsys, monkeypatch) -> None:
    args = ["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--test_after_fit", "true"]
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    main([*args, "--trainer.default_root_dir", str(tmp_path / "one")])
    assert "Test bound" not in capsys.readouterr().out
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    main([*args, "--trainer.default_root_dir", str(tmp_path / "zero")])
    assert "Test bound" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ 2. allowlist
def _foreign(vdm: Path, tmp_path: Path) -> list[Path]:
    """The VDM as an export and as a .ckpt whose saved model class path names the module ``this``."""
    from mulan.export import export

    exported = read_export(export(vdm, tmp_path / "vdm.safetensors"))
    model = {**exported.model_config, "_class_path": "this.Something"}
    files = [write_export(exported.tensors, model, exported.data_config, tmp_path / "foreign.safetensors")]
    checkpoint = torch.load(vdm, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "this.Something"
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    return [*files, tmp_path / "foreign.ckpt"]


def test_a_foreign_class_path_is_refused_before_it_is_imported(vdm: Path, tmp_path: Path, capsys) -> None:
    for path in _foreign(vdm, tmp_path):
        sys.modules.pop("this", None)
        for subcommand in ("test", "predict"):
            with pytest.raises(SystemExit) as exc:
                main([subcommand, "--ckpt_path", str(path), *QUIET])
            line = _one_error_line(capsys, exc)
            assert "refusing to import 'this.Something'" in line and str(path) in line
            assert "--trusted_classes" in line
            assert "this" not in sys.modules and capsys.readouterr().out == ""
        with pytest.raises(SystemExit) as exc:  # trusted: imported, then refused for another reason
            main(["test", "--ckpt_path", str(path), "--trusted_classes", "this.Something", *QUIET])
        assert "refusing to import" not in capsys.readouterr().err
        assert "this" in sys.modules


def test_a_checkpoint_of_a_user_subclass_evaluates_when_its_module_is_trusted(tmp_path, capsys, monkeypatch) -> None:
    from mulan.cli import build_cli

    root = Path(__file__).parents[1]
    monkeypatch.syspath_prepend(str(root))  # examples/ importable, as from the repository root
    main(
        ["fit", "--config", str(root / "examples" / "custom_module.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    )
    ckpt = str(sorted(tmp_path.rglob("*.ckpt"))[-1])
    with pytest.raises(SystemExit) as exc:
        main(["test", "--ckpt_path", ckpt, *QUIET])
    assert "refusing to import 'examples.custom_module.TermLoggingModule'" in _one_error_line(capsys, exc)
    cli = build_cli(["test", "--ckpt_path", ckpt, "--trusted_classes", "examples.custom_module.", *QUIET])
    assert type(cli.model).__name__ == "TermLoggingModule" and cli.model.test_results["total"][0] > 0
