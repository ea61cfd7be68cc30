"""What makes the evaluation's per-image results reproducible and resumable (docs: evaluation, "Reproducible
evaluation"): a key per image (:class:`ImageKeys`), draws seeded from them (:func:`seeded_rng`), and the on-disk
cache of a test's results (:class:`ResultCache`) under a :func:`fingerprint` of the model and the settings.
Used by :class:`mulan.lightning.evaluation.EvaluationCallback`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

CACHE_FORMAT = 3
"""Version of the on-disk layout of :class:`ResultCache` (part of the fingerprint: a new layout starts afresh)."""


def fingerprint(model: nn.Module, settings: dict) -> str:
    """A hex digest (24 characters) of everything the per-image results depend on: the evaluation ``settings``
    (JSON), the library version, the model's structure (``repr``: layers, shapes, options), the process's
    ``gamma_min`` / ``gamma_max`` (options that are not parameters) and every tensor of its ``state_dict`` (names,
    dtypes, shapes and bytes)."""
    from mulan import __version__

    digest = hashlib.sha256()
    process = getattr(model, "process", None)
    described = {
        **settings,
        "mulan": __version__,
        "structure": repr(model),
        "endpoints": [getattr(process, name, None) for name in ("gamma_min", "gamma_max")],
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{value.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class ResultCache:
    """Per-image results of one fingerprint: ``dense`` (key -> dense bits/dim) and ``ode`` (key -> the ODE figures).

    ``root`` None: in memory only. Otherwise every ``*.json`` file under ``root`` (any rank's) is read at start, and
    :meth:`save` writes each batch's new entries to a file of its own, atomically (a temporary file in the same
    directory, flushed to disk, then renamed): an interrupted run leaves whole files or none."""

    def __init__(self, root: Path | None, rank: int) -> None:
        self.root, self.rank = root, rank
        self.dense: dict[str, float] = {}
        self.ode: dict[str, dict[str, float]] = {}
        if root is None or not root.is_dir():
            return
        for path in sorted(root.glob("*.json")):
            try:
                content = json.loads(path.read_text())
            except (OSError, ValueError) as error:  # not written by this class: leave it, recompute its images
                rank_zero_info(f"EvaluationCallback: ignoring unreadable cache file {path} ({error}).")
                continue
            self.dense.update(content.get("dense", {}))
            self.ode.update(content.get("ode", {}))

    def save(self, kind: str, entries: dict) -> None:
        """Add ``entries`` (key -> value) of ``kind`` (``"dense"`` or ``"ode"``) in memory and, with a root, on disk."""
        getattr(self, kind).update(entries)
        if self.root is None or not entries:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(",".join(sorted(entries)).encode()).hexdigest()[:16]
        target = self.root / f"{kind}-rank{self.rank}-{name}.json"
        with tempfile.NamedTemporaryFile("w", dir=self.root, suffix=".tmp", delete=False) as handle:
            json.dump({kind: entries}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)


class ImageKeys:
    """Keys of the images of one stage on one rank: a hash of each image's uint8 bytes (and of its conditioning
    input), with the number of earlier images of the stage with the same bytes, so repeated images stay distinct."""

    def __init__(self) -> None:
        self._occurrences: dict[str, int] = {}

    def __call__(self, images: Tensor, y: Tensor | None) -> list[str]:
        """One key per image of ``images`` (uint8 (B, C, H, W)) and ``y`` (their conditioning inputs or None)."""
        keys = []
        images_cpu = images.detach().cpu().contiguous()
        y_cpu = None if y is None else y.detach().cpu().contiguous()
        for i in range(images_cpu.shape[0]):
            digest = hashlib.sha256(images_cpu[i].numpy().tobytes())
            if y_cpu is not None:
                digest.update(y_cpu[i].reshape(-1).view(torch.uint8).numpy().tobytes())
            base = digest.hexdigest()[:32]
            count = self._occurrences.get(base, 0)
            self._occurrences[base] = count + 1
            keys.append(f"{base}-{count}")
        return keys


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global random state (CPU and ``device``) with ``seed``; restore it after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
