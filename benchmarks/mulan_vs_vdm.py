"""The paper's central claim at small scale: VDM vs MuLAN on the embedded digits, same denoiser, same budget.

Each arm trains through the real CLI (``configs/demo_digits.yaml``, ``configs/demo_digits_vdm.yaml``, plus overrides)
for ``--steps`` optimiser steps with checkpoints every ``--every`` steps (EMA weights), for several seeds; every
checkpoint is then evaluated on the test split with the dense ELBO (``--times`` stratified times per image).

    python benchmarks/mulan_vs_vdm.py --steps 2000 --every 500 --seeds 0 1 2

Writes ``benchmarks/results/mulan_vs_vdm.json``, ``docs/figures/mulan_vs_vdm.png`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mulan.cli import main
from mulan.lightning import DiffusionTask
from mulan.lightning.data import EmbeddedDataModule
from mulan.likelihood import dense_elbo_dataset

ROOT = Path(__file__).resolve().parents[1]
LATENT = "--model.init_args.latent"
ARMS = {
    "vdm": ("demo_digits_vdm.yaml", []),
    "mulan (m=50, k=15)": ("demo_digits.yaml", [f"{LATENT}.init_args.m=50", f"{LATENT}.init_args.k=15"]),
    "mulan (m=8, k=2)": ("demo_digits.yaml", [f"{LATENT}.init_args.m=8", f"{LATENT}.init_args.k=2"]),
    "mulan, no latent": ("demo_digits.yaml", [f"{LATENT}=mulan.latents.NoLatent"]),
}


def train(arm: str, seed: int, steps: int, every: int, workdir: Path) -> tuple[Path, float]:
    config, overrides = ARMS[arm]
    ckpt_dir = (
        workdir
        / arm.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("=", "")
        / f"seed{seed}"
    )
    start = time.perf_counter()
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / config),
            *overrides,
            "--seed_everything",
            str(seed),
            "--trainer.max_steps",
            str(steps),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.default_root_dir",
            str(ckpt_dir),
            "--test_after_fit",
            "false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={ckpt_dir / 'every'}",
            f"--trainer.callbacks.every_n_train_steps={every}",
            "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.filename={step}",
        ]
    )
    return ckpt_dir / "every", time.perf_counter() - start


def evaluate(ckpt: Path, times: int, seed: int) -> dict[str, float]:
    module = DiffusionTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    module.eval()
    data = EmbeddedDataModule(source="digits", batch_size=64)
    data.setup("test")
    torch.manual_seed(seed)
    terms = dense_elbo_dataset(module.model, data.test_dataloader(), num_times=times)
    bpd = {name: module.model.bpd(value) for name, value in terms.as_dict().items()}
    n = bpd["total"].numel()
    return {**{k: float(v.mean()) for k, v in bpd.items()}, "total_stderr": float(bpd["total"].std() / math.sqrt(n))}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in results["arms"].items():
        steps = sorted({int(s) for run in runs.values() for s in run["eval"]})

        def curve(key: str, runs: dict = runs, steps: list = steps) -> torch.Tensor:
            return torch.tensor([[run["eval"][str(s)][key] for s in steps] for run in runs.values()])

        total = curve("total")
        spread = total.std(0) if len(runs) > 1 else torch.zeros(len(steps))
        line = ax.errorbar(steps, total.mean(0), yerr=spread, marker="o", capsize=3, label=arm)
        latent = curve("latent")
        if latent.abs().max() > 0:  # the same bound without the latent's cost, to show where the gap comes from
            label = f"{arm} without latent cost"
            ax.plot(steps, (total - latent).mean(0), ls="--", color=line[0].get_color(), label=label)
    ax.set_xlabel("optimiser steps (batch 64)")
    ax.set_ylabel("test bits/dim (dense ELBO, honest latent KL)")
    ax.set_title("8x8 digits: VDM vs MuLAN, same U-Net (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(results: dict) -> str:
    arms = results["arms"]
    steps = sorted({int(s) for runs in arms.values() for run in runs.values() for s in run["eval"]})
    head = (
        "| arm | "
        + " | ".join(f"{s} steps" for s in steps)
        + " | diffusion | latent (honest) | latent (surrogate) | s/run |"
    )
    lines = [head, "|" + "---|" * (len(steps) + 5)]
    for arm, runs in arms.items():
        cells = []
        for s in steps:
            v = torch.tensor([run["eval"][str(s)]["total"] for run in runs.values()])
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}")
        final = [run["eval"][str(steps[-1])] for run in runs.values()]
        avg = {k: sum(f[k] for f in final) / len(final) for k in ("diffusion", "latent", "latent_surrogate")}
        secs = sum(run["train_seconds"] for run in runs.values()) / len(runs)
        lines.append(
            f"| {arm} | "
            + " | ".join(cells)
            + f" | {avg['diffusion']:.3f} | {avg['latent']:.3f} | {avg['latent_surrogate']:.3f} | {secs:.0f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.plot_only:
        results = json.loads(out.read_text())
        plot(results, Path(args.figure))
        print(table(results))
        return
    results = json.loads(out.read_text()) if out.exists() and args.resume else {"arms": {}}
    results["settings"] = {
        "steps": args.steps,
        "every": args.every,
        "times": args.times,
        "seeds": args.seeds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for seed in args.seeds:
        for arm in args.arms:
            runs = results["arms"].setdefault(arm, {})
            if str(seed) in runs:
                continue
            ckpt_dir, seconds = train(arm, seed, args.steps, args.every, Path(args.workdir))
            evals = {}
            for ckpt in sorted(ckpt_dir.glob("step=*.ckpt")):
                step = int(ckpt.stem.split("=")[1])
                evals[str(step)] = evaluate(ckpt, args.times, seed)
                print(f"{arm} seed {seed} step {step}: {evals[str(step)]['total']:.4f} bpd", flush=True)
            runs[str(seed)] = {"train_seconds": seconds, "eval": evals}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    plot(results, Path(args.figure))
    print(table(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--times", type=int, default=32, help="stratified times per test image (dense ELBO)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "mulan_vs_vdm"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mulan_vs_vdm.json"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "mulan_vs_vdm.png"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the figure and table from --out")
    run(parser.parse_args())
