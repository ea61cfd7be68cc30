"""Function evaluations, time and bound of the probability-flow ODE likelihood under several solve settings.

    python benchmarks/ode_nfe.py runs/study/colour/vdm/seed0/every/step=2000.ckpt --images 16
    python benchmarks/ode_nfe.py CKPT --images 8 --rtol 1e-5 --atol 1e-5 --variants t,t:inf --json out.json

A variant is a time variable (:data:`mulan.ode.TIME_VARIABLES`), optionally followed by ``:`` and the
``divergence_atol`` of the log-density integral in nats (``inf``: not error-controlled) or by ``:s`` and a number
``M`` of ``divergence_samples`` (the integral by stratified sampling at ``M`` times, e.g. ``t:s128``); without it
the integral is controlled like the state. The first ``--images`` test images of the checkpoint's own data (the data
configuration saved in it) are evaluated with :func:`mulan.likelihood.ode_likelihood` at the given tolerances and
the EvaluationCallback's defaults otherwise (one dequantisation draw, one Hutchinson probe, float32;
``--exact-divergence`` for the exact trace). For a fair comparison each chunk of ``--solve-batch-size`` images
(default 1: one solve per image, so each image's NFE is its own) is solved in every variant in turn, with the
same latent, dequantisation and probe draws (seeded per chunk from ``--seed``). Printed: per image, NFE and
seconds in each variant and the bound (bits/dim; called an estimate for ``:inf``, whose integral carries the
solver's uncontrolled error); then per variant the mean NFE and seconds per image and the bound with its standard
error over images, and each variant's paired difference from the first
(same draws: only the solver's error and the probe's path differ) with its standard error. One thread by default
(``--threads``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(ckpt: Path) -> tuple[Any, Any]:
    """The checkpoint's model (eval mode, on the CPU) and its data module, set up for test."""
    from mulan.lightning.loading import load_task

    task, data = load_task(ckpt)
    assert data is not None, f"{ckpt} saved no data configuration"
    data.setup("test")
    return task.model, data


