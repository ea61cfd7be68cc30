"""One-command GPU check: the CUDA paths of the design (bf16-mixed, torch.compile, DDP), measured into one JSON.

    python benchmarks/gpu_check.py                 # a CUDA machine: <= 8 minutes from a fresh environment
    python benchmarks/gpu_check.py --dry-run       # the CPU, a tiny U-Net, a few steps (CI: keeps it from rotting)

What it measures, on synthetic uint8 images (3, 32, 32) (no data set needed):

* ``train``: training steps (forward + backward + AdamW) of VDM and MuLAN built from ``configs/vdm_cifar.yaml``
  and ``configs/mulan_cifar.yaml`` (the paper's CIFAR-10 architecture: U-Net 128 channels, 32 blocks) under
  ``torch.autocast(bfloat16)`` (what Lightning's ``bf16-mixed`` does), with and without ``torch.compile``:
  img/s (median and best timed step), peak memory, first-step (compile) seconds, the loss;
* ``engine``: the same models trained by ``mulan-cli`` itself (LightningCLI, ``precision: bf16-mixed``, the
  configs' EMA callback) for a few steps: img/s and peak memory of the real training path;
* ``dense_elbo``: the dense ELBO (``mulan.likelihood.dense_elbo``) of a few images, bits/dim and seconds;
* ``ode``: the probability-flow ODE bound (``mulan.likelihood.ode_likelihood``) of a few images: NFE, bits/dim
  and seconds per image (of a model trained for only the few steps above, so NFE is lower than a trained one's);
* ``ddp``: with two or more GPUs, ``mulan-cli fit`` with ``--trainer.devices 2 --trainer.strategy ddp`` for a few
  steps (global img/s); otherwise skipped with the reason recorded.

Every job runs in a child process with a time cap (a hung compile cannot stop the check) and streams each
result as it finishes; a job that fails or runs out of time leaves rows with an ``error``. The JSON (default
``benchmarks/results/gpu_check.json``; the dry run writes ``gpu_check_dry_run.json``) always has every row and
every field of :data:`FIELDS`. ``--dry-run`` runs the same code on the CPU with the configs shrunk to a tiny
U-Net, a few steps and ``torch.compile(backend="eager")`` (tracing without code generation), all in one child.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import timing  # noqa: E402  (the benchmarks' timing harness: synchronised steps, peak memory, machine info)

RESULTS = HERE / "results"
IMAGE_SHAPE = (3, 32, 32)
KINDS = ("vdm", "mulan")
SCHEMA = "mulan-gpu-check/1"

FIELDS: dict[str, tuple[str, ...]] = {
    "train": (
        "kind", "compile", "compile_backend", "precision", "batch", "params_m", "steps", "first_step_s",
        "compile_s", "img_s_median", "img_s_best", "peak_mib", "memory", "loss_bpd", "graph_breaks", "error",
    ),
    "engine": ("kind", "precision", "batch", "steps", "img_s_median", "peak_mib", "loss_bpd", "wall_s", "error"),
    "dense_elbo": ("kind", "images", "num_times", "bpd_mean", "seconds", "img_s", "peak_mib", "error"),
    "ode": ("kind", "images", "nfe_mean", "bpd_mean", "seconds_per_image", "rtol", "atol", "note", "error"),
    "ddp": (
        "ran", "skipped", "devices", "strategy", "precision", "batch_per_device", "steps", "img_s_global",
        "loss_bpd", "wall_s", "error",
    ),
}  # fmt: skip
"""Every row of each section has exactly these fields (``None`` where a value does not apply)."""
TOP_LEVEL = ("schema", "mode", "started", "wall_s", "machine", "settings", *FIELDS)


# ------------------------------------------------------------------------------------------------ settings
def settings(dry_run: bool, cuda_devices: int, ddp_on_cpu: bool) -> dict[str, Any]:
    """Sizes of every measurement: the paper's on a GPU, tiny on the CPU (``dry_run``)."""
    if dry_run:
        return dict(
            device="cpu",
            accelerator="cpu",
            tiny=True,
            batch=4,
            warmup=1,
            steps=2,
            compile_warmup=1,
            compile_backend="eager",
            engine_steps=3,
            elbo_images=2,
            elbo_times=4,
            ode_images=1,
            ode_tol=1e-2,
            ddp_devices=2 if ddp_on_cpu else 0,
            ddp_steps=2,
            caps=dict(eager=600, compile=600, engine=600, ddp=600),
        )
    return dict(
        device="cuda",
        accelerator="gpu",
        tiny=False,
        batch=128,
        warmup=3,
        steps=10,
        compile_warmup=2,
        compile_backend="inductor",
        engine_steps=20,
        elbo_images=4,
        elbo_times=128,
        ode_images=2,
        ode_tol=1e-5,
        ddp_devices=2 if cuda_devices >= 2 else 0,
        ddp_steps=20,
        caps=dict(eager=120, compile=150, engine=120, ddp=150),
    )


