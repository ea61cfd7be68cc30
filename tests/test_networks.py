"""Tests of mulan.networks: the U-Net on any C x H x W, its zero-initialised identity, conditioning variants,
Fourier features in float32 under autocast, and the attention block against a naive implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mulan.networks import AttentionBlock, FourierFeatures, UNet

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(shape, batch=2, latent_dim=0, multivariate=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, *shape, generator=g)
    gamma_shape = (batch, *shape) if multivariate else (batch, 1, 1, 1)
    gamma = -13.3 + 18.3 * torch.rand(gamma_shape, generator=g)
    z = torch.randn(batch, latent_dim, generator=g) if latent_dim else None
    return x_t, gamma, z


def _perturb_output(net: UNet, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:  # the zero-initialised layers: conv_out, ResNet conv2, attention proj
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("shape", [(3, 6, 10), (1, 8, 8), (2, 5, 3)])
@pytest.mark.parametrize("latent_dim", [0, 5])
def test_unet_any_shape_and_identity_at_init(shape, latent_dim):
    torch.manual_seed(0)
    net = UNet(shape, latent_dim, channels=8, num_blocks=1)
    x_t, gamma, z = _inputs(shape, latent_dim=latent_dim)
    out = net(x_t, gamma, z)
    assert out.shape == x_t.shape
    assert torch.equal(out, x_t)  # eps_hat = x_t + NN with a zero-initialised output convolution
    _perturb_output(net)
    out = net(x_t, gamma, z)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, x_t)


@pytest.mark.parametrize("attention", ["mid", "all"])
@pytest.mark.parametrize("gamma_conditioning", ["mean", "map"])
def test_unet_variants(attention, gamma_conditioning):
    shape, m = (3, 6, 10), 4
    torch.manual_seed(0)
    # 64 channels: GroupNorm(32) has 2 channels per group, so the per-channel conditioning shift survives it
    # (see test_unet_conditioning_survives_group_norm_with_few_channels)
    net = UNet(shape, m, channels=64, num_blocks=1, attention=attention, gamma_conditioning=gamma_conditioning)
    n_attn = sum(isinstance(mod, AttentionBlock) for mod in net.modules())
    assert n_attn == (1 + 1 + 2 if attention == "all" else 1)
    x_t, gamma, z = _inputs(shape, latent_dim=m, multivariate=True)
    assert torch.equal(net(x_t, gamma, z), x_t)
    _perturb_output(net)
    net.eval()
    out = net(x_t, gamma, z)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    # a different per-dimension gamma map with the same mean per example
    flat = gamma.flatten(1)
    shuffled = flat[:, torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(3))].view_as(gamma)
    torch.testing.assert_close(shuffled.flatten(1).mean(1), flat.mean(1))
    out_shuffled = net(x_t, shuffled, z)
    if gamma_conditioning == "mean":
        torch.testing.assert_close(out_shuffled, out, rtol=1e-5, atol=1e-5)  # sees only the mean of gamma
    else:
        assert (out_shuffled - out).abs().max() > 1e-4  # sees the map
    # z and the (mean) gamma condition the network
    assert (net(x_t, gamma, z + 1.0) - out).abs().max() > 1e-3
    assert (net(x_t, gamma + 2.0, z) - out).abs().max() > 1e-3


def test_unet_conditioning_survives_group_norm_with_few_channels():
    shape, m = (3, 6, 10), 4
    torch.manual_seed(0)
    net = UNet(shape, m, channels=16, num_blocks=1, dropout=0.0)
    _perturb_output(net)
    net.eval()
    x_t, gamma, z = _inputs(shape, latent_dim=m)
    out = net(x_t, gamma, z)
    assert (net(x_t, gamma, z + 1.0) - out).abs().max() > 1e-3
    assert (net(x_t, gamma + 2.0, z) - out).abs().max() > 1e-3


def test_unet_scalar_gamma_equals_constant_map():
    shape = (2, 4, 6)
    torch.manual_seed(0)
    net = UNet(shape, 0, channels=8, num_blocks=1, gamma_conditioning="map")
    _perturb_output(net)
    net.eval()
    x_t, gamma, _ = _inputs(shape)
    torch.testing.assert_close(net(x_t, gamma), net(x_t, gamma.expand_as(x_t)))


def test_unet_requires_z_when_built_with_latent():
    shape = (1, 8, 8)
    net = UNet(shape, 3, channels=8, num_blocks=1)
    x_t, gamma, _ = _inputs(shape)
    with pytest.raises(ValueError, match="latent"):
        net(x_t, gamma, None)


def test_unet_bad_options():
    with pytest.raises(ValueError):
        UNet((1, 4, 4), 0, channels=8, num_blocks=1, attention="bogus")
    with pytest.raises(ValueError):
        UNet((1, 4, 4), 0, channels=8, num_blocks=1, gamma_conditioning="bogus")


def test_fourier_features_float32_under_bf16_autocast_and_exact():
    exponents = (6, 7)
    ff = FourierFeatures(exponents)
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ff(x)
    assert out.dtype == torch.float32
    assert out.shape == (2, 3 * 2 * len(exponents), 4, 5)
    # reference in float64: channels are [sin(c, n) for c, n] then [cos(c, n) for c, n], c-major
    xd = x.double()
    args = [xd[:, c] * (2.0**n * 2 * math.pi) for c in range(3) for n in exponents]
    ref = torch.cat([torch.stack([torch.sin(a) for a in args], 1), torch.stack([torch.cos(a) for a in args], 1)], 1)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4)


def test_attention_block_matches_naive_softmax_attention():
    channels = 8
    torch.manual_seed(0)
    block = AttentionBlock(channels)
    assert block.proj.weight.abs().max() == 0  # zero-initialised: identity at init
    x = torch.randn(2, channels, 3, 5)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.proj.weight.normal_(0, 0.3)
        block.proj.bias.normal_(0, 0.1)
    out = block(x)
    # naive: q, k, v from a 1x1 conv of the group-normed input; softmax(Q K^T / sqrt(C)) V over H W positions
    b, c, h, w = x.shape
    qkv = block.qkv(block.norm(x)).double()  # (B, 3C, H, W)
    q, k, v = qkv[:, :c].flatten(2), qkv[:, c : 2 * c].flatten(2), qkv[:, 2 * c :].flatten(2)  # (B, C, HW)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)  # (B, HW, HW)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
    expected = x.double() + F.conv2d(attended, block.proj.weight.double(), block.proj.bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
