"""The training loss of VDM and MuLAN compiles as one graph (``torch.compile(fullgraph=True)``: a graph break is an
error) and gives the eager loss and gradients.

The models are those of ``tests/conf/vdm_tiny.yaml`` and ``tests/conf/mulan_tiny.yaml`` built in Python (the digits'
1x8x8 images). Graph breaks are Dynamo's: the ``eager`` backend (Dynamo's trace, run eagerly: ~6 s a model) finds
every one; ``aot_eager`` (slow: ~16 s a model) also traces the backward with AOTAutograd, as inductor would, without
code generation. Both run the traced ops eagerly and draw the random numbers (times, noise, the latent's
perturbation) from the same generator in the same order as eager, so one seed gives both the same draws.

The compiled graph evaluates the reconstruction term over all 256 bins (the eager step uses the window of
``elbo.decoder_window``, which needs a host read of ``gamma_0``): the same value to float32 rounding, so the losses
are compared to 1e-6 relative rather than bitwise.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mulan.latents import KHotLatent
from mulan.model import DiffusionModel, build_model
from mulan.networks import UNet
from mulan.processes.schedules import LearnedScalar, Polynomial

IMAGE_SHAPE = (1, 8, 8)  # the digits data of the tiny configs
BATCH = 8


def tiny_model(kind: str) -> DiffusionModel:
    """The model of ``tests/conf/<kind>_tiny.yaml``, seeded."""
    torch.manual_seed(0)
    if kind == "vdm":
        return build_model(IMAGE_SHAPE, functools.partial(UNet, channels=16, num_blocks=1, dropout=0.0), LearnedScalar)
    return build_model(
        IMAGE_SHAPE,
        functools.partial(UNet, channels=16, num_blocks=1, dropout=0.0, gamma_conditioning="map"),
        functools.partial(Polynomial, hidden=32),
        functools.partial(KHotLatent, m=10, k=3, channels=8, num_blocks=1),
    )


def loss_and_grads(model: DiffusionModel, step, images: torch.Tensor, **given) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean bits/dim of ``step(images, **given)`` drawn from seed 1, and the flattened gradient of every
    parameter (zeros where a parameter gets none)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = step(images, **given)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return loss.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize(
    ("kind", "backend"),
    [
        ("vdm", "eager"),
        ("mulan", "eager"),
        pytest.param("vdm", "aot_eager", marks=pytest.mark.slow),
        pytest.param("mulan", "aot_eager", marks=pytest.mark.slow),
    ],
)
def test_training_loss_compiles_as_one_graph_and_equals_eager(kind: str, backend: str) -> None:
    model = tiny_model(kind).train()
    for p in model.parameters():  # the zero-initialised output layers: give every parameter a gradient
        if not p.detach().any():
            torch.nn.init.normal_(p, std=0.05)
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (BATCH, *IMAGE_SHAPE), dtype=torch.uint8, generator=generator)

    def step(images: torch.Tensor, **given) -> torch.Tensor:
        return model.bpd(model(images, **given).total).mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)  # a graph break raises here
    # the time sampler's draws (default) and, for MuLAN, times and noise given by the caller (the check_times path)
    cases = [{}]
    if kind == "mulan":
        shape = (BATCH, *model.process.state_shape)
        cases.append(
            {
                "t": torch.rand(BATCH, generator=generator),
                "eps": torch.randn(shape, generator=generator),
                "recon_noise": torch.randn((BATCH, *IMAGE_SHAPE), generator=generator),
            }
        )
    for given in cases:
        eager_loss, eager_grad = loss_and_grads(model, step, images, **given)
        compiled_loss, compiled_grad = loss_and_grads(model, compiled, images, **given)
        assert torch.isfinite(eager_loss) and bool(eager_grad.abs().sum() > 0)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0.0)
        relative = float((compiled_grad - eager_grad).norm() / eager_grad.norm())
        assert relative < 1e-5, relative