TINY_OVERRIDES = {
    "denoiser": {"channels": 8, "num_blocks": 1},
    "process": {"hidden": 32},  # Polynomial: the reference width (the data dimension) is 38M parameters
    "latent": {"channels": 8, "num_blocks": 1},
}
"""Dry run: the options of the paper configs that shrink them to a tiny model (applied where the class has them)."""


def model_config(kind: str, tiny: bool) -> dict[str, Any]:
    """The DiffusionTask hyper-parameters of ``configs/<kind>_cifar.yaml`` (DiffusionTask's defaults for the
    options the file leaves out), shrunk by :data:`TINY_OVERRIDES` when ``tiny``."""
    import inspect

    import yaml

    from mulan.export import MODEL_OPTIONS
    from mulan.lightning.task import DiffusionTask

    given = yaml.safe_load((ROOT / "configs" / f"{kind}_cifar.yaml").read_text())["model"]["init_args"]
    config: dict[str, Any] = {"image_shape": list(IMAGE_SHAPE)}
    for name in MODEL_OPTIONS[1:]:
        default = inspect.signature(DiffusionTask).parameters[name].default
        if isinstance(default, type):
            default = {"class_path": f"{default.__module__}.{default.__qualname__}"}
        config[name] = json.loads(json.dumps(given.get(name, default)))
    if tiny:
        for name, options in TINY_OVERRIDES.items():
            init_args = config[name].setdefault("init_args", {})
            accepted = _init_parameters(config[name]["class_path"])
            init_args.update({k: v for k, v in options.items() if k in accepted})
    return config


def _init_parameters(class_path: str) -> set[str]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    return set(inspect.signature(getattr(importlib.import_module(module), name)).parameters)


def cli_overrides(kind: str, tiny: bool) -> list[str]:
    """The command-line options of ``mulan-cli`` that give :func:`model_config`'s shrinking."""
    if not tiny:
        return []
    config = model_config(kind, tiny=True)
    return [
        f"--model.init_args.{name}.init_args.{option}={value}"
        for name, options in TINY_OVERRIDES.items()
        for option, value in options.items()
        if option in config[name].get("init_args", {})
    ]


# ------------------------------------------------------------------------------------------------ measurements
def _build(kind: str, s: dict[str, Any]):
    import torch

    from mulan.export import build_model

    torch.manual_seed(0)
    return build_model(model_config(kind, s["tiny"]), f"configs/{kind}_cifar.yaml").to(s["device"])


def _images(n: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8, generator=generator).to(device)


def _graph_breaks() -> int | None:
    with contextlib.suppress(Exception):
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    return None


