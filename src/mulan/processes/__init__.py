"""Forward processes ``q(x_t | x)``: the interface (:class:`ForwardProcess`) and its diagonal Gaussian family.

The noise schedules of VDM and MuLAN (:mod:`mulan.schedules`) are diagonal processes; other learned forward
processes subclass :class:`ForwardProcess` or :class:`DiagonalProcess` directly.
"""

from mulan.processes.base import Context, ForwardProcess, ImageShape, Marginal, Predictor, ProcessFactory
from mulan.processes.diagonal import DiagonalProcess

__all__ = [
    "Context",
    "DiagonalProcess",
    "ForwardProcess",
    "ImageShape",
    "Marginal",
    "Predictor",
    "ProcessFactory",
]
