"""Why MuLAN learns slower than VDM (issue 17): training dynamics of the schedule head, the latent and the loss.

Trains VDM and MuLAN variants ("arms") on the embedded photo crops (3 x s x s, default s = 16) with a plain
torch loop that mimics the library's optimiser (``DiffusionTask.parameter_groups``: AdamW lr 2e-4, betas
(0.9, 0.99), weight decay 0.01 on >= 2-D parameters only, 100-step linear warm-up, global grad-norm clip 1.0,
no EMA) and records

* the train bound (bits/dim) every 50 steps and the test bound (dense ELBO, ``--eval-times`` stratified times
  per image, every term in bits/dim) at ``--eval-at`` steps;
* every ``--inst-every`` steps (measured across that one optimiser step): how far the log-SNR map ``gamma``
  moves on a fixed probe batch (16 test images, 9 times, ``z`` fixed at init), per-layer relative updates and
  output changes of the polynomial head, z stability (flip rates of the k-hot z, logit margin vs the
  perturbation's std), gradient and update norms of head / encoder / denoiser and the clip factor;
* at ``--var-at`` steps: the variance of the batch-mean loss over ``--var-draws`` independent draws (times,
  noise, z perturbation) on a fixed training batch, and the spread of ``dgamma_i/dt`` across dimensions.

Arms are ``+``-joined modifiers (see ``MODIFIERS``); anything that does not start with ``vdm`` is MuLAN:

    python benchmarks/archive/mulan_dynamics.py --quick                       # smoke test, < 1 min
    python benchmarks/archive/mulan_dynamics.py --arms vdm mulan_ref mulan_frozen mulan_slow --steps 500
    python benchmarks/archive/mulan_dynamics.py --arms linear_init+width_lr --steps 1000 --eval-at 250 500 1000
    python benchmarks/archive/mulan_dynamics.py --plot                        # figures from the JSON only

Results are merged (one entry per arm, image size and seed) into ``benchmarks/results/mulan_dynamics.json``;
figures go to ``docs/figures/dynamics_*.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

import mulan
from mulan.lightning.data import EmbeddedDataModule
from mulan.lightning.optim import AdamW

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/archive/ -> the repository
RESULTS = ROOT / "benchmarks" / "results" / "mulan_dynamics.json"
FIGURES = ROOT / "docs" / "figures"

LR, BETAS, WD, WARMUP, CLIP = 2e-4, (0.9, 0.99), 0.01, 100, 1.0
M, K = 50, 15


# ------------------------------------------------------------------------------------------------ arms
@dataclass
class ArmConfig:
    latent: bool = True  # KHotLatent(m=50, k=15) vs NoLatent
    schedule: str = "poly"  # "poly" (Polynomial) or "scalar" (LearnedScalar)
    hidden: int | None = None  # Polynomial hidden width (None: D)
    linear_init: bool = False  # zero head_a/b/c weights and head_a/b biases: gamma linear in t for every z
    frozen: bool = False  # schedule + encoder not trained
    frozen_parts: tuple[str, ...] = ()  # "schedule" and/or "encoder": not trained
    aux_lr: float | None = None  # lr of schedule + encoder (None: LR)
    width_lr: int = 0  # >0: lr of >=2-D schedule weights times min(1, width_lr / fan_in)
    width_lr_encoder: bool = False  # ... and the encoder's >=2-D weights too
    warmup_schedule: int = 0  # N > 0: schedule+encoder lr 0 for N steps, then a linear ramp over N steps
    v_param: bool = False  # velocity parameterisation of the denoiser
    gamma_map: bool = False  # UNet(gamma_conditioning="map")
    tau: float = 10.0  # Sum-of-Gamma temperature of the k-hot latent
    clip_split: bool = False  # clip the denoiser's and the schedule+encoder's gradients separately (1.0 each)
    notes: list[str] = field(default_factory=list)


MODIFIERS: dict[str, dict] = {
    "vdm": dict(latent=False, schedule="scalar"),
    "mulan_ref": {},
    "mulan": {},
    "mulan_frozen": dict(frozen=True),
    "frozen": dict(frozen=True),
    "mulan_slow": dict(aux_lr=1e-5),
    "slow": dict(aux_lr=1e-5),
    "linear_init": dict(linear_init=True),
    "width_lr": dict(width_lr=64),
    "width_lr_all": dict(width_lr=64, width_lr_encoder=True),
    "light_head": dict(hidden=64),
    "warmup_schedule": dict(warmup_schedule=200),
    "v_param": dict(v_param=True),
    "gamma_map": dict(gamma_map=True),
    "tau1": dict(tau=1.0),
    "clip_split": dict(clip_split=True),
    "frozen_encoder": dict(frozen_parts=("encoder",)),
    "frozen_schedule": dict(frozen_parts=("schedule",)),
    "nolatent": dict(latent=False),
}


def arm_config(name: str) -> ArmConfig:
    """``"linear_init+width_lr"`` -> the MuLAN reference with both modifiers; ``"vdm+v_param"`` -> VDM with v."""
    cfg = ArmConfig()
    for part in name.split("+"):
        if part.startswith("warmup_schedule") and part[len("warmup_schedule") :].isdigit():
            cfg = replace(cfg, warmup_schedule=int(part[len("warmup_schedule") :]))
            continue
        if part.startswith("hidden") and part[len("hidden") :].isdigit():
            cfg = replace(cfg, hidden=int(part[len("hidden") :]))
            continue
        if part not in MODIFIERS:
            raise SystemExit(f"unknown arm modifier {part!r}; known: {sorted(MODIFIERS)}")
        cfg = replace(cfg, **MODIFIERS[part])
    return cfg


class VParam(nn.Module):
    """Velocity parameterisation around a UNet (which returns ``x_t + NN``): ``v_hat = NN``,
    ``eps_hat = alpha v_hat + sigma x_t`` with per-dimension ``alpha, sigma`` from ``gamma``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_t: Tensor, gamma: Tensor, z: Tensor | None = None) -> Tensor:
        v_hat = self.unet(x_t, gamma, z) - x_t
        alpha, sigma = mulan.elbo.alpha_sigma(gamma.float())
        return alpha * v_hat + sigma * x_t