def test_images(data: Any, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``count`` test images (uint8 (N, C, H, W)) and their conditioning inputs (or None)."""
    from mulan.lightning.task import split_batch

    images, ys = [], []
    for batch in data.test_dataloader():
        x, y = split_batch(batch)
        images.append(x)
        ys.append(y)
        if sum(i.shape[0] for i in images) >= count:
            break
    y_all = None if ys[0] is None else torch.cat(ys)[:count]
    return torch.cat(images)[:count], y_all


def settings_of(variant: str, args: argparse.Namespace) -> Any:
    """The :class:`mulan.ode.ODESettings` of ``variant`` (``time_variable[:divergence_atol | :sM]``) and ``args``."""
    from mulan.ode import ODESettings

    time_variable, _, divergence = variant.partition(":")
    return ODESettings(
        num_draws=args.draws,
        num_probes=args.probes,
        exact_divergence=args.exact_divergence,
        rtol=args.rtol,
        atol=args.atol,
        divergence_atol=float(divergence) if divergence and not divergence.startswith("s") else None,
        divergence_samples=int(divergence[1:]) if divergence.startswith("s") else None,
        time_variable=time_variable,
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from mulan.likelihood import ode_likelihood

    model, data = load(args.ckpt)
    images, y = test_images(data, args.images)
    variables = args.variants.split(",")
    settings = {v: settings_of(v, args) for v in variables}  # a bad variant fails here, before any solve
    rows: dict[str, dict[str, list[float]]] = {v: {"nfe": [], "seconds": [], "bpd": [], "sd": []} for v in variables}
    step = args.solve_batch_size
    print(f"{args.ckpt}: {images.shape[0]} test images {tuple(images.shape[1:])}, rtol={args.rtol}, atol={args.atol}")
    header = "image  " + "  ".join(f"{'NFE ' + v:>12} {'s ' + v:>10} {'bpd ' + v:>12}" for v in variables)
    print(header, flush=True)
    for start in range(0, images.shape[0], step):
        chunk = slice(start, start + step)
        for variable in variables:
            torch.manual_seed(args.seed * 1_000_003 + start)  # the latent draw
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + start)  # dequantisation, probes
            begin = time.perf_counter()
            part_y = None if y is None else y[chunk]
            result = ode_likelihood(model, images[chunk], part_y, settings[variable], generator=generator)
            seconds = (time.perf_counter() - begin) / result.bpd.shape[0]
            rows[variable]["nfe"] += result.nfe.tolist()
            rows[variable]["seconds"] += [seconds] * result.bpd.shape[0]
            rows[variable]["bpd"] += result.bpd.tolist()
            rows[variable]["sd"] += model.bpd(result.nll_var_nats.sqrt()).tolist()  # the ODE's own noise, if known
        for i in range(start, min(start + step, images.shape[0])):
            cells = [
                f"{rows[v]['nfe'][i]:12.0f} {rows[v]['seconds'][i]:10.1f} {rows[v]['bpd'][i]:12.4f}" for v in variables
            ]
            print(f"{i:5d}  " + "  ".join(cells), flush=True)
    summary: dict[str, Any] = {"images": images.shape[0], "rtol": args.rtol, "atol": args.atol, "variants": {}}
    for variable in variables:
        bpd = torch.tensor(rows[variable]["bpd"], dtype=torch.float64)
        summary["variants"][variable] = {
            "nfe_per_image": sum(rows[variable]["nfe"]) / bpd.numel(),
            "seconds_per_image": sum(rows[variable]["seconds"]) / bpd.numel(),
            "bpd": bpd.mean().item(),
            "bpd_stderr": (bpd.std() / math.sqrt(bpd.numel())).item() if bpd.numel() > 1 else math.nan,
            "estimated_sd_per_image": torch.tensor(rows[variable]["sd"]).square().mean().sqrt().item(),
            "per_image": rows[variable],
        }
    print()
    for variable, s in summary["variants"].items():
        s["figure"] = figure_kind(variable)
        print(
            f"{variable:>8}: NFE/image {s['nfe_per_image']:8.1f}   s/image {s['seconds_per_image']:7.1f}   "
            f"{s['figure']} {s['bpd']:.4f} ± {s['bpd_stderr']:.4f} bits/dim"
            + (f"   own noise {s['estimated_sd_per_image']:.3f} per image" if s["estimated_sd_per_image"] > 0 else "")
        )
    base = variables[0]
    summary["paired_difference_bpd"] = {}
    for other in variables[1:]:
        a, b = (summary["variants"][v] for v in (base, other))
        diff = torch.tensor(b["per_image"]["bpd"], dtype=torch.float64) - torch.tensor(
            a["per_image"]["bpd"], dtype=torch.float64
        )
        se = (diff.std() / math.sqrt(diff.numel())).item() if diff.numel() > 1 else math.nan
        summary["paired_difference_bpd"][other] = {"mean": diff.mean().item(), "stderr": se}
        print(
            f"{other} / {base}: NFE x{b['nfe_per_image'] / a['nfe_per_image']:.3f}, "
            f"time x{b['seconds_per_image'] / a['seconds_per_image']:.3f}, "
            f"difference {diff.mean().item():+.4f} ± {se:.4f} bits/dim (paired, same draws)"
        )
    return summary


def figure_kind(variant: str) -> str:
    """``"bound"``, or ``"estimate"`` for a variant whose divergence integral is not error-controlled (``:inf``):
    the solver's error in it is neither controlled nor zero in expectation."""
    return "estimate" if variant.partition(":")[2] == "inf" else "bound"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, help="a checkpoint of mulan-cli fit")
    parser.add_argument("--images", type=int, default=16, help="test images (default 16)")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--draws", type=int, default=1, help="dequantisation draws per image (callback default 1)")
    parser.add_argument("--probes", type=int, default=1, help="Hutchinson probes per solve (callback default 1)")
    parser.add_argument(
        "--variants",
        default="t,log_snr",
        help="comma-separated time_variable[:divergence_atol | :sM], e.g. t,t:inf,t:s128; the first is the baseline",
    )
    parser.add_argument("--exact-divergence", action="store_true", help="the exact trace instead of a probe")
    parser.add_argument("--solve-batch-size", type=int, default=1, help="images per solve (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    summary = measure(args)
    summary["ckpt"] = str(args.ckpt)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
