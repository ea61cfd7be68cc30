"""Forward processes ``q(x_t | x)``: the interface (:class:`ForwardProcess`, :mod:`~mulan.processes.base`), its
diagonal Gaussian family (:class:`DiagonalProcess`), the noise schedules of VDM and MuLAN
(:mod:`mulan.processes.schedules`, diagonal processes), and the learned processes (CVDM, DiffEnc, the auxiliary
family). Other forward processes subclass :class:`ForwardProcess` or :class:`DiagonalProcess` directly.
"""

from mulan.processes.auxiliary import (
    ALDA,
    MALDA,
    AuxiliaryProcess,
    CriticallyDampedLangevin,
    FixedAuxiliary,
    LearnedAuxiliary,
)
from mulan.processes.base import (
    GAMMA_MAX,
    GAMMA_MIN,
    Context,
    ForwardProcess,
    ImageShape,
    Marginal,
    Predictor,
    ProcessFactory,
)
from mulan.processes.cvdm import CVDM
from mulan.processes.diagonal import DiagonalProcess
from mulan.processes.diffenc import DiffEnc
from mulan.processes.schedules import FixedLinear, LearnedScalar, MonotoneNN, NoiseSchedule, Polynomial

__all__ = [
    "GAMMA_MAX",
    "GAMMA_MIN",
    "ALDA",
    "AuxiliaryProcess",
    "Context",
    "CriticallyDampedLangevin",
    "CVDM",
    "DiagonalProcess",
    "DiffEnc",
    "FixedAuxiliary",
    "FixedLinear",
    "ForwardProcess",
    "ImageShape",
    "LearnedAuxiliary",
    "LearnedScalar",
    "MALDA",
    "Marginal",
    "MonotoneNN",
    "NoiseSchedule",
    "Polynomial",
    "Predictor",
    "ProcessFactory",
]
