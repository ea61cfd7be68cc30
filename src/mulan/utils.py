"""Small helpers shared by the pure-torch core."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def float32_region(reference: Tensor) -> Iterator[None]:
    """Disable autocast on ``reference``'s device: the code inside runs in the precision of its inputs.

    Used for the float32 islands of MATH.md section 8 (schedule, Fourier features, decoder, loss terms).
    Callers cast their inputs with ``.float()``.
    """
    device_type = reference.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield
