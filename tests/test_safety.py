"""Unsafe files are refused at every entry point without running their code, and a misused CLI says what is wrong
in one line, before any expensive work, without overwriting anything."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mulan.cli import build_cli, main
from mulan.lightning import DiffusionTask
from mulan.lightning.data import ImageNet32DataModule

CONF = Path(__file__).parent / "conf"


class Payload:
    """What an attacker pickles: unpickling it calls ``Path.touch(target)``."""

    target = ""

    def __reduce__(self):
        return (Path.touch, (Path(Payload.target),))


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint whose hyper-parameters carry the payload, and the file the payload would create."""
    marker = tmp_path / "payload_ran"
    Payload.target = str(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}, "global_step": 0}, path)
    return path, marker


@pytest.mark.parametrize("subcommand", ["fit", "test", "validate", "predict"])
def test_cli_refuses_an_unsafe_checkpoint_without_running_it(subcommand, evil, tmp_path, capsys) -> None:
    path, marker = evil
    args = [subcommand, "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main([*args[:1], "--config", str(CONF / "vdm_tiny.yaml"), *args[1:]] if subcommand == "fit" else args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unsafe" in err and "Traceback" not in err
    assert not marker.exists()


def test_python_loading_refuses_an_unsafe_checkpoint_without_running_it(evil) -> None:
    path, marker = evil
    for weights_only in (True, None, False):  # even a caller asking for an unsafe load is refused first
        with pytest.raises(ValueError, match="unsafe"):
            DiffusionTask.load_from_checkpoint(path, weights_only=weights_only)
    from mulan.export import export

    with pytest.raises(ValueError, match="unsafe"):
        export(path, path.with_suffix(".safetensors"))
    assert not marker.exists()


def test_imagenet32_pickles_are_read_as_arrays_only(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    Payload.target = str(marker)
    (tmp_path / "val_data").write_bytes(pickle.dumps({"data": Payload()}))
    with pytest.raises(ValueError, match="unsafe.*pathlib.*npz"):
        ImageNet32DataModule(root=str(tmp_path), version="new").setup("test")
    assert not marker.exists()
    # a genuine batch (a dict of numpy arrays, as the data set ships it) loads
    images = np.random.default_rng(0).integers(0, 256, (5, 3072), dtype=np.uint8)
    (tmp_path / "val_data").write_bytes(pickle.dumps({"data": images, "labels": [1, 2, 3, 4, 5]}, protocol=2))
    data = ImageNet32DataModule(root=str(tmp_path), version="new")
    data.setup("test")
    assert torch.equal(data.datasets["test"].images.reshape(5, -1), torch.from_numpy(images))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.process.init_args.gamma_min=6"], "gamma_min (6.0) must be smaller than gamma_max (5.0)"),
        (["--data.init_args.batch_size=0"], "batch sizes must be >= 1"),
        (["--config", "{shape}"], "image_shape is (3, 4, 4), but the data's images have shape (1, 8, 8)"),
    ],
)
def test_a_bad_option_is_one_line_before_training(args, message, tmp_path, capsys) -> None:
    shape = tmp_path / "shape.yaml"
    shape.write_text("model:\n  init_args:\n    image_shape: [3, 4, 4]\n")
    args = [a.replace("{shape}", str(shape)) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONF / "vdm_tiny.yaml"), *args, "--trainer.default_root_dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any("Traceback" in line for line in err)
    assert not (tmp_path / "config.yaml").exists()  # nothing was trained or written


def test_k_not_below_m_is_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONF / "mulan_tiny.yaml"), "--model.init_args.latent.init_args.k=20"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: KHotLatent: need 0 < k < m for a k-hot latent, got m=10, k=20."
    )


def test_fit_does_not_overwrite_an_earlier_run_without_being_told(tmp_path, capsys) -> None:
    args = ["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    main(args)
    config = (tmp_path / "config.yaml").read_text()
    with pytest.raises(SystemExit):
        main([*args, "--trainer.max_steps=2"])
    err = capsys.readouterr().err
    assert "config.yaml exists" in err and "--overwrite true" in err
    assert (tmp_path / "config.yaml").read_text() == config  # untouched
    main([*args, "--trainer.max_steps=2", "--overwrite=true"])
    assert "max_steps: 2" in (tmp_path / "config.yaml").read_text()


def test_predict_checks_its_output_directory_before_sampling(tmp_path, capsys) -> None:
    main(["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    ckpt = str(sorted(tmp_path.rglob("*.ckpt"))[-1])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", ckpt, "--predict_output_dir", str(blocker / "samples")])
    assert "cannot write predictions" in capsys.readouterr().err
    out = tmp_path / "samples"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"earlier samples")
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", ckpt, "--predict_output_dir", str(out)])
    assert "already holds samples.npz" in capsys.readouterr().err
    assert (out / "samples.npz").read_bytes() == b"earlier samples"


def test_build_cli_without_running(tmp_path) -> None:
    cli = build_cli(["--config", str(CONF / "mulan_tiny.yaml")], run=False)
    assert isinstance(cli.model, DiffusionTask) and cli.datamodule.image_shape == (1, 8, 8)
    assert cli.trainer.global_step == 0