def train_row(kind: str, compiled: bool, s: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """bf16 autocast training steps of the model of ``kind``; returns the row and the trained model."""
    import torch

    from mulan.lightning.optim import AdamW

    device = torch.device(s["device"])
    model = _build(kind, s).train()
    optimizer = AdamW(model.parameters())
    images = _images(s["batch"], s["device"])
    if compiled:
        torch._dynamo.reset()
        with contextlib.suppress(Exception):
            from torch._dynamo.utils import counters

            counters.clear()
    forward = torch.compile(model, backend=s["compile_backend"]) if compiled else model

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.bpd(forward(images).total).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    timed = timing.time_steps(step, device, s["compile_warmup"] if compiled else s["warmup"], s["steps"])
    first, median = timed.first_s, timed.median_s
    row = {
        "kind": kind,
        "compile": compiled,
        "compile_backend": s["compile_backend"] if compiled else None,
        "precision": "bf16-mixed",
        "batch": s["batch"],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "steps": s["steps"],
        "first_step_s": first,
        "compile_s": first - median if compiled else None,
        "img_s_median": s["batch"] / median,
        "img_s_best": s["batch"] / timed.best_s,
        "peak_mib": timed.peak_mib,
        "memory": timed.memory,
        "loss_bpd": timed.last,
        "graph_breaks": _graph_breaks() if compiled else None,
    }
    return row, model


def elbo_row(kind: str, model, s: dict[str, Any]) -> dict[str, Any]:
    """Dense ELBO (float32) of ``elbo_images`` images at ``elbo_times`` times each."""
    import torch

    from mulan.likelihood import dense_elbo

    device = torch.device(s["device"])
    images = _images(s["elbo_images"], s["device"])
    timed = timing.time_steps(lambda: dense_elbo(model.eval(), images, num_times=s["elbo_times"]), device, 0, 1)
    return {
        "kind": kind,
        "images": s["elbo_images"],
        "num_times": s["elbo_times"],
        "bpd_mean": float(model.bpd(timed.last.total).mean()),
        "seconds": timed.best_s,
        "img_s": s["elbo_images"] / timed.best_s,
        "peak_mib": timed.peak_mib,
    }


def ode_row(kind: str, model, s: dict[str, Any]) -> dict[str, Any]:
    """Probability-flow ODE bound (float32, one dequantisation draw) of ``ode_images`` images."""
    from mulan.likelihood import ode_likelihood

    images = _images(s["ode_images"], s["device"])
    result = ode_likelihood(model.eval(), images, num_draws=1, rtol=s["ode_tol"], atol=s["ode_tol"])
    return {
        "kind": kind,
        "images": s["ode_images"],
        "nfe_mean": float(result.nfe.float().mean()),
        "bpd_mean": float(result.bpd.float().mean()),
        "seconds_per_image": float(result.seconds_per_image),
        "rtol": s["ode_tol"],
        "atol": s["ode_tol"],
        "note": f"model trained for {s['warmup'] + s['steps']} steps only: a trained model needs more NFE",
    }


def _step_timer():
    """A Lightning callback recording the wall time and loss of every training step."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            timing.sync(pl_module.device)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            timing.sync(pl_module.device)
            self.times.append(time.perf_counter() - self._start)
            self.losses.append(float(outputs["loss"]))

    return StepTimer()


def cli_fit(kind: str, s: dict[str, Any], steps: int, devices: int, strategy: str) -> dict[str, Any]:
    """``mulan-cli fit`` (bf16-mixed) of ``configs/<kind>_cifar.yaml`` on synthetic images; timings of rank 0."""
    import torch

    from mulan.cli import build_cli

    data = {
        "class_path": "mulan.lightning.data.SyntheticDataModule",
        "init_args": {"shape": list(IMAGE_SHAPE), "num_train": 2 * s["batch"], "num_eval": 4,
                      "batch_size": s["batch"], "num_workers": 0},  # in memory (the configs' 8 would carry over)
    }  # fmt: skip
    ema = [{"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9999}}]
    args = [
        "--config", str(ROOT / "configs" / f"{kind}_cifar.yaml"), "--seed_everything", "0",
        "--trainer.accelerator", s["accelerator"], "--trainer.devices", str(devices), "--trainer.strategy", strategy,
        "--trainer.precision", "bf16-mixed", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        f"--trainer.callbacks={json.dumps(ema)}", "--trainer.default_root_dir", tempfile.mkdtemp(prefix="gpu_check_"),
        f"--data={json.dumps(data)}", *cli_overrides(kind, s["tiny"]),
    ]  # fmt: skip
    cli = build_cli(args, run=False)
    timer = _step_timer()
    cli.trainer.callbacks.append(timer)  # type: ignore[attr-defined]
    device = torch.device(s["device"] if s["device"] == "cpu" else f"cuda:{cli.trainer.local_rank}")
    timing.reset_peak(device)
    rss = timing.vm_mib("VmRSS")
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - start
    timed = sorted(timer.times[1:] or timer.times)  # the first step pays for start-up
    return {
        "rank": cli.trainer.global_rank,
        "steps": len(timer.times),
        "median_s": timed[len(timed) // 2],
        "loss_bpd": timer.losses[-1],
        "wall_s": wall,
        "peak_mib": timing.peak_mib(device, rss)["peak_mib"],
    }


def engine_row(kind: str, s: dict[str, Any]) -> dict[str, Any]:
    fit = cli_fit(kind, s, s["engine_steps"], devices=1, strategy="auto")
    return {
        "kind": kind,
        "precision": "bf16-mixed",
        "batch": s["batch"],
        "steps": fit["steps"],
        "img_s_median": s["batch"] / fit["median_s"],
        "peak_mib": fit["peak_mib"],
        "loss_bpd": fit["loss_bpd"],
        "wall_s": fit["wall_s"],
    }


def ddp_row(s: dict[str, Any]) -> dict[str, Any] | None:
    """MuLAN by ``mulan-cli fit --trainer.devices N --trainer.strategy ddp``; None on ranks other than 0."""
    fit = cli_fit("mulan", s, s["ddp_steps"], devices=s["ddp_devices"], strategy="ddp")
    if fit["rank"] != 0:
        return None
    return {
        "ran": True,
        "skipped": None,
        "devices": s["ddp_devices"],
        "strategy": "ddp",
        "precision": "bf16-mixed",
        "batch_per_device": s["batch"],
        "steps": fit["steps"],
        "img_s_global": s["ddp_devices"] * s["batch"] / fit["median_s"],
        "loss_bpd": fit["loss_bpd"],
        "wall_s": fit["wall_s"],
    }


# ------------------------------------------------------------------------------------------------ jobs
def jobs(s: dict[str, Any], dry_run: bool) -> list[dict[str, Any]]:
    """Child processes to run, in order; each lists the rows ``(section, kind)`` it produces. The cheap, essential
    measurements come first, torch.compile (the slowest) last. The dry run puts everything into one child."""
    eager = [
        {"name": f"eager:{k}", "cap": "eager", "tasks": [["train", k, False], ["dense_elbo", k], ["ode", k]]}
        for k in KINDS
    ]
    engine = [{"name": "engine", "cap": "engine", "tasks": [["engine", k] for k in KINDS]}]
    ddp = [{"name": "ddp", "cap": "ddp", "tasks": [["ddp"]]}] if s["ddp_devices"] else []
    compiled = [{"name": f"compile:{k}", "cap": "compile", "tasks": [["train", k, True]]} for k in KINDS]
    plan: list[dict[str, Any]] = [*eager, *engine, *ddp, *compiled]
    if dry_run:
        single = [job for job in plan if job["name"] != "ddp"]
        plan = [{"name": "dry-run", "cap": "eager", "tasks": [t for job in single for t in job["tasks"]]}] + ddp
    return plan


def row_key(task: list) -> str:
    return "/".join(str(x) for x in task)


def run_tasks(job: dict[str, Any], s: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Run the job's tasks in order, yielding ``{key, section, row}`` after each (an ``error`` row for a task
    that raised; the next task still runs)."""
    import torch

    torch.manual_seed(0)
    trained: dict[str, Any] = {}
    for task in job["tasks"]:
        section, row = task[0], None
        try:
            if section == "train":
                row, model = train_row(task[1], task[2], s)
                if not task[2]:
                    trained[task[1]] = model
            elif section == "dense_elbo":
                row = elbo_row(task[1], trained[task[1]] if task[1] in trained else _build(task[1], s), s)
            elif section == "ode":
                row = ode_row(task[1], trained[task[1]] if task[1] in trained else _build(task[1], s), s)
            elif section == "engine":
                row = engine_row(task[1], s)
            elif section == "ddp":
                row = ddp_row(s)
                if row is None:
                    continue
        except Exception as error:
            traceback.print_exc()  # the child's stderr: the whole story behind the row's one-line error
            row = {"error": f"{type(error).__name__}: {error}"[:2000]}
        yield {"key": row_key(task), "section": section, "row": row}
        if section == "train" and s["device"] == "cuda":
            torch.cuda.empty_cache()


def run_child(job: dict[str, Any], s: dict[str, Any]) -> None:
    """Child process: print ``RESULT {key, section, row}`` after each task."""
    for item in run_tasks(job, s):
        print("RESULT " + json.dumps(item), flush=True)


def launch(job: dict[str, Any], s: dict[str, Any], cap: float) -> dict[str, dict[str, Any]]:
    """Run ``job`` in a child process for at most ``cap`` seconds; its results by key (an ``error`` row for every
    task that produced none)."""
    spec = json.dumps({"job": job, "settings": s})
    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--_child", spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
        env=env,
        start_new_session=True,  # its own process group: DDP ranks started by the child go with it on a timeout
    )
    reason = None
    try:
        out, err = proc.communicate(timeout=max(cap, 1.0))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        reason = f"time cap of {cap:.0f} s reached (job {job['name']})"
    results = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            item = json.loads(line[7:])
            results[item["key"]] = item
    if reason is None and proc.returncode:
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-3:]
        reason = f"job {job['name']} exited with {proc.returncode}: " + " | ".join(tail)
    for task in job["tasks"]:
        key = row_key(task)
        if key not in results:
            results[key] = {"key": key, "section": task[0], "row": {"error": reason or "no result"}}
    return results