def build_model(cfg: ArmConfig, image_shape: tuple[int, int, int], seed: int) -> mulan.DiffusionModel:
    """Each component from its own seed, so arms with the same component get the same initial weights."""
    m = M if cfg.latent else 0
    torch.manual_seed(seed)
    unet = mulan.UNet(
        image_shape, m, channels=32, num_blocks=4, dropout=0.0, gamma_conditioning="map" if cfg.gamma_map else "mean"
    )
    torch.manual_seed(seed + 1)
    latent = (
        mulan.KHotLatent(image_shape, m=M, k=K, channels=32, num_blocks=2, tau=cfg.tau)
        if cfg.latent
        else mulan.NoLatent(image_shape)
    )
    torch.manual_seed(seed + 2)
    if cfg.schedule == "scalar":
        schedule = mulan.LearnedScalar(image_shape, m)
    else:
        schedule = mulan.Polynomial(image_shape, m, hidden=cfg.hidden)
        if cfg.linear_init:
            with torch.no_grad():
                for head in (schedule.head_a, schedule.head_b, schedule.head_c):
                    head.weight.zero_()
                schedule.head_a.bias.zero_()
                schedule.head_b.bias.zero_()
    denoiser = VParam(unet) if cfg.v_param else unet
    return mulan.DiffusionModel(image_shape, schedule, denoiser, latent)


def parameter_groups(model: mulan.DiffusionModel, cfg: ArmConfig) -> list[dict]:
    """As ``DiffusionTask.parameter_groups`` (denoiser vs schedule+encoder; only >= 2-D params decayed), with
    each group's ``base_lr`` and ``aux`` flag, and per-parameter groups for the schedule+encoder."""
    den = [p for p in model.denoiser.parameters()]
    groups = [
        {"params": [p for p in den if p.ndim >= 2], "lr": LR, "base_lr": LR, "aux": False, "part": "denoiser"},
        {
            "params": [p for p in den if p.ndim < 2],
            "lr": LR,
            "base_lr": LR,
            "aux": False,
            "part": "denoiser",
            "weight_decay": 0.0,
        },
    ]
    aux = [("schedule", n, p) for n, p in model.process.named_parameters()]
    aux += [("encoder", n, p) for n, p in model.latent.named_parameters()]
    for part, name, p in aux:
        if cfg.frozen or part in cfg.frozen_parts:
            p.requires_grad_(False)
            continue
        lr = cfg.aux_lr if cfg.aux_lr is not None else LR
        if cfg.width_lr and p.ndim >= 2 and (part == "schedule" or cfg.width_lr_encoder):
            lr *= min(1.0, cfg.width_lr / p[0].numel())  # fan_in = size of one output row
        group = {"params": [p], "lr": lr, "base_lr": lr, "aux": True, "part": part, "name": name}
        if p.ndim < 2:
            group["weight_decay"] = 0.0
        groups.append(group)
    return [g for g in groups if g["params"]]


