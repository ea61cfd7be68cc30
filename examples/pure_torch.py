"""The pure-torch core without Lightning: build a model, train it with a plain loop, report bits/dim.

Nothing here imports Lightning: :mod:`mulan` (schedules, latents, the U-Net, :class:`~mulan.DiffusionModel`,
the terms of the bound, :func:`~mulan.dense_elbo`, the samplers) is plain PyTorch. The data are scikit-learn's
8x8 digits, read directly (no download).
"""

from __future__ import annotations

import torch

import mulan
from mulan.data import digits_images


# --8<-- [start:main]
def digits() -> torch.Tensor:
    """scikit-learn's 1797 digits as uint8 (1797, 1, 8, 8) (the core's embedded data helper)."""
    return digits_images()


def build_model(shape: tuple[int, int, int] = (1, 8, 8)) -> mulan.DiffusionModel:
    """A tiny MuLAN: 10-choose-3 k-hot latent, polynomial schedule, a one-block U-Net."""
    latent = mulan.KHotLatent(shape, m=10, k=3, channels=8, num_blocks=1)
    return mulan.DiffusionModel(
        shape,
        process=mulan.Polynomial(shape, latent.dim, hidden=32),
        denoiser=mulan.UNet(shape, latent.dim, channels=16, num_blocks=1, dropout=0.0),
        latent=latent,
    )


def main(steps: int = 5, batch_size: int = 32) -> dict[str, float]:
    torch.manual_seed(0)
    images = digits()
    train, test = images[:-64], images[-64:]
    model = build_model()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    model.train()
    for step in range(steps):
        batch = train[torch.randint(0, len(train), (batch_size,))]
        terms = model(batch)  # the Bound: each term (B,) in nats, by name
        loss = model.bpd(terms.total).mean()  # the training loss is the bound in bits/dim
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        print(f"step {step}: {loss.item():.3f} bits/dim")

    model.eval()
    dense = mulan.dense_elbo(model, test[:16], num_times=16)  # 16 stratified times per image
    result = {name: model.bpd(value).mean().item() for name, value in dense.as_dict().items()}
    print("dense ELBO on 16 held-out digits, bits/dim:")
    for name, value in result.items():
        print(f"  {name:<18}{value:.4f}")
    samples = mulan.ancestral_sample(model, 4, steps=8).samples  # uint8 (4, 1, 8, 8)
    print(f"4 samples (8 ancestral steps): {tuple(samples.shape)} {samples.dtype}")
    return result


# --8<-- [end:main]

if __name__ == "__main__":
    main()
