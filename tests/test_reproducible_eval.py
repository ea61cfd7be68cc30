"""Reproducible evaluation (docs: evaluation, "Reproducible evaluation"): the validation and test stages and the
evaluation callback seed their draws from (run seed, stage, batch position, rank) or the images' keys, so the test
printed at the end of ``fit``, ``mulan-cli test`` on the saved weights and a second such test give the same numbers
bit for bit, whatever the global random state was before; and an evaluation leaves the global random state as it
found it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from mulan.cli import build_cli
from mulan.lightning.data import EmbeddedDataModule
from mulan.lightning.evaluation import EvaluationCallback
from test_eval_resume import tiny_mulan

pytestmark = pytest.mark.usefixtures("single_thread")

CONF = Path(__file__).parent / "conf"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
EVALUATION = [
    "--trainer.callbacks+=mulan.lightning.evaluation.EvaluationCallback",
    "--trainer.callbacks.num_images=8",
    "--trainer.callbacks.num_times=2",
    "--trainer.callbacks.fid=false",
    "--trainer.callbacks.ode_images=2",
    "--trainer.callbacks.ode_divergence_samples=4",
    "--trainer.callbacks.ode_rtol=1e-3",
    "--trainer.callbacks.ode_atol=1e-3",
    "--trainer.callbacks.progress=false",
    "--trainer.limit_test_batches=2",
]


def logged(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}


def test_fit_then_test_equals_mulan_cli_test_twice(tmp_path: Path) -> None:
    """``fit --test_after_fit true`` on the tiny VDM with the evaluation callback (dense ELBO and sampled-time ODE of
    a few images), then ``test --ckpt_path`` twice, each after drawing from the global random state differently:
    every logged test figure (the one-sample bound and its terms, their standard error, the dense ELBO, the ODE
    bound and its noise) is equal bit for bit across the three."""
    fit = build_cli(
        ["fit", "--config", str(CONF / "vdm_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "fit"),
         *EVALUATION, "--test_after_fit", "true"]
    )  # fmt: skip
    after_fit = logged(fit)
    assert {"test/bpd", "test/bpd_stderr", "test/dense_bpd", "test/ode_bpd", "test/ode_noise_bpd"} <= after_fit.keys()
    ckpt = sorted((tmp_path / "fit").rglob("*.ckpt"))[-1]
    tests = []
    for run in range(2):
        torch.manual_seed(1000 + run)  # whatever came before must not matter
        torch.rand(7 + run)
        cli = build_cli(
            ["test", "--ckpt_path", str(ckpt), *QUIET, "--trainer.default_root_dir", str(tmp_path / f"t{run}"),
             *EVALUATION]
        )  # fmt: skip
        tests.append(logged(cli))
    for name, value in after_fit.items():
        if name == "test/ode_seconds_per_image":
            continue
        assert tests[0][name] == value and tests[1][name] == value, (name, value, tests[0][name], tests[1][name])


def _test(module: L.LightningModule, callback: EvaluationCallback | None = None) -> dict[str, float]:
    trainer = L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[] if callback is None else [callback],
        limit_test_batches=2,
        limit_val_batches=2,
    )
    trainer.test(module, datamodule=EmbeddedDataModule(batch_size=4), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if "seconds" not in k}


def test_evaluation_ignores_the_global_random_state_and_restores_it() -> None:
    """A test (task and callback) gives the same figures whatever the global random state, and puts that state
    back: the next draw after a test with the evaluation callback's dense ELBO and ODE is the one after a test
    without the callback (the evaluation's draws leave no trace; the data loader's own draw of its workers' base
    seed, made before the stage starts, is the same in both)."""
    module = tiny_mulan()
    callback = EvaluationCallback(num_images=8, num_times=2, fid=False, ode_images=2, ode_divergence_samples=4,
                                  ode_rtol=1e-3, ode_atol=1e-3, progress=False)  # fmt: skip
    results, after = [], []
    for seed, with_callback in ((0, True), (1, True), (0, False)):
        torch.manual_seed(seed)
        results.append(_test(module, callback if with_callback else None))
        after.append(torch.rand(3))
    assert results[0] == results[1] and "test/ode_bpd" in results[0]
    assert results[2]["test/bpd"] == results[0]["test/bpd"]
    assert torch.equal(after[0], after[2]) and not torch.equal(after[0], after[1])
