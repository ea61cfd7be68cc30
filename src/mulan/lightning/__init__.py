"""The Lightning layer: the training task, data modules, callbacks and optimiser defaults.

Importing it imports Lightning; the pure-torch core (:mod:`mulan`) does not.
"""

from mulan.lightning.checkpoint_io import LastCheckpoint
from mulan.lightning.task import DiffusionTask

__all__ = ["DiffusionTask", "LastCheckpoint"]
