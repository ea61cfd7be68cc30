"""Every snippet of docs/extending.md runs as written.

The page's fenced blocks are read from the Markdown itself, with their ``--8<--`` includes resolved the way the
docs build resolves them (a whole file, or the lines between ``--8<-- [start:name]`` and ``[end:name]``). Each
YAML block is trained through ``mulan-cli fit`` (:func:`mulan.cli.main`) for two steps on the embedded digits;
each command is run (``mulan fit`` through :func:`mulan.cli.main`, ``python -m examples.x`` as a module); each
Python block either defines a class that a YAML block of the page names (so that block's run exercises it) or is
run through its example's ``main()``; the printed output the page shows is the output the example prints.
"""

from __future__ import annotations

import csv
import importlib
import io
import math
import re
import runpy
import shlex
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples.*` class paths in the snippets resolve from the repository root
    sys.path.insert(0, str(ROOT))

from mulan.cli import main  # noqa: E402
from mulan.model import BOUND_TERMS  # noqa: E402

PAGE = ROOT / "docs" / "extending.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
INCLUDE = re.compile(r'^--8<-- "([^":]+)(?::([\w-]+))?"$')

# What a model-only YAML block (``model:`` alone) is trained with: the embedded digits on the CPU.
BASE_CONFIG = """\
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false}
data:
  class_path: mulan.lightning.data.EmbeddedDataModule
  init_args: {source: digits, batch_size: 8}
"""


def tiny_run(root: Path) -> list[str]:
    """Overrides that cut any fit to one epoch of two steps and one validation batch, logged to ``root``."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "log"}}
    return [
        *("--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"),
        *(
            "--trainer.limit_val_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.log_every_n_steps",
            "1",
        ),
        *("--trainer.default_root_dir", str(root), "--trainer.logger", repr(logger).replace("'", '"')),
        *("--data.init_args.batch_size", "8"),
    ]


def logged(root: Path) -> dict[str, float]:
    """The last value of every metric the CSV logger under ``root`` wrote."""
    (path,) = root.glob("log/version_*/metrics.csv")
    values: dict[str, float] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            values.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return values


def include(line: str) -> tuple[str, str]:
    """The text an include line stands for, and a label ``file[:section]``."""
    match = INCLUDE.match(line.strip())
    assert match, line
    path, section = match.groups()
    text = (ROOT / path).read_text()
    if section:
        start, end = f"--8<-- [start:{section}]", f"--8<-- [end:{section}]"
        assert start in text and end in text, f"{path} has no snippet section {section!r}"
        text = text.split(start, 1)[1].split(end, 1)[0].split("\n", 1)[1].rsplit("\n", 1)[0]
    assert text.strip(), f"{path}:{section} is empty"
    return text, f"{path}:{section}" if section else path


def snippets() -> list[tuple[str, str, str]]:
    """``(language, text, label)`` of every fenced block of the page, includes resolved, in page order."""
    found = []
    for number, match in enumerate(FENCE.finditer(PAGE.read_text())):
        language, body = match.groups()
        lines = body.strip("\n").splitlines()
        if lines and lines[0].startswith("--8<--"):
            assert len(lines) == 1, f"block {number}: an include must be the block's only line"
            text, label = include(lines[0])
        else:
            text, label = body, f"block {number} ({language})"
        found.append((language, text, label))
    return found


SNIPPETS = snippets()
YAML = [(text, label) for language, text, label in SNIPPETS if language == "yaml"]
PYTHON = [(text, label) for language, text, label in SNIPPETS if language == "python"]
COMMANDS = [
    line.split("#", 1)[0].strip()
    for language, text, _ in SNIPPETS
    if language == "bash"
    for line in text.splitlines()
    if line.split("#", 1)[0].strip()
]


def test_the_page_has_the_snippets_this_test_runs() -> None:
    """The parsing above sees the page's blocks: the four YAML configs, the three commands, the six Python parts."""
    assert {language for language, _, _ in SNIPPETS} == {"bash", "python", "yaml", "text"}
    assert len(YAML) == 4 and len(COMMANDS) == 3 and len(PYTHON) == 6
    assert "examples/categorical_latent.yaml:model" in [label for _, label in YAML]


@pytest.mark.parametrize(("text", "label"), YAML, ids=[label for _, label in YAML])
def test_yaml_snippet_trains_through_mulan_cli_fit(text: str, label: str, tmp_path: Path) -> None:
    config = tmp_path / "snippet.yaml"
    config.write_text(text)
    base = tmp_path / "base.yaml"
    base.write_text(BASE_CONFIG)
    configs = ["--config", str(config)] if "data:" in text else ["--config", str(base), "--config", str(config)]
    main(["fit", *configs, *tiny_run(tmp_path)])
    values = logged(tmp_path)
    assert values["step"] == 1 and math.isfinite(values["train/bpd_step"])
    for stage in ("train", "val"):
        assert math.isfinite(values[f"{stage}/bpd"])
        parts = sum(values[f"{stage}/{name}_bpd"] for name in BOUND_TERMS)
        assert values[f"{stage}/bpd"] == pytest.approx(parts, rel=1e-5)


def test_the_categorical_latent_yaml_logs_its_surrogate(tmp_path: Path) -> None:
    """The latent returns ``kl_surrogate`` without declaring it: the task logs it, per stage, and since this
    latent's surrogate is its exact KL, the two logged means are the same number."""
    (text,) = [text for text, label in YAML if label == "examples/categorical_latent.yaml:model"]
    config, base = tmp_path / "snippet.yaml", tmp_path / "base.yaml"
    config.write_text(text)
    base.write_text(BASE_CONFIG)
    main(["fit", "--config", str(base), "--config", str(config), *tiny_run(tmp_path)])
    values = logged(tmp_path)
    for stage in ("train", "val"):
        assert values[f"{stage}/latent_surrogate_bpd"] == pytest.approx(values[f"{stage}/latent_bpd"], rel=1e-6)
        assert 0 < values[f"{stage}/latent_bpd"] <= math.log(8) / (64 * math.log(2)) + 1e-6  # log m per image


@pytest.mark.parametrize("command", COMMANDS)
def test_command_runs_as_written(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the page's commands run from the repository root
    words = shlex.split(command)
    words = words[1:] if words[0].endswith("python") else words
    if words[:2] == ["-m", "pytest"]:  # the test suite itself: only check that what it names exists
        assert all((ROOT / word).exists() for word in words[2:] if not word.startswith("-"))
    elif words[:3] == ["-m", "mulan", "fit"] or words[:2] == ["mulan-cli", "fit"]:
        args = words[3:] if words[0] == "-m" else words[2:]
        main(["fit", *args, *tiny_run(tmp_path)])
        assert math.isfinite(logged(tmp_path)["train/bpd"])
    elif words[0] == "-m" and words[1].startswith("examples."):
        monkeypatch.delitem(sys.modules, words[1], raising=False)  # run fresh as __main__, as `python -m` does
        runpy.run_module(words[1], run_name="__main__")
    else:
        pytest.fail(f"the page shows a command this test does not know how to run: {command!r}")


@pytest.mark.parametrize(("text", "label"), PYTHON, ids=[label for _, label in PYTHON])
def test_python_snippet_runs(text: str, label: str) -> None:
    """A class is exercised by the YAML block that names it (trained above); functions run through ``main()``."""
    module_name = "examples." + Path(label.split(":")[0]).stem
    classes = re.findall(r"^class (\w+)", text, re.MULTILINE)
    if classes:
        named = "\n".join(text for text, _ in YAML)
        for name in classes:
            assert f"class_path: {module_name}.{name}" in named, f"no YAML block of the page trains {name}"
        return
    module = importlib.import_module(module_name)
    if module_name == "examples.pure_torch":
        return  # run once, with its printed output, below
    result = module.main()
    assert result


def test_pure_torch_prints_what_the_page_shows() -> None:
    (shown,) = [text for language, text, _ in SNIPPETS if language == "text"]
    from examples import pure_torch

    out = io.StringIO()
    with redirect_stdout(out):
        pure_torch.main()
    printed = out.getvalue().splitlines()
    shown_lines = shown.strip("\n").splitlines()
    assert [re.sub(r"[\d.]+", "#", line) for line in printed[-len(shown_lines) :]] == [
        re.sub(r"[\d.]+", "#", line) for line in shown_lines
    ]
    number = re.compile(r"\d+\.\d+")
    for ours, theirs in zip(printed[-len(shown_lines) :], shown_lines, strict=True):
        for a, b in zip(number.findall(ours), number.findall(theirs), strict=True):
            assert float(a) == pytest.approx(float(b), abs=2e-3), (ours, theirs)


def test_every_example_the_page_names_has_a_main() -> None:
    """The page says each example has a ``main()``."""
    names = set(re.findall(r"examples/(\w+)\.py", PAGE.read_text()))
    assert names >= {"custom_module", "cosine_schedule", "categorical_latent", "small_denoiser", "pure_torch"}
    for name in names:
        assert callable(getattr(importlib.import_module(f"examples.{name}"), "main", None)), name


def test_inline_class_paths_of_the_page_import() -> None:
    for path in re.findall(r"`class_path: ([\w.]+)`", PAGE.read_text()):
        module, name = path.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), name), type), path
