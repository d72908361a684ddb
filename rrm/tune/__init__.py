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

from rrm.tune.config import DEFAULT_STORAGE, MODES, PRUNERS, TuneConfig, parse_range
from rrm.tune.storage import open_storage, storage_label
from rrm.tune.study import EpochScore, PruneOnScore, TrialSeededTPE, best_trials, open_study, tune
from rrm.tune.summary import TuneResult

__all__ = [
    "DEFAULT_STORAGE", "MODES", "PRUNERS", "EpochScore", "PruneOnScore", "TrialSeededTPE", "TuneConfig",
    "TuneResult", "best_trials", "open_storage", "open_study", "parse_range", "storage_label", "tune",
]
