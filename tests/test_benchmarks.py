"""The benchmarks stay runnable: every script in ``benchmarks/`` answers ``--help``; every study file in
``benchmarks/studies/`` builds each of its arms through the CLI, and runs end to end through ``study.py`` on a
2-step budget (one arm each), writing the JSON and figure where it is told."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import re
import runpy
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from mulan.model import BOUND_TERMS

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if "__main__" in p.read_text())
STUDIES = sorted((BENCHMARKS / "studies").glob("*.yaml"))
HELPERS = {"timing.py"}
"""Modules of benchmarks/ that are imported by the scripts, not run."""


@functools.cache
def _study() -> ModuleType:
    """benchmarks/study.py as a module (registered, as its dataclasses need)."""
    spec = importlib.util.spec_from_file_location("study", BENCHMARKS / "study.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("study", module)
    spec.loader.exec_module(sys.modules["study"])
    return sys.modules["study"]


def test_every_python_file_is_a_script_or_a_known_helper() -> None:
    assert {p.name for p in BENCHMARKS.glob("*.py")} - {p.name for p in SCRIPTS} == HELPERS
    assert len(STUDIES) >= 6


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_answers_help(script: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])  # as `python benchmarks/x.py` sees it
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


CLASS_PATH = re.compile(r"\b(?:mulan|lightning|torch)(?:\.\w+)+")
"""A class path named in an override (``mulan.processes.MALDA``, ``lightning.pytorch.callbacks.ModelCheckpoint``)."""


@pytest.mark.parametrize("file", STUDIES, ids=lambda p: p.stem)
def test_every_arm_names_existing_configs_and_classes(file: Path) -> None:
    """Fast: each arm's config exists and every class path in its overrides imports (a class that moved without
    its old path kept fails here); the slow test below builds every arm through the CLI."""
    study = yaml.safe_load(file.read_text())
    assert study["arms"] and study["steps"] % study["every"] == 0  # the last step has a checkpoint
    for arm, spec in study["arms"].items():
        assert (ROOT / spec["config"]).is_file(), (arm, spec["config"])
        for path in CLASS_PATH.findall(" ".join(spec.get("overrides", []))):
            module, _, name = path.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), name, None), type), (arm, path)


@pytest.mark.slow
@pytest.mark.parametrize("file", STUDIES, ids=lambda p: p.stem)
def test_every_arm_of_the_study_builds(file: Path, tmp_path: Path, single_thread) -> None:
    """Each arm's ``mulan-cli fit`` command line (config, overrides, budget) parses and builds model, data and
    trainer: a misspelt override or a class path that moved fails here."""
    from mulan.cli import build_cli

    study = yaml.safe_load(file.read_text())
    for arm in study["arms"]:
        command = _study().train_command(study, arm, 0, tmp_path, ["--trainer.max_steps=2"])
        assert command[0] == "fit"
        cli = build_cli(command[1:], run=False)  # fit's arguments, parsed and instantiated without fitting
        assert cli.trainer.max_steps == 2 and cli.model.hparams["image_shape"] == tuple(cli.datamodule.image_shape)


@pytest.fixture(scope="module")
def shared_cwd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One working directory for the smoke runs: the digits configs' FID classifier (runs/digits_features.pt,
    trained on first use) is trained once, not once per study."""
    return tmp_path_factory.mktemp("studies")


@pytest.mark.parametrize("file", STUDIES, ids=lambda p: p.stem)
def test_the_study_runs_end_to_end_on_two_steps(
    file: Path, tmp_path: Path, shared_cwd: Path, monkeypatch: pytest.MonkeyPatch, single_thread
) -> None:
    monkeypatch.chdir(shared_cwd)
    study = yaml.safe_load(file.read_text())
    reused = set((study.get("reuse") or {}).get("arms", []))
    arm = next(a for a in study["arms"] if a not in reused)
    out = tmp_path / "out"
    _study().main(
        [str(file), "--arms", arm, "--seeds", "0", "--steps", "2", "--every", "2", "--times", "2",
         "--eval-batches", "1", "--draws", "2", "--in-process", "--workdir", str(tmp_path / "runs"),
         "--fit-args=--trainer.limit_val_batches=1", "--out", str(out)]
    )  # fmt: skip
    results = json.loads((out / f"{file.stem}.json").read_text())
    entry = results[arm]["0"]
    assert set(entry) == {"train_seconds", "2", "loss_variance"}  # one checkpoint, at the overridden budget
    terms = entry["2"]
    parts = sum(terms[name]["mean"] for name in BOUND_TERMS if name in terms)
    assert math.isfinite(parts) and terms["total"]["mean"] == pytest.approx(parts, rel=1e-6)  # float32 terms
    assert entry["loss_variance"]["total"] >= 0
    assert (tmp_path / "runs" / arm / "seed0" / "every" / "step=2.ckpt").is_file()
    assert (out / f"{file.stem}.png").is_file()


def test_the_timing_harness_times_only_the_calls_after_the_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    timing = importlib.import_module("timing")
    calls: list[int] = []

    def step() -> int:
        time.sleep(0.05 if not calls else 0.001)  # the first call is slow (start-up, compilation)
        calls.append(len(calls))
        return len(calls)

    result = timing.time_steps(step, torch.device("cpu"), warmup=2, steps=3)
    assert len(calls) == 5 and result.last == 5  # 2 untimed + 3 timed calls; the last call's value
    assert result.first_s >= 0.05 and len(result.times_s) == 3 and max(result.times_s) < 0.05
    assert result.times_s == sorted(result.times_s) and result.best_s == result.times_s[0]
    with pytest.raises(ValueError, match="steps >= 1"):
        timing.time_steps(step, torch.device("cpu"), warmup=0, steps=0)
