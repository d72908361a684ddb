"""Tuning a transfer method's knobs with Optuna: the robustness/accuracy trade-off measured, not guessed.

RRM's lambda decides how much natural accuracy a student trades for robustness; the KD temperature decides whether
distillation transfers robustness at all. :func:`tune` runs an Optuna study over them (and optionally the learning
rate and the epochs); this package is the only place in rrm that imports optuna. One module per job:
:mod:`~rrm.tune.config` (what to tune), :mod:`~rrm.tune.storage` (where the study lives, dead workers),
:mod:`~rrm.tune.study` (the objective and the run) and :mod:`~rrm.tune.summary` (the files and the parent run).

- Modes: ``pareto`` maximises (natural, adversarial) validation accuracy; the Pareto front is the answer (Optuna
  cannot prune multi-objective studies). ``constrained`` maximises adversarial accuracy subject to natural accuracy
  >= ``min_natural_accuracy`` (``Trial.set_constraint``) and prunes on the per-epoch APGD accuracy.
- ``n_trials`` is the study's target: a worker starts a trial only while the study has fewer than ``n_trials``
  finished trials (complete, pruned, or failed by its own error) plus trials running in live workers. Restarting a
  study continues it; several workers on one storage share the target. Workers that start their last trials at
  the same instant can overshoot it by one trial each.
- Sampler: TPE (Optuna 5's default, multi-objective too; 5 random trials first) reseeded before each trial from
  (seed, trial number), so a single worker is reproducible, parallel workers draw different points and a resumed
  study does not repeat its first draws.
"""

import importlib

from rrm.tune.config import DEFAULT_STORAGE, MODES, PRUNERS, TuneConfig, parse_range

# The rest loads optuna, so it is imported on first use: the command line reads the configuration above without it.
_LAZY = {
    "open_storage": "storage",
    "storage_label": "storage",
    "EpochScore": "study",
    "PruneOnScore": "study",
    "TrialSeededTPE": "study",
    "best_trials": "study",
    "open_study": "study",
    "tune": "study",
    "TuneResult": "summary",
}

__all__ = ["DEFAULT_STORAGE", "MODES", "PRUNERS", "TuneConfig", "parse_range", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"rrm.tune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'rrm.tune' has no attribute {name!r}")
