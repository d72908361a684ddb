"""One trainer, every method as a small strategy."""

from rrm.train.config import FEATURE_LOSSES, MATCH_INPUTS, PRECISIONS, SCHEDULES, TrainConfig
from rrm.train.methods import (
    METHODS,
    TRAINING_KNOBS,
    Knob,
    Method,
    get_method,
    knobs_of,
    may_teach,
    teacher_methods,
    tunable_methods,
)
from rrm.train.strategy import resolved_precision, resolved_schedule
from rrm.train.trainer import Callback, TrainResult, accuracy, train

__all__ = [
    "FEATURE_LOSSES",
    "MATCH_INPUTS",
    "METHODS",
    "PRECISIONS",
    "SCHEDULES",
    "TRAINING_KNOBS",
    "Callback",
    "Knob",
    "Method",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "get_method",
    "knobs_of",
    "may_teach",
    "resolved_precision",
    "resolved_schedule",
    "teacher_methods",
    "train",
    "tunable_methods",
]
