"""Small helpers shared by the pure-torch core."""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

LIBRARY_PACKAGES = frozenset(
    {"mulan", "jsonargparse", "lightning", "lightning_fabric", "lightning_utilities", "pytorch_lightning", "torch"}
)
"""Top-level packages whose frames :func:`warn_once` skips (with the standard library's) to find the user's line."""

_warned: set[tuple[type[Warning], str]] = set()
_warned_under: object = None  # the warnings.filters list the messages in _warned were shown under


def caller_stacklevel(skip: frozenset[str] = LIBRARY_PACKAGES) -> int:
    """The ``stacklevel`` for a ``warnings.warn`` call made by the caller of this function that attributes the
    warning to the first frame outside the packages ``skip`` and the standard library: the user's script or test,
    not a line inside mulan, jsonargparse or Lightning. The outermost frame when every frame is a library's."""
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None  # the function that will call warnings.warn: level 1
    level, outermost = 1, 1
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        top = module.partition(".")[0]
        if module == "__main__" or not (top in skip or top in sys.stdlib_module_names):
            return level
        frame, outermost, level = frame.f_back, level, level + 1
    return outermost


def warn_once(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` the first time this process asks for this message, attributed to the
    user's call site (:func:`caller_stacklevel`); later calls with the same message do nothing, so building,
    loading or testing a model again does not repeat it.

    "Once" holds as long as the warning filters stay those it was shown under: inside a new
    ``warnings.catch_warnings()`` block (as pytest and ``pytest.warns`` open one per test) it is shown once again."""
    global _warned_under
    if warnings.filters is not _warned_under:
        _warned.clear()
        _warned_under = warnings.filters
    if (category, message) in _warned:
        return
    _warned.add((category, message))
    warnings.warn(message, category, stacklevel=caller_stacklevel())


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