def lr_factor(step: int, aux: bool, cfg: ArmConfig) -> float:
    f = min(1.0, (step + 1) / WARMUP)
    if aux and cfg.warmup_schedule:
        n = cfg.warmup_schedule
        f *= min(1.0, max(0.0, (step - n) / n))
    return f


# ------------------------------------------------------------------------------------------------ helpers
def khot(logits: Tensor, k: int) -> Tensor:
    return torch.zeros_like(logits).scatter_(-1, logits.topk(k, dim=-1).indices, 1.0)


def flip_fraction(a: Tensor, b: Tensor) -> float:
    """Mean over rows of the fraction of the k hot positions that differ."""
    return float(((a - b).abs().sum(-1) / (2 * K)).mean())


def rms(x: Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def norm(tensors) -> float:
    return float(torch.sqrt(sum((t.float() ** 2).sum() for t in tensors))) if tensors else 0.0


def parts(model: mulan.DiffusionModel) -> dict[str, list[nn.Parameter]]:
    return {
        "schedule": list(model.process.parameters()),
        "encoder": list(model.latent.parameters()),
        "denoiser": list(model.denoiser.parameters()),
    }


def head_layers(model: mulan.DiffusionModel) -> dict[str, nn.Linear]:
    s = model.process
    if not isinstance(s, mulan.Polynomial):
        return {}
    return {"net.0": s.net[0], "net.2": s.net[2], "head_a": s.head_a, "head_b": s.head_b, "head_c": s.head_c}


def noise_std(latent: nn.Module, n: int = 20000) -> float:
    """Empirical std of the latent's perturbation of one logit (fixed seed, own RNG stream)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        logits = torch.zeros(n, M)
        return float((latent.perturb(logits) - logits).std())


# ------------------------------------------------------------------------------------------------ instrumentation
class Probe:
    """Fixed probe batch; ``before(model)`` snapshots, ``after(model, snap)`` measures one optimiser step."""

    def __init__(self, model: mulan.DiffusionModel, images: Tensor, num_t: int = 9) -> None:
        self.x = mulan.to_unit_interval(images)
        self.n = images.shape[0]
        self.t = torch.linspace(0, 1, num_t + 2)[1:-1]
        self.has_latent = model.latent.dim > 0
        with torch.no_grad():
            self.z0 = khot(model.latent.encoder(self.x), K) if self.has_latent else None
        self.noise_std = noise_std(model.latent) if self.has_latent else None

    def gamma(self, model: mulan.DiffusionModel, z: Tensor | None) -> Tensor:
        tt = self.t.repeat(self.n)
        zz = z.repeat_interleave(len(self.t), 0) if z is not None else None
        return model.process(tt, zz)[0]

    def layer_io(self, model: mulan.DiffusionModel) -> dict[str, tuple[Tensor, Tensor]]:
        layers = head_layers(model)
        if not layers:
            return {}
        io: dict[str, tuple[Tensor, Tensor]] = {}
        hooks = [
            layer.register_forward_hook(lambda mod, inp, out, name=name: io.__setitem__(name, (inp[0], out)))
            for name, layer in layers.items()
        ]
        try:
            model.process.coefficients(self.z0, self.n)
        finally:
            for h in hooks:
                h.remove()
        return io

    @torch.no_grad()
    def before(self, model: mulan.DiffusionModel) -> dict:
        snap: dict = {"gamma_z0": self.gamma(model, self.z0), "io": self.layer_io(model)}
        snap["params"] = {k: [p.detach().clone() for p in ps] for k, ps in parts(model).items()}
        snap["layers"] = {
            n: (layer.weight.detach().clone(), layer.bias.detach().clone()) for n, layer in head_layers(model).items()
        }
        if self.has_latent:
            logits = model.latent.encoder(self.x)
            n1 = model.latent.perturb(logits) - logits
            snap.update(logits=logits, n1=n1, zdet=khot(logits, K), zpert=khot(logits + n1, K))
            snap["gamma_zdet"] = self.gamma(model, snap["zdet"])
            snap["gamma_zpert"] = self.gamma(model, snap["zpert"])
        return snap

    @torch.no_grad()
    def after(self, model: mulan.DiffusionModel, snap: dict) -> dict:
        out: dict = {}
        g_a = self.gamma(model, self.z0)
        out["gamma_motion"] = float((g_a - snap["gamma_z0"]).abs().mean())
        out["gamma_motion_max"] = float((g_a - snap["gamma_z0"]).abs().max())
        # per-dimension spread of gamma on the probe (0 for a scalar schedule)
        g = g_a.expand(-1, *model.image_shape).flatten(1)
        out["gamma_dim_std"] = float(g.std(1).mean())
        out["update_norm"] = {
            k: norm([p.detach() - q for p, q in zip(ps, snap["params"][k], strict=True)])
            for k, ps in parts(model).items()
        }
        out["param_norm"] = {k: norm([p.detach() for p in ps]) for k, ps in parts(model).items()}
        io_a = self.layer_io(model)
        layers = {}
        for name, layer in head_layers(model).items():
            w0, b0 = snap["layers"][name]
            dw, db = layer.weight.detach() - w0, layer.bias.detach() - b0
            h_b, o_b = snap["io"][name]
            own = h_b @ dw.T + db
            layers[name] = {
                "rel_update_w": float(dw.norm() / w0.norm().clamp_min(1e-12)),
                "rel_update_b": float(db.norm() / b0.norm().clamp_min(1e-12)),
                "out_rms": rms(o_b),
                "in_abs_mean": float(h_b.abs().mean()),
                "fan_in": int(w0.shape[1]),
                "out_change_own": rms(own),
                "out_change_total": rms(io_a[name][1] - o_b),
            }
        if layers:
            out["layers"] = layers
        if self.has_latent:
            logits = model.latent.encoder(self.x)
            n2 = model.latent.perturb(logits) - logits
            zdet, zpert_same, zpert_new = khot(logits, K), khot(logits + snap["n1"], K), khot(logits + n2, K)
            srt = snap["logits"].sort(-1, descending=True).values
            margin = srt[:, K - 1] - srt[:, K]
            out["z"] = {
                "flip_perturbed": flip_fraction(zpert_new, snap["zpert"]),  # new noise and new weights
                "flip_perturbed_same_noise": flip_fraction(zpert_same, snap["zpert"]),  # new weights only
                "flip_deterministic": flip_fraction(zdet, snap["zdet"]),
                "perturbed_vs_deterministic": flip_fraction(snap["zpert"], snap["zdet"]),
                "margin_mean": float(margin.mean()),
                "margin_median": float(margin.median()),
                "logit_std": float(snap["logits"].std(-1).mean()),
                "gap_kth_to_mean_noise": float((srt[:, :K].mean(-1) - srt[:, K:].mean(-1)).mean()),
                "noise_std": self.noise_std,
            }
            out["gamma_motion_zdet"] = float((self.gamma(model, zdet) - snap["gamma_zdet"]).abs().mean())
            out["gamma_motion_zpert"] = float((self.gamma(model, zpert_new) - snap["gamma_zpert"]).abs().mean())
            # resampling z alone (weights fixed): how much gamma of one image changes between two draws
            out["gamma_resample"] = float((self.gamma(model, zpert_new) - self.gamma(model, zpert_same)).abs().mean())
        return out


@torch.no_grad()
def loss_variance(model: mulan.DiffusionModel, batch: Tensor, draws: int, seed: int) -> dict:
    """Variance over ``draws`` of the batch-mean loss (bits/dim) on a fixed batch; dgamma/dt spread."""
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = mulan.to_unit_interval(batch)
        zdet = khot(model.latent.encoder(x), K) if model.latent.dim else None
        totals, diffs, diffs_zfixed = [], [], []
        for _ in range(draws):
            terms = model(batch)
            totals.append(float(model.bpd(terms.total).mean()))
            diffs.append(float(model.bpd(terms.diffusion).mean()))
            t = mulan.antithetic_uniform(batch.shape[0])
            diffs_zfixed.append(float(model.bpd(model.diffusion_term(x, t, zdet)).mean()))
        t = mulan.antithetic_uniform(batch.shape[0])
        _, dg = model.process(t, zdet)
        w = dg.expand(-1, *model.image_shape).flatten(1)
    model.train(was_training)
    tot, dif, dz = (torch.tensor(v, dtype=torch.float64) for v in (totals, diffs, diffs_zfixed))
    return {
        "draws": draws,
        "total_mean": float(tot.mean()),
        "total_var": float(tot.var()),
        "diffusion_mean": float(dif.mean()),
        "diffusion_var": float(dif.var()),
        "diffusion_zfixed_var": float(dz.var()),
        "dgamma_cv": float((w.std(1) / w.mean(1)).mean()),  # across dimensions, mean over examples
        "dgamma_max_over_mean": float((w.max(1).values / w.mean(1)).mean()),
        "dgamma_q": [float(q) for q in torch.quantile(w.flatten()[:200000], torch.tensor([0.01, 0.5, 0.99]))],
    }


@torch.no_grad()
def evaluate(model: mulan.DiffusionModel, images: Tensor, num_times: int, seed: int, chunk: int = 32) -> dict:
    """Dense ELBO of every test image, each term averaged over images in bits/dim (fixed RNG: common draws)."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts_ = [mulan.dense_elbo(model, b, num_times=num_times) for b in images.split(chunk)]
    model.train(was_training)
    out = {}
    for name in ("recon", "prior", "diffusion", "latent", "total"):
        v = model.bpd(torch.cat([getattr(p, name) for p in parts_]))
        out[name] = float(v.mean())
        if name == "total":
            out["total_stderr"] = float(v.std() / math.sqrt(len(v)))
    return out


# ------------------------------------------------------------------------------------------------ training
def train_arm(arm: str, args: argparse.Namespace, data: dict[str, Tensor]) -> dict:
    cfg = arm_config(arm)
    image_shape = tuple(data["train"].shape[1:])
    model = build_model(cfg, image_shape, args.seed)
    groups = parameter_groups(model, cfg)
    opt = AdamW(groups, lr=LR, betas=BETAS, weight_decay=WD)
    trainable = [p for g in groups for p in g["params"]]
    probe = Probe(model, data["test"][:16])
    var_batch = data["train"][:32]
    gen = torch.Generator().manual_seed(args.seed)
    eval_at = sorted({s for s in args.eval_at if s <= args.steps})
    var_at = sorted({s for s in args.var_at if s <= args.steps})
    rec: dict = {
        "arm": arm,
        "config": asdict(cfg),
        "image_shape": list(image_shape),
        "seed": args.seed,
        "steps": args.steps,
        "eval_times": args.eval_times,
        "num_params": {k: sum(p.numel() for p in ps) for k, ps in parts(model).items()},
        "train": [],
        "eval": {},
        "inst": [],
        "variance": {},
    }
    window: list[tuple[float, float]] = []
    step_seconds = 0.0
    log(f"[{arm}] {image_shape} params {rec['num_params']}")
    perm: Tensor | None = None
    for step in range(args.steps + 1):
        if step in var_at:
            rec["variance"][str(step)] = loss_variance(model, var_batch, args.var_draws, seed=777)
            v = rec["variance"][str(step)]
            log(
                f"[{arm}] step {step} var total {v['total_var']:.3g} diff {v['diffusion_var']:.3g} "
                f"dgamma cv {v['dgamma_cv']:.3g}"
            )
        if step in eval_at and step > 0:
            t0 = time.perf_counter()
            rec["eval"][str(step)] = ev = evaluate(model, data["test"], args.eval_times, seed=999)
            log(
                f"[{arm}] step {step} test bpd {ev['total']:.4f} (diff {ev['diffusion']:.4f}) "
                f"[{time.perf_counter() - t0:.0f}s]"
            )
        if step == args.steps:
            break
        # data: reshuffled every epoch from the run's own generator, incomplete batch dropped
        n = data["train"].shape[0]
        per_epoch = n // args.batch_size
        if step % per_epoch == 0:
            perm = torch.randperm(n, generator=gen)
        i = step % per_epoch
        batch = data["train"][perm[i * args.batch_size : (i + 1) * args.batch_size]]
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, g["aux"], cfg)
        instrument = step % args.inst_every == 0
        snap = probe.before(model) if instrument else None
        t0 = time.perf_counter()
        torch.manual_seed(args.seed * 1_000_003 + step + 1)  # this step's draws (times, noise, z perturbation)
        terms = model(batch)
        loss = model.bpd(terms.total).mean()
        if not torch.isfinite(loss):
            log(f"[{arm}] non-finite loss at step {step}; stopping")
            rec["diverged_at"] = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if instrument:
            grad = {k: norm([p.grad for p in ps if p.grad is not None]) for k, ps in parts(model).items()}
        if cfg.clip_split:
            den_params = [p for p in model.denoiser.parameters() if p.requires_grad]
            aux_params = [p for p in trainable if all(p is not q for q in den_params)]
            den_norm = float(torch.nn.utils.clip_grad_norm_(den_params, CLIP))
            aux_norm = float(torch.nn.utils.clip_grad_norm_(aux_params, CLIP)) if aux_params else 0.0
            total_norm = math.hypot(den_norm, aux_norm)
            clip_factor = min(1.0, CLIP / (den_norm + 1e-6))  # the denoiser's
        else:
            total_norm = float(torch.nn.utils.clip_grad_norm_(trainable, CLIP))
            clip_factor = min(1.0, CLIP / (total_norm + 1e-6))
        opt.step()
        step_seconds += time.perf_counter() - t0
        window.append((float(loss.detach()), float(model.bpd(terms.diffusion.detach()).mean())))
        if instrument:
            m = probe.after(model, snap)
            m.update(
                step=step,
                loss=float(loss.detach()),
                grad_norm=grad,
                grad_norm_total=total_norm,
                clip_factor=clip_factor,
                lr={
                    p: max((g["lr"] for g in opt.param_groups if g["part"] == p), default=0.0)
                    for p in ("denoiser", "schedule", "encoder")
                },
            )
            rec["inst"].append(m)
        if (step + 1) % 50 == 0:
            tot, dif = (sum(v) / len(v) for v in zip(*window, strict=False))
            rec["train"].append({"step": step + 1, "bpd": tot, "diffusion": dif})
            window = []
            last = rec["inst"][-1] if rec["inst"] else {}
            log(
                f"[{arm}] step {step + 1} train bpd {tot:.4f} diff {dif:.4f} | dgamma/step "
                f"{last.get('gamma_motion', float('nan')):.3g} | {step_seconds / (step + 1):.3f}s/step"
            )
    rec["seconds_per_step"] = step_seconds / max(args.steps, 1)
    return rec


