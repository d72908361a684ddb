"""One trainer, every method as a small strategy."""

from rrm.train.config import FEATURE_LOSSES, MATCH_INPUTS, PRECISIONS, SCHEDULES, TrainConfig
from rrm.train.methods import METHODS, Method, get_method
from rrm.train.trainer import Callback, TrainResult, accuracy, load_teacher, resolve_device, train

__all__ = [
    "FEATURE_LOSSES", "MATCH_INPUTS", "METHODS", "PRECISIONS", "SCHEDULES", "Callback", "Method", "TrainConfig",
    "TrainResult", "accuracy", "get_method", "load_teacher", "resolve_device", "train",
]
