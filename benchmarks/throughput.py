"""Throughput and peak memory of VDM and MuLAN: training step, dense ELBO, ancestral sampling, ODE likelihood.

    python benchmarks/throughput.py                      # everything (small + paper architecture), CPU or GPU
    python benchmarks/throughput.py --only small --no-compile --steps 3 --warmup 1
    python benchmarks/throughput.py --compare REV        # training steps of this tree vs git revision REV
    python benchmarks/throughput.py --head               # the schedule head's share of MuLAN's training step

Every configuration runs in its own child process (clean peak memory, a hard time cap for torch.compile).
Training step = forward + backward + AdamW step through :class:`mulan.model.DiffusionModel` on random uint8
images; ``bf16`` = ``torch.autocast(dtype=bfloat16)`` around the forward, as Lightning's ``bf16-mixed``.
img/s is reported from the median and from the fastest timed step (the fastest is the better estimate on a
shared machine), timed by :func:`timing.time_steps` (warm-up, device-synchronised steps, peak memory).
Results: ``benchmarks/results/throughput.json`` and a Markdown table (printed, and written to
``docs/benchmarks.md`` between the ``<!-- throughput:begin/end -->`` markers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine, time_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "throughput.json"
DOCS = ROOT / "docs" / "benchmarks.md"

ARCHS = {
    # the paper's CIFAR-10 denoiser (docs: math, section 9); on a CPU only a couple of steps at a small batch
    "paper": dict(channels=128, num_blocks=32, dropout=0.1, attention="mid", batch=4),
    # the small reference architecture: 64 ch, 8 down + 9 up blocks, mid attention
    "small": dict(channels=64, num_blocks=8, dropout=0.1, attention="mid", batch=32),
}
IMAGE_SHAPE = (3, 32, 32)


# ------------------------------------------------------------------------------------------------ models
def build(kind: str, arch: str, channels_last: bool, device, hidden: int | None = None):
    """VDM (learned scalar schedule) or MuLAN (15-hot-of-50 latent, polynomial head of width ``hidden``, None: D)
    with the architecture's U-Net. Positional arguments only, so that older revisions build the same model."""
    from mulan.latents import KHotLatent
    from mulan.model import DiffusionModel
    from mulan.networks import UNet
    from mulan.schedules import LearnedScalar, Polynomial  # the import path every revision has (--compare)

    a = ARCHS[arch]
    if kind == "vdm":
        latent, schedule = None, LearnedScalar(IMAGE_SHAPE, 0)
    else:
        latent = KHotLatent(IMAGE_SHAPE, m=50, k=15)
        schedule = Polynomial(IMAGE_SHAPE, latent.dim, hidden=hidden)
    denoiser = UNet(
        IMAGE_SHAPE,
        latent.dim if latent else 0,
        channels=a["channels"],
        num_blocks=a["num_blocks"],
        dropout=a["dropout"],
        attention=a["attention"],
    )
    return DiffusionModel(IMAGE_SHAPE, schedule, denoiser, latent, channels_last=channels_last).to(device)


def autocast(device, precision: str):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ------------------------------------------------------------------------------------------------ one child run
def run_train(spec: dict) -> dict:
    import torch

    from mulan.lightning.optim import AdamW

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build(spec["kind"], spec["arch"], spec["channels_last"], device, spec.get("hidden")).train()
    optimizer = AdamW(model.parameters())
    batch = spec["batch"]
    images = torch.randint(0, 256, (batch, *IMAGE_SHAPE), dtype=torch.uint8, device=device)
    forward = torch.compile(model) if spec["compile"] else model

    def step() -> float:
        with autocast(device, spec["precision"]):
            loss = model.bpd(forward(images).total).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    timing = time_steps(step, device, spec["warmup"], spec["steps"])
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "first_step_s": timing.first_s,
        "peak_mib": timing.peak_mib,
        "memory": timing.memory,
        "step_times_s": timing.times_s,
        "img_s_median": batch / timing.median_s,
        "img_s_best": batch / timing.best_s,
        "loss_bpd": timing.last,
        "compile_s": (timing.first_s - timing.median_s) if spec["compile"] else None,
    }


