"""Regression check of MuLAN's learning speed: MuLAN's and VDM's test bound after a few hundred steps.

Both models of the colour demo (``configs/demo_photos.yaml``, ``configs/demo_photos_vdm.yaml``: same photo crops,
denoiser and optimiser) train for ``steps`` steps through the CLI; each checkpoint's dense-ELBO test bound is
printed with every term, and the gap MuLAN - VDM. Before the fix of docs/learning_speed.md the gap was several
bits/dim at these step counts; with it, it is within the seeds' spread. Runs in about ten minutes on two cores.

    python benchmarks/mulan_regression.py                  # 400 steps, seed 0
    python benchmarks/mulan_regression.py --seeds 0 1 2    # the spread too
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GAP_ALARM = 0.1
"""Bits/dim: a larger MuLAN - VDM gap at the last step is reported as a regression."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    spec_file = ROOT / "benchmarks" / "studies" / "regression.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    workdir = ROOT / "runs" / "study" / "regression"
    results: dict = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = [
            pool.submit(study.run_arm_seed, spec, a, s, workdir, results, lambda: None)
            for s in args.seeds
            for a in spec["arms"]
        ]
        for run in runs:
            run.result()
    print(study.table(spec, results))
    last = str(spec["steps"])
    gaps = [
        results["mulan"][str(s)][last]["total"]["mean"] - results["vdm"][str(s)][last]["total"]["mean"]
        for s in args.seeds
    ]
    verdict = "REGRESSION" if max(gaps) > GAP_ALARM else "ok"
    print(f"\nMuLAN - VDM at {last} steps, per seed (bits/dim): {', '.join(f'{g:+.3f}' for g in gaps)} -> {verdict}")
    out = ROOT / "benchmarks" / "results" / "mulan_regression.json"
    out.write_text(json.dumps({"gaps": gaps, "results": results}, indent=1))


if __name__ == "__main__":
    main()
