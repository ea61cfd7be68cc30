"""Forward processes ``q(x_t | x)``: the interface (:class:`ForwardProcess`) and its diagonal Gaussian family.

The noise schedules of VDM and MuLAN (:mod:`mulan.schedules`) are diagonal processes; other learned forward
processes subclass :class:`ForwardProcess` or :class:`DiagonalProcess` directly.
"""

from mulan.processes.auxiliary import (
    ALDA,
    MALDA,
    AuxiliaryProcess,
    CriticallyDampedLangevin,
    FixedAuxiliary,
    LearnedAuxiliary,
)
from mulan.processes.base import Context, ForwardProcess, ImageShape, Marginal, Predictor, ProcessFactory
from mulan.processes.cvdm import CVDM
from mulan.processes.diagonal import DiagonalProcess
from mulan.processes.diffenc import DiffEnc

__all__ = [
    "ALDA",
    "AuxiliaryProcess",
    "Context",
    "CriticallyDampedLangevin",
    "CVDM",
    "DiagonalProcess",
    "DiffEnc",
    "FixedAuxiliary",
    "ForwardProcess",
    "ImageShape",
    "LearnedAuxiliary",
    "MALDA",
    "Marginal",
    "Predictor",
    "ProcessFactory",
]
