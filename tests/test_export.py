"""Shareable models: export a checkpoint's EMA weights and configuration to safetensors, load them back in Python
(one call, no Lightning) and in ``mulan-cli test/predict``, with the same test bound bit for bit; tampered or
inconsistent files are refused with the tensors named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mulan import export
from mulan.cli import build_cli, main
from mulan.lightning.task import DiffusionTask
from mulan.model import DiffusionModel

CONF = Path(__file__).parent / "conf"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--seed_everything", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """MuLAN (tiny) fitted for 4 steps by the CLI with EMAWeightAveraging (decay 0.5, so the average differs from
    the raw weights), then exported with the documented script."""
    root = tmp_path_factory.mktemp("export")
    main(
        ["fit", "--config", str(CONF / "mulan_tiny.yaml"), "--trainer.default_root_dir", str(root),
         "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay=0.5",
         "--model.init_args.optimizer.init_args.lr=0.01", "--model.init_args.lr_scheduler.init_args.warmup_steps=1"]
    )  # fmt: skip
    ckpt = sorted(root.rglob("*.ckpt"))[-1]
    out = export.main([str(ckpt), str(root / "model.safetensors")])
    return {"root": root, "ckpt": ckpt, "file": out, "saved": torch.load(ckpt, weights_only=True)}


def test_export_holds_the_ema_weights_and_the_saved_configuration(trained: dict) -> None:
    content = export.read_export(trained["file"])
    saved = trained["saved"]
    ema = {name.removeprefix("model."): value for name, value in saved["state_dict"].items()}
    raw = {name.removeprefix("model."): value for name, value in saved["current_model_state"].items()}
    assert content.tensors.keys() == ema.keys()
    for name, value in ema.items():
        assert torch.equal(content.tensors[name], value), name
    assert any(not torch.equal(content.tensors[n], raw[n]) for n in raw)  # the average, not the raw weights
    assert content.metadata["weights"] == "ema" and content.metadata["global_step"] == "4"
    assert content.model_config == json.loads(json.dumps(saved["hyper_parameters"]))
    assert content.data_config == saved["datamodule_hyper_parameters"]


def _test(ckpt_path: Path, root: Path, *extra: str):
    return build_cli(["test", "--ckpt_path", str(ckpt_path), "--trainer.default_root_dir", str(root), *QUIET, *extra])


def test_cli_test_from_the_export_gives_the_checkpoints_bound_bitwise(trained: dict) -> None:
    from_ckpt = _test(trained["ckpt"], trained["root"])
    from_file = _test(trained["file"], trained["root"])
    assert from_file.trainer.ckpt_path is None  # the Trainer never saw the safetensors file ...
    for name, value in from_ckpt.model.state_dict().items():
        assert torch.equal(from_file.model.state_dict()[name], value), name  # ... the hook loaded the weights
    assert from_file.datamodule.image_shape == (1, 8, 8)  # data rebuilt from the file's configuration
    assert from_file.model.test_results == from_ckpt.model.test_results  # every term: mean and std. err.
    ckpt_metrics = {k: v.item() for k, v in from_ckpt.trainer.callback_metrics.items()}
    assert {k: v.item() for k, v in from_file.trainer.callback_metrics.items()} == ckpt_metrics


def test_load_model_is_one_call_and_gives_the_tasks_bound(trained: dict) -> None:
    model = export.load_model(trained["file"])
    assert isinstance(model, DiffusionModel) and not model.training
    task = DiffusionTask.load_from_checkpoint(trained["ckpt"], weights_only=True).eval()
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    draws = {"t": torch.tensor([0.1, 0.5, 0.9]), "eps": torch.randn(3, 1, 8, 8), "recon_noise": torch.randn(3, 1, 8, 8)}
    with torch.no_grad():
        torch.manual_seed(2)
        ours = model(images, **draws).as_dict()
        torch.manual_seed(2)
        theirs = task.model(images, **draws).as_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_load_model_in_a_fresh_process_needs_no_lightning(trained: dict) -> None:
    code = (
        "import sys, mulan.export as e; m = e.load_model(sys.argv[1]); "
        "print(type(m).__name__, 'lightning' in sys.modules, sum(p.numel() for p in m.parameters()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(trained["file"])], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    name, imported, count = result.stdout.split()
    assert (name, imported) == ("DiffusionModel", "False")
    assert int(count) == sum(p.numel() for p in export.load_model(trained["file"]).parameters())


def test_exporting_a_checkpoint_in_a_fresh_process_needs_no_lightning(trained: dict, tmp_path: Path) -> None:
    """The checkpoint reader is in the pure-torch core (:mod:`mulan.checkpoints`): ``export`` reads the ``.ckpt``
    and writes the same file as the fixture's export without importing Lightning."""
    out = tmp_path / "again.safetensors"
    code = "import sys, mulan.export as e; e.export(sys.argv[1], sys.argv[2]); print('lightning' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code, str(trained["ckpt"]), str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False"]
    again, first = export.read_export(out), export.read_export(trained["file"])
    assert again.metadata["sha256"] == first.metadata["sha256"]  # same tensors, configuration and metadata