def run_eval(spec: dict) -> dict:
    import torch

    from mulan import likelihood, sampling

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build(spec["kind"], spec["arch"], spec["channels_last"], device).eval()
    n = spec["batch"]
    images = torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8, device=device)
    out: dict = {}
    with autocast(device, spec["precision"]):
        if spec["what"] == "dense_elbo":
            likelihood.dense_elbo(model, images[:1], num_times=2)  # warm-up, on one image
            timing = time_steps(
                lambda: likelihood.dense_elbo(model, images, num_times=spec["times"], chunk_size=spec["chunk"]),
                device,
                warmup=0,
                steps=1,
            )
            seconds = timing.best_s
            out.update(num_times=spec["times"], img_s=n / seconds, model_evals_s=n * spec["times"] / seconds)
        elif spec["what"] == "ancestral":
            sampling.ancestral_sample(model, 1, steps=2)  # warm-up, one image and two steps
            timing = time_steps(
                lambda: sampling.ancestral_sample(model, n, steps=spec["sample_steps"]), device, warmup=0, steps=1
            )
            seconds = timing.best_s
            out.update(
                steps=spec["sample_steps"],
                img_s=n / seconds,
                img_s_at_256_steps=n / seconds * spec["sample_steps"] / 256,
            )
        elif spec["what"] == "ode":
            fn = getattr(likelihood, "ode_likelihood", None)
            if fn is None:
                return {"skipped": "mulan.likelihood has no ode_likelihood"}
            timing = time_steps(lambda: fn(model, images), device, warmup=0, steps=1)  # the solver times itself
            result = timing.last
            out.update(
                nfe=float(result.nfe.mean()),
                seconds_per_image=float(result.seconds_per_image),
                note="untrained (zero-initialised output) network: NFE of a trained model is higher",
            )
    out.update(peak_mib=timing.peak_mib, memory=timing.memory)
    return out


def run_head(spec: dict) -> dict:
    """The schedule head's share of a MuLAN training step: the time of the head alone (coefficients and
    ``gamma``, ``dgamma/dt`` of the batch forward, their backward, and the AdamW update of the head's parameters),
    over the time of the whole training step, each the median of the timed repetitions."""
    import torch

    from mulan.lightning.optim import AdamW
    from mulan.processes import Context

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    model = build("mulan", spec["arch"], False, device, spec.get("hidden")).train()
    head = model.process
    batch = spec["batch"]
    images = torch.randint(0, 256, (batch, *IMAGE_SHAPE), dtype=torch.uint8, device=device)
    z = model.latent.sample_prior(batch, device).requires_grad_(True)  # what the encoder hands the head
    t = torch.rand(batch, device=device)
    model_opt, head_opt = AdamW(model.parameters()), AdamW(head.parameters())

    def full_step() -> None:
        loss = model.bpd(model(images).total).mean()
        loss.backward()
        model_opt.step()
        model_opt.zero_grad(set_to_none=True)

    def head_step() -> None:
        gamma, dgamma = head(t, Context(z=z))
        (gamma.sum() + dgamma.sum()).backward()  # the same graph and backward work, whatever the upstream gradient
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)

    step_s = time_steps(full_step, device, max(spec["warmup"], 1), spec["steps"]).median_s
    head_s = time_steps(head_step, device, max(spec["warmup"], 1), spec["steps"]).median_s
    return {
        "head_params_m": sum(p.numel() for p in head.parameters()) / 1e6,
        "step_s": step_s,
        "head_s": head_s,
        "head_share": head_s / step_s,
        "img_s_best": batch / step_s,
    }


def child(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    runs = {"train": run_train, "head": run_head}
    result = runs[spec["what"]](spec) if spec["what"] in runs else run_eval(spec)
    print("RESULT " + json.dumps(result), flush=True)


def checkout(revision: str) -> Path:
    """The ``src/`` of git revision ``revision``, checked out once under ``runs/revisions/`` (a git worktree)."""
    sha = subprocess.run(["git", "rev-parse", revision], cwd=ROOT, capture_output=True, text=True, check=True)
    folder = ROOT / "runs" / "revisions" / sha.stdout.strip()[:12]
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(folder), revision], cwd=ROOT, check=True)
    return folder / "src"


