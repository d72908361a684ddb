"""Tuning a transfer method's knobs with Optuna: the robustness/accuracy trade-off measured, not guessed.

RRM's lambda decides how much natural accuracy a student trades for robustness; the KD temperature decides whether
distillation transfers robustness at all. :func:`tune` runs an Optuna study over them (and optionally the learning
rate and the epochs) and is the only place in rrm that imports optuna.

- Scoring: each trial trains with :func:`rrm.train.train` on the training split minus a stratified validation split
  (:meth:`ImageData.validation_split`), so the trainer's "test" accuracy is validation accuracy and the test split is
  never seen while choosing. After every epoch native APGD-CE attacks the first ``attack_examples`` validation
  images; the last epoch's value is the trial's adversarial accuracy. All trials train with the same seed, so they
  differ only in the knobs.
- Modes: ``pareto`` maximises (natural, adversarial) accuracy; the Pareto front is the answer (Optuna cannot prune
  multi-objective studies). ``constrained`` maximises adversarial accuracy subject to natural accuracy >=
  ``min_natural_accuracy`` (``Trial.set_constraint``) and prunes on the per-epoch APGD accuracy.
- The best trials (the front, or the best feasible ones) are then evaluated on the test split as they are: the
  model that was scored, not a re-training on the full training split, which would cost one more training per
  best trial and evaluate a model nobody scored. Results are cached in the study, so restarts do not repeat them.
- ``n_trials`` is the study's target: a worker starts a trial only while the study has fewer than ``n_trials``
  finished trials (complete, pruned, or failed by its own error) plus trials running in live workers. Restarting a
  study continues it; several workers on one storage share the target. Workers that start their last trials at
  the same instant can overshoot it by one trial each.
- Crashes: a trial left RUNNING by a dead worker on this host (its pid is gone), or never claimed by a worker for
  ``ORPHAN_SECONDS``, is marked FAIL before each trial; on database storages a heartbeat fails it after a grace period wherever its worker ran. Such trials do not
  count as finished, so the restart runs a replacement.
- Sampler: TPE (Optuna 5's default, multi-objective too; 5 random trials first) reseeded before each trial from
  (seed, trial number), so a single worker is reproducible, parallel workers draw different points and a resumed
  study does not repeat its first draws.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import json
import math
import os
import random
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from rrm.data import ImageData, load_dataset
from rrm.errors import RRMError, unknown
from rrm.evaluate import EvalConfig, apgd_accuracy, evaluate
from rrm.io import write_json
from rrm.models import Classifier, load_model
from rrm.train import Callback, TrainConfig, knobs_of, load_teacher, resolve_device, train, tunable_methods
from rrm.train.methods import get_method
from rrm.train.config import RUNTIME_OPTIONS

MODES = ("pareto", "constrained")
PRUNERS = ("median", "hyperband", "threshold", "none")
DEFAULT_STORAGE = "sqlite:///optuna.db"
STARTUP_TRIALS = 5  # random trials before TPE models the results
HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 180
SCHEMA_RACE_RETRIES = 5
# A live worker names itself on a trial milliseconds after creating it; an unnamed trial this old was orphaned.
ORPHAN_SECONDS = 30


_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class TuneConfig:
    """One study: what to tune, how to score and where to keep it. ``train`` holds every fixed training option."""

    method: str = "rrm"
    mode: str = "pareto"  # pareto | constrained
    n_trials: int = 20  # the study's target number of finished trials (see the module docstring)
    knobs: tuple[str, ...] = ()  # knobs to tune; empty: the method's (Method.tuned_by_default)
    ranges: dict = field(default_factory=dict)  # knob -> (low, high); missing knobs use the knob's default range
    min_natural_accuracy: float = 0.0  # validation natural-accuracy floor (a constraint; 0 turns it off)
    pruner: str | None = None  # median | hyperband | threshold | none; None: median (constrained), none (pareto)
    prune_below: float = 0.0  # threshold pruner: stop a trial whose APGD accuracy falls below this
    storage: str = DEFAULT_STORAGE  # sqlite:///FILE, journal:FILE (or FILE.log), postgresql://USER:PW@HOST/DB
    study_name: str | None = None  # None: METHOD-MODEL-DATASET
    seed: int = 0  # sampler seed and every trial's training seed
    validation_size: float = 0.2  # fraction of the training split held out to score trials
    attack_examples: int = 256  # validation images attacked by APGD after each epoch
    attack_steps: int = 20  # APGD iterations (1 restart) of the per-epoch score
    best_trials: int = 3  # best trials evaluated on the test split
    test_examples: int | None = None  # test images attacked in that evaluation; None: the whole test split
    test_steps: int = 50
    test_restarts: int = 1
    out_dir: str | None = None  # None: runs/tune/STUDY
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def tuned(self) -> tuple[str, ...]:
        """The tuned knobs: ``knobs`` (or the method's) plus any knob given a range, in a stable order."""
        named = self.knobs or get_method(self.method).tuned_by_default
        return tuple(dict.fromkeys([*named, *self.ranges]))

    def range_of(self, name: str) -> tuple[float, float]:
        knob = knobs_of(self.method)[name]
        return tuple(self.ranges.get(name, (knob.low, knob.high)))

    @property
    def name(self) -> str:
        return self.study_name or f"{self.method}-{self.train.model}-{Path(self.train.dataset).stem}"

    @property
    def directory(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / "tune" / self.name

    @property
    def pruner_name(self) -> str:
        return self.pruner or ("median" if self.mode == "constrained" else "none")

    def trial_config(self, params: dict, number: int) -> TrainConfig:
        knobs = knobs_of(self.method)
        values = {knobs[name].field: value for name, value in params.items()}
        return self.train.replace(method=self.method, **values, out_dir=str(self.directory / "trials" / f"{number:04d}"),
                                  resume=False, progress=False, monitor_examples=0)

    def settings(self) -> dict:
        """What a study's trials depend on; a restart must match them (n_trials and the test budget may change)."""
        base = {k: v for k, v in self.train.to_dict().items()
                if k not in (*RUNTIME_OPTIONS, "out_dir", "monitor_examples", "monitor_steps")}
        return json.loads(json.dumps({
            "method": self.method, "mode": self.mode, "ranges": {k: list(self.range_of(k)) for k in self.tuned},
            "min_natural_accuracy": self.min_natural_accuracy, "pruner": self.pruner_name,
            "prune_below": self.prune_below, "seed": self.seed, "validation_size": self.validation_size,
            "attack_examples": self.attack_examples, "attack_steps": self.attack_steps, "train": base}))

    def validate(self) -> "TuneConfig":
        """Raise :class:`RRMError` naming the bad value and the fix; returns self for chaining."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise RRMError(message)

        if self.method not in tunable_methods():
            raise unknown("tuning method", self.method, tunable_methods())
        if self.mode not in MODES:
            raise unknown("tuning mode", self.mode, MODES)
        if self.pruner is not None and self.pruner not in PRUNERS:
            raise unknown("pruner", self.pruner, PRUNERS)
        need(self.n_trials >= 1, f"n_trials must be >= 1, got {self.n_trials}")
        for name in (*self.knobs, *self.ranges):
            if name not in knobs_of(self.method):
                raise unknown(f"parameter to tune for {self.method!r}", name, knobs_of(self.method))
        for name in self.tuned:
            self._check_range(name)
        need(0 <= self.min_natural_accuracy < 1,
             f"min_natural_accuracy must be in [0, 1), got {self.min_natural_accuracy}")
        need(self.mode == "constrained" or self.pruner_name == "none",
             f"pruner {self.pruner_name!r} needs --mode constrained (Optuna cannot prune multi-objective studies); "
             "pass --pruner none or --mode constrained")
        need(self.pruner_name != "threshold" or 0 < self.prune_below <= 1,
             f"the threshold pruner needs prune_below in (0, 1], got {self.prune_below}")
        need(0 < self.validation_size < 1, f"validation_size must be in (0, 1), got {self.validation_size}")
        for name in ("attack_examples", "attack_steps", "best_trials", "test_steps", "test_restarts"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.test_examples is None or self.test_examples >= 1,
             f"test_examples must be >= 1 (or unset for the whole test split), got {self.test_examples}")
        need(bool(re.fullmatch(r"[\w.@+-]{1,200}", self.name)),
             f"study name {self.name!r} may hold only letters, digits and . _ - + @; pass another --study-name")
        need(bool(self.train.teacher), f"method {self.method!r} needs a teacher; pass --teacher <model file or "
                                       "models:/ URI>")
        self.train.replace(method=self.method).validate()
        return self

    def _check_range(self, name: str) -> None:
        knob = knobs_of(self.method)[name]
        bounds = self.range_of(name)
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise RRMError(f"range of {name} must be two numbers LOW,HIGH, got {bounds!r}") from None
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            what = "empty" if low == high else "inverted" if low > high else "not finite"
            raise RRMError(f"range of {name} [{low:g}, {high:g}] is {what}; pass LOW < HIGH, e.g. --range "
                           f"{name}={knob.low:g},{knob.high:g}")
        if knob.log and low <= 0:
            raise RRMError(f"range of {name} [{low:g}, {high:g}] is searched on a log scale and must be > 0; "
                           f"e.g. --range {name}={knob.low:g},{high:g}")
        if knob.integer and (low != int(low) or high != int(high)):
            raise RRMError(f"range of {name} [{low:g}, {high:g}] must be whole numbers")
        for bound in (low, high):  # the training config's own rules (alpha <= 1, epochs >= 1, ...)
            value = int(bound) if knob.integer else bound
            try:
                self.train.replace(method=self.method, **{knob.field: value}).validate()
            except RRMError as exc:
                raise RRMError(f"range of {name} [{low:g}, {high:g}]: {exc}") from None


def parse_range(text: object) -> tuple[float, float]:
    """``"1e-5,1"`` or ``[1e-5, 1]`` -> ``(1e-05, 1.0)``."""
    parts = text if isinstance(text, (list, tuple)) else str(text).strip("[]() ").split(",")
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise RRMError(f"a range is LOW,HIGH (two numbers), got {text!r}") from None
    return low, high


# -------------------------------------------------------------------------------------------------------- storage

def storage_label(url: str) -> str:
    """The storage URL without its password, fit for logs and tags."""
    return re.sub(r"(://[^:/@]+:)[^@/]*@", r"\1***@", url)


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        return Path(url[len("journal:"):].removeprefix("//"))
    return Path(url) if "://" not in url and url.endswith(".log") else None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage behind ``url``, opened now so that a bad or unreachable one fails before any trial.

    ``sqlite:///FILE`` (one process at a time), ``journal:FILE`` or ``FILE.log`` (several processes on one host),
    any SQLAlchemy URL such as ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB`` (many hosts; psycopg is a
    dependency of rrm).
    """
    label = storage_label(url)
    journal = _journal_path(url)
    if journal is not None:
        try:
            journal.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        except OSError as exc:
            raise RRMError(f"cannot open the journal file {str(journal)!r}: {exc.strerror or exc}; check the path") \
                from None
    if "://" not in url:
        if url.endswith((".db", ".sqlite", ".sqlite3")):
            url = f"sqlite:///{url}"
        else:
            raise RRMError(f"storage {label!r} is not a URL; use sqlite:///FILE.db, journal:FILE.log or "
                           "postgresql://USER:PASSWORD@HOST:PORT/DB")
    engine_kwargs: dict = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds
    try:
        for attempt in range(SCHEMA_RACE_RETRIES + 1):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the heartbeat options are marked experimental
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                      heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
            except Exception as exc:  # noqa: BLE001 - narrowed below
                # Workers started together on an empty database race to create Optuna's tables; the losers see
                # "already exists" or a duplicate key. The winner's schema is there a moment later: open again.
                text = _database_message(exc)
                if attempt == SCHEMA_RACE_RETRIES or not any(m in text for m in ("already exists", "duplicate key")):
                    raise
                time.sleep(0.5 + random.random())
    except ImportError as exc:
        driver = getattr(exc, "name", None) or str(exc)
        raise RRMError(f"storage {label} needs the database driver {driver!r}, which is not installed; install it "
                       "(PostgreSQL: pip install 'psycopg[binary]' for postgresql+psycopg://)") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many types for a bad URL or a server that is down
        text = " ".join(_database_message(exc).split())[:300]
        if "Can't load plugin" in text:
            raise RRMError(f"storage {label}: unknown database kind {url.split(':')[0]!r}; use sqlite:///FILE.db, "
                           "journal:FILE.log or postgresql://USER:PASSWORD@HOST:PORT/DB") from None
        raise RRMError(f"cannot open the Optuna storage {label}: {text}; check the URL and that the database "
                       "server is running") from None


def _database_message(exc: BaseException) -> str:
    """The database driver's own message where SQLAlchemy wrapped it (``exc.orig``), else the exception's."""
    return str(getattr(exc, "orig", None) or exc)


# ------------------------------------------------------------------------------------------------------ scoring

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
        self.last = apgd_accuracy(self.model, self.x, self.y, norm=self.norm, eps=self.eps, steps=self.steps,
                                  seed=self.seed)
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


# -------------------------------------------------------------------------------------------------------- study

@dataclass
class TuneResult:
    study_name: str
    storage: str
    out_dir: Path
    ran: list[int]  # numbers of the trials this call ran
    trials: list[dict]  # every trial of the study (see _record)
    best: list[dict]  # the best trials with their test-split scores
    files: dict[str, Path]
    finished: int  # finished trials in the study (the quantity n_trials targets)
    seconds: float
    parent_run_id: str | None = None


def _worker() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(owner: dict | None) -> bool:
    """Whether the worker running a trial is alive; only this host's processes can be checked."""
    if not owner:
        return False  # asked for but never started: its worker died at once
    if owner.get("host") != socket.gethostname():
        return True  # the database heartbeat fails it if its worker died
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finished(trial: FrozenTrial) -> bool:
    """Complete, pruned, or failed by its own error (a diverged loss, say); not abandoned by a dead worker."""
    return trial.state in _FINISHED or (trial.state == TrialState.FAIL and "rrm.error" in trial.user_attrs)


def _abandon_dead_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Mark FAIL the trials left RUNNING by workers of this host that died, and trials that never got an owner
    (their worker died between creating and starting them); returns them."""
    dead = []
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("rrm.worker")
        orphan = owner is None and (now - trial.datetime_start).total_seconds() > ORPHAN_SECONDS
        if orphan or (owner is not None and not _alive(owner)):
            with contextlib.suppress(RuntimeError, ValueError):  # another worker got there first
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                dead.append(trial)
    return dead


def _counts(study: optuna.Study) -> tuple[int, int]:
    """(finished trials, trials running in live workers)."""
    trials = study.get_trials(deepcopy=False)
    running = sum(t.state == TrialState.RUNNING and _alive(t.user_attrs.get("rrm.worker")) for t in trials)
    return sum(map(_finished, trials)), running


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


def open_study(cfg: TuneConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study or load it to resume; a study made with other settings is refused."""
    directions = ["maximize", "maximize"] if cfg.mode == "pareto" else ["maximize"]
    try:
        study = optuna.create_study(storage=storage, study_name=cfg.name, directions=directions,
                                    load_if_exists=True, sampler=TrialSeededTPE(cfg.seed), pruner=_pruner(cfg))
    except Exception as exc:  # noqa: BLE001 - a database that fails only now (read-only file, lost server)
        raise RRMError(f"cannot create or load study {cfg.name!r} in {storage_label(cfg.storage)}: "
                       f"{' '.join(str(exc).split())[:300]}") from None
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
            changed += sorted(f"train.{k}" for k in set(saved["train"]) | set(settings["train"])
                              if saved["train"].get(k) != settings["train"].get(k))
        raise RRMError(f"study {cfg.name!r} in {storage_label(cfg.storage)} was made with other settings "
                       f"({', '.join(changed)}); use the same settings to resume it, or another --study-name")
    return study


def _record(trial: FrozenTrial) -> dict:
    attrs = trial.user_attrs
    return {
        "number": trial.number, "state": trial.state.name, "params": dict(trial.params),
        "natural_accuracy": attrs.get("val_natural_accuracy"),
        "adversarial_accuracy": attrs.get("val_adversarial_accuracy"),
        "feasible": all(v <= 0 for v in trial.constraints.values()),
        "epochs": attrs.get("epochs"), "seconds": attrs.get("seconds"), "error": attrs.get("rrm.error"),
        "mlflow_run_id": attrs.get("mlflow_run_id"), "model_path": attrs.get("model_path"),
    }


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


def _test_scores(study: optuna.Study, trial: FrozenTrial, cfg: TuneConfig, data: ImageData) -> dict | None:
    """The trial's model on the test split (cached in the study); None when its model file is not on this host."""
    key = f"rrm.test.{trial.number}"
    if key in study.user_attrs:
        return study.user_attrs[key]
    path = trial.user_attrs.get("model_path")
    if not path or not Path(path).is_file():
        return None
    model, _ = load_model(path, map_location=resolve_device(cfg.train.device))
    n = len(data.test_y) if cfg.test_examples is None else min(cfg.test_examples, len(data.test_y))
    config = EvalConfig(norm=cfg.train.norm, eps=cfg.train.eps, attacks=("apgd",), n_examples=n,
                        steps=cfg.test_steps, restarts=cfg.test_restarts, sanity=True,
                        sanity_examples=min(100, n), sanity_steps=10, seed=cfg.seed)
    result = evaluate(model, data, config, progress=False)
    scores = {"natural_accuracy": result.natural_accuracy, "adversarial_accuracy": result.adversarial_accuracy["apgd"],
              "n_examples": result.n_examples, "attack": f"apgd {cfg.test_steps} steps x {cfg.test_restarts}",
              "sanity_passed": result.sanity_passed}
    study.set_user_attr(key, scores)
    return scores


def _fmt(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def tune(cfg: TuneConfig, *, track: bool = True, experiment: str = "rrm",
         log: Callable[[str], None] | None = None, teacher: Classifier | None = None) -> TuneResult:
    """Run the study until it has ``cfg.n_trials`` finished trials; evaluate its best trials on the test split;
    write ``trials.csv``, ``results.json`` and the plots to ``cfg.directory``; record it all in MLflow.

    ``teacher`` is the loaded teacher (``rrm.jobs`` resolves a registry URI); by default the file ``cfg.train.teacher``.

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

        params = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in cfg.settings().items()
                  if k != "train"}
        params.update({f"train.{k}": json.dumps(v) if isinstance(v, (dict, list)) else v
                       for k, v in cfg.settings()["train"].items()})
        parent, experiment = tracking.open_study_run(cfg.name, label, params=params, experiment=experiment)
        study.set_user_attr("mlflow_parent_run_id", parent)

    x_attack = validation.test_x[: cfg.attack_examples]
    y_attack = validation.test_y[: cfg.attack_examples]
    ran: list[int] = []

    def objective(trial: optuna.Trial):
        trial.set_user_attr("rrm.worker", _worker())
        params = {}
        for name in cfg.tuned:
            low, high = cfg.range_of(name)
            knob = knobs_of(cfg.method)[name]
            params[name] = (trial.suggest_int(name, int(low), int(high)) if knob.integer
                            else trial.suggest_float(name, low, high, log=knob.log))
        ran.append(trial.number)
        train_cfg = cfg.trial_config(params, trial.number)
        score = EpochScore(x_attack, y_attack, norm=train_cfg.norm, eps=train_cfg.eps, steps=cfg.attack_steps,
                           seed=cfg.seed)
        tracker = None
        if tracking is not None:
            tracker = tracking.MlflowCallback(
                experiment=experiment, run_name=f"trial {trial.number}", log_model=False,
                tags={"mlflow.parentRunId": parent, "rrm.kind": "trial", "optuna.study": cfg.name,
                      "optuna.trial": str(trial.number)})
        callbacks = [score, *([tracker] if tracker else []),
                     *([PruneOnScore(trial, score)] if cfg.mode == "constrained" else [])]
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

    try:
        while True:
            for dead in _abandon_dead_trials(study):
                log(f"trial {dead.number} was left running by a worker that died; marked FAIL")
                if tracking is not None and dead.user_attrs.get("mlflow_run_id"):
                    tracking.update_run(dead.user_attrs["mlflow_run_id"], tags={"optuna.state": "FAIL"},
                                        status="FAILED")
            finished, running = _counts(study)
            if finished + running >= cfg.n_trials:
                break
            before = len(ran)
            study.optimize(objective, n_trials=1, catch=(RRMError,), gc_after_trial=False)
            if len(ran) > before:
                trial = study.get_trials(deepcopy=False)[ran[-1]]
                log(_trial_line(trial, cfg, finished + _finished(trial)))
        if finished < cfg.n_trials:
            log(f"the study has {finished} of {cfg.n_trials} finished trials; {running} are running in other workers")
        result = _summarise(study, cfg, data, label, ran, started)
    except BaseException as exc:
        if parent is not None:
            with contextlib.suppress(Exception):  # already failing: keep the original error
                tracking.update_run(parent, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if parent is not None:
        result.parent_run_id = parent
        # The worker that sees the study complete ends the parent run; others leave it running.
        tracking.update_run(parent, tags=_parent_tags(result), metrics=_parent_metrics(result),
                            artifacts=list(result.files.values()),
                            status="FINISHED" if finished >= cfg.n_trials else None)
    return result


def _trial_line(trial: FrozenTrial, cfg: TuneConfig, finished: int) -> str:
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    attrs = trial.user_attrs
    scores = ""
    if attrs.get("val_natural_accuracy") is not None:
        scores += f" natural {attrs['val_natural_accuracy']:.4f}"
    if attrs.get("val_adversarial_accuracy") is not None:
        scores += f" adversarial {attrs['val_adversarial_accuracy']:.4f}"
    if attrs.get("rrm.error"):
        scores += f" ({attrs['rrm.error'][:120]})"
    return (f"trial {trial.number} {trial.state.name.lower()}: {params}{scores} "
            f"[{attrs.get('seconds', 0):.1f} s; {finished}/{cfg.n_trials} finished]")


def _summarise(study: optuna.Study, cfg: TuneConfig, data: ImageData, label: str, ran: list[int],
               started: float) -> TuneResult:
    trials = [_record(t) for t in study.get_trials(deepcopy=False)]
    best = []
    for trial in best_trials(study, cfg):
        record = _record(trial)
        record["test"] = _test_scores(study, trial, cfg, data)
        best.append(record)
    out = cfg.directory
    out.mkdir(parents=True, exist_ok=True)
    files = {"trials": out / "trials.csv", "results": out / "results.json"}
    _write_csv(files["trials"], trials, cfg.tuned)
    counts = {state.name.lower(): sum(t["state"] == state.name for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    finished = sum(map(_finished, study.get_trials(deepcopy=False)))
    write_json(files["results"], {
        "study": cfg.name, "storage": label, "method": cfg.method, "mode": cfg.mode, "target_trials": cfg.n_trials,
        "finished_trials": finished, "trials": {"total": len(trials), **counts},
        "knobs": {k: list(cfg.range_of(k)) for k in cfg.tuned}, "min_natural_accuracy": cfg.min_natural_accuracy,
        "best": {f"trial_{b['number']}": {"params": b["params"],
                                           "validation": {"natural_accuracy": b["natural_accuracy"],
                                                          "adversarial_accuracy": b["adversarial_accuracy"]},
                                           "test": b["test"]} for b in best},
    })
    from rrm.plots import plot_history, plot_knob, plot_pareto  # matplotlib only when writing

    knob = cfg.tuned[0]
    files["pareto"] = plot_pareto(trials, out / "pareto_front.png", floor=cfg.min_natural_accuracy,
                                  title=f"{cfg.name}: validation accuracy of each trial")
    files["knob"] = plot_knob(trials, knob, knobs_of(cfg.method)[knob].log, out / f"{knob}_vs_accuracy.png",
                              title=f"{cfg.name}: accuracy against {knob}")
    files["history"] = plot_history(trials, cfg.mode, out / "optimization_history.png",
                                    title=f"{cfg.name}: optimisation history")
    return TuneResult(study_name=cfg.name, storage=label, out_dir=out, ran=ran, trials=trials, best=best,
                      files=files, finished=finished, seconds=time.perf_counter() - started)


def _write_csv(path: Path, trials: list[dict], knobs: tuple[str, ...]) -> None:
    columns = ["number", "state", *knobs, "natural_accuracy", "adversarial_accuracy", "feasible", "epochs",
               "seconds", "mlflow_run_id", "error"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for t in trials:
            writer.writerow({**t, **t["params"]})


def _parent_tags(result: TuneResult) -> dict:
    return {"rrm.best_trials": json.dumps([b["number"] for b in result.best]),
            "rrm.best": json.dumps([{k: b[k] for k in ("number", "params", "natural_accuracy",
                                                       "adversarial_accuracy", "test")} for b in result.best])}


def _parent_metrics(result: TuneResult) -> dict:
    metrics = {f"trials_{state}": sum(t["state"] == state.upper() for t in result.trials)
               for state in ("complete", "pruned", "fail")}
    metrics["trials_finished"] = result.finished
    if result.best:
        top = result.best[0]
        metrics.update(best_val_natural_accuracy=top["natural_accuracy"],
                       best_val_adversarial_accuracy=top["adversarial_accuracy"])
        if top["test"]:
            metrics.update(best_test_natural_accuracy=top["test"]["natural_accuracy"],
                           best_test_adversarial_accuracy=top["test"]["adversarial_accuracy"])
    return metrics
