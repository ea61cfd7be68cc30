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
from mulan.likelihood import dense_elbo
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


# ------------------------------------------------------------------------------------------------ pretrained directory
@pytest.fixture(scope="module")
def pretrained(trained: dict) -> Path:
    """The directory ``python -m mulan.export CKPT DIR`` writes from the fixture's checkpoint."""
    return export.main([str(trained["ckpt"]), str(trained["root"] / "tiny-mulan")])


def _same_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name


def test_from_pretrained_of_save_pretrained_gives_the_same_tensors_and_bound_bitwise(
    trained: dict, pretrained: Path, tmp_path: Path
) -> None:
    """The directory holds the export's tensors; the model rebuilt from it gives the export's bound bitwise (one
    sample with given draws, and the library's dense bound with the same seed); saving that model again gives the
    same directory (the same SHA-256 of tensors and configuration)."""
    assert sorted(p.name for p in pretrained.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model, reference = export.from_pretrained(pretrained), export.load_model(trained["file"])
    assert isinstance(model, DiffusionModel) and not model.training
    _same_tensors(model.state_dict(), reference.state_dict())
    _same_tensors(model.state_dict(), export.read_export(trained["file"]).tensors)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bounds = []
        for m in (model, reference):
            torch.manual_seed(3)
            bounds.append((m(images).as_dict(), dense_elbo(m, images, num_times=8).as_dict()))
    for ours, theirs in zip(*bounds, strict=True):
        _same_tensors(ours, theirs)
    config = json.loads((pretrained / "config.json").read_text())
    assert model.config == {k: v for k, v in config.items() if k not in export.INTERNAL_KEYS}
    assert (model.config["global_step"], model.config["seed"], model.config["weights"]) == (4, 0, "ema")
    assert model.config["model_config"] == json.loads(json.dumps(trained["saved"]["hyper_parameters"]))
    again = export.save_pretrained(model, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["sha256"] == config["sha256"]
    assert (again / "README.md").read_text() == (pretrained / "README.md").read_text().replace(
        str(pretrained), str(again)
    ).replace("# tiny-mulan", "# again")


def test_config_json_is_plain_json_readable_without_mulan(pretrained: Path) -> None:
    code = (
        "import json, sys; c = json.load(open(sys.argv[1])); "
        "print(c['format'], c['image_shape'], c['model_config']['denoiser']['class_path'], "
        "c['data_config']['source'], c['seed'], 'mulan' in sys.modules, 'torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code, str(pretrained / "config.json")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mulan-pretrained [1, 8, 8] mulan.UNet digits 0 False False"


def test_the_card_names_data_steps_seed_bound_and_command(trained: dict, pretrained: Path, tmp_path: Path) -> None:
    import yaml

    card = (pretrained / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "mulan" and "diffusion" in meta["tags"] and "datasets" not in meta
    assert "`mulan.lightning.data.EmbeddedDataModule` (source='digits'" in body
    assert "- steps: 4 (checkpoint `" in body and "- seed: 0 (" in body
    assert "Not evaluated." in body and f"mulan-cli test --ckpt_path {pretrained}\n" in body
    # with metrics (what mulan-cli test logs): the bound with its standard error, recorded in config.json too
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,test/bpd,test/bpd_stderr,val/bpd,test/fid\n0,2,,,9.5,\n0,4,,,9.0,\n0,4,1.23456,0.125,,80.5\n"
    )
    assert export.read_metrics(csv) == {"val/bpd": 9.0, "test/bpd": 1.23456, "test/bpd_stderr": 0.125, "test/fid": 80.5}
    out = export.main([str(trained["ckpt"]), str(tmp_path / "evaluated"), "--metrics", str(csv)])
    card = (out / "README.md").read_text()
    assert "| `test/bpd` | 1.2346 | ± 0.1250 |" in card and "| `val/bpd` | 9.0000 | – |" in card
    bits, other = card.split("| metric | bits/dim | std. err. |")[1].split("| other metric | value | std. err. |")
    assert "test/fid" not in bits and "| `test/fid` | 80.5000 | – |" in other  # FID is not in bits/dim
    assert "Not evaluated" not in card
    assert export.from_pretrained(out).config["metrics"]["test/bpd_stderr"] == 0.125
    with pytest.raises(ValueError, match=r"'test/bpd' = 'nan' is not a finite number"):
        export.save_pretrained(trained["ckpt"], tmp_path / "bad", metrics={"test/bpd": "nan"})


def test_cli_test_and_predict_from_the_directory_give_the_checkpoints_figures(
    trained: dict, pretrained: Path, tmp_path: Path
) -> None:
    """``--ckpt_path DIR``: model and data rebuilt from config.json, the weights loaded, the run's seed used (the
    command line's seed differs from the run's, so the printed figures match only with the seed from the file)."""
    seed = ["--seed_everything", "1"]
    from_ckpt, from_dir = _test(trained["ckpt"], trained["root"], *seed), _test(pretrained, trained["root"], *seed)
    assert from_dir.trainer.ckpt_path is None
    assert from_dir.datamodule.image_shape == (1, 8, 8)
    assert from_dir.model.test_results == from_ckpt.model.test_results
    ckpt_metrics = {k: v.item() for k, v in from_ckpt.trainer.callback_metrics.items()}
    assert {k: v.item() for k, v in from_dir.trainer.callback_metrics.items()} == ckpt_metrics
    main(
        ["predict", "--ckpt_path", str(pretrained), *QUIET, "--trainer.limit_predict_batches", "1",
         "--model.init_args.sample_steps", "2", "--data.init_args.eval_batch_size", "4",
         "--predict_output_dir", str(tmp_path / "samples")]
    )  # fmt: skip
    assert list((tmp_path / "samples").iterdir())


def _copy(pretrained: Path, to: Path) -> Path:
    to.mkdir()
    for file in pretrained.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def test_a_directory_edited_after_saving_is_refused(pretrained: Path, tmp_path: Path, capsys) -> None:
    reformatted = _copy(pretrained, tmp_path / "reformatted")
    config = json.loads((pretrained / "config.json").read_text())
    (reformatted / "config.json").write_text(json.dumps(config))  # same content, other layout: accepted
    export.from_pretrained(reformatted)
    edited = _copy(pretrained, tmp_path / "edited")
    config["model_config"]["process"]["init_args"]["hidden"] = 16
    (edited / "config.json").write_text(json.dumps(config, indent=2))
    with pytest.raises(ValueError, match=r"edited was modified after saving: its config\.json changed"):
        export.from_pretrained(edited)
    flipped = _copy(pretrained, tmp_path / "flipped")
    data = bytearray((pretrained / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped was modified after saving: its model\.safetensors changed"):
        export.from_pretrained(flipped)
    with pytest.raises(SystemExit):
        main(["test", "--ckpt_path", str(flipped), *QUIET])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors changed" in err


@pytest.mark.parametrize("where", ["model_config", "data_config"])
def test_a_planted_class_path_is_refused_before_it_is_imported(
    pretrained: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A consistent directory (SHA-256 recomputed: it is not a signature) whose configuration names the standard
    module ``this`` (importing it prints the Zen of Python): refused in one line, ``this`` never imported."""
    monkeypatch.delenv(export.TRUSTED_ENV, raising=False)
    content = export.read_pretrained(pretrained)
    config = {k: v for k, v in content.config.items() if k not in export.INTERNAL_KEYS}
    if where == "model_config":
        config[where]["denoiser"]["class_path"] = "this.Zen"
    else:
        config[where]["_class_path"] = "this.Zen"
    planted = export.write_pretrained(content.tensors, config, tmp_path / "planted")
    sys.modules.pop("this", None)
    with pytest.raises(ValueError, match=r"planted: refusing to import 'this\.Zen'") as error:
        export.from_pretrained(planted)
    assert "\n" not in str(error.value) and "this" not in sys.modules
    with pytest.raises(SystemExit):
        main(["test", "--ckpt_path", str(planted), *QUIET])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to import 'this.Zen'" in err and "this" not in sys.modules


def test_dtype_round_trip_stores_only_the_denoiser_lower(trained: dict, pretrained: Path, tmp_path: Path) -> None:
    """``dtype=torch.bfloat16``: the denoiser's weights stored in bfloat16 (the file shrinks), everything else in
    float32 (schedule, latent: docs/math.md section 8); loading widens them to float32 exactly. A low-precision
    load is refused with the way to run bfloat16 (autocast)."""
    low = export.save_pretrained(trained["ckpt"], tmp_path / "bf16", dtype=torch.bfloat16)
    stored = export.read_pretrained(low).tensors
    full = export.read_pretrained(pretrained).tensors
    assert {t.dtype for n, t in stored.items() if n.startswith("denoiser.")} == {torch.bfloat16}
    assert {t.dtype for n, t in stored.items() if not n.startswith("denoiser.")} == {torch.float32}
    assert (low / "model.safetensors").stat().st_size < 0.75 * (pretrained / "model.safetensors").stat().st_size
    model = export.from_pretrained(low)
    assert model.config["dtype"] == "bfloat16"
    expected = {n: t.to(torch.bfloat16).float() if n.startswith("denoiser.") else t for n, t in full.items()}
    _same_tensors(model.state_dict(), expected)
    with pytest.raises(ValueError, match=r"keeps the model's parameters in float32.*torch\.autocast"):
        export.from_pretrained(low, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"dtype torch\.float64 is not supported"):
        export.save_pretrained(trained["ckpt"], tmp_path / "f64", dtype=torch.float64)


def test_a_model_without_a_saved_configuration_is_refused(trained: dict, tmp_path: Path) -> None:
    plain = export.load_model(trained["file"])
    assert plain.config["model_config"] == export.read_export(trained["file"]).model_config  # known: saved again
    del plain.config
    with pytest.raises(ValueError, match=r"has no \.config .*save_pretrained\('run/checkpoints/last\.ckpt', DIR\)"):
        export.save_pretrained(plain, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