def launch(spec: dict, cap: float) -> dict:
    """Run one configuration in a child process with a wall-clock cap (on the code of ``spec["revision"]`` when
    given: that revision's ``src/`` comes first on the child's import path)."""
    start = time.perf_counter()
    env = dict(os.environ)
    if spec.get("revision"):
        env["PYTHONPATH"] = os.pathsep.join([str(checkout(spec["revision"])), env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--_child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=cap,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"time cap of {cap:.0f} s reached"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {**spec, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return {**spec, **json.loads(lines[-1][7:]), "wall_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ plans
def plan(args) -> list[dict]:
    base = dict(device=args.device, threads=args.threads)
    specs = []
    archs = [a for a in ("small", "paper") if args.only in (None, a)]
    for arch in archs:
        small = arch == "small"
        for kind in ("vdm", "mulan"):
            for precision in ("fp32", "bf16"):
                for cl in (False, True) if small else (False,):  # channels-last lost on the test CPU
                    with_compile = small and not args.no_compile and not cl and kind in args.compile_kinds
                    for comp in (False, True) if with_compile else (False,):
                        specs.append(
                            dict(
                                base,
                                what="train",
                                kind=kind,
                                arch=arch,
                                precision=precision,
                                channels_last=cl,
                                compile=comp,
                                batch=args.batch or ARCHS[arch]["batch"],
                                steps=args.steps if small else min(args.steps, 2),
                                warmup=args.warmup + (1 if comp else 0),
                            )
                        )
    if args.only in (None, "small", "eval"):
        for kind in ("vdm", "mulan"):
            for what in ("dense_elbo", "ancestral", "ode"):
                specs.append(
                    dict(
                        base,
                        what=what,
                        kind=kind,
                        arch="small",
                        precision="fp32",
                        channels_last=False,
                        batch=2,
                        times=args.elbo_times,
                        chunk=64,
                        sample_steps=args.sample_steps,
                    )
                )
    return specs


def compare_plan(args) -> list[dict]:
    """Training steps of VDM and MuLAN (small architecture, float32 and bf16) on this tree and on
    ``args.compare``, interleaved (this tree, the revision, this tree, ...) so both see the same machine load."""
    specs = []
    for _ in range(args.rounds):
        for kind in ("vdm", "mulan"):
            for precision in args.precisions:
                for revision in ("", args.compare):
                    specs.append(
                        dict(
                            device=args.device,
                            threads=args.threads,
                            what="train",
                            kind=kind,
                            arch="small",
                            precision=precision,
                            channels_last=False,
                            compile=False,
                            batch=args.batch or ARCHS["small"]["batch"],
                            steps=args.steps,
                            warmup=args.warmup,
                            revision=revision,
                        )
                    )
    return specs


def compare_table(results: list[dict], revision: str) -> str:
    """Best img/s over the rounds, per model and precision: this tree, the revision, and their ratio."""
    rows = [
        f"| model | precision | img/s, this tree | img/s, {revision} | ratio (this / {revision}) |",
        "|---|---|---|---|---|",
    ]
    for kind in ("vdm", "mulan"):
        for precision in sorted({r["precision"] for r in results}):

            def best(rev: str, kind=kind, precision=precision) -> float:
                hits = [
                    r["img_s_best"]
                    for r in results
                    if (r["kind"], r["precision"], r["revision"]) == (kind, precision, rev) and "img_s_best" in r
                ]
                return max(hits, default=float("nan"))

            new, old = best(""), best(revision)
            rows.append(f"| {kind} | {precision} | {fmt(new, 2)} | {fmt(old, 2)} | {fmt(new / old, 3)} |")
    return "\n".join(rows)


def head_plan(args) -> list[dict]:
    """The head's share of MuLAN's step: the reference head (width D) and the light head (width 64)."""
    return [
        dict(
            device=args.device,
            threads=args.threads,
            what="head",
            kind="mulan",
            arch="small",
            hidden=hidden,
            precision="fp32",
            channels_last=False,
            compile=False,
            batch=args.batch or ARCHS["small"]["batch"],
            steps=args.steps,
            warmup=args.warmup,
        )
        for _ in range(args.rounds)
        for hidden in (None, 64)
    ]


def head_table(results: list[dict]) -> str:
    rows = ["| head | parameters (M) | head s | step s | head share of the step |", "|---|---|---|---|---|"]
    for hidden, name in ((None, "reference (width D = 3072)"), (64, "light (width 64)")):
        hits = [r for r in results if r.get("hidden") == hidden and "head_share" in r]
        if hits:
            r = min(hits, key=lambda r: r["head_share"])
            rows.append(
                f"| {name} | {fmt(r['head_params_m'], 2)} | {fmt(r['head_s'], 4)} | {fmt(r['step_s'], 3)} | "
                f"{100 * r['head_share']:.2f}% |"
            )
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ reporting
def fmt(v, digits=1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table(results: list[dict]) -> str:
    rows = [
        "| what | model | arch | batch | precision | channels-last | compile | img/s (best) | img/s (median) | "
        "compile s | peak MiB | note |",
        "|---" * 12 + "|",
    ]
    for r in results:
        if r["what"] == "train":
            note = "CPU: 2 timed steps only" if r["arch"] == "paper" and r["device"] == "cpu" else ""
            rows.append(
                f"| train step | {r['kind']} | {r['arch']} | {r['batch']} | {r['precision']} | "
                f"{'on' if r['channels_last'] else 'off'} | {'on' if r['compile'] else 'off'} | "
                f"{fmt(r.get('img_s_best'), 2)} | {fmt(r.get('img_s_median'), 2)} | {fmt(r.get('compile_s'), 0)} | "
                f"{fmt(r.get('peak_mib'), 0)} | {r.get('error', note)} |"
            )
        else:
            if r["what"] == "dense_elbo":
                v, note = r.get("img_s"), f"{r['times']} times per image"
            elif r["what"] == "ancestral":
                v, note = (
                    r.get("img_s"),
                    f"{r['sample_steps']} steps (img/s at 256 steps: {fmt(r.get('img_s_at_256_steps'), 3)})",
                )
            else:
                v = 1 / r["seconds_per_image"] if r.get("seconds_per_image") else None
                note = r.get("skipped") or (
                    f"NFE {fmt(r.get('nfe'), 0)}, {fmt(r.get('seconds_per_image'), 1)} s/image; {r.get('note', '')}"
                )
            rows.append(
                f"| {r['what']} | {r['kind']} | {r['arch']} | {r['batch']} | {r['precision']} | "
                f"{'on' if r['channels_last'] else 'off'} | off | {fmt(v, 3)} | – | – | "
                f"{fmt(r.get('peak_mib'), 0)} | {r.get('error', note)} |"
            )
    return "\n".join(rows)


def write_docs(markdown: str, key: str) -> None:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    DOCS.write_text(f"{head}{begin}\n{markdown}\n{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["small", "paper", "eval"], help="a subset of the configurations")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile adds one)")
    parser.add_argument("--batch", type=int, help="override the architecture's batch size")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument(
        "--compile-kinds",
        nargs="+",
        default=["vdm"],
        choices=["vdm", "mulan"],
        help="models to also run under torch.compile (small architecture, channels-last off)",
    )
    parser.add_argument("--compile-cap", type=float, default=900.0, help="seconds allowed per compiled configuration")
    parser.add_argument("--cap", type=float, default=900.0, help="seconds allowed per eager configuration")
    parser.add_argument("--elbo-times", type=int, default=16, help="times per image of the dense ELBO")
    parser.add_argument("--sample-steps", type=int, default=32, help="ancestral sampling steps")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    parser.add_argument("--repeats", type=int, default=1, help="run the plan this many times, keep each config's best")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write JSON or docs")
    parser.add_argument("--compare", metavar="REV", help="training steps of this tree against git revision REV")
    parser.add_argument("--head", action="store_true", help="the schedule head's share of MuLAN's training step")
    parser.add_argument("--rounds", type=int, default=3, help="--compare/--head: interleaved rounds")
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"], help="--compare: precisions"
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        return child(json.loads(args._child))
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.compare or args.head:
        return paired(args)
    specs = plan(args)
    best: dict[int, dict] = {}
    for _ in range(args.repeats):
        for i, spec in enumerate(specs):
            cap = args.compile_cap if spec.get("compile") else args.cap
            r = launch(spec, cap)
            print(json.dumps({k: v for k, v in r.items() if k not in ("step_times_s",)}), flush=True)
            if i not in best or r.get("img_s_best", r.get("img_s", 0)) > best[i].get(
                "img_s_best", best[i].get("img_s", 0)
            ):
                best[i] = r
    results = [best[i] for i in range(len(specs))]
    info = machine()
    md = table(results)
    header = (
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"{info.get('gpu', 'no GPU')}, torch {info['torch']}, {time.strftime('%Y-%m-%d')}."
    )
    print(header + "\n\n" + md)
    if args.no_write:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = "throughput"
    if key in saved:  # a subset run (--only) replaces its rows and keeps the others

        def ident(r: dict) -> tuple:
            return tuple(r.get(k) for k in ("what", "kind", "arch", "precision", "channels_last", "compile", "batch"))

        merged = {ident(r): r for r in saved[key]["results"]}
        merged.update({ident(r): r for r in results})
        results = list(merged.values())
        md = table(results)
    saved[key] = {"machine": info, "args": vars(args), "results": results}
    RESULTS.write_text(json.dumps(saved, indent=1))
    write_docs(header + "\n\n" + md, key)


def paired(args) -> None:
    """``--compare`` / ``--head``: interleaved runs, a table of ratios measured in this one run."""
    specs = compare_plan(args) if args.compare else head_plan(args)
    results = []
    for spec in specs:
        r = launch(spec, args.cap)
        print(json.dumps({k: v for k, v in r.items() if k not in ("step_times_s",)}), flush=True)
        results.append(r)
    info = machine()
    md = compare_table(results, args.compare) if args.compare else head_table(results)
    key = "compare" if args.compare else "head"
    header = (
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"{info.get('gpu', 'no GPU')}, torch {info['torch']}, {time.strftime('%Y-%m-%d')}; "
        f"{args.rounds} interleaved rounds, best of each."
    )
    print(header + "\n\n" + md)
    if args.no_write:
        return
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    saved[key] = {"machine": info, "args": vars(args), "results": results}
    RESULTS.write_text(json.dumps(saved, indent=1))
    write_docs(header + "\n\n" + md, key)


if __name__ == "__main__":
    main()
