"""One-command GPU check: the CUDA paths of the design (bf16-mixed, torch.compile, DDP), measured into one JSON.

    python benchmarks/gpu_check.py                 # a CUDA machine: <= 8 minutes from a fresh environment
    python benchmarks/gpu_check.py --dry-run       # the CPU, a tiny U-Net, a few steps (CI: keeps it from rotting)
    python benchmarks/gpu_check.py --config configs/mulan_cifar.yaml --batch 64   # one config, another batch
    python benchmarks/gpu_check.py --judge benchmarks/results/gpu_check.json       # judge a JSON written before

It judges and measures, on synthetic uint8 images (3, 32, 32) (no data set needed), the models of ``--config``
(default ``configs/vdm_cifar.yaml`` and ``configs/mulan_cifar.yaml``, the paper's CIFAR-10 architecture: U-Net 128
channels, 32 blocks); a row's ``kind`` is its config's file name without ``.yaml``:

* ``correctness``: on one fixed batch (``min(batch, 32)`` images; fixed times, noise and reconstruction noise;
  the latent's perturbation from one seed; dropout off; the zero-initialised layers given random weights so that
  every parameter has a gradient), forward + backward of the float32 step (the reference, TF32 off) against the
  bf16-autocast step, the compiled float32 step and the compiled bf16 step: relative error of the loss and
  relative L2 error of the flattened gradient, each against the tolerance of :data:`TOLERANCES`; finite values;
  graph breaks;
* ``train``: training steps (forward + backward + AdamW) under ``torch.autocast(bfloat16)`` (what Lightning's
  ``bf16-mixed`` does), with and without ``torch.compile``: img/s (median and best timed step), peak memory,
  first-step (compile) seconds, the loss, graph breaks;
* ``engine``: the same models trained by ``mulan-cli`` itself (LightningCLI, ``precision: bf16-mixed``, the
  configs' EMA callback) for a few steps: img/s and peak memory of the real training path;
* ``dense_elbo``: the dense ELBO (``mulan.likelihood.dense_elbo``) of a few images, bits/dim and seconds;
* ``ode``: the probability-flow ODE bound (``mulan.likelihood.ode_likelihood``) of a few images: NFE, bits/dim
  and seconds per image (of a model trained for only the few steps above, so NFE is lower than a trained one's);
* ``ddp``: with two or more GPUs, ``mulan-cli fit`` with ``--trainer.devices 2 --trainer.strategy ddp`` for a few
  steps (global img/s); otherwise skipped with the reason recorded;
* ``estimate``: GPU-days of each config's own training run (its ``trainer.max_steps`` x ``data.batch_size``) at the
  img/s measured above (:func:`gpu_days`).

At the end it prints the judged table (:func:`judge`: every row's checks, with value, tolerance and PASS/FAIL) and
exits with status 1 when any check fails (an error, a time cap, a value out of tolerance, a non-finite loss or
gradient, a graph break in a compiled step), 0 otherwise. ``--force-fail NAME`` (for tests of that exit status)
fails the check of that name.

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
CONFIGS = ("configs/vdm_cifar.yaml", "configs/mulan_cifar.yaml")
"""The configs checked by default (``--config``)."""
SCHEMA = "mulan-gpu-check/2"
CHECK_BATCH = 32
"""At most this many images in the correctness rows (their float32 step needs ~2x the memory of a bf16 one)."""

VARIANTS = ("fp32", "bf16", "compiled", "compiled+bf16")
"""The correctness rows of each config: the float32 eager step (the reference), the bf16-autocast step, the compiled
float32 step, the compiled bf16-autocast step."""
TOLERANCES: dict[str, tuple[float, float]] = {
    "bf16": (5e-3, 1e-1),
    "compiled": (1e-5, 1e-3),
    "compiled+bf16": (5e-3, 1e-1),
}
"""``(loss, gradient)`` tolerances of each variant against the float32 step: the loss's relative error, the relative L2
error of the flattened gradient of every parameter. Derivation (docs/benchmarks.md, "The GPU check's correctness
rows"): bf16 keeps 8 significant bits, a unit round-off of ``u = 2^-9``; only the U-Net body and the encoder run in
bf16, and every loss term is a float32 sum, so the mean loss carries a few ``u`` (``5e-3`` ~ ``2.5 u``, the bound of
``tests/test_performance_numerics.py``). The gradient passes back through ~4 bf16 roundings in each of ~65 residual
blocks: ~260 independent roundings of ``u`` give a relative error of ``sqrt(260) u`` ~ ``0.03``; ``0.1`` leaves 3x.
Compiled float32 reorders and fuses float32 sums (unit round-off ``2^-24`` ~ ``6e-8``; a blocked sum of ``n`` terms
errs by ~``log2(n) u`` ~ ``1e-6`` for the loss's ~``4e5`` terms): ``1e-5`` for the loss; the gradient's reductions
over the batch and the pixels through ~65 blocks, and other convolution algorithms for another memory layout, give
~``1e-4``: ``1e-3``. A compiled bf16 step differs from the eager bf16 step far less than bf16 from float32, so it
has bf16's tolerances."""

FIELDS: dict[str, tuple[str, ...]] = {
    "correctness": (
        "kind", "variant", "compile_backend", "batch", "loss_bpd", "loss_rel_err", "loss_tol", "grad_rel_err",
        "grad_cosine", "grad_tol", "finite", "graph_breaks", "seconds", "error",
    ),
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
    "estimate": ("kind", "source", "measured_batch", "img_s", "steps", "batch", "gpu_days", "error"),
}  # fmt: skip
"""Every row of each section has exactly these fields (``None`` where a value does not apply)."""
TOP_LEVEL = ("schema", "mode", "started", "wall_s", "machine", "settings", *FIELDS, "verdicts", "passed")
VERDICT_FIELDS = ("row", "value", "tolerance", "status", "note")
"""Every verdict of :func:`judge`; ``status`` is ``PASS``, ``FAIL`` or ``SKIP``."""


# ------------------------------------------------------------------------------------------------ settings
def settings(
    dry_run: bool,
    cuda_devices: int,
    ddp_on_cpu: bool,
    configs: tuple[str, ...] | list[str] = CONFIGS,
    batch: int | None = None,
) -> dict[str, Any]:
    """Sizes of every measurement: the paper's on a GPU, tiny on the CPU (``dry_run``); ``configs`` (paths relative
    to the repository root or absolute) and ``batch`` (default 128 on a GPU, 4 in the dry run) as given."""
    common: dict[str, Any] = {"configs": [str(c) for c in configs]}
    if batch is not None:
        common["batch"] = int(batch)
    if dry_run:
        sizes = dict(
            device="cpu",
            accelerator="cpu",
            tiny=True,
            batch=4,
            check_batch=4,
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
            caps=dict(eager=600, correctness=600, compile=600, engine=600, ddp=600),
        )
    else:
        sizes = dict(
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
            caps=dict(eager=90, correctness=150, compile=120, engine=120, ddp=150),
        )
    sizes.update(common)
    sizes["check_batch"] = min(sizes["batch"], CHECK_BATCH)
    return sizes


def label(config: str) -> str:
    """A config's name in the rows: its file name without ``.yaml`` (``configs/vdm_cifar.yaml`` -> ``vdm_cifar``)."""
    return Path(config).stem


def config_path(config: str) -> Path:
    """``config`` as given, else relative to the repository root."""
    path = Path(config)
    return path if path.is_absolute() or path.exists() else ROOT / path


TINY_OVERRIDES = {
    "denoiser": {"channels": 8, "num_blocks": 1},
    "process": {"hidden": 32},  # Polynomial: the reference width (the data dimension) is 38M parameters
    "latent": {"channels": 8, "num_blocks": 1},
}
"""Dry run: the options of the paper configs that shrink them to a tiny model (applied where the class has them)."""


def model_config(config: str, tiny: bool) -> dict[str, Any]:
    """The DiffusionTask hyper-parameters of the config file ``config`` (DiffusionTask's defaults for the options the
    file leaves out), for 3x32x32 images, shrunk by :data:`TINY_OVERRIDES` when ``tiny``."""
    import inspect

    import yaml

    from mulan.export import MODEL_OPTIONS
    from mulan.lightning.task import DiffusionTask

    given = yaml.safe_load(config_path(config).read_text())["model"]["init_args"]
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


def cli_overrides(config: str, tiny: bool) -> list[str]:
    """The command-line options of ``mulan-cli`` that give :func:`model_config`'s shrinking."""
    if not tiny:
        return []
    options_of = model_config(config, tiny=True)
    return [
        f"--model.init_args.{name}.init_args.{option}={value}"
        for name, options in TINY_OVERRIDES.items()
        for option, value in options.items()
        if option in options_of[name].get("init_args", {})
    ]


def training_run(config: str) -> tuple[int, int]:
    """``(steps, batch)`` of the config's own training run: ``trainer.max_steps`` and ``data.init_args.batch_size``
    (per device: the global batch of one device)."""
    import yaml

    given = yaml.safe_load(config_path(config).read_text())
    return int(given["trainer"]["max_steps"]), int(given["data"]["init_args"]["batch_size"])


def gpu_days(steps: int, batch: int, img_s: float) -> float:
    """Device-days of ``steps`` optimiser steps of ``batch`` images at ``img_s`` images per second:
    ``steps * batch / img_s / 86400``."""
    if not img_s > 0:
        raise ValueError(f"gpu_days needs a positive img/s, got {img_s}.")
    return steps * batch / img_s / 86400.0


# ------------------------------------------------------------------------------------------------ measurements
def _build(config: str, s: dict[str, Any]):
    import torch

    from mulan.export import build_model

    torch.manual_seed(0)
    return build_model(model_config(config, s["tiny"]), config).to(s["device"])


def _images(n: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8, generator=generator).to(device)


def _graph_breaks() -> int | None:
    """Graph breaks since Dynamo's counters were last cleared; ``-1`` when no graph was compiled at all (so that a
    step that never went through the compiler cannot pass as one without breaks)."""
    with contextlib.suppress(Exception):
        from torch._dynamo.utils import counters

        if not counters["stats"]["unique_graphs"]:
            return -1
        return int(sum(counters["graph_break"].values()))
    return None


def train_row(config: str, compiled: bool, s: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """bf16 autocast training steps of the model of ``config``; returns the row and the trained model."""
    import torch

    from mulan.lightning.optim import AdamW

    device = torch.device(s["device"])
    model = _build(config, s).train()
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
        "kind": label(config),
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


def elbo_row(config: str, model, s: dict[str, Any]) -> dict[str, Any]:
    """Dense ELBO (float32) of ``elbo_images`` images at ``elbo_times`` times each."""
    import torch

    from mulan.likelihood import dense_elbo

    device = torch.device(s["device"])
    images = _images(s["elbo_images"], s["device"])
    timed = timing.time_steps(lambda: dense_elbo(model.eval(), images, num_times=s["elbo_times"]), device, 0, 1)
    return {
        "kind": label(config),
        "images": s["elbo_images"],
        "num_times": s["elbo_times"],
        "bpd_mean": float(model.bpd(timed.last.total).mean()),
        "seconds": timed.best_s,
        "img_s": s["elbo_images"] / timed.best_s,
        "peak_mib": timed.peak_mib,
    }


def ode_row(config: str, model, s: dict[str, Any]) -> dict[str, Any]:
    """Probability-flow ODE bound (float32, one dequantisation draw) of ``ode_images`` images."""
    from mulan.likelihood import ode_likelihood

    images = _images(s["ode_images"], s["device"])
    result = ode_likelihood(model.eval(), images, num_draws=1, rtol=s["ode_tol"], atol=s["ode_tol"])
    return {
        "kind": label(config),
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


def cli_fit(config: str, s: dict[str, Any], steps: int, devices: int, strategy: str) -> dict[str, Any]:
    """``mulan-cli fit`` (bf16-mixed) of the config file ``config`` on synthetic images; timings of rank 0."""
    import torch

    from mulan.cli import build_cli

    data = {
        "class_path": "mulan.lightning.data.SyntheticDataModule",
        "init_args": {"shape": list(IMAGE_SHAPE), "num_train": 2 * s["batch"], "num_eval": 4,
                      "batch_size": s["batch"], "num_workers": 0},  # in memory (the configs' 8 would carry over)
    }  # fmt: skip
    ema = [{"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9999}}]
    args = [
        "--config", str(config_path(config)), "--seed_everything", "0",
        "--trainer.accelerator", s["accelerator"], "--trainer.devices", str(devices), "--trainer.strategy", strategy,
        "--trainer.precision", "bf16-mixed", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        f"--trainer.callbacks={json.dumps(ema)}", "--trainer.default_root_dir", tempfile.mkdtemp(prefix="gpu_check_"),
        f"--data={json.dumps(data)}", *cli_overrides(config, s["tiny"]),
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


def engine_row(config: str, s: dict[str, Any]) -> dict[str, Any]:
    fit = cli_fit(config, s, s["engine_steps"], devices=1, strategy="auto")
    return {
        "kind": label(config),
        "precision": "bf16-mixed",
        "batch": s["batch"],
        "steps": fit["steps"],
        "img_s_median": s["batch"] / fit["median_s"],
        "peak_mib": fit["peak_mib"],
        "loss_bpd": fit["loss_bpd"],
        "wall_s": fit["wall_s"],
    }


def ddp_config(s: dict[str, Any]) -> str:
    """The config of the DDP smoke test: the last of ``configs`` whose name has ``mulan``, else the last."""
    return next((c for c in reversed(s["configs"]) if "mulan" in label(c)), s["configs"][-1])


def ddp_row(s: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`ddp_config` by ``mulan-cli fit --trainer.devices N --trainer.strategy ddp``; None on ranks other
    than 0."""
    fit = cli_fit(ddp_config(s), s, s["ddp_steps"], devices=s["ddp_devices"], strategy="ddp")
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


# ------------------------------------------------------------------------------------------------ correctness
def correctness_setup(config: str, s: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The model of ``config`` (training mode, dropout off, every all-zero weight matrix or kernel drawn from
    ``N(0, 1/fan_in)`` so that every parameter gets a gradient) and one fixed batch: ``check_batch`` images, times,
    the noise of ``x_t`` and of the reconstruction term, all from seeded generators."""
    import torch

    model = _build(config, s).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()  # a mask is a draw that a compiler may make from its own generator
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.any()):  # zero-initialised output layers: no gradient flows behind them
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
    n, device = s["check_batch"], s["device"]
    inputs = {
        "images": torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8, generator=generator).to(device),
        "t": torch.rand(n, generator=generator).to(device),
        "eps": torch.randn((n, *model.process.state_shape), generator=generator).to(device),
        "recon_noise": torch.randn((n, *IMAGE_SHAPE), generator=generator).to(device),
    }
    return model, inputs


def correctness_step(model, forward, inputs: dict[str, Any], bf16: bool) -> tuple[float, Any]:
    """Forward and backward of the mean bits/dim of ``forward(**inputs)`` (under bf16 autocast when ``bf16``);
    returns the loss and the flattened gradient of every parameter (float64, zeros where a parameter has none).
    The latent's perturbation, the one draw left inside the step, comes from seed 2."""
    import torch

    device = inputs["images"].device
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model.bpd(forward(**inputs).total).mean()
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return float(loss.detach()), torch.cat([g.detach().double().flatten() for g in grads])


@contextlib.contextmanager
def float32_reference() -> Iterator[None]:
    """TF32 off (a true float32 reference) and inductor's random draws from torch's generator (as eager)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    inductor = None
    with contextlib.suppress(Exception):
        import torch._inductor.config as inductor

        saved_random = inductor.fallback_random
        inductor.fallback_random = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        if inductor is not None:
            inductor.fallback_random = saved_random


def correctness_row(config: str, variant: str, s: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    """One correctness row: ``variant`` (:data:`VARIANTS`) of ``config``'s step against the float32 step on the
    batch of :func:`correctness_setup`; ``cache`` keeps the model, the batch and the reference between the rows."""
    import torch

    if config not in cache:
        cache.clear()  # one config's model at a time
        cache[config] = correctness_setup(config, s)
    model, inputs = cache[config]
    compiled, bf16 = variant.startswith("compiled"), variant.endswith("bf16")
    start = time.perf_counter()
    with float32_reference():
        if compiled:
            torch._dynamo.reset()
            with contextlib.suppress(Exception):
                from torch._dynamo.utils import counters

                counters.clear()
        forward = torch.compile(model, backend=s["compile_backend"]) if compiled else model
        loss, grad = correctness_step(model, forward, inputs, bf16)
    seconds = time.perf_counter() - start
    finite = math.isfinite(loss) and bool(torch.isfinite(grad).all())
    row: dict[str, Any] = {
        "kind": label(config),
        "variant": variant,
        "compile_backend": s["compile_backend"] if compiled else None,
        "batch": s["check_batch"],
        "loss_bpd": loss,
        "finite": finite,
        "graph_breaks": _graph_breaks() if compiled else None,
        "seconds": seconds,
    }
    if variant == "fp32":
        cache["reference"] = (loss, grad)
        return row
    if "reference" not in cache:
        raise RuntimeError(f"no float32 reference for {label(config)}: its fp32 row failed")
    ref_loss, ref_grad = cache["reference"]
    loss_tol, grad_tol = TOLERANCES[variant]
    norm = float(ref_grad.norm())
    row.update(
        loss_rel_err=abs(loss - ref_loss) / abs(ref_loss),
        loss_tol=loss_tol,
        grad_rel_err=float((grad - ref_grad).norm()) / norm,
        grad_cosine=float(grad @ ref_grad) / (float(grad.norm()) * norm),
        grad_tol=grad_tol,
    )
    return row


# ------------------------------------------------------------------------------------------------ jobs
def jobs(s: dict[str, Any], dry_run: bool) -> list[dict[str, Any]]:
    """Child processes to run, in order; each lists the rows ``(section, config, ...)`` it produces. The cheap,
    essential measurements come first, then the correctness rows (two compilations per config), the timed
    torch.compile steps last. The dry run puts everything into one child."""
    configs = s["configs"]
    eager = [
        {"name": f"eager:{label(c)}", "cap": "eager", "tasks": [["train", c, False], ["dense_elbo", c], ["ode", c]]}
        for c in configs
    ]
    correctness = [
        {"name": f"correctness:{label(c)}", "cap": "correctness", "tasks": [["correctness", c, v] for v in VARIANTS]}
        for c in configs
    ]
    engine = [{"name": "engine", "cap": "engine", "tasks": [["engine", c] for c in configs]}]
    ddp = [{"name": "ddp", "cap": "ddp", "tasks": [["ddp"]]}] if s["ddp_devices"] else []
    compiled = [{"name": f"compile:{label(c)}", "cap": "compile", "tasks": [["train", c, True]]} for c in configs]
    plan: list[dict[str, Any]] = [*eager, *correctness, *engine, *ddp, *compiled]
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
    cache: dict[str, Any] = {}
    for task in job["tasks"]:
        section, row = task[0], None
        try:
            if section == "train":
                row, model = train_row(task[1], task[2], s)
                if not task[2]:
                    trained[task[1]] = model
            elif section == "correctness":
                row = correctness_row(task[1], task[2], s, cache)
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
        if section in ("train", "correctness") and s["device"] == "cuda":
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
        full.update(kind=label(task[1]), compile=task[2])
    elif section == "correctness":
        full.update(kind=label(task[1]), variant=task[2])
    elif section == "ddp":
        full.update(ran=False)
    elif len(task) > 1:
        full["kind"] = label(task[1])
    full.update(row)
    return full


# ------------------------------------------------------------------------------------------------ judging
ESTIMATE_SOURCES = (
    ("engine", "mulan-cli fit, bf16-mixed (engine row)"),
    ("compiled", "compiled bf16 step (train row, torch.compile)"),
)


def estimates(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``estimate`` rows: for each config and each measured img/s (:data:`ESTIMATE_SOURCES`), the GPU-days of
    the config's training run (:func:`training_run`, :func:`gpu_days`) at that speed. The img/s is the one measured
    at the check's batch, which should be the run's batch per device (the default 128 is CIFAR-10's)."""
    rows = []
    for config in report["settings"]["configs"]:
        kind = label(config)
        measured = {
            "engine": next((r for r in report["engine"] if r["kind"] == kind), None),
            "compiled": next((r for r in report["train"] if r["kind"] == kind and r["compile"]), None),
        }
        steps, batch = training_run(config)
        for key, source in ESTIMATE_SOURCES:
            row = dict.fromkeys(FIELDS["estimate"]) | {"kind": kind, "source": source, "steps": steps, "batch": batch}
            measure = measured[key]
            img_s = None if measure is None else measure["img_s_median"]
            if img_s is None or not img_s > 0:
                row["error"] = f"no img/s measured ({(measure or {}).get('error') or 'no row'})"[:300]
            else:
                row.update(measured_batch=measure["batch"], img_s=img_s, gpu_days=gpu_days(steps, batch, img_s))
            rows.append(row)
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def row_name(section: str, row: dict[str, Any]) -> str:
    """A row's name in the verdicts: ``train/vdm_cifar/compiled``, ``correctness/mulan_cifar/bf16``, ``ode/...``."""
    if section == "train":
        return f"train/{row['kind']}/{'compiled' if row['compile'] else 'eager'}"
    if section == "correctness":
        return f"correctness/{row['kind']}/{row['variant']}"
    return section if section == "ddp" else f"{section}/{row['kind']}"


def judge(report: dict[str, Any], force_fail: tuple[str, ...] | list[str] = ()) -> list[dict[str, Any]]:
    """Every check of the report, in order, as ``{row, value, tolerance, status, note}``; ``status`` FAIL for an
    error (a crash, a time cap, a budget that ran out), a value out of its tolerance, a non-finite loss or
    gradient, graph breaks in a compiled step; SKIP for the DDP smoke test on fewer than 2 GPUs. ``force_fail``:
    names of checks to fail (for tests of the exit status); a name that is no check is refused."""
    verdicts: list[dict[str, Any]] = []

    def add(name: str, value: Any, tolerance: Any, passed: bool, note: str | None = None) -> None:
        status = "PASS" if passed else "FAIL"
        verdicts.append({"row": name, "value": value, "tolerance": tolerance, "status": status, "note": note})

    def within(name: str, value: Any, tolerance: float) -> None:
        add(name, value, tolerance, _finite(value) and value <= tolerance)  # NaN or None fails

    for section in FIELDS:
        if section == "estimate":
            continue  # derived from the train and engine rows, judged there
        for row in report[section]:
            name = row_name(section, row)
            if row.get("error"):
                add(name, row["error"][:120], "no error", False)
                continue
            if section == "ddp" and not row["ran"]:
                verdicts.append(
                    {"row": name, "value": row["skipped"], "tolerance": "-", "status": "SKIP", "note": None}
                )
                continue
            if section == "correctness":
                add(f"{name}/finite", row["finite"], "finite loss and gradient", row["finite"] is True)
                if row["variant"] != "fp32":
                    within(f"{name}/loss", row["loss_rel_err"], row["loss_tol"])
                    within(f"{name}/grad", row["grad_rel_err"], row["grad_tol"])
                if row["compile_backend"]:
                    add(f"{name}/graph_breaks", row["graph_breaks"], 0, row["graph_breaks"] == 0)
                continue
            value = {"dense_elbo": "bpd_mean", "ode": "bpd_mean"}.get(section, "loss_bpd")
            add(f"{name}/finite", row[value], "finite", _finite(row[value]))
            if section == "train" and row["compile"]:
                add(f"{name}/graph_breaks", row["graph_breaks"], 0, row["graph_breaks"] == 0)
    names = {v["row"] for v in verdicts}
    unknown = [name for name in force_fail if name not in names]
    if unknown:
        raise SystemExit(f"gpu_check: --force-fail {unknown[0]} names no check; the checks: {', '.join(sorted(names))}")
    for verdict in verdicts:
        if verdict["row"] in force_fail:
            verdict.update(status="FAIL", note="forced by --force-fail (a test of the exit status)")
    return verdicts


def exit_status(verdicts: list[dict[str, Any]]) -> int:
    """1 when any verdict failed, else 0."""
    return int(any(v["status"] == "FAIL" for v in verdicts))


# ------------------------------------------------------------------------------------------------ driver
def check(
    dry_run: bool,
    out: Path,
    budget: float,
    ddp_on_cpu: bool = False,
    in_process: bool = False,
    configs: tuple[str, ...] | list[str] = CONFIGS,
    batch: int | None = None,
    force_fail: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """Run every job within ``budget`` seconds, judge the rows (:func:`judge`) and write the JSON to ``out``;
    returns it. ``in_process`` (dry run only, for tests that have the imports already) runs the jobs in this
    process instead of child processes."""
    import torch

    begin = time.perf_counter()
    missing = [c for c in configs if not config_path(c).is_file()]
    if missing:
        raise SystemExit(f"gpu_check: no config file {missing[0]}; give --config paths of mulan-cli config files.")
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not dry_run and cuda_devices == 0:
        raise SystemExit("gpu_check: no CUDA device found. Run with --dry-run for the CPU check.")
    s = settings(dry_run, cuda_devices, ddp_on_cpu, configs, batch)
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
    report["estimate"] = estimates(report)
    report["wall_s"] = time.perf_counter() - begin
    report["verdicts"] = judge(report, force_fail)
    report["passed"] = exit_status(report["verdicts"]) == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fmt_g(value: Any) -> str:
    """Small and large numbers alike: three significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else fmt(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (for docs/benchmarks.md)."""
    m = report["machine"]
    lines = [
        f"{report['mode']}: {m.get('gpu', m['cpu'])}, torch {m['torch']} (CUDA {m['cuda']}), "
        f"{report['started'][:10]}, {fmt(report['wall_s'], 0)} s in all.",
        "",
        "| correctness (against fp32) | variant | batch | loss bpd | loss rel. err (tol) | grad rel. L2 err (tol) | "
        "grad cosine | graph breaks | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["correctness"]:
        lines.append(
            f"| {r['kind']} | {r['variant']} | {r['batch']} | {fmt(r['loss_bpd'], 4)} | "
            f"{fmt_g(r['loss_rel_err'])} ({fmt_g(r['loss_tol'])}) | "
            f"{fmt_g(r['grad_rel_err'])} ({fmt_g(r['grad_tol'])}) | {fmt(r['grad_cosine'], 6)} | "
            f"{fmt(r['graph_breaks'])} | {r['error'] or ''} |"
        )
    lines += [
        "",
        "| training step (bf16) | compile | batch | img/s (median) | img/s (best) | peak MiB | first step s | "
        "graph breaks | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["train"]:
        lines.append(
            f"| {r['kind']} | {r['compile_backend'] or 'off'} | {r['batch']} | {fmt(r['img_s_median'])} | "
            f"{fmt(r['img_s_best'])} | {fmt(r['peak_mib'], 0)} | {fmt(r['first_step_s'])} | "
            f"{fmt(r['graph_breaks'])} | {r['error'] or ''} |"
        )
    for r in report["engine"]:
        lines.append(
            f"| {r['kind']} via mulan-cli (Lightning bf16-mixed) | off | {r['batch']} | {fmt(r['img_s_median'])} | – | "
            f"{fmt(r['peak_mib'], 0)} | – | – | {r['error'] or ''} |"
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
    cpu = (
        " (CPU dry run, tiny model: an illustration of the formula, not a GPU figure)"
        if report["mode"] != "gpu"
        else ""
    )
    lines += [
        "",
        f"| GPU-days of the config's training run{cpu} | measured at | batch | img/s | steps x batch | GPU-days |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["estimate"]:
        lines.append(
            f"| {r['kind']} | {r['source']} | {fmt(r['measured_batch'])} | {fmt(r['img_s'])} | "
            f"{r['steps']} x {r['batch']} | {fmt(r['gpu_days'], 2) if r['gpu_days'] is not None else r['error']} |"
        )
    return "\n".join(lines)


def verdict_table(verdicts: list[dict[str, Any]]) -> str:
    """The judged checks as a Markdown table: row, value, tolerance, PASS/FAIL/SKIP (and a note)."""
    lines = ["| check | value | tolerance | result |", "|---|---|---|---|"]
    for v in verdicts:
        note = f" ({v['note']})" if v["note"] else ""
        lines.append(f"| {v['row']} | {fmt_g(v['value'])} | {fmt_g(v['tolerance'])} | {v['status']}{note} |")
    failed = sum(v["status"] == "FAIL" for v in verdicts)
    lines += ["", f"{failed} of {len(verdicts)} checks failed." if failed else f"all {len(verdicts)} checks passed."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command; returns the exit status (:func:`exit_status`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CPU, a tiny U-Net, a few steps")
    parser.add_argument(
        "--config", nargs="+", default=list(CONFIGS), metavar="YAML",
        help="mulan-cli config files of 3x32x32 models to check (default: the two CIFAR-10 configs)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, help="images per training step (default 128; dry run 4)")
    parser.add_argument("--out", type=Path, help="the JSON to write (default: benchmarks/results/gpu_check*.json)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all jobs (default 480)")
    parser.add_argument("--ddp-on-cpu", action="store_true", help="dry run: also the 2-process DDP test (gloo)")
    parser.add_argument("--judge", type=Path, metavar="JSON", help="judge a JSON this check wrote; run nothing")
    parser.add_argument(
        "--force-fail", action="append", default=[], metavar="CHECK",
        help="for testing the exit status: fail the check of this name (e.g. correctness/vdm_cifar/bf16/loss)",
    )  # fmt: skip
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_in-process", action="store_true", help=argparse.SUPPRESS)  # tests: the dry run here
    args = parser.parse_args(argv)
    if args._child:
        spec = json.loads(args._child)
        run_child(spec["job"], spec["settings"])
        return 0
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be a positive number of images, got {args.batch}")
    if args.judge:
        report = json.loads(args.judge.read_text())
        report["verdicts"] = judge(report, args.force_fail)
    else:
        out = args.out or RESULTS / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
        report = check(
            args.dry_run, out, args.budget, args.ddp_on_cpu, args._in_process, args.config, args.batch,
            args.force_fail,
        )  # fmt: skip
        print(markdown(report))
        print(f"\nwrote {out}\n")
    print(verdict_table(report["verdicts"]))
    return exit_status(report["verdicts"])


if __name__ == "__main__":
    sys.exit(main())
