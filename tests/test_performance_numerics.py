"""Numerics of the performance options: bf16-mixed keeps the float32 islands of docs: math, section 8 and agrees
with float32; channels-last, the fused AdamW default, the flash-attention layout and the decoder's logsumexp
form change speed, not values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mulan import elbo
from mulan.latents import KHotLatent
from mulan.lightning.optim import AdamW
from mulan.model import DiffusionModel
from mulan.networks import AttentionBlock, UNet
from mulan.processes.schedules import LearnedScalar, Polynomial
from mulan.utils import float32_region

SHAPE = (3, 16, 16)


def make_model(kind: str, channels_last: bool = False, seed: int = 0) -> DiffusionModel:
    torch.manual_seed(seed)
    latent = KHotLatent(SHAPE, m=10, k=3, channels=16, num_blocks=1) if kind == "mulan" else None
    m = latent.dim if latent else 0
    schedule = Polynomial(SHAPE, m, hidden=64) if kind == "mulan" else LearnedScalar(SHAPE, 0)
    denoiser = UNet(SHAPE, m, channels=32, num_blocks=2, dropout=0.0)
    model = DiffusionModel(SHAPE, schedule, denoiser, latent, channels_last=channels_last)
    # the zero-initialised output layers would make eps_hat = x_t whatever the body computes: give them weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            # copy_ of a fresh tensor: the same values whatever the memory layout of ``p``
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape) * (0.5 / math.sqrt(p[0].numel())))
            elif name.endswith("head_a.bias"):
                p.copy_(torch.randn(p.shape) * 0.1)
    return model


def terms(model: DiffusionModel, images: torch.Tensor, t: torch.Tensor, bf16: bool, seed: int = 1):
    torch.manual_seed(seed)  # the same latent noise, reconstruction noise and diffusion noise in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(images, t=t)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (8, *SHAPE), dtype=torch.uint8, generator=g)
    return images, torch.rand(8, generator=g)


@pytest.mark.parametrize("kind", ["vdm", "mulan"])
def test_bf16_mixed_loss_agrees_with_float32(kind, batch):
    """Same weights, same noise: bf16-mixed total within 2e-2 relative of float32.

    Tolerance: only the U-Net body runs in bf16 (8-bit mantissa, unit round-off u = 2^-9 ~ 2e-3). Over the
    ~10 matmul/conv layers of this network the output error is at most a few u per layer (~1e-2 relative
    when all errors align), and the diffusion term, a sum of squared residuals, at most doubles the relative
    error of the residual where it is aligned; everything else is float32. 2e-2 on the total bounds that worst
    case; the observed difference is far smaller because the errors are independent across the D sums.
    The reconstruction and prior terms never see the network and must agree to float32 round-off.
    """
    images, t = batch
    model = make_model(kind).eval()
    ref, mixed = terms(model, images, t, bf16=False), terms(model, images, t, bf16=True)
    torch.testing.assert_close(mixed.recon, ref.recon, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed.prior, ref.prior, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed.latent, ref.latent)
    rel = ((mixed.total - ref.total).abs() / ref.total.abs()).max()
    assert rel < 2e-2, rel
    rel_mean = (mixed.total.mean() - ref.total.mean()).abs() / ref.total.mean().abs()
    assert rel_mean < 5e-3, rel_mean
    # and bf16 did run: the body is not silently float32
    assert not torch.equal(mixed.diffusion, ref.diffusion)


@pytest.mark.parametrize("kind", ["vdm", "mulan"])
def test_float32_islands_under_autocast(kind, batch, monkeypatch):
    """Fourier features, gamma, dgamma/dt, alpha/sigma, the decoder logits and every loss term are float32 inside
    autocast, while the U-Net body runs in bfloat16."""
    images, t = batch
    model = make_model(kind).eval()
    seen: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, inputs, output):
            outs = output if isinstance(output, tuple) else (output,)
            for i, o in enumerate(outs):
                if isinstance(o, torch.Tensor):
                    seen[f"{name}[{i}]"] = o.dtype

        return hook

    model.denoiser.fourier.register_forward_hook(record("fourier"))
    model.process.register_forward_hook(record("schedule"))  # (gamma, dgamma_dt)
    model.denoiser.conv_in.register_forward_hook(record("conv_in"))
    model.denoiser.down[0].conv1.register_forward_hook(record("body_conv"))
    for name in ("decoder_logits", "alpha_sigma", "diffusion_loss", "prior_loss", "reconstruction_loss"):
        original = getattr(elbo, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            for i, o in enumerate(out if isinstance(out, tuple) else (out,)):
                seen[f"{_name}[{i}]"] = o.dtype
            return out

        monkeypatch.setattr(elbo, name, wrapped)
    result = terms(model, images, t, bf16=True)
    # the full 256-way fallback (large gamma_0) runs in the same float32 island
    with torch.autocast("cpu", dtype=torch.bfloat16), float32_region(images):
        elbo.reconstruction_loss(images, torch.zeros(8, 1, 1, 1))
    assert seen["decoder_logits[0]"] == torch.float32
    float32 = [k for k in seen if not k.startswith(("conv_in", "body_conv"))]
    # (the decoder logits: ``decoder_logits`` runs only for large gamma_0; the windowed decoder's logits are
    # checked through its output here and through exact float32 agreement in the bf16 test above)
    assert {
        "fourier[0]",
        "schedule[0]",
        "schedule[1]",
        "alpha_sigma[0]",
        "alpha_sigma[1]",
        "diffusion_loss[0]",
        "prior_loss[0]",
        "reconstruction_loss[0]",
    } <= set(float32)
    assert all(seen[k] == torch.float32 for k in float32), seen
    assert seen["body_conv[0]"] == torch.bfloat16, seen
    for name, value in result.as_dict().items():
        assert value.dtype == torch.float32, name


def _legacy_reconstruction_loss(images, gamma_0, noise):
    x = elbo.to_unit_interval(images)
    z_tilde = x + torch.exp(0.5 * gamma_0) * noise
    diff = z_tilde.unsqueeze(-1) - elbo.to_unit_interval(torch.arange(256))
    log_probs = torch.log_softmax(-0.5 * diff.square() * torch.exp(-gamma_0).unsqueeze(-1), dim=-1)
    return -elbo.sum_per_example(log_probs.gather(-1, images.long().unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("gamma_0", [-13.3, -10.0, -6.0, -2.0, 1.0])
@pytest.mark.parametrize("noise_scale", [1.0, 6.0])
def test_decoder_window_is_the_full_256_way_value(gamma_0, noise_scale, batch):
    """The windowed decoder (the bins within float32 reach of the largest logit) against the full 256-way
    log_softmax of the code before: same loss and gradient to float32 rounding, including the edge bins 0 and
    255 and noise that throws ``z~`` several bins away (or outside [-1, 1])."""
    images, _ = batch
    images = images.clone()
    images[0], images[1] = 0, 255
    noise = noise_scale * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    window = elbo.decoder_window(torch.tensor(gamma_0))
    assert (window is None) == (gamma_0 > -5.0)
    g_new = torch.full((8, 1, 1, 1), gamma_0, requires_grad=True)
    g_old = g_new.detach().clone().requires_grad_()
    new = elbo.reconstruction_loss(images, g_new, noise)
    old = _legacy_reconstruction_loss(images, g_old, noise)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-4)
    new.sum().backward()
    old.sum().backward()
    torch.testing.assert_close(g_new.grad, g_old.grad, rtol=1e-4, atol=1e-3)
    # fixed endpoints: gamma_0 is a constant, so the decoder records no autograd graph
    assert not elbo.reconstruction_loss(images, g_new.detach(), noise).requires_grad
    assert elbo.bin_centres() is elbo.bin_centres()  # built once, not per step


def test_attention_uses_flash_kernel_and_matches_math():
    torch.manual_seed(0)
    block = AttentionBlock(32)
    torch.nn.init.normal_(block.proj.weight, std=0.1)
    x = torch.randn(2, 32, 8, 8)
    b, c, h, w = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), -1) @ v
    reference = x + block.proj(att.transpose(-1, -2).reshape(b, c, h, w))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = block(x)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert any("flash_attention" in e.key for e in prof.key_averages())
    nhwc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(block(nhwc), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vdm", "mulan"])
def test_channels_last_same_loss_and_gradients(kind, batch):
    images, t = batch
    dense, nhwc = make_model(kind, seed=5), make_model(kind, channels_last=True, seed=5)
    conv = nhwc.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    a, b = terms(dense, images, t, bf16=False), terms(nhwc, images, t, bf16=False)
    torch.testing.assert_close(b.total, a.total, rtol=1e-5, atol=1e-4)
    a.total.sum().backward()
    b.total.sum().backward()
    for (name, p), q in zip(dense.named_parameters(), nhwc.parameters(), strict=True):
        if p.grad is not None:
            # summation order differs between the layouts: compare in norm, float32 round-off accumulated
            assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-6, name
    # a state dict moves between the layouts
    dense.load_state_dict(nhwc.state_dict())


def test_adamw_fused_by_default_and_same_update_as_foreach():
    torch.manual_seed(0)
    w = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    w2 = [p.detach().clone().requires_grad_() for p in w]
    fused = AdamW([{"params": iter(w)}])  # a generator inside a group is read once
    assert fused.defaults["fused"] and len(fused.param_groups[0]["params"]) == 2
    reference = AdamW(w2, foreach=True)
    assert not reference.defaults["fused"]
    for _ in range(5):
        for opt, ps in ((fused, w), (reference, w2)):
            opt.zero_grad()
            (ps[0].sin().sum() + ps[1].square().sum()).backward()
            opt.step()
    for p, q in zip(w, w2, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not AdamW([torch.zeros(2, dtype=torch.int64)], fused=None).defaults["fused"]


def test_log_softmax_reference_identity():
    """``logsumexp(l) - l_k`` is ``-log_softmax(l)_k`` (the identity the decoder relies on)."""
    logits = torch.randn(5, 256) * 50
    k = torch.randint(0, 256, (5, 1))
    lse_form = torch.logsumexp(logits, -1) - logits.gather(-1, k).squeeze(-1)
    torch.testing.assert_close(lse_form, -F.log_softmax(logits, -1).gather(-1, k).squeeze(-1))
