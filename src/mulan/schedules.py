"""The old home of the noise schedules, now :mod:`mulan.processes.schedules`: kept so that saved configurations and
checkpoints naming ``mulan.schedules.<Class>`` still load. New code imports from :mod:`mulan.processes.schedules`."""

from mulan.processes.schedules import GAMMA_MAX as GAMMA_MAX  # old path, kept for saved configs
from mulan.processes.schedules import GAMMA_MIN as GAMMA_MIN  # old path, kept for saved configs
from mulan.processes.schedules import FixedLinear as FixedLinear  # old path, kept for saved configs
from mulan.processes.schedules import LearnedScalar as LearnedScalar  # old path, kept for saved configs
from mulan.processes.schedules import MonotoneNN as MonotoneNN  # old path, kept for saved configs
from mulan.processes.schedules import NoiseSchedule as NoiseSchedule  # old path, kept for saved configs
from mulan.processes.schedules import Polynomial as Polynomial  # old path, kept for saved configs
from mulan.processes.schedules import ScheduleFactory as ScheduleFactory  # old path, kept for saved configs
