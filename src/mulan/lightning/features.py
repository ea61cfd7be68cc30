"""Feature networks for FID/KID: torch-fidelity's InceptionV3 weights, found and checked before a run starts
(:func:`resolve_inception_weights`), and networks that run offline, where those weights cannot be downloaded (or,
for 8x8 digits, mean nothing): small CNNs trained in seconds on the embedded data and saved to a weights file.

* :class:`DigitsFeatures`: a classifier of scikit-learn's labelled digits (the analogue of MNIST's "LeNet FID").
* :class:`PhotoFeatures`: a network trained to tell which photo, and which cell of a grid over it, a crop of
  scikit-learn's sample photos comes from (for the photo crops, which have no other labels).

FIDs with these features are comparable between models evaluated with the same weights file, never with
Inception FIDs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mulan.lightning.data import EmbeddedDataModule, digits_images, split_indices

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def resolve_inception_weights(path: str | None) -> str:
    """The path of torch-fidelity's InceptionV3 weights, checked to exist and to load with ``weights_only=True``.

    Without ``path``, torch's hub cache (where torch-fidelity would download them) is used. Offline and
    without the file this raises at once, with where to put it, instead of failing after hours of training.
    torch-fidelity itself loads the file with ``weights_only=False``; loading it here first with
    ``weights_only=True`` refuses a file that holds anything but tensors before that happens.
    """
    candidate = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not candidate.is_file():
        raise FileNotFoundError(
            f"FID/KID need torch-fidelity's InceptionV3 weights, not found at {candidate}. This machine cannot "
            f"download them at run time: fetch {INCEPTION_URL} elsewhere, then either pass "
            f"feature_extractor_weights_path=/path/to/{INCEPTION_FILE} to the EvaluationCallback, or copy the "
            f"file to {Path(torch.hub.get_dir()) / 'checkpoints'}/. Or set fid: false."
        )
    try:
        torch.load(candidate, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"{candidate} is not a plain InceptionV3 state dict ({type(exc).__name__}: {exc}).") from exc
    return str(candidate)


def inception_features(weights_path: str | None = None) -> nn.Module:
    """torch-fidelity's InceptionV3 as torchmetrics runs it for FID/KID: uint8 (N, 3, H, W) -> (N, 2048) pool
    features, from the weights :func:`resolve_inception_weights` finds (and checks) for ``weights_path``."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    weights = resolve_inception_weights(weights_path)
    feature = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    feature.num_features = 2048
    return feature


def rgb(images: Tensor) -> Tensor:
    """uint8 (N, 1 or 3, H, W) -> (N, 3, H, W) for Inception-style feature networks."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _load_or_train(net: nn.Module, weights_path: str, train_if_missing: bool, train: Callable[[], float]) -> float:
    """Load ``net``'s weights from ``weights_path`` (``weights_only``), first training and saving them there with
    ``train`` (which returns a test accuracy) if the file is missing and ``train_if_missing``; freeze ``net``, put
    it in eval mode and return the saved test accuracy."""
    path = Path(weights_path)
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"{path} does not exist; set train_if_missing=true to train it (seconds).")
        accuracy = train()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": net.state_dict(), "test_accuracy": accuracy}, path)
    saved = torch.load(path, weights_only=True, map_location="cpu")
    net.load_state_dict(saved["state_dict"])
    net.requires_grad_(False)
    net.eval()
    return float(saved["test_accuracy"])


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
        self.test_accuracy = _load_or_train(
            self, weights_path, train_if_missing, lambda: train_digits_classifier(self, seed)
        )

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


def photo_regions(size: int, grid: int = 4) -> Tensor:
    """The class of every crop of :func:`~mulan.data.photo_crops` (same order): which photo and which cell of a
    ``grid`` x ``grid`` partition of it the crop lies in, ``photo * grid**2 + row_cell * grid + col_cell``; (N,)."""
    labels = []
    for photo, (height, width) in enumerate(PHOTO_SIZES):
        rows, cols = height // size, width // size
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        labels.append(photo * grid**2 + (r * grid // rows) * grid + c * grid // cols)
    return torch.cat([label.reshape(-1) for label in labels])


PHOTO_SIZES = ((427, 640), (427, 640))
"""Height and width of scikit-learn's two sample photos (``china.jpg``, ``flower.jpg``)."""


class PhotoFeatures(nn.Module):
    """``uint8 (N, 3, H, W)`` images (resized to the training size) -> ``(N, 128)`` features: the penultimate layer
    of a CNN trained to tell which photo, and which cell of a 4 x 4 grid over it, a crop of scikit-learn's sample
    photos comes from (32 classes; the crops carry no other labels). Sky, roof, foliage, petals and background
    land in different classes, so the features separate the kinds of content the crops show.

    Args:
        weights_path: the network's state dict; trained on the train split of
            ``EmbeddedDataModule(source="photos", image_size=image_size, seed=seed)`` and saved there when missing
            and ``train_if_missing``.
        image_size: crop size it is trained on (a multiple of 4); other sizes are resized to it.
        train_if_missing: train and save the weights when ``weights_path`` is missing.
        seed: the data split and initialisation seed of that training.
        epochs: passes over the train split.
    """

    num_features = 128
    grid = 4

    def __init__(
        self,
        weights_path: str = "runs/photo_features.pt",
        image_size: int = 16,
        train_if_missing: bool = True,
        seed: int = 0,
        epochs: int = 30,
    ) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(f"PhotoFeatures: image_size must be a multiple of 4, got {image_size}.")
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, len(PHOTO_SIZES) * self.grid**2)

        def train() -> float:
            return train_photo_classifier(self, seed, epochs)

        self.test_accuracy = _load_or_train(self, weights_path, train_if_missing, train)

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> float (N, 3, s, s) in [-1, 1] (one channel is repeated to three)."""
        x = images.float() / 127.5 - 1.0
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        size = (self.image_size, self.image_size)
        return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="area")

    def forward(self, images: Tensor) -> Tensor:
        return self.body(self.prepare(images))

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.body(self.prepare(images)))


def train_photo_classifier(net: PhotoFeatures, seed: int = 0, epochs: int = 30) -> float:
    """Train ``net`` on the photo crops' regions (train split); return its accuracy on the test split."""
    data = EmbeddedDataModule("photos", image_size=net.image_size, seed=seed)
    images, labels = data.all_images(), photo_regions(net.image_size, net.grid)
    train, test = data.indices["train"], data.indices["test"]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Conv2d | nn.Linear) else None)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in train[torch.randperm(len(train), generator=generator)].split(64):
            flip = torch.rand(len(batch), generator=generator) < 0.5  # mirror images keep their region's content
            x = torch.where(flip[:, None, None, None], images[batch].flip(-1), images[batch])
            loss = F.cross_entropy(net.logits(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float((net.logits(images[test]).argmax(1) == labels[test]).float().mean())
