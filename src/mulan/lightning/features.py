"""A feature network for FID/KID on the embedded 8x8 digits, where InceptionV3 (ImageNet photos) is meaningless
and its weights cannot be downloaded: a small CNN classifier trained on scikit-learn's labelled digits.

FID with these features is the analogue of the "LeNet FID" used for MNIST: comparable between models evaluated
with the same weights file, not with Inception FIDs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.lightning.data import digits_images, split_indices


class DigitsFeatures(nn.Module):
    """``uint8 (N, C, H, W)`` images (any C; channel 0 is used, resized to 8x8) -> ``(N, 64)`` features, the
    penultimate layer of a digits classifier.

    Args:
        weights_path: the classifier's state dict. If the file does not exist and ``train_if_missing`` is set,
            the classifier is trained on the scikit-learn digits (train split of the embedded data module's
            split with ``seed``; a few seconds on a CPU) and saved there.
        train_if_missing: train and save the weights when ``weights_path`` is missing.
        seed: the data split and initialisation seed of that training.
    """

    num_features = 64

    def __init__(
        self, weights_path: str = "runs/digits_features.pt", train_if_missing: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)
        path = Path(weights_path)
        if not path.is_file():
            if not train_if_missing:
                raise FileNotFoundError(f"{path} does not exist; set train_if_missing=true to train it (seconds).")
            self.test_accuracy = train_digits_classifier(self, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": self.state_dict(), "test_accuracy": self.test_accuracy}, path)
        saved = torch.load(path, weights_only=True, map_location="cpu")
        self.load_state_dict(saved["state_dict"])
        self.test_accuracy = float(saved["test_accuracy"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> float (N, 1, 8, 8) in [0, 1]."""
        x = images[:, :1].float() / 255.0
        return x if x.shape[-2:] == (8, 8) else F.interpolate(x, size=(8, 8), mode="area")

    def forward(self, images: Tensor) -> Tensor:
        return self.body(self.prepare(images))

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.body(self.prepare(images)))


def train_digits_classifier(net: DigitsFeatures, seed: int = 0, epochs: int = 15) -> float:
    """Train ``net`` on the labelled digits (train split); return its accuracy on the test split."""
    from sklearn.datasets import load_digits

    images, labels = digits_images(), torch.from_numpy(load_digits().target)
    splits = split_indices(len(images), 0.1, 0.1, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Conv2d | nn.Linear) else None)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    train = splits["train"]
    for _ in range(epochs):
        for batch in train[torch.randperm(len(train), generator=generator)].split(64):
            loss = F.cross_entropy(net.logits(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        test = splits["test"]
        return float((net.logits(images[test]).argmax(1) == labels[test]).float().mean())
