"""Running a study: the sampler and pruners, the objective that trains and scores a trial, and the best trials.

- Scoring: each trial trains with :func:`rrm.train.train` on the training split minus a stratified validation split
  (:meth:`ImageData.validation_split`), so the trainer's "test" accuracy is validation accuracy and the test split is
  never seen while choosing. After every epoch native APGD-CE (:func:`rrm.evaluation.apgd_accuracy`) attacks the first
  ``attack_examples`` validation images; the last epoch's value is the trial's adversarial accuracy. All trials
  train with the same seed, so they differ only in the knobs.
- The best trials (the front, or the best feasible ones) are then evaluated on the test split by
  :func:`rrm.evaluation.evaluate` as they are: the model that was scored, not a re-training on the full training
  split. Results are cached in the study, so restarts do not repeat them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from rrm.config import resolve_device
from rrm.data import ImageData, as_tensor, load_dataset
from rrm.errors import RRMError
from rrm.evaluation import EvalConfig, apgd_accuracy, evaluate
from rrm.models import Classifier, Teacher, load_model, load_teacher
from rrm.train import Callback, TrainConfig, knobs_of, train
from rrm.tune.config import TuneConfig
from rrm.tune.storage import (
    abandon_dead_trials,
    is_finished,
    open_storage,
    storage_label,
    storage_lost,
    this_worker,
    trial_counts,
)
from rrm.tune.summary import (
    TuneResult,
    parent_best_params,
    parent_metrics,
    parent_params,
    parent_tags,
    summarise,
    trial_line,
    trial_record,
)

STARTUP_TRIALS = 5  # random trials before TPE models the results


class EpochScore(Callback):
    """After each epoch: APGD accuracy on fixed validation images, added to the epoch's metrics as
    ``val_apgd_accuracy`` (so the history and a tracking callback after this one record it)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, steps: int, seed: int):
        self.x, self.y, self.norm, self.eps, self.steps, self.seed = x, y, norm, eps, steps, seed
        self.model = None
        self.last: float | None = None
        self.epochs = 0

    def on_train_start(self, cfg, data, model) -> None:
        self.model = model

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.last = apgd_accuracy(
            self.model, self.x, self.y, norm=self.norm, eps=self.eps, steps=self.steps, seed=self.seed
        )
        self.epochs = epoch
        metrics["val_apgd_accuracy"] = self.last


class PruneOnScore(Callback):
    """Feed the epoch's APGD accuracy to the study's pruner; raise ``optuna.TrialPruned`` when it says stop."""

    def __init__(self, trial: optuna.Trial, score: EpochScore):
        self.trial, self.score = trial, score

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.trial.report(self.score.last, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"APGD accuracy {self.score.last:.4f} after epoch {epoch}")


def _pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    name = cfg.pruner_name
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=cfg.prune_below)
    return optuna.pruners.NopPruner()


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE, reseeded before each trial from (seed, trial number).

    Trial numbers are unique across workers and restarts, so one worker is reproducible, workers that start
    together draw different points, and a resumed study does not repeat its first draws. The seed is hashed:
    numpy's first draws for consecutive seeds are close (0.55, 0.42, 0.44, 0.55 for seeds 0-3).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._tpe = self._for(0)

    def _for(self, number: int) -> optuna.samplers.TPESampler:
        digest = hashlib.sha256(f"{self.seed}:{number}".encode()).digest()
        return optuna.samplers.TPESampler(seed=int.from_bytes(digest[:4], "little"), n_startup_trials=STARTUP_TRIALS)

    def before_trial(self, study, trial) -> None:
        self._tpe = self._for(trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)


def objective_names(mode: str) -> list[str]:
    """What each objective of a study is: validation APGD accuracy, with natural accuracy first in pareto mode."""
    return ["val_natural_accuracy", "val_apgd_accuracy"] if mode == "pareto" else ["val_apgd_accuracy"]


