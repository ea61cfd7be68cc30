"""Pictures of a trained model for the docs: samples, per-image log-SNR maps and the spread of the learned log-SNR.

    .venv/bin/python docs/trained_figures.py CHECKPOINT OUT_DIR [--images 6] [--samples 64]

The test images come from the checkpoint's own data configuration; the samples are ancestral (256 steps). Writes
``OUT_DIR/samples.png``, ``OUT_DIR/schedule_maps.png``, ``OUT_DIR/log_snr_spread.png`` and prints the spread
of the learned log-SNR across the test images against ``t`` (and whether the schedule ignores its latent).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mulan.checkpoints import load_checkpoint  # noqa: E402
from mulan.figures import image_grid, log_snr_spread, schedule_maps  # noqa: E402
from mulan.lightning import DiffusionTask  # noqa: E402
from mulan.lightning.task import split_batch  # noqa: E402
from mulan.sampling import ancestral_sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=6, help="test images in the log-SNR maps")
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    hparams = load_checkpoint(str(args.checkpoint))["datamodule_hyper_parameters"]
    module, name = hparams["_class_path"].rsplit(".", 1)
    data = getattr(importlib.import_module(module), name)(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    data.setup("test")
    images, _ = split_batch(next(iter(data.test_dataloader())))
    model = DiffusionTask.load_from_checkpoint(args.checkpoint, map_location="cpu").model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        samples = ancestral_sample(model, args.samples, steps=256, generator=torch.Generator().manual_seed(0)).samples
    grid = image_grid(samples).permute(1, 2, 0).numpy()
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).resize(
        (grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST
    ).save(args.out / "samples.png")
    schedule_maps(model, images[: args.images], times=(0.2, 0.4, 0.6, 0.8)).savefig(
        args.out / "schedule_maps.png", dpi=110
    )
    fig, times, across, within, adaptive = log_snr_spread(model, images)
    fig.savefig(args.out / "log_snr_spread.png", dpi=110)
    print(f"{'t':>5} {'across images':>14} {'within an image':>16}   (std of the log-SNR, nats)")
    for t, a, w in zip(times.tolist(), across.tolist(), within.tolist(), strict=True):
        print(f"{t:5.2f} {a:14.4f} {w:16.4f}")
    print("adaptive to the latent" if adaptive else "flat spread across images: the schedule ignores its latent")


if __name__ == "__main__":
    main()
