"""Throughput and peak memory of VDM and MuLAN: training step, dense ELBO, ancestral sampling, ODE likelihood.

    python benchmarks/throughput.py                      # everything (small + paper architecture), CPU or GPU
    python benchmarks/throughput.py --only small --no-compile --steps 3 --warmup 1
    python benchmarks/throughput.py --ablation           # the before/after table of docs/benchmarks.md
    python benchmarks/throughput.py --compare REV        # training steps of this tree vs git revision REV
    python benchmarks/throughput.py --head               # the schedule head's share of MuLAN's training step

Every configuration runs in its own child process (clean peak memory, a hard time cap for torch.compile).
Training step = forward + backward + AdamW step through :class:`mulan.model.DiffusionModel` on random uint8
images; ``bf16`` = ``torch.autocast(dtype=bfloat16)`` around the forward, as Lightning's ``bf16-mixed``.
img/s is reported from the median and from the fastest timed step (the fastest is the better estimate on a
shared machine). Results: ``benchmarks/results/throughput.json`` and a Markdown table (printed, and written to
``docs/benchmarks.md`` between the ``<!-- throughput:begin/end -->`` markers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

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
# cumulative changes of docs/benchmarks.md, each on top of the previous row ("legacy" = the code before)
ABLATION = [
    ("baseline (before)", dict(legacy=["attention", "decoder", "adamw"], channels_last=False)),
    ("+ SDPA flash kernel (unit-stride q/k/v)", dict(legacy=["decoder", "adamw"], channels_last=False)),
    ("+ decoder: softmax over the bins within float32 reach", dict(legacy=["adamw"], channels_last=False)),
    ("+ fused AdamW (new default)", dict(legacy=[], channels_last=False)),
    ("+ channels-last end to end", dict(legacy=[], channels_last=True)),
]


# ------------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    with contextlib.suppress(OSError):
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------------------ memory
def _vm(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM); nan where unavailable."""
    with contextlib.suppress(OSError, StopIteration):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
        return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def peak_mib(device, rss_before: float) -> dict:
    import torch

    if device.type == "cuda":
        return {
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "memory": "cuda max_memory_allocated",
        }
    return {
        "peak_mib": _vm("VmHWM") - rss_before,
        "memory": "CPU peak RSS (VmHWM) above the RSS before the step",
    }


# ------------------------------------------------------------------------------------------------ legacy code
def install_legacy(parts: list[str]) -> None:
    """Put back the code as it was before the performance work, to measure what each change bought."""
    import torch
    import torch.nn.functional as F

    from mulan import elbo, networks

    if "attention" in parts:

        def attention_forward(self, x, cond=None):
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
            out = F.scaled_dot_product_attention(q, k, v)  # strided heads: SDPA's math fallback
            return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))

        networks.AttentionBlock.forward = attention_forward
    if "decoder" in parts:

        def reconstruction_loss(images, gamma_0, noise=None):
            x = elbo.to_unit_interval(images)
            noise = torch.randn_like(x) if noise is None else noise
            z_tilde = x + torch.exp(0.5 * gamma_0) * noise
            diff = z_tilde.unsqueeze(-1) - elbo.to_unit_interval(torch.arange(256, device=x.device))
            log_probs = torch.log_softmax(-0.5 * diff.square() * torch.exp(-gamma_0).unsqueeze(-1), dim=-1)
            return -elbo.sum_per_example(log_probs.gather(-1, images.long().unsqueeze(-1)).squeeze(-1))

        elbo.reconstruction_loss = reconstruction_loss


# ------------------------------------------------------------------------------------------------ models
def build(kind: str, arch: str, channels_last: bool, device, hidden: int | None = None):
    """VDM (learned scalar schedule) or MuLAN (15-hot-of-50 latent, polynomial head of width ``hidden``, None: D)
    with the architecture's U-Net. Positional arguments only, so that older revisions build the same model."""
    from mulan.latents import KHotLatent
    from mulan.model import DiffusionModel
    from mulan.networks import UNet
    from mulan.schedules import LearnedScalar, Polynomial

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


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, precision: str):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ------------------------------------------------------------------------------------------------ one child run
def run_train(spec: dict) -> dict:
    import torch

    from mulan.lightning.optim import AdamW

    device = torch.device(spec["device"])
    install_legacy(spec.get("legacy", []))
    torch.manual_seed(0)
    model = build(spec["kind"], spec["arch"], spec["channels_last"], device, spec.get("hidden")).train()
    fused = False if "adamw" in spec.get("legacy", []) else None  # legacy: torch's default (for-loop on CPU)
    optimizer = AdamW(model.parameters(), fused=fused)
    batch = spec["batch"]
    images = torch.randint(0, 256, (batch, *IMAGE_SHAPE), dtype=torch.uint8, device=device)
    forward = torch.compile(model) if spec["compile"] else model

    def step():
        with autocast(device, spec["precision"]):
            loss = model.bpd(forward(images).total).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return float(loss.detach())

    out = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    start = time.perf_counter()
    step()
    out["first_step_s"] = time.perf_counter() - start
    for _ in range(spec["warmup"] - 1):
        step()
    rss = _vm("VmRSS")
    reset_peak(device)
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    out.update(peak_mib(device, rss))
    out.update(
        step_times_s=times,
        img_s_median=batch / median,
        img_s_best=batch / times[0],
        loss_bpd=loss,
        compile_s=(out["first_step_s"] - median) if spec["compile"] else None,
    )
    return out


