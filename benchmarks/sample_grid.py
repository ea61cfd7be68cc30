"""One figure of the samples of several models beside real test images, from ``mulan-cli predict`` outputs.

    mulan-cli predict --config RUN/config.yaml --ckpt_path CKPT --trainer.limit_predict_batches 1 \
        --predict_output_dir samples/cld
    python benchmarks/sample_grid.py cld=samples/cld malda=samples/malda --data-config configs/demo_photos_vdm.yaml \
        --out docs/figures/auxiliary_samples.png

Each ``name=dir`` panel shows the first ``--count`` images of ``dir/samples.npz`` (uint8 (N, C, H, W)); the first
panel shows as many test images of the config's data module (``--data-config``, its ``data`` block), drawn at
random from the whole test split, for comparison.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import numpy as np
import torch
import yaml


def test_images(config: Path, count: int) -> torch.Tensor:
    """``count`` test images (uint8 (N, C, H, W)) of the data module a config names, drawn without replacement
    from the whole test split (a fixed seed)."""
    from mulan.lightning.task import split_batch

    spec = yaml.safe_load(config.read_text())["data"]
    module, name = spec["class_path"].rsplit(".", 1)
    data = getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
    data.setup("test")
    images = torch.cat([split_batch(batch)[0] for batch in data.test_dataloader()])
    return images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:count]]


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mulan.figures import image_grid

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("panels", nargs="+", help="name=directory of a mulan-cli predict output")
    parser.add_argument("--data-config", type=Path, required=True, help="a config whose data block gives the reals")
    parser.add_argument("--count", type=int, default=32, help="images per panel (default 32)")
    parser.add_argument("--columns", type=int, default=4, help="panels per row (default 4)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    panels = [("test images", test_images(args.data_config, args.count))]
    for spec in args.panels:
        name, _, directory = spec.partition("=")
        samples = torch.from_numpy(np.load(Path(directory) / "samples.npz")["samples"][: args.count])
        panels.append((name, samples))
    cols = min(len(panels), args.columns)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, images) in zip(axes.flat, panels, strict=False):
        grid = image_grid(images, nrow=8)  # (C, H', W') uint8
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
