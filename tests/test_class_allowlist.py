"""Loading an exported model builds only allowed classes: mulan's own, torch optimisers and schedulers, and
classes the user trusts by name (``trusted=`` or ``MULAN_TRUSTED_CLASSES``). Anything else is refused in one
line before its module is imported, even in a file whose SHA-256 was recomputed after the edit (the digest is
not a signature)."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch

from mulan import export

ROOT = Path(__file__).resolve().parents[1]

MODEL_CONFIG = {
    "_class_path": "mulan.lightning.DiffusionTask",
    "image_shape": [1, 8, 8],
    "denoiser": {"class_path": "mulan.UNet", "init_args": {"channels": 16, "num_blocks": 1, "dropout": 0.0}},
    "process": {"class_path": "mulan.Polynomial", "init_args": {"hidden": 32}},
    "latent": {"class_path": "mulan.KHotLatent", "init_args": {"m": 10, "k": 3, "channels": 8, "num_blocks": 1}},
    "parameterisation": {"class_path": "mulan.Epsilon"},
    "time_sampler": {"class_path": "mulan.AntitheticUniform"},
    "timesteps": 0,
    "optimizer": {"class_path": "mulan.lightning.optim.AdamW", "init_args": {"lr": 0.01}},
    "lr_scheduler": {"class_path": "mulan.lightning.optim.LinearWarmup", "init_args": {"warmup_steps": 100}},
    "channels_last": False,
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
}
"""The structure of the hyper-parameters ``mulan-cli fit`` saves for tests/conf/mulan_tiny.yaml (shortest class
paths, as jsonargparse writes them)."""

CUSTOM_MODULE = '''
import mulan


class TrustedDenoiser(mulan.UNet):
    """A user's denoiser: a U-Net under another name, outside mulan."""
