"""What a study found, written down: ``trials.csv``, ``results.json``, the plots, and the parent run's record.

The parent run's params, tags and metrics are built here as plain dicts; :mod:`rrm.tracking` records them.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from rrm.io import write_json
from rrm.secrets import mask_url
from rrm.train import TrainConfig, knobs_of
from rrm.tune.config import TuneConfig
from rrm.tune.storage import is_finished


@dataclass
class TuneResult:
    study_name: str
    storage: str
    out_dir: Path
    ran: list[int]  # numbers of the trials this call ran
    trials: list[dict]  # every trial of the study (see trial_record)
    best: list[dict]  # the best trials with their test-split scores
    files: dict[str, Path]
    finished: int  # finished trials in the study (the quantity n_trials targets)
    seconds: float
    parent_run_id: str | None = None


def trial_record(trial: FrozenTrial) -> dict:
    """A trial as the CSV, results.json and the plots read it."""
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "state": trial.state.name,
        "params": dict(trial.params),
        "natural_accuracy": attrs.get("val_natural_accuracy"),
        "adversarial_accuracy": attrs.get("val_adversarial_accuracy"),
        "feasible": all(v <= 0 for v in trial.constraints.values()),
        "epochs": attrs.get("epochs"),
        "seconds": attrs.get("seconds"),
        "error": attrs.get("rrm.error"),
        "mlflow_run_id": attrs.get("mlflow_run_id"),
        "model_path": attrs.get("model_path"),
    }


def _fmt(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_line(trial: FrozenTrial, cfg: TuneConfig, finished: int) -> str:
    """The line a worker prints when a trial ends: its values, scores and how far the study is."""
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    attrs = trial.user_attrs
    scores = ""
    if attrs.get("val_natural_accuracy") is not None:
        scores += f" natural {attrs['val_natural_accuracy']:.4f}"
    if attrs.get("val_adversarial_accuracy") is not None:
        scores += f" adversarial {attrs['val_adversarial_accuracy']:.4f}"
    if attrs.get("rrm.error"):
        scores += f" ({attrs['rrm.error'][:120]})"
    return (
        f"trial {trial.number} {trial.state.name.lower()}: {params}{scores} "
        f"[{attrs.get('seconds', 0):.1f} s; {finished}/{cfg.n_trials} finished]"
    )


def summarise(
    study: optuna.Study, cfg: TuneConfig, best: list[dict], label: str, ran: list[int], started: float
) -> TuneResult:
    """Write the study's files to ``cfg.directory``; ``best`` holds the best trials' records with their ``test``
    scores. ``label`` names the storage; a password in it is masked all the same."""
    trials = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    out = cfg.directory
    out.mkdir(parents=True, exist_ok=True)
    files = {"trials": out / "trials.csv", "results": out / "results.json"}
    _write_csv(files["trials"], trials, cfg.tuned)
    counts = {
        state.name.lower(): sum(t["state"] == state.name for t in trials)
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }
    finished = sum(map(is_finished, study.get_trials(deepcopy=False)))
    write_json(
        files["results"],
        {
            "study": cfg.name,
            "storage": mask_url(label),
            "method": cfg.method,
            "mode": cfg.mode,
            "target_trials": cfg.n_trials,
            "finished_trials": finished,
            "trials": {"total": len(trials), **counts},
            "knobs": {k: list(cfg.range_of(k)) for k in cfg.tuned},
            "min_natural_accuracy": cfg.min_natural_accuracy,
            "best": {
                f"trial_{b['number']}": {
                    "params": b["params"],
                    "validation": {
                        "natural_accuracy": b["natural_accuracy"],
                        "adversarial_accuracy": b["adversarial_accuracy"],
                    },
                    "test": b["test"],
                }
                for b in best
            },
        },
    )
    from rrm.plots import plot_history, plot_knob, plot_pareto, threat_title  # matplotlib only when writing

    knob = cfg.tuned[0]
    train = cfg.train
    threat = threat_title(Path(train.dataset).stem, train.norm, train.eps, "apgd")  # a second line: titles are long
    files["pareto"] = plot_pareto(
        trials,
        out / "pareto_front.png",
        floor=cfg.min_natural_accuracy,
        title=f"{cfg.name}: validation accuracy of each trial\n{threat}",
    )
    files["knob"] = plot_knob(
        trials,
        knob,
        knobs_of(cfg.method)[knob].log,
        out / f"{knob}_vs_accuracy.png",
        title=f"{cfg.name}: accuracy against {knob}\n{threat}",
    )
    files["history"] = plot_history(
        trials, cfg.mode, out / "optimization_history.png", title=f"{cfg.name}: optimisation history\n{threat}"
    )
    return TuneResult(
        study_name=cfg.name,
        storage=mask_url(label),
        out_dir=out,
        ran=ran,
        trials=trials,
        best=best,
        files=files,
        finished=finished,
        seconds=time.perf_counter() - started,
    )


def _write_csv(path: Path, trials: list[dict], knobs: tuple[str, ...]) -> None:
    columns = [
        "number",
        "state",
        *knobs,
        "natural_accuracy",
        "adversarial_accuracy",
        "feasible",
        "epochs",
        "seconds",
        "mlflow_run_id",
        "error",
    ]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for t in trials:
            writer.writerow({**t, **t["params"]})


def _logged(value: object) -> object:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def parent_params(cfg: TuneConfig) -> dict:
    """The study's settings as the parent run's params (``train.*`` for the fixed training options)."""
    settings = cfg.settings()
    params = {k: _logged(v) for k, v in settings.items() if k != "train"}
    # a tuned option's default never ran: its range is in `ranges`, the best trial's value in best.<name>
    tuned = {*cfg.tuned, *(TrainConfig.ALIASES.get(k, k) for k in cfg.tuned)}  # lambda is TrainConfig's lam
    params.update({f"train.{k}": _logged(v) for k, v in settings["train"].items() if k not in tuned})
    return params


def parent_best_params(result: TuneResult) -> dict:
    """The tuned values of the best trial (the most robust, in pareto mode), as ``best.<name>`` params; none when no
    trial completed (or, in constrained mode, none was feasible)."""
    return {f"best.{k}": _logged(v) for k, v in result.best[0]["params"].items()} if result.best else {}


def parent_tags(result: TuneResult) -> dict:
    return {
        "rrm.best_trials": json.dumps([b["number"] for b in result.best]),
        "rrm.best": json.dumps(
            [
                {k: b[k] for k in ("number", "params", "natural_accuracy", "adversarial_accuracy", "test")}
                for b in result.best
            ]
        ),
    }


def parent_metrics(result: TuneResult, mode: str) -> dict:
    metrics = {
        f"trials_{state}": sum(t["state"] == state.upper() for t in result.trials)
        for state in ("complete", "pruned", "fail")
    }
    metrics["trials_finished"] = result.finished
    if result.best:
        top = result.best[0]  # the most robust feasible trial, or the robust end of the Pareto front
        metrics.update(
            best_val_natural_accuracy=top["natural_accuracy"], best_val_adversarial_accuracy=top["adversarial_accuracy"]
        )
        if mode == "pareto":  # no one trial is best: each objective's best over the front, besides the robust end
            complete = [t for t in result.trials if t["state"] == "COMPLETE"]
            metrics["best_val_natural_accuracy"] = max(t["natural_accuracy"] for t in complete)
            metrics["robust_end_val_natural_accuracy"] = top["natural_accuracy"]
        if top["test"]:
            metrics.update(
                best_test_natural_accuracy=top["test"]["natural_accuracy"],
                best_test_adversarial_accuracy=top["test"]["adversarial_accuracy"],
            )
    return metrics
