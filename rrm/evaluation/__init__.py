"""Evaluation: what to attack (:mod:`~rrm.evaluation.config`), the attacks as an evaluation runs them
(:mod:`~rrm.evaluation.crafts`), the gradient-masking checks, one function per symptom
(:mod:`~rrm.evaluation.checks`), :func:`evaluate` itself (:mod:`~rrm.evaluation.run`), its typed result
(:mod:`~rrm.evaluation.results`) and RobustBench's layout of it (:mod:`~rrm.evaluation.export`), and where a model's
robustness sits (:mod:`~rrm.evaluation.probe`).

Built on the attacks, models, data and the accuracy loop only: nothing here imports the trainer, tracking, tuning,
the jobs or the command line, nor MLflow, Optuna or DVC.
"""

from rrm.evaluation.checks import (
    CheckSubset,
    Constraint,
    check_eps_growth,
    check_more_restarts,
    check_more_steps,
    check_noise,
    check_reachable,
    check_square,
    check_transfer,
    checked,
    eps_growth_radii,
    other_class_starts,
    sanity_checks,
    sanity_warnings,
)
from rrm.evaluation.config import ATTACKS, EPS_MULTIPLES, MORE_RESTARTS, MORE_STEPS_FACTOR, TRANSFER_ATTACKS, EvalConfig
from rrm.evaluation.crafts import apgd_accuracy, crafted_on, crafts, native_apgd, noise
from rrm.evaluation.export import robustbench_json
from rrm.evaluation.probe import layer_agreement, stem_thresholds
from rrm.evaluation.results import EvalResult, headline_attack, spec_record
from rrm.evaluation.run import check_compatible, evaluate, load_for_evaluation

__all__ = [
    "ATTACKS",
    "EPS_MULTIPLES",
    "MORE_RESTARTS",
    "MORE_STEPS_FACTOR",
    "TRANSFER_ATTACKS",
    "CheckSubset",
    "Constraint",
    "EvalConfig",
    "EvalResult",
    "apgd_accuracy",
    "check_compatible",
    "check_eps_growth",
    "check_more_restarts",
    "check_more_steps",
    "check_noise",
    "check_reachable",
    "check_square",
    "check_transfer",
    "checked",
    "crafted_on",
    "crafts",
    "eps_growth_radii",
    "evaluate",
    "headline_attack",
    "layer_agreement",
    "load_for_evaluation",
    "native_apgd",
    "noise",
    "other_class_starts",
    "robustbench_json",
    "sanity_checks",
    "sanity_warnings",
    "spec_record",
    "stem_thresholds",
]
