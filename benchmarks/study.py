"""Train-and-evaluate studies: arms (configs + overrides) x seeds, the test bound per term against training steps.

A study file (YAML) names the arms, each a config of ``configs/`` plus command-line overrides, and the budget:

    steps: 2000           # optimiser steps per run
    every: 250            # a checkpoint (EMA weights) every this many steps
    seeds: [0, 1, 2]
    times: 32             # stratified times per test image in the dense ELBO
    arms:
      vdm: {config: configs/demo_digits_vdm.yaml}
      mulan: {config: configs/demo_digits.yaml, overrides: ["--model.init_args.parameterisation=mulan.Velocity"]}
    reuse: {study: colour, arms: [vdm, mulan]}   # optional: arms already run by another study (same budget)
    first: [vdm, mulan]                           # optional: run these arms (every seed) before the others
    terms: [total, diffusion, latent]             # optional: the terms of the final table
    plot_without_latent: true                     # optional: also draw each total less its latent cost (dashed)

Every run trains through the real CLI (``mulan-cli fit``) in its own process (``--jobs`` at a time, one thread
each); every checkpoint is then evaluated on the test split with the dense ELBO (every term, bits/dim), and at
the last step the variance of the one-sample training-loss estimate of a fixed batch is measured. Results are
cached per (arm, seed, step) in the study's JSON, so an interrupted study resumes where it stopped.

    python benchmarks/study.py benchmarks/studies/colour.yaml --jobs 2
    python benchmarks/study.py benchmarks/studies/colour.yaml --report-only
    python benchmarks/study.py benchmarks/studies/colour.yaml --steps 2 --every 2 --times 2 --eval-batches 1 \
        --seeds 0 --draws 2 --in-process --fit-args=--trainer.limit_val_batches=1 --out /tmp/smoke  # a smoke run

Checkpoints are read back with :func:`mulan.lightning.loading.load_task`.
Writes ``benchmarks/results/<study>.json`` and ``docs/figures/<study>.png`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
TERMS = ["total", "recon", "prior", "diffusion", "latent"]
"""The terms of the final table, unless the study file names others (``terms: [...]``)."""


def run_name(arm: str, seed: int) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in arm) + f"/seed{seed}"


@dataclass
class Options:
    """How a study is run beyond its file: extra ``mulan-cli fit`` arguments for every run (``fit_args``), the test
    batches each checkpoint is evaluated on (``eval_batches``, None: all), the draws of the loss-variance
    measurement, and whether runs train in this process (one at a time) instead of a child process each."""

    fit_args: list[str] = field(default_factory=list)
    eval_batches: int | None = None
    draws: int = 64
    in_process: bool = False


def train_command(study: dict, arm: str, seed: int, workdir: Path, fit_args: Sequence[str] = ()) -> list[str]:
    """The ``mulan-cli fit`` arguments of one run: the arm's config and overrides, the study's budget, and a
    checkpoint of the EMA weights every ``every`` steps under ``workdir/<arm>/seed<k>/every``; ``fit_args`` last."""
    spec = study["arms"][arm]
    out = workdir / run_name(arm, seed)
    return [
        "fit",
        "--config",
        str(ROOT / spec["config"]),
        *spec.get("overrides", []),
        f"--seed_everything={seed}",
        f"--trainer.max_steps={study['steps']}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}",
        "--test_after_fit=false",
        "--overwrite=true",  # a run interrupted earlier is trained again from the start
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out / 'every'}",
        f"--trainer.callbacks.every_n_train_steps={study['every']}",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
        *fit_args,
    ]


def train(study: dict, arm: str, seed: int, workdir: Path, options: Options | None = None) -> float:
    """Run one training, in a child process with one thread (or in this process with ``options.in_process``);
    returns its wall-clock seconds."""
    options = options or Options()
    log = workdir / f"{run_name(arm, seed)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / run_name(arm, seed), ignore_errors=True)  # no checkpoint of an interrupted run survives
    args = train_command(study, arm, seed, workdir, options.fit_args)
    start = time.perf_counter()
    if options.in_process:
        from mulan.cli import main as cli_main

        cli_main(args)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(log, "w") as out:
            subprocess.run(
                [sys.executable, "-m", "mulan", *args], check=True, stdout=out, stderr=subprocess.STDOUT, env=env
            )
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(ckpt: Path, times: int, seed: int, batches: int | None = None) -> dict[str, Any]:
    """Dense-ELBO test bound of one checkpoint: mean and standard error per term (bits/dim), over the whole test
    split or its first ``batches`` batches."""
    from mulan.lightning.loading import load_task
    from mulan.lightning.task import split_batch
    from mulan.likelihood import dense_elbo

    task, data = load_task(ckpt)
    data.setup("test")
    torch.manual_seed(seed)
    values: dict[str, list[torch.Tensor]] = {}
    for index, batch in enumerate(data.test_dataloader()):
        if batches is not None and index >= batches:
            break
        images, y = split_batch(batch)
        bound = dense_elbo(task.model, images, y, num_times=times)
        for name, nats in bound.as_dict().items():
            values.setdefault(name, []).append(task.model.bpd(nats))
    out = {}
    for name, parts in values.items():
        v = torch.cat(parts).double()
        out[name] = {"mean": v.mean().item(), "stderr": (v.std() / math.sqrt(v.numel())).item()}
    return out


@torch.no_grad()
def loss_variance(ckpt: Path, draws: int = 64, seed: int = 0) -> dict[str, float]:
    """Variance over ``draws`` of the one-sample training-loss estimate (the batch mean of the total, bits/dim) of
    one fixed training batch, with the training draws (time sampler, noise, latent perturbation); also of the
    diffusion term alone."""
    from mulan.lightning.loading import load_task
    from mulan.lightning.task import split_batch

    task, data = load_task(ckpt)
    task.train()
    for module in task.modules():  # the draws of training, without dropout's extra noise
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    data.setup("fit")
    images, y = split_batch(next(iter(data.train_dataloader())))
    torch.manual_seed(seed)
    totals, diffusions = [], []
    for _ in range(draws):
        bound = task.model(images, y)
        totals.append(task.model.bpd(bound.total).mean())
        diffusions.append(task.model.bpd(bound.diffusion).mean())
    return {"total": torch.stack(totals).var().item(), "diffusion": torch.stack(diffusions).var().item()}


def run_arm_seed(
    study: dict, arm: str, seed: int, workdir: Path, results: dict, save: Any, options: Options | None = None
) -> None:
    """Train one arm and seed (unless its checkpoints are there), evaluate every checkpoint not yet in ``results``
    and measure the loss variance at the last step; ``save()`` after each result."""
    options = options or Options()
    entry = results.setdefault(arm, {}).setdefault(str(seed), {})
    steps = list(range(study["every"], study["steps"] + 1, study["every"]))
    ckpts = workdir / run_name(arm, seed) / "every"
    missing = [s for s in steps if str(s) not in entry]
    needed = missing + ([study["steps"]] if "loss_variance" not in entry else [])
    if needed and not all((ckpts / f"step={s}.ckpt").is_file() for s in needed):
        entry["train_seconds"] = train(study, arm, seed, workdir, options)
    for s in missing:
        entry[str(s)] = evaluate(ckpts / f"step={s}.ckpt", study.get("times", 32), seed, options.eval_batches)
        save()
    if "loss_variance" not in entry:
        entry["loss_variance"] = loss_variance(ckpts / f"step={study['steps']}.ckpt", options.draws)
        save()
    print(f"done: {arm} seed {seed}", flush=True)


def reuse(study: dict, results: dict) -> set[str]:
    """Copy the arms named in ``study["reuse"]`` from the other study's results (same budget required); returns
    their names. They are reported like the study's own arms and never retrained."""
    spec = study.get("reuse")
    if not spec:
        return set()
    other_file = ROOT / "benchmarks" / "studies" / f"{spec['study']}.yaml"
    other = yaml.safe_load(other_file.read_text())
    for key in ("steps", "every", "times"):
        if other.get(key) != study.get(key):
            raise ValueError(
                f"cannot reuse arms of {other_file}: its {key} is {other.get(key)}, this study's {study.get(key)}"
            )
    saved = json.loads((RESULTS / f"{spec['study']}.json").read_text())
    for arm in spec["arms"]:
        study["arms"].setdefault(arm, other["arms"][arm])
        results[arm] = saved[arm]
    return set(spec["arms"])