def run_eval(spec: dict) -> dict:
    import torch

    from mulan import likelihood, sampling

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build(spec["kind"], spec["arch"], spec["channels_last"], device).eval()
    n = spec["batch"]
    images = torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8, device=device)
    rss = _vm("VmRSS")
    reset_peak(device)
    out = {}
    with autocast(device, spec["precision"]):
        if spec["what"] == "dense_elbo":
            likelihood.dense_elbo(model, images[:1], num_times=2)  # warm-up
            start = time.perf_counter()
            likelihood.dense_elbo(model, images, num_times=spec["times"], chunk_size=spec["chunk"])
            sync(device)
            seconds = time.perf_counter() - start
            out.update(num_times=spec["times"], img_s=n / seconds, model_evals_s=n * spec["times"] / seconds)
        elif spec["what"] == "ancestral":
            sampling.ancestral_sample(model, 1, steps=2)
            start = time.perf_counter()
            sampling.ancestral_sample(model, n, steps=spec["sample_steps"])
            sync(device)
            seconds = time.perf_counter() - start
            out.update(
                steps=spec["sample_steps"],
                img_s=n / seconds,
                img_s_at_256_steps=n / seconds * spec["sample_steps"] / 256,
            )
        elif spec["what"] == "ode":
            fn = getattr(likelihood, "ode_likelihood", None)
            if fn is None:
                return {"skipped": "mulan.likelihood has no ode_likelihood"}
            result = fn(model, images)
            out.update(
                nfe=float(result.nfe.mean()),
                seconds_per_image=float(result.seconds_per_image),
                note="untrained (zero-initialised output) network: NFE of a trained model is higher",
            )
    out.update(peak_mib(device, rss))
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
        sync(device)

    def head_step() -> None:
        gamma, dgamma = head(t, Context(z=z))
        (gamma.sum() + dgamma.sum()).backward()  # the same graph and backward work, whatever the upstream gradient
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)
        sync(device)

    def median_seconds(fn) -> float:
        for _ in range(spec["warmup"]):
            fn()
        times = []
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    step_s, head_s = median_seconds(full_step), median_seconds(head_step)
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
                    r.get("img_s_best", 0.0)
                    for r in results
                    if (r["kind"], r["precision"], r["revision"]) == (kind, precision, rev)
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


def ablation_plan(args) -> list[dict]:
    base = dict(
        device=args.device,
        threads=args.threads,
        what="train",
        arch="small",
        compile=False,
        batch=args.batch or 32,
        steps=args.steps,
        warmup=args.warmup,
    )
    specs = []
    for precision in ("fp32", "bf16"):
        for name, change in ABLATION:
            specs.append(dict(base, kind="vdm", precision=precision, change=name, **change))
        specs.append(
            dict(
                base,
                kind="mulan",
                precision=precision,
                change="MuLAN, all changes but channels-last",
                legacy=[],
                channels_last=False,
            )
        )
    return specs


# ------------------------------------------------------------------------------------------------ reporting
def fmt(v, digits=1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table(results: list[dict], ablation: bool) -> str:
    if ablation:
        rows = [
            "| precision | model | change (cumulative) | img/s (best step) | img/s (median) | peak MiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in results:
            rows.append(
                f"| {r['precision']} | {r['kind']} | {r['change']} | {fmt(r.get('img_s_best'))} | "
                f"{fmt(r.get('img_s_median'))} | {fmt(r.get('peak_mib'), 0)} |"
                + (f" {r['error']}" if "error" in r else "")
            )
        return "\n".join(rows)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["small", "paper", "eval"], help="a subset of the configurations")
    parser.add_argument("--ablation", action="store_true", help="the before/after table of each change")
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
    args = parser.parse_args()
    if args._child:
        return child(json.loads(args._child))
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.compare or args.head:
        return paired(args)
    specs = ablation_plan(args) if args.ablation else plan(args)
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
    md = table(results, args.ablation)
    header = (
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"{info.get('gpu', 'no GPU')}, torch {info['torch']}, {time.strftime('%Y-%m-%d')}."
    )
    print(header + "\n\n" + md)
    if args.no_write:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = "ablation" if args.ablation else "throughput"
    if not args.ablation and key in saved:  # a subset run (--only) replaces its rows and keeps the others

        def ident(r: dict) -> tuple:
            return tuple(r.get(k) for k in ("what", "kind", "arch", "precision", "channels_last", "compile", "batch"))

        merged = {ident(r): r for r in saved[key]["results"]}
        merged.update({ident(r): r for r in results})
        results = list(merged.values())
        md = table(results, args.ablation)
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