def open_study(cfg: TuneConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study or load it to resume; a study made with other settings is refused."""
    directions = ["maximize", "maximize"] if cfg.mode == "pareto" else ["maximize"]
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=cfg.name,
            directions=directions,
            load_if_exists=True,
            sampler=TrialSeededTPE(cfg.seed),
            pruner=_pruner(cfg),
        )
    except Exception as exc:
        raise RRMError(
            f"cannot create or load study {cfg.name!r} in {storage_label(cfg.storage)}: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from None
    settings = cfg.settings()
    saved = study.user_attrs.get("rrm.settings")
    if saved is not None and isinstance(saved.get("train"), dict):
        # A study made before a training option existed ran with that option's default.
        defaults = json.loads(json.dumps(TrainConfig().to_dict()))
        saved = {**saved, "train": {**{k: defaults[k] for k in settings["train"] if k in defaults}, **saved["train"]}}
    if saved is None:
        study.set_user_attr("rrm.settings", settings)
    elif saved != settings:
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if "train" in changed:
            changed.remove("train")
            changed += sorted(
                f"train.{k}"
                for k in set(saved["train"]) | set(settings["train"])
                if saved["train"].get(k) != settings["train"].get(k)
            )
        raise RRMError(
            f"study {cfg.name!r} in {storage_label(cfg.storage)} was made with other settings "
            f"({', '.join(changed)}); use the same settings to resume it, or another --study-name"
        )
    names = objective_names(cfg.mode)
    if study.metric_names != names:  # Optuna's plots and optuna-dashboard label the objectives with them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    return study


def best_trials(study: optuna.Study, cfg: TuneConfig) -> list[FrozenTrial]:
    """The Pareto front (pareto) or the best feasible trials (constrained), most robust first, at most
    ``cfg.best_trials``."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if cfg.mode == "pareto":
        chosen = study.best_trials if complete else []
    else:
        chosen = [t for t in complete if all(v <= 0 for v in t.constraints.values())]
    key = (lambda t: (t.values[1], t.values[0])) if cfg.mode == "pareto" else (lambda t: t.value)
    return sorted(chosen, key=key, reverse=True)[: cfg.best_trials]


def scores_on_test_split(study: optuna.Study, trial: FrozenTrial, cfg: TuneConfig, data: ImageData) -> dict | None:
    """The trial's model on the test split (cached in the study); None when its model file is not on this host."""
    key = f"rrm.test.{trial.number}"
    if key in study.user_attrs:
        return study.user_attrs[key]
    path = trial.user_attrs.get("model_path")
    if not path or not Path(path).is_file():
        return None
    model, _ = load_model(path, map_location=resolve_device(cfg.train.device))
    n = len(data.test_y) if cfg.test_examples is None else min(cfg.test_examples, len(data.test_y))
    config = EvalConfig(
        norm=cfg.train.norm,
        eps=cfg.train.eps,
        attacks=("apgd",),
        n_examples=n,
        steps=cfg.test_steps,
        restarts=cfg.test_restarts,
        sanity=True,
        sanity_examples=min(100, n),
        sanity_steps=10,
        seed=cfg.seed,
    )
    result = evaluate(model, data, config, progress=False)
    scores = {
        "natural_accuracy": result.natural_accuracy,
        "adversarial_accuracy": result.adversarial_accuracy["apgd"],
        "n_examples": result.n_examples,
        "attack": f"apgd {cfg.test_steps} steps x {cfg.test_restarts}",
        "sanity_passed": result.sanity_passed,
    }
    study.set_user_attr(key, scores)
    return scores


def _objective(
    cfg: TuneConfig,
    validation: ImageData,
    teacher: Teacher | Classifier,
    ran: list[int],
    tracking,
    experiment: str,
    parent: str | None,
) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    """The study's objective: train a trial on ``validation``'s training part and score it; each trial it starts
    is appended to ``ran``. ``tracking`` is :mod:`rrm.tracking` (each trial a child run of ``parent``) or None."""
    # the teacher as each trial's run records it, resolved once by the job (a file loaded here is looked up per run)
    record = dataclasses.replace(teacher, model=None) if isinstance(teacher, Teacher) else None
    x_attack = as_tensor(validation.test_x[: cfg.attack_examples])
    y_attack = validation.test_y[: cfg.attack_examples]

    def objective(trial: optuna.Trial):
        trial.set_user_attr("rrm.worker", this_worker())
        params = {}
        for name in cfg.tuned:
            low, high = cfg.range_of(name)
            knob = knobs_of(cfg.method)[name]
            params[name] = (
                trial.suggest_int(name, int(low), int(high))
                if knob.integer
                else trial.suggest_float(name, low, high, log=knob.log)
            )
        ran.append(trial.number)
        train_cfg = cfg.trial_config(params, trial.number)
        score = EpochScore(
            x_attack, y_attack, norm=train_cfg.norm, eps=train_cfg.eps, steps=cfg.attack_steps, seed=cfg.seed
        )
        tracker = None
        if tracking is not None:
            tracker = tracking.MlflowCallback(
                experiment=experiment,
                run_name=f"trial {trial.number}",
                log_model=False,
                teacher=record,
                tags={
                    "mlflow.parentRunId": parent,
                    "rrm.kind": "trial",
                    "optuna.study": cfg.name,
                    "optuna.trial": str(trial.number),
                },
            )
        callbacks = [
            score,
            *([tracker] if tracker else []),
            *([PruneOnScore(trial, score)] if cfg.mode == "constrained" else []),
        ]
        begun = time.perf_counter()

        def finish(state: str, **metrics: float) -> None:
            trial.set_user_attr("seconds", time.perf_counter() - begun)
            trial.set_user_attr("epochs", score.epochs)
            if tracker is not None and tracker.run_id:
                trial.set_user_attr("mlflow_run_id", tracker.run_id)
                tracking.update_run(tracker.run_id, tags={"optuna.state": state}, metrics=metrics)

        with tracker if tracker is not None else contextlib.nullcontext():
            try:
                result = train(train_cfg, data=validation, teacher=teacher, callbacks=callbacks)
            except optuna.TrialPruned as exc:
                if score.last is not None:
                    trial.set_user_attr("val_adversarial_accuracy", score.last)
                finish("PRUNED")
                if tracker is not None:
                    tracker.stop(f"pruned: {exc}")
                raise
            except Exception as exc:
                trial.set_user_attr("rrm.error", " ".join(f"{type(exc).__name__}: {exc}".split())[:500])
                finish("FAIL")
                raise
        natural, adversarial = result.summary["test_accuracy"], score.last
        trial.set_user_attr("val_natural_accuracy", natural)
        trial.set_user_attr("val_adversarial_accuracy", adversarial)
        trial.set_user_attr("model_path", str(result.model_path.resolve()))
        if cfg.min_natural_accuracy > 0:
            trial.set_constraint("natural_floor", cfg.min_natural_accuracy - natural)
        finish("COMPLETE", val_natural_accuracy=natural, val_adversarial_accuracy=adversarial)
        return (natural, adversarial) if cfg.mode == "pareto" else adversarial

    return objective


def tune(
    cfg: TuneConfig,
    *,
    track: bool = True,
    experiment: str = "rrm",
    log: Callable[[str], None] | None = None,
    teacher: Teacher | Classifier | None = None,
) -> TuneResult:
    """Run the study until it has ``cfg.n_trials`` finished trials; evaluate its best trials on the test split;
    write ``trials.csv``, ``results.json`` and the plots to ``cfg.directory``; record it all in MLflow.

    ``teacher`` is the teacher as ``rrm.jobs`` resolved it (or a loaded model); by default the file
    ``cfg.train.teacher``.

    Everything that can be wrong with the input (ranges, names, data, teacher, storage, a study made with other
    settings) raises :class:`RRMError` before the first trial.
    """
    started = time.perf_counter()
    log = log or (lambda line: None)
    cfg.validate()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.train.dataset)
    validation = data.validation_split(cfg.validation_size, cfg.seed)
    teacher = teacher if teacher is not None else load_teacher(cfg.train.teacher, device)
    storage = open_storage(cfg.storage)
    study = open_study(cfg, storage)
    label = storage_label(cfg.storage)
    tracking = None
    parent = None
    if track:
        from rrm import tracking  # MLflow only when tracking

        parent, experiment = tracking.open_study_run(cfg.name, label, params=parent_params(cfg), experiment=experiment)
        study.set_user_attr("mlflow_parent_run_id", parent)

    ran: list[int] = []
    objective = _objective(cfg, validation, teacher, ran, tracking, experiment, parent)
    try:
        while True:
            for dead in abandon_dead_trials(study):
                log(f"trial {dead.number} was left running by a worker that died; marked FAIL")
                if tracking is not None and dead.user_attrs.get("mlflow_run_id"):
                    tracking.update_run(
                        dead.user_attrs["mlflow_run_id"], tags={"optuna.state": "FAIL"}, status="FAILED"
                    )
            finished, running = trial_counts(study)
            if finished + running >= cfg.n_trials:
                break
            before = len(ran)
            study.optimize(objective, n_trials=1, catch=(RRMError,), gc_after_trial=False)
            if len(ran) > before:
                trial = study.get_trials(deepcopy=False)[ran[-1]]
                log(trial_line(trial, cfg, finished + is_finished(trial)))
        if finished < cfg.n_trials:
            log(f"the study has {finished} of {cfg.n_trials} finished trials; {running} are running in other workers")
        best = [{**trial_record(t), "test": scores_on_test_split(study, t, cfg, data)} for t in best_trials(study, cfg)]
        result = summarise(study, cfg, best, label, ran, started)
    except BaseException as exc:
        if parent is not None:
            with contextlib.suppress(Exception):  # already failing: keep the original error
                tracking.update_run(parent, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        lost = storage_lost(exc, label)
        if lost is not None:
            raise lost from None
        raise
    if parent is not None:
        result.parent_run_id = parent
        # The worker that sees the study complete ends the parent run; others leave it running.
        tracking.update_run(
            parent,
            tags=parent_tags(result),
            params=parent_best_params(result) if finished >= cfg.n_trials else None,  # final values only
            metrics=parent_metrics(result, cfg.mode),
            artifacts=list(result.files.values()),
            status="FINISHED" if finished >= cfg.n_trials else None,
        )
    return result
