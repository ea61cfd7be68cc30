"""A callback for tests/test_resume.py: the training process kills itself with SIGKILL as optimiser step
``step + 1`` starts (after step ``step``'s checkpoint was written), so the kill lands at a known point on a
loaded machine as on an idle one."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch.callbacks import Callback


class SigkillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