def complete(section: str, task: list, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every field of ``section`` (None where missing) and the task's identity filled in."""
    full = dict.fromkeys(FIELDS[section])
    if section == "train":
        full.update(kind=task[1], compile=task[2])
    elif section == "ddp":
        full.update(ran=False)
    elif len(task) > 1:
        full["kind"] = task[1]
    full.update(row)
    return full


# ------------------------------------------------------------------------------------------------ driver
def check(
    dry_run: bool, out: Path, budget: float, ddp_on_cpu: bool = False, in_process: bool = False
) -> dict[str, Any]:
    """Run every job within ``budget`` seconds and write the JSON to ``out``; returns it. ``in_process`` (dry run
    only, for tests that have the imports already) runs the jobs in this process instead of child processes."""
    import torch

    begin = time.perf_counter()
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not dry_run and cuda_devices == 0:
        raise SystemExit("gpu_check: no CUDA device found. Run with --dry-run for the CPU check.")
    s = settings(dry_run, cuda_devices, ddp_on_cpu)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "dry-run" if dry_run else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": None,
        "machine": {**timing.machine(), "cuda_devices": cuda_devices, "cuda": torch.version.cuda},
        "settings": s,
        **{section: [] for section in FIELDS},
    }
    if s["ddp_devices"] == 0:
        report["ddp"] = [
            complete("ddp", ["ddp"], {"skipped": f"{cuda_devices} CUDA device(s): the DDP smoke test needs >= 2"})
        ]
    for job in jobs(s, dry_run):
        left = budget - (time.perf_counter() - begin)
        if left < 5:
            results = {
                row_key(t): {"section": t[0], "row": {"error": f"skipped: the time budget of {budget:.0f} s ran out"}}
                for t in job["tasks"]
            }
        elif in_process and dry_run and job["name"] != "ddp":
            results = {item["key"]: item for item in run_tasks(job, s)}
        else:
            results = launch(job, s, min(s["caps"][job["cap"]], left))
        for task in job["tasks"]:
            item = results[row_key(task)]
            report[item["section"]].append(complete(item["section"], task, item["row"]))
        print(f"[{time.perf_counter() - begin:6.1f} s] {job['name']}: done", flush=True)
    report["wall_s"] = time.perf_counter() - begin
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (for docs/benchmarks.md)."""
    m = report["machine"]
    lines = [
        f"{report['mode']}: {m.get('gpu', m['cpu'])}, torch {m['torch']} (CUDA {m['cuda']}), "
        f"{report['started'][:10]}, {fmt(report['wall_s'], 0)} s in all.",
        "",
        "| training step (bf16) | compile | batch | img/s (median) | img/s (best) | peak MiB | first step s | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["train"]:
        lines.append(
            f"| {r['kind']} | {r['compile_backend'] or 'off'} | {r['batch']} | {fmt(r['img_s_median'])} | "
            f"{fmt(r['img_s_best'])} | {fmt(r['peak_mib'], 0)} | {fmt(r['first_step_s'])} | {r['error'] or ''} |"
        )
    for r in report["engine"]:
        lines.append(
            f"| {r['kind']} via mulan-cli (Lightning bf16-mixed) | off | {r['batch']} | {fmt(r['img_s_median'])} | – | "
            f"{fmt(r['peak_mib'], 0)} | – | {r['error'] or ''} |"
        )
    lines += ["", "| evaluation | model | images | result | time | error |", "|---|---|---|---|---|---|"]
    for r in report["dense_elbo"]:
        lines.append(
            f"| dense ELBO, {r['num_times']} times | {r['kind']} | {r['images']} | {fmt(r['bpd_mean'], 3)} bpd | "
            f"{fmt(r['seconds'])} s | {r['error'] or ''} |"
        )
    for r in report["ode"]:
        lines.append(
            f"| ODE, rtol=atol={r['rtol']} | {r['kind']} | {r['images']} | NFE {fmt(r['nfe_mean'], 0)}, "
            f"{fmt(r['bpd_mean'], 3)} bpd | {fmt(r['seconds_per_image'])} s/image | {r['error'] or ''} |"
        )
    d = report["ddp"][0]
    ran = f"{d['devices']} devices, {fmt(d['img_s_global'])} img/s global, loss {fmt(d['loss_bpd'], 3)} bpd"
    lines += ["", f"DDP smoke test: {d['skipped'] or d['error'] or ran}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CPU, a tiny U-Net, a few steps")
    parser.add_argument("--out", type=Path, help="the JSON to write (default: benchmarks/results/gpu_check*.json)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all jobs (default 450)")
    parser.add_argument("--ddp-on-cpu", action="store_true", help="dry run: also the 2-process DDP test (gloo)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        spec = json.loads(args._child)
        return run_child(spec["job"], spec["settings"])
    out = args.out or RESULTS / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    report = check(args.dry_run, out, args.budget, args.ddp_on_cpu)
    print(markdown(report))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