def test_the_old_import_paths_name_the_moved_objects() -> None:
    """What moved keeps its old path (saved configurations and user code name them): the file format and the
    checkpoint reader (now :mod:`mulan.checkpoints`), the class allowlist (:mod:`mulan.trusted`) and the schedules
    (:mod:`mulan.processes.schedules`); the allowlist still accepts the old class paths."""
    import mulan.schedules
    from mulan import checkpoints, trusted
    from mulan.lightning import checkpoint_io
    from mulan.processes import schedules

    for name in ("Export", "digest", "is_safetensors", "read_checkpoint_dict", "read_export", "write_export"):
        assert getattr(export, name) is getattr(checkpoints, name), name
    assert checkpoint_io.load_checkpoint is checkpoints.load_checkpoint
    assert (export.check_class_paths, export.TRUSTED_ENV) == (trusted.check_class_paths, trusted.TRUSTED_ENV)
    for name in ("NoiseSchedule", "FixedLinear", "LearnedScalar", "MonotoneNN", "Polynomial", "GAMMA_MIN", "GAMMA_MAX"):
        assert getattr(mulan.schedules, name) is getattr(schedules, name), name
        if name[0] != "G":
            export.check_class_paths({"class_path": f"mulan.schedules.{name}"}, "old.yaml")


def test_predict_from_the_export_writes_samples(trained: dict, tmp_path: Path) -> None:
    main(
        ["predict", "--ckpt_path", str(trained["file"]), *QUIET, "--trainer.limit_predict_batches", "1",
         "--model.init_args.sample_steps", "2", "--data.init_args.eval_batch_size", "4",
         "--predict_output_dir", str(tmp_path / "samples")]
    )  # fmt: skip
    assert list((tmp_path / "samples").iterdir())


def test_tampered_tensor_bytes_are_refused(trained: dict, tmp_path: Path) -> None:
    data = bytearray(trained["file"].read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tampered\.safetensors was modified after export: the SHA-256"):
        export.load_model(tampered)
    with pytest.raises(ValueError, match=r"modified after export"):
        export.read_checkpoint_dict(tampered)


def test_tampered_configuration_is_refused_by_the_cli(trained: dict, tmp_path: Path, capsys) -> None:
    data = trained["file"].read_bytes()
    assert data.count(b'\\"hidden\\": 32') == 1  # the Polynomial's width, inside the JSON of the header
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(data.replace(b'\\"hidden\\": 32', b'\\"hidden\\": 16'))
    with pytest.raises(SystemExit):
        main(["test", "--ckpt_path", str(tampered), *QUIET])
    assert "was modified after export" in capsys.readouterr().err


def test_configuration_that_does_not_match_the_tensors_names_them(trained: dict, tmp_path: Path, capsys) -> None:
    """A consistent file (valid SHA-256) whose configuration describes another model: the missing, unexpected
    and wrong-shape tensors are named, in Python and in mulan-cli test."""
    content = export.read_export(trained["file"])
    config = json.loads(json.dumps(content.model_config))
    config["denoiser"]["init_args"]["channels"] = 8  # the U-Net of the tensors has 16
    tensors = dict(content.tensors)
    tensors["extra.weight"] = torch.zeros(2)
    del tensors["process.head_c.bias"]
    bad = export.write_export(tensors, config, content.data_config, tmp_path / "bad.safetensors")
    match = (
        r"bad\.safetensors: the model its configuration describes does not match the file's tensors: "
        r"missing \(1\): process\.head_c\.bias; unexpected \(1\): extra\.weight; wrong shape \(\d+\): "
        r".*denoiser\.conv_in\.weight \(16, \d+, 3, 3\) in the file vs \(8, \d+, 3, 3\) in the model"
    )
    with pytest.raises(ValueError, match=match):
        export.load_model(bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--ckpt_path", str(bad), *QUIET])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert re.match(r"error: .*bad\.safetensors: the model given now does not match .*missing \(1\)", err)


def test_export_evaluated_on_data_of_another_shape_is_refused(trained: dict, capsys) -> None:
    data = json.dumps({"class_path": "mulan.lightning.data.EmbeddedDataModule", "init_args": {"image_size": 16}})
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--ckpt_path", str(trained["file"]), f"--data={data}", *QUIET])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert re.match(r"error: .*trained on images of shape \(1, 8, 8\).*\(1, 16, 16\).*leave out --data", err)


def test_other_safetensors_files_are_refused(tmp_path: Path, trained: dict) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match=r"plain\.safetensors is a safetensors file but not a mulan export"):
        export.load_model(plain)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(trained["file"].read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.safetensors cannot be read: .*truncated or corrupted"):
        export.read_export(truncated)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors: no such file"):
        export.load_model(tmp_path / "nowhere.safetensors")


def test_checkpoint_without_a_saved_configuration_is_not_exported(tmp_path: Path) -> None:
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "hyper_parameters": {}}, bare)
    with pytest.raises(ValueError, match=r"holds no saved model configuration.*mulan-cli fit"):
        export.export(bare, tmp_path / "out.safetensors")


def test_fit_from_an_export_starts_from_its_weights(trained: dict, tmp_path: Path) -> None:
    """``mulan-cli fit --ckpt_path X.safetensors`` with the same model config: a new run (step 0) whose model
    starts from the exported weights."""
    cli = build_cli(
        ["fit", "--config", str(CONF / "mulan_tiny.yaml"), "--ckpt_path", str(trained["file"]),
         "--trainer.max_steps", "0", "--trainer.default_root_dir", str(tmp_path)]
    )  # fmt: skip
    assert cli.trainer.global_step == 0 and cli.trainer.ckpt_path is None
    tensors = export.read_export(trained["file"]).tensors
    for name, value in cli.model.model.state_dict().items():
        assert torch.equal(value, tensors[name]), name