def table(study: dict, results: dict) -> str:
    """Markdown: test bpd (mean +- std over seeds) per arm at each evaluated step, then every term at the end."""
    steps = list(range(study["every"], study["steps"] + 1, study["every"]))
    arms = [a for a in study["arms"] if a in results]

    def stat(arm: str, step: int, term: str = "total") -> str:
        vals = [r[str(step)][term]["mean"] for r in results[arm].values() if str(step) in r and term in r[str(step)]]
        if not vals:
            return "-"
        t = torch.tensor(vals, dtype=torch.float64)
        return f"{t.mean():.3f} ± {t.std():.3f}" if len(vals) > 1 else f"{t.mean():.3f}"

    lines = ["| arm | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(stat(a, s) for s in steps) + " |" for a in arms]
    terms = study.get("terms", TERMS)
    lines += [
        "",
        f"Every term at {study['steps']} steps (bits/dim, mean ± std over seeds), and the variance of the",
        "one-sample training-loss estimate of a fixed batch (bits/dim², mean over seeds):",
        "",
    ]
    lines += [
        "| arm | " + " | ".join(terms) + " | loss variance | diffusion-term variance |",
        "|---" * (len(terms) + 3) + "|",
    ]
    for a in arms:
        var = [r["loss_variance"] for r in results[a].values() if "loss_variance" in r]
        v_total = sum(v["total"] for v in var) / len(var) if var else float("nan")
        v_diff = sum(v["diffusion"] for v in var) / len(var) if var else float("nan")
        cells = " | ".join(stat(a, study["steps"], t) for t in terms)
        lines.append(f"| {a} | {cells} | {v_total:.4f} | {v_diff:.4f} |")
    return "\n".join(lines)


def plot(study: dict, results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(study["every"], study["steps"] + 1, study["every"]))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm in study["arms"]:
        if arm not in results:
            continue
        rows = [[r[str(s)]["total"]["mean"] for s in steps] for r in results[arm].values() if str(steps[-1]) in r]
        if not rows:
            continue
        t = torch.tensor(rows, dtype=torch.float64)
        mean, std = t.mean(0), (t.std(0) if len(rows) > 1 else torch.zeros(len(steps)))
        line = ax.errorbar(steps, mean, yerr=std, marker="o", ms=3, capsize=2, label=arm)
        latent = torch.tensor(
            [[r[str(s)].get("latent", {}).get("mean", 0.0) for s in steps] for r in results[arm].values()
             if str(steps[-1]) in r], dtype=torch.float64)  # fmt: skip
        if study.get("plot_without_latent") and latent.abs().max() > 0:  # where the gap comes from; not a bound
            ax.plot(steps, (t - latent).mean(0), ls="--", color=line[0].get_color(), label=f"{arm} without latent cost")
    ax.set_xlabel("training steps")
    ax.set_ylabel("test bound, dense ELBO (bits/dim)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="the study file (YAML)")
    parser.add_argument("--arms", nargs="*", help="only these arms (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds (default: the study's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--workdir", type=Path, default=None, help="checkpoints and logs (default: runs/study/<name>)")
    parser.add_argument("--report-only", action="store_true", help="print the table and plot from the saved JSON")
    smaller = parser.add_argument_group("a smaller run (smoke tests: results go to --out, not the study's JSON)")
    smaller.add_argument("--steps", type=int, help="optimiser steps per run instead of the study's")
    smaller.add_argument("--every", type=int, help="checkpoint interval instead of the study's")
    smaller.add_argument("--times", type=int, help="stratified times per test image instead of the study's")
    smaller.add_argument("--eval-batches", type=int, help="evaluate each checkpoint on this many test batches only")
    smaller.add_argument("--draws", type=int, default=64, help="draws of the loss-variance measurement")
    smaller.add_argument("--fit-args", nargs="*", default=[], help="mulan-cli fit arguments appended to every run")
    smaller.add_argument("--in-process", action="store_true", help="train in this process, one run at a time")
    smaller.add_argument("--out", type=Path, help="folder of the JSON and figure (default: the repository's)")
    args = parser.parse_args(argv)
    study = yaml.safe_load(args.study.read_text())
    name = args.study.stem
    results_dir, figures_dir = (args.out, args.out) if args.out else (RESULTS, FIGURES)
    out_json = results_dir / f"{name}.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    workdir = args.workdir or ROOT / "runs" / "study" / name
    reused = reuse(study, results)  # checked against the study's own budget, before any override
    study.update({key: getattr(args, key) for key in ("steps", "every", "times") if getattr(args, key) is not None})
    options = Options(args.fit_args, args.eval_batches, args.draws, args.in_process)

    lock = threading.Lock()

    def save() -> None:
        with lock:
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=1))

    if not args.report_only:
        torch.set_num_threads(1)
        arms = [a for a in (args.arms or list(study["arms"])) if a not in reused]
        unknown = sorted(set(arms) - set(study["arms"]))
        if unknown:
            parser.error(f"no arm {', '.join(unknown)} in {args.study}; its arms: {', '.join(study['arms'])}")
        seeds = args.seeds if args.seeds is not None else study["seeds"]
        first = [a for a in study.get("first", []) if a in arms]  # these arms, every seed, before the others
        jobs = [(a, s) for a in first for s in seeds] + [(a, s) for s in seeds for a in arms if a not in first]
        if options.in_process:
            for a, s in jobs:
                run_arm_seed(study, a, s, workdir, results, save, options)
        else:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                runs = [pool.submit(run_arm_seed, study, a, s, workdir, results, save, options) for a, s in jobs]
                for future in runs:
                    future.result()
    print(table(study, results))
    plot(study, results, figures_dir / f"{name}.png", study.get("title", name))


if __name__ == "__main__":
    main()