'''


def _write(tmp_path: Path, config: dict, name: str = "model.safetensors") -> Path:
    """An export of ``config`` whose tensors fit the mulan_tiny model, written with a valid (recomputed) SHA-256."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tensors = export.build_model(MODEL_CONFIG).state_dict()
    return export.write_export(tensors, config, None, tmp_path / name, weights="raw", global_step="0")


def _edited(path: str, value: object) -> dict:
    """MODEL_CONFIG with the entry at the dotted ``path`` set to ``value``."""
    config = copy.deepcopy(MODEL_CONFIG)
    *keys, last = path.split(".")
    node = config
    for key in keys:
        node = node[key]
    node[last] = value
    return config


@pytest.fixture(autouse=True)
def _no_trusted_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(export.TRUSTED_ENV, raising=False)


def test_the_library_export_loads(tmp_path: Path) -> None:
    model = export.load_model(_write(tmp_path, MODEL_CONFIG))
    assert type(model).__name__ == "DiffusionModel" and not model.training


@pytest.mark.parametrize("where", ["denoiser.class_path", "denoiser", "_class_path"])
def test_a_file_naming_the_module_this_is_refused_before_it_is_imported(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], where: str
) -> None:
    """Importing the standard module ``this`` prints the Zen of Python: the edited file (SHA-256 recomputed, so
    read_export accepts it) must be refused by name, with ``this`` never imported and nothing printed. Also as a
    bare string where a component is expected (jsonargparse takes ``"pkg.mod.name"`` for an import path) and as
    the saved module's ``_class_path``."""
    file = _write(tmp_path, _edited(where, "this.Zen"))
    export.read_export(file)  # the digest matches: it is no defence against an edit
    sys.modules.pop("this", None)
    capfd.readouterr()
    with pytest.raises(ValueError) as error:
        export.load_model(file)
    message = str(error.value)
    assert "\n" not in message
    assert "'this.Zen'" in message and str(file) in message
    assert "trusted=" in message and "--trusted_classes" in message and "MULAN_TRUSTED_CLASSES" in message
    assert "this" not in sys.modules
    assert capfd.readouterr() == ("", "")


def test_a_program_is_not_run_through_subprocess_popen(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    config = _edited("denoiser", {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}})
    with pytest.raises(ValueError, match=r"refusing to import 'subprocess\.Popen' \(at denoiser\.class_path\)"):
        export.load_model(_write(tmp_path, config))
    assert not marker.exists()


def test_mulan_prefixed_paths_to_foreign_objects_are_refused(tmp_path: Path) -> None:
    """``mulan.networks.nn.Linear`` starts with ``mulan.`` but jsonargparse resolves it (module
    ``mulan.networks``, attribute ``nn``, then ``Linear``) to torch's class; a module mulan imports, and a
    function, are not classes of mulan either; ``mulanx.`` is not ``mulan.``."""
    from jsonargparse._util import import_object

    assert import_object("mulan.networks.nn.Linear") is torch.nn.Linear  # the path is live without the check
    for path in [
        "mulan.networks.nn.Linear",
        "mulan.export.torch",
        "mulan.cli.sys",
        "mulan.export.subprocess",
        "mulan.export.check_class_paths",
        "mulan.lightning.DiffusionTask.load_from_checkpoint",
        "mulan.__main__.main",
        "mulanx.evil.Class",
    ]:
        with pytest.raises(ValueError, match=re.escape(f"refusing to import {path!r}")):
            export.check_class_paths(_edited("denoiser.class_path", path), "f.safetensors")


def test_a_foreign_optimiser_path_is_refused_but_torch_optimisers_are_allowed() -> None:
    for allowed in ["torch.optim.Adam", "torch.optim.SGD", "torch.optim.lr_scheduler.CosineAnnealingLR"]:
        export.check_class_paths(_edited("optimizer.class_path", allowed), "f")
    for refused in ["torch.optim.lr_scheduler.warnings", "torch.nn.Linear", "torch.optimx.Adam", "os.system"]:
        with pytest.raises(ValueError, match=re.escape(repr(refused))):
            export.check_class_paths(_edited("optimizer.class_path", refused), "f")
    with pytest.raises(ValueError, match="'os.system'"):
        export.check_class_paths(_edited("_instantiator", "os.system"), "f")


def test_every_mulan_class_in_the_shipped_configurations_is_allowed() -> None:
    paths = {
        match.group(1)
        for file in [*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("tests/conf/*.yaml")]
        for match in re.finditer(r"class_path:\s*(mulan\.[\w.]+)", file.read_text())
    }
    assert len(paths) > 20
    for path in sorted(paths):
        export.check_class_paths({"class_path": path}, "f")


def test_a_custom_class_loads_when_trusted_by_argument_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "user_models_mod.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_models_mod", None)
    file = _write(tmp_path, _edited("denoiser.class_path", "user_models_mod.TrustedDenoiser"))
    for not_enough in ([], ["user_models_mod"], ["user_models_mo."], ["user_models_mod.Other"]):
        with pytest.raises(ValueError, match="'user_models_mod.TrustedDenoiser'"):
            export.load_model(file, trusted=not_enough)
        assert "user_models_mod" not in sys.modules
    reference = export.read_export(file).tensors
    by_argument = export.load_model(file, trusted=["user_models_mod.TrustedDenoiser"])
    assert type(by_argument.denoiser).__name__ == "TrustedDenoiser"
    monkeypatch.setenv(export.TRUSTED_ENV, "some.other.Class, user_models_mod.")
    by_environment = export.load_model(file)
    for model in (by_argument, by_environment):
        state = model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[name], reference[name]) for name in reference)


def test_a_malformed_trusted_entry_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"trusted class entry 'my-package\.\*'"):
        export.check_class_paths(MODEL_CONFIG, "f", trusted=["my-package.*"])
    monkeypatch.setenv(export.TRUSTED_ENV, "ok.Class,bad path")
    with pytest.raises(ValueError, match=r"trusted class entry 'bad path'"):
        export.check_class_paths(MODEL_CONFIG, "f")
