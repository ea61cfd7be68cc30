"""A custom latent encoder: a one-hot (categorical) ``z`` with its exact KL.

``q(z | x)`` is a categorical distribution over ``m`` classes with probabilities ``softmax(l(x))``; the prior
is uniform. Unlike the k-hot latent, whose honest cost is the bound ``log C(m, k)``, the KL of a categorical
posterior has a closed form, ``KL(q || Uniform(m)) = log m - H(q)``, so here ``kl`` is exact (and equals the
reference code's surrogate, which is the right KL only for ``k = 1``).

Training draws ``z`` by the Gumbel-max trick (an exact sample of ``q``) and passes gradients with the
straight-through Gumbel-softmax estimator. A latent is built as ``Latent(image_shape, **options)`` and
returns a :class:`mulan.latents.LatentSample`; the model sizes schedule and denoiser from ``self.dim``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.latents import Latent, LatentSample
from mulan.processes import ImageShape


# --8<-- [start:CategoricalLatent]
class CategoricalLatent(Latent):
    """One-hot ``z`` of ``m`` classes from a small convolutional encoder; exact KL to the uniform prior.

    Args:
        image_shape: ``(C, H, W)`` of the data.
        m: number of classes (the size of ``z``).
        channels: width of the encoder.
        temperature: temperature of the Gumbel-softmax relaxation used for the gradients.
    """

    def __init__(self, image_shape: ImageShape, m: int = 8, channels: int = 16, temperature: float = 1.0) -> None:
        super().__init__()
        self.dim, self.temperature = m, temperature
        self.encoder = nn.Sequential(
            nn.Conv2d(image_shape[0], channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, m),
        )

    def forward(self, x: Tensor) -> LatentSample:
        logits = self.encoder(x).float()  # (B, m)
        log_q = F.log_softmax(logits, -1)
        kl = (log_q.exp() * log_q).sum(-1) + math.log(self.dim)  # log m - H(q), exact, (B,) nats
        if self.training:
            z = F.gumbel_softmax(logits, tau=self.temperature, hard=True)  # one-hot forward, soft backward
        else:
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-10, 1.0)))
            z = F.one_hot((logits + gumbel).argmax(-1), self.dim).float()
        return LatentSample(z, kl, kl)

    def sample_prior(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        return F.one_hot(torch.randint(0, self.dim, (batch_size,), device=device), self.dim).float()


# --8<-- [end:CategoricalLatent]


def main(steps: int = 3) -> dict[str, float]:
    """Train a tiny MuLAN-style model whose schedule adapts to a categorical ``z`` (pure torch)."""
    from examples.pure_torch import digits
    from mulan.model import DiffusionModel
    from mulan.networks import UNet
    from mulan.processes.schedules import Polynomial

    torch.manual_seed(0)
    shape = (1, 8, 8)
    latent = CategoricalLatent(shape, m=8)
    model = DiffusionModel(
        shape,
        process=Polynomial(shape, latent.dim, hidden=32),
        denoiser=UNet(shape, latent.dim, channels=16, num_blocks=1, dropout=0.0),
        latent=latent,
    )
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = digits()[:64]
    for step in range(steps):
        terms = model(images[16 * step % 64 :][:16])
        loss = model.bpd(terms.total).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        print(f"step {step}: {loss.item():.3f} bits/dim, latent {model.bpd(terms.latent).mean().item():.4f}")
    grad = sum(p.grad.abs().sum().item() for p in latent.parameters() if p.grad is not None)
    return {"bpd": loss.item(), "encoder_grad": grad}


if __name__ == "__main__":
    main()
