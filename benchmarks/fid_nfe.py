"""FID against network evaluations (NFE): DPM-Solver++ (2M), deterministic and stochastic (SDE), at a few dozen
steps against the ancestral sampler (25 to 1000 steps), on trained checkpoints, with feature networks that run
offline.

The features follow the checkpoint's data: :class:`~mulan.lightning.features.DigitsFeatures` (a digits classifier)
for 1x8x8 images, :class:`~mulan.lightning.features.PhotoFeatures` (a classifier of which photo and region a crop
comes from) for the photo crops. Real features: the images of the checkpoint's train loader (full batches). Every
sampler draws the same number of images (FID is biased upwards at small N, equally for every row). Both DPM-Solvers
at ``--noise-steps`` are repeated with ``--noise-seeds`` seeds, and the reference every row is compared with,
ancestral-256, with ``--reference-seeds``: they show how much FID moves with the draw alone. The ± of such a row is
the standard deviation of one draw's FID over its seeds (not divided by the square root of their number): the
yardstick for a single-draw row; it covers the generated samples only (real images and features are fixed per
column; docs: evaluation, "What each ± means"). A floor row gives the
FID of the test split (real images, fewer of them) against the same features.

    python benchmarks/fid_nfe.py runs/study/colour/mulan/seed0/every/step=2000.ckpt --name photos_mulan
    python benchmarks/fid_nfe.py <digits checkpoint> --name digits_mulan --samples 1000

Results are cached per (name, sampler, steps, seed) in ``benchmarks/results/fid_nfe.json`` (a run resumes);
``--report-only`` prints the table and draws ``docs/figures/fid_nfe.png`` from it. Two processes may fill one
name's column with disjoint plans, e.g. the slow row alone in one of them:

    python benchmarks/fid_nfe.py <ckpt> --name photos_mulan --ancestral 1000 --dpm --sde --noise-seeds 1
    python benchmarks/fid_nfe.py <ckpt> --name photos_mulan --ancestral 25 50 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fid_nfe.json"
FIGURE = ROOT / "docs" / "figures" / "fid_nfe.png"
REFERENCE = 256  # the ancestral steps every row is compared with
sys.path.insert(0, str(Path(__file__).parent))


def feature_network(image_shape: tuple[int, int, int]) -> nn.Module:
    """The offline feature network for images of ``image_shape`` (C, H, W)."""
    from mulan.lightning.features import DigitsFeatures, PhotoFeatures

    if image_shape[0] == 1:
        return DigitsFeatures(str(ROOT / "runs" / "digits_features.pt"))
    return PhotoFeatures(str(ROOT / "runs" / f"photo_features_{image_shape[-1]}.pt"), image_size=image_shape[-1])


def rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def draw(model, sampler: str, steps: int, count: int, batch: int, seed: int) -> tuple[torch.Tensor, float]:
    """``count`` samples (uint8) with ``sampler`` at ``steps``, all randomness from ``seed``; and the seconds."""
    from mulan.sampling import SAMPLERS

    generator = torch.Generator().manual_seed(seed)
    start, parts = time.perf_counter(), []
    for first in range(0, count, batch):
        n = min(batch, count - first)
        parts.append(SAMPLERS[sampler](model, n, steps=steps, generator=generator).samples)
    return torch.cat(parts), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, nargs="?", help="a trained checkpoint (EMA weights)")
    parser.add_argument("--name", help="the row label in the results (e.g. photos_mulan)")
    parser.add_argument("--samples", type=int, default=500, help="generated images per sampler setting")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--dpm", type=int, nargs="*", default=[10, 15, 25, 50], help="DPM-Solver++ steps (= NFE)")
    parser.add_argument("--sde", type=int, nargs="*", default=[10, 15, 25, 50], help="SDE-DPM-Solver++ steps (= NFE)")
    parser.add_argument("--ancestral", type=int, nargs="*", default=[25, 50, 256, 1000], help="ancestral steps (= NFE)")
    parser.add_argument("--noise-steps", type=int, default=25, help="DPM-Solver steps repeated over seeds")
    parser.add_argument("--noise-seeds", type=int, default=3)
    parser.add_argument(
        "--reference-seeds", type=int, default=3, help=f"seeds of the reference row, ancestral-{REFERENCE} (when run)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.report_only:
        if args.ckpt is None or args.name is None:
            parser.error("a checkpoint and --name are needed (or --report-only)")
        torch.set_num_threads(args.threads)
        entry = results.setdefault(args.name, {})

        def save() -> None:
            """Merge this run's rows into the file as it is now: other runs (of any name, or of this name with
            other samplers or steps, e.g. the ancestral-1000 row in a second process) may write it too."""
            current = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
            current.setdefault(args.name, {}).update(entry)
            partial = RESULTS.with_suffix(".json.partial")
            partial.write_text(json.dumps(current, indent=1))
            partial.replace(RESULTS)  # atomic: a reader never sees half a file
            results.update(current)

        run(args, entry, save)
    print(table(results))
    plot(results)


def run(args: argparse.Namespace, entry: dict, save) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from mulan.lightning.loading import load_task

    task, data = load_task(args.ckpt)
    assert data is not None, f"{args.ckpt} saved no data configuration"
    data.setup(None)
    train, test = (
        torch.cat([b if torch.is_tensor(b) else b[0] for b in loader])
        for loader in (data.train_dataloader(), data.test_dataloader())
    )
    features = feature_network(tuple(task.model.image_shape))
    metric = FrechetInceptionDistance(feature=features, reset_real_features=False)
    metric.update(rgb(train), real=True)
    entry["settings"] = {
        "ckpt": str(args.ckpt),
        "samples": args.samples,
        "real": len(train),
        "features": type(features).__name__,
        "feature_test_accuracy": features.test_accuracy,
    }

    def fid(fake: torch.Tensor) -> float:
        metric.reset()  # keeps the real features
        metric.update(rgb(fake), real=False)
        return metric.compute().item()

    if "floor" not in entry:
        entry["floor"] = {"fid": fid(test), "images": len(test)}
        save()
    plan = [("dpm_solver", s, 0) for s in args.dpm]
    plan += [("dpm_solver", args.noise_steps, seed) for seed in range(1, args.noise_seeds)]
    plan += [("dpm_solver_sde", s, 0) for s in args.sde]
    plan += [("dpm_solver_sde", args.noise_steps, seed) for seed in range(1, args.noise_seeds)]
    plan += [("ancestral", s, 0) for s in sorted(args.ancestral)]
    if REFERENCE in args.ancestral:
        plan += [("ancestral", REFERENCE, seed) for seed in range(1, args.reference_seeds)]
    for sampler, steps, seed in plan:
        key = f"{sampler}-{steps}-seed{seed}"
        if key in entry:
            continue
        with torch.no_grad():
            samples, seconds = draw(task.model, sampler, steps, args.samples, args.batch, seed)
        entry[key] = {"sampler": sampler, "nfe": steps, "seed": seed, "fid": fid(samples), "seconds": seconds}
        save()
        print(f"{args.name} {key}: FID {entry[key]['fid']:.3f} ({seconds:.0f} s)", flush=True)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def rows(entry: dict, sampler: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for value in entry.values():
        if isinstance(value, dict) and value.get("sampler") == sampler:
            out.setdefault(value["nfe"], []).append(value["fid"])
    return dict(sorted(out.items()))


def table(results: dict) -> str:
    lines = []
    for name, entry in results.items():
        settings = entry.get("settings", {})
        lines += [
            f"\n{name}: {settings.get('samples')} samples per row vs {settings.get('real')} real train images, "
            f"{settings.get('features')} (test accuracy {settings.get('feature_test_accuracy', float('nan')):.3f})",
            f"| sampler | NFE | FID | vs ancestral-{REFERENCE} |",
            "|---|---|---|---|",
        ]
        reference = mean(rows(entry, "ancestral").get(REFERENCE, [float("nan")]))
        for sampler in ("dpm_solver", "dpm_solver_sde", "ancestral"):
            for nfe, fids in rows(entry, sampler).items():
                t = torch.tensor(fids)
                spread = f" ± {t.std().item():.2f} ({len(fids)} seeds)" if len(fids) > 1 else ""
                lines.append(
                    f"| {sampler} | {nfe} | {t.mean().item():.2f}{spread} | "
                    f"{100 * (t.mean().item() / reference - 1):+.0f}% |"
                )
        if "floor" in entry:
            floor = entry["floor"]
            lines.append(f"| test split (real, {floor['images']} images) | — | {floor['fid']:.2f} | |")
    return "\n".join(lines)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (name, entry) in zip(axes[0], results.items(), strict=True):
        anc = rows(entry, "ancestral")
        for sampler, style, label in (
            ("dpm_solver", "o-", "DPM-Solver++ 2M"),
            ("dpm_solver_sde", "^-", "SDE-DPM-Solver++ 2M"),
            ("ancestral", "s--", "ancestral"),
        ):
            found = rows(entry, sampler)
            line = ax.plot(list(found), [mean(v) for v in found.values()], style, label=label)[0]
            for nfe, fids in found.items():
                if len(fids) > 1:  # the seeds behind a mean
                    ax.plot([nfe] * len(fids), fids, ".", color=line.get_color(), ms=4)
        if REFERENCE in anc:
            ref = mean(anc[REFERENCE])
            ax.axhspan(ref * 0.9, ref * 1.1, color="C2", alpha=0.15, label=f"ancestral-{REFERENCE} ± 10%")
        if "floor" in entry:
            ax.axhline(entry["floor"]["fid"], color="gray", ls=":", label=f"test split ({entry['floor']['images']})")
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.set_ylabel(f"FID ({entry.get('settings', {}).get('features', '?')})")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120)


if __name__ == "__main__":
    main()
