"""Small helpers shared by the pure-torch core."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def float32_region(reference: Tensor) -> Iterator[None]:
    """Disable autocast on ``reference``'s device: the code inside runs in the precision of its inputs.

    Used for the float32 islands of the math page's section 8 (schedule, Fourier features, decoder, loss terms).
    Callers cast their inputs with ``.float()``.
    """
    device_type = reference.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


@contextlib.contextmanager
def progress_bar(total: float, description: str, enabled: bool) -> Iterator[Callable[..., None]]:
    """A transient ``rich`` progress bar with an ETA; yields ``advance(amount=1)`` (a no-op when not ``enabled``)."""
    if not enabled:
        yield lambda amount=1.0: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda amount=1.0: bar.advance(task, amount)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU when it has neither)."""
    tensor: Tensor | None = next(module.parameters(), None)
    tensor = tensor if tensor is not None else next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
