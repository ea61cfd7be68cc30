"""The old home of the callbacks, kept so that saved configs and checkpoints naming
``mulan.lightning.callbacks.<Name>`` still load. New code imports from :mod:`mulan.lightning.evaluation`,
:mod:`mulan.lightning.pictures` and :mod:`mulan.lightning.features`."""

from mulan.lightning.evaluation import EvaluationCallback as EvaluationCallback  # old path, kept for saved configs
from mulan.lightning.features import resolve_inception_weights as resolve_inception_weights  # old path, kept
from mulan.lightning.pictures import PICTURES_DIR as PICTURES_DIR  # old path, kept for mulan.cli until it moves
from mulan.lightning.pictures import PicturesCallback as PicturesCallback  # old path, kept for saved configs
from mulan.lightning.pictures import SampleWriter as SampleWriter  # old path, kept for saved configs