# ------------------------------------------------------------------------------------------------ I/O, figures
LOG_FILE: Path | None = None


def log(msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    if LOG_FILE is not None:
        with LOG_FILE.open("a") as f:
            f.write(line + "\n")


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save(path: Path, rec: dict) -> None:
    results = load(path)
    results.setdefault("runs", {})
    key = f"{rec['arm']}|{rec['image_shape'][1]}|s{rec['seed']}"
    results["runs"][key] = rec
    results["protocol"] = {
        "data": "EmbeddedDataModule(source='photos', image_size=s), train split, batch 32, reshuffled per epoch",
        "model": "UNet(channels=32, num_blocks=4, dropout=0); KHotLatent(m=50, k=15, channels=32, num_blocks=2)",
        "optimiser": f"AdamW lr {LR} betas {BETAS} wd {WD} (>=2-D only), {WARMUP}-step linear warm-up, "
        f"global grad-norm clip {CLIP}, no EMA",
        "eval": "mulan.dense_elbo over the whole test split, bits/dim per term",
        "probe": "16 first test images, 9 times linspace(0,1,11)[1:-1], z fixed = top-k of the initial encoder",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def plot(path: Path, fig_dir: Path, size: int = 16, gamma_arms: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["arm"]: r for r in load(path)["runs"].values() if r["image_shape"][1] == size}
    fig_dir.mkdir(parents=True, exist_ok=True)
    palette = plt.get_cmap("tab20").colors
    colour = {arm: palette[(2 * i) % 20 + (2 * i) // 20] for i, arm in enumerate(sorted(runs))}
    colour.update({a: c for a, c in (("vdm", "k"), ("mulan_ref", "tab:red")) if a in runs})
    width = {"vdm": 2.5, "mulan_ref": 2.5}
    arms = [a for a in (gamma_arms or sorted(runs)) if a in runs]

    def smooth(values: list[float], n: int = 5) -> list[float]:
        return [
            sum(values[max(0, i - n + 1) : i + 1]) / len(values[max(0, i - n + 1) : i + 1]) for i in range(len(values))
        ]

    def line(ax, arm, x, y, **kw):
        ax.plot(x, y, color=colour[arm], lw=width.get(arm, 1.2), label=arm, **kw)

    # 1. gamma motion per optimiser step
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm in arms:
        inst = runs[arm]["inst"]
        line(ax[0], arm, [r["step"] for r in inst], [max(r["gamma_motion"], 1e-7) for r in inst])
        if inst and "gamma_motion_zpert" in inst[0]:
            line(ax[1], arm, [r["step"] for r in inst], smooth([r["gamma_motion_zpert"] for r in inst]))
    ax[0].set(
        yscale="log",
        xlabel="optimiser step",
        ylabel="mean |gamma_after - gamma_before| per step",
        title="log-SNR map motion per step (probe: 16 test images x 9 t, z fixed)",
    )
    ax[1].set(
        yscale="log",
        xlabel="optimiser step",
        ylabel="mean |gamma change| between consecutive steps",
        title="per image, as the denoiser sees it: new weights + newly perturbed z",
    )
    ax[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(fig_dir / "dynamics_gamma_motion.png", dpi=120)
    plt.close(fig)

    # 2. test bound (dense ELBO) and train bound vs steps
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8))
    for arm in sorted(runs, key=lambda a: (a not in ("vdm", "mulan_ref"), a)):
        rec = runs[arm]
        steps = sorted(int(k) for k in rec["eval"])
        if steps:
            line(ax[0], arm, steps, [rec["eval"][str(k)]["total"] for k in steps], marker="o")
        line(ax[1], arm, [r["step"] for r in rec["train"]], [r["bpd"] for r in rec["train"]])
    ax[0].set(
        xlabel="optimiser step",
        ylabel="test bits/dim (dense ELBO, 32 t per image)",
        title=f"test bound, 3x{size}x{size} photo crops, seed 0",
    )
    ax[1].set(
        xlabel="optimiser step", ylabel="train bits/dim (mean of the last 50 steps)", ylim=(4, 9.5), title="train bound"
    )
    ax[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(fig_dir / "dynamics_bound.png", dpi=120)
    plt.close(fig)

    # 3. z stability and schedule-head output motion
    zarms = [a for a in arms if runs[a]["inst"] and "z" in runs[a]["inst"][0]]
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    for arm in zarms:
        inst = runs[arm]["inst"]
        st = [r["step"] for r in inst]
        line(ax[0], arm, st, smooth([r["z"]["flip_perturbed"] for r in inst]))
        ax[0].plot(st, smooth([r["z"]["flip_deterministic"] for r in inst]), color=colour[arm], lw=0.8, ls=":")
        line(ax[1], arm, st, smooth([r["z"]["margin_mean"] for r in inst]))
        if "layers" in inst[0]:
            line(ax[2], arm, st, [max(r["layers"]["head_b"]["out_change_total"], 1e-7) for r in inst])
    if zarms:
        z0 = runs[zarms[0]]["inst"][0]["z"]
        ax[1].axhline(
            z0["noise_std"], color="k", ls="--", label=f"std of the Sum-of-Gamma perturbation ({z0['noise_std']:.3f})"
        )
    ax[0].set(
        xlabel="optimiser step",
        ylabel="fraction of the k hot positions changed",
        title="z flips per step: perturbed draw (solid), deterministic top-k (dotted)",
    )
    ax[1].set(
        xlabel="optimiser step",
        ylabel="logit margin (k-th minus (k+1)-th)",
        yscale="log",
        title="encoder logit margin vs perturbation std",
    )
    ax[2].set(
        xlabel="optimiser step",
        ylabel="rms change of head_b output per step",
        yscale="log",
        title="schedule head: change of the b coefficient per step",
    )
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "dynamics_head_and_z.png", dpi=120)
    plt.close(fig)

    # 4. gradient norms, clip factor, loss variance
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    for arm in arms:
        inst = runs[arm]["inst"]
        st = [r["step"] for r in inst]
        line(ax[0], arm, st, smooth([max(r["grad_norm"]["schedule"], 1e-7) for r in inst]))
        ax[0].plot(st, smooth([r["grad_norm"]["denoiser"] for r in inst]), color=colour[arm], lw=0.8, ls=":")
        line(ax[1], arm, st, smooth([r["clip_factor"] for r in inst]))
        var = runs[arm]["variance"]
        steps = sorted(int(k) for k in var)
        line(ax[2], arm, steps, [var[str(k)]["total_var"] for k in steps], marker="o")
    ax[0].set(
        xlabel="optimiser step",
        ylabel="gradient norm before clipping",
        yscale="log",
        title="schedule head (solid) and denoiser (dotted) gradient norms",
    )
    ax[1].set(
        xlabel="optimiser step",
        ylabel="min(1, 1 / ||g||_global)",
        yscale="log",
        title="global clip factor (multiplies every gradient)",
    )
    ax[2].set(
        xlabel="optimiser step",
        ylabel="variance of the batch-mean loss (bpd^2)",
        yscale="log",
        title="loss-estimate variance, fixed train batch, 64 draws",
    )
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "dynamics_grad_and_variance.png", dpi=120)
    plt.close(fig)


def summary(
    path: Path, size: int = 16, windows: tuple[tuple[int, int], ...] = ((100, 250), (250, 500), (500, 1000))
) -> str:
    """Markdown tables: test bound per arm and step; instrumentation averaged over step windows."""
    runs = {r["arm"]: r for r in load(path)["runs"].values() if r["image_shape"][1] == size}
    steps = sorted({int(s) for r in runs.values() for s in r["eval"]})
    lines = [
        f"### Test bits/dim, 3x{size}x{size} (dense ELBO; total / diffusion term)",
        "",
        "| arm | " + " | ".join(f"step {s}" for s in steps) + " | s/step |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for arm, r in runs.items():
        cells = [
            f"{r['eval'][str(s)]['total']:.3f} / {r['eval'][str(s)]['diffusion']:.3f}" if str(s) in r["eval"] else ""
            for s in steps
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {r['seconds_per_step']:.3f} |")

    def avg(rows: list[dict], get) -> float:
        vals = [get(x) for x in rows]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    cols = [
        ("dgamma/step", lambda x: x["gamma_motion"]),
        ("dgamma/step (z_pert)", lambda x: x.get("gamma_motion_zpert")),
        ("gamma resample", lambda x: x.get("gamma_resample")),
        ("flip pert", lambda x: x.get("z", {}).get("flip_perturbed")),
        ("flip det", lambda x: x.get("z", {}).get("flip_deterministic")),
        ("margin", lambda x: x.get("z", {}).get("margin_mean")),
        ("|g| sched", lambda x: x["grad_norm"]["schedule"]),
        ("|g| enc", lambda x: x["grad_norm"]["encoder"]),
        ("|g| den", lambda x: x["grad_norm"]["denoiser"]),
        ("|du| sched", lambda x: x["update_norm"]["schedule"]),
        ("|du| enc", lambda x: x["update_norm"]["encoder"]),
        ("|du| den", lambda x: x["update_norm"]["denoiser"]),
        ("clip", lambda x: x["clip_factor"]),
        ("head_b dout", lambda x: x.get("layers", {}).get("head_b", {}).get("out_change_total")),
    ]
    for lo, hi in windows:
        lines += [
            "",
            f"### Per-step instrumentation, mean over steps [{lo}, {hi}) (probe batch)",
            "",
            "| arm | " + " | ".join(c for c, _ in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for arm, r in runs.items():
            rows = [x for x in r["inst"] if lo <= x["step"] < hi]
            if rows:
                lines.append(f"| {arm} | " + " | ".join(f"{avg(rows, g):.3g}" for _, g in cols) + " |")
    vsteps = sorted({int(s) for r in runs.values() for s in r["variance"]})
    ref = runs.get("vdm", {}).get("variance", {})
    lines += [
        "",
        "### Variance of the batch-mean loss (bpd^2; fixed batch; ratio to VDM at the same step)",
        "",
        "| arm | " + " | ".join(f"step {s}: total (x vdm) / diff z-fixed / dgamma cv" for s in vsteps) + " |",
        "|---|" + "---|" * len(vsteps),
    ]
    for arm, r in runs.items():
        cells = []
        for s in vsteps:
            v = r["variance"].get(str(s))
            if v is None:
                cells.append("")
                continue
            ratio = v["total_var"] / ref[str(s)]["total_var"] if str(s) in ref else float("nan")
            cells.append(
                f"{v['total_var']:.3g} ({ratio:.2f}x) / {v['diffusion_zfixed_var']:.3g} / {v['dgamma_cv']:.3g}"
            )
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    global LOG_FILE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["vdm", "mulan_ref", "mulan_frozen", "mulan_slow"])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-at", type=int, nargs="+", default=[250, 500, 1000])
    p.add_argument("--var-at", type=int, nargs="+", default=[0, 250, 500, 1000])
    p.add_argument("--var-draws", type=int, default=64)
    p.add_argument("--eval-times", type=int, default=32)
    p.add_argument("--inst-every", type=int, default=10)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--fig-dir", type=Path, default=FIGURES)
    p.add_argument("--fig-arms", nargs="+", default=None, help="arms in the gamma-motion figures")
    p.add_argument("--log", type=Path, default=None)
    p.add_argument("--plot", action="store_true", help="only make the figures from --out")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--summary", action="store_true", help="only print Markdown tables from --out")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny run, own JSON, figures to /tmp")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    LOG_FILE = args.log
    if args.quick:
        args.steps, args.eval_at, args.var_at, args.var_draws = 20, [10, 20], [0, 20], 4
        args.eval_times, args.inst_every = 2, 5
        if args.arms == p.get_default("arms"):
            args.arms = ["vdm", "mulan_ref", "linear_init+width_lr+v_param"]
        args.out = RESULTS.with_name("mulan_dynamics_quick.json")
        args.fig_dir = Path("/tmp/mulan_dynamics_quick_figures")
    if args.plot or args.summary:
        if args.plot:
            plot(args.out, args.fig_dir, args.image_size, args.fig_arms)
        if args.summary:
            print(summary(args.out, args.image_size))
        return
    for arm in args.arms:
        arm_config(arm)  # fail early on a typo
    dm = EmbeddedDataModule(source="photos", image_size=args.image_size, batch_size=args.batch_size)
    dm.setup()
    data = {s: dm.datasets[s].images for s in ("train", "test")}
    if args.quick:
        data["test"] = data["test"][:32]
    log(f"data: train {tuple(data['train'].shape)} test {tuple(data['test'].shape)}")
    for arm in args.arms:
        rec = train_arm(arm, args, data)
        save(args.out, rec)
    if not args.no_plot:
        plot(args.out, args.fig_dir, args.image_size, args.fig_arms)


if __name__ == "__main__":
    main()
