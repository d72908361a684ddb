"""Jobs: what each command does, as plain functions over typed configs.

A job resolves registry URIs, loads data and models, runs the library function and records the result. The command
line, the DVC stages (through the command line) and the MLproject entry points only parse their input and call a job,
so all three behave the same. MLflow is imported only by jobs that track or read the registry.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from rrm.errors import RRMError, unknown
from rrm.evaluate import EvalConfig
from rrm.io import write_json
from rrm.results import EvalResult
from rrm.tracking.uri import check_sqlite_directory, is_local_store, tracking_uri

# MLflow retries an unreachable server 7 times with exponential backoff (minutes) and waits up to 120 s for each
# answer; jobs give up in seconds instead (under a minute for a server that accepts but never answers). Values the
# user exported win.
FAIL_FAST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
REGISTRY_SCHEMES = ("models:/", "runs:/")
# What `rrm evaluate` writes: every number with the sanity checks, or RobustBench's model_info layout.
EVALUATE_FORMATS = ("rrm", "robustbench")


@dataclass
class Tracking:
    """Whether and where a job records its run in MLflow."""

    enabled: bool = True
    experiment: str | None = "rrm"  # None: the job's default (an evaluation joins its training run's experiment)
    run_name: str | None = None  # None: the job's default name


def tracking() -> ModuleType:
    """:mod:`rrm.tracking` (and with it MLflow, seconds to import), loaded only by jobs that need it."""
    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", str(sys.stderr.isatty()).lower())
    # libpq (PostgreSQL stores): a database host that drops packets fails in seconds, not after the TCP timeout.
    os.environ.setdefault("PGCONNECT_TIMEOUT", "10")
    # MLflow prints a run's URL, password included, whenever a run on a server ends; rrm prints it masked.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from rrm import tracking as module

    if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # MLflow's INFO lines (store creation) would bury our output
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # A database store that is down: MLflow logs a traceback per failed call; rrm says it in one line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    return module


def is_registry_uri(ref: str | os.PathLike | None) -> bool:
    """Whether a model reference is a registry URI (loading it talks to MLflow) rather than a file."""
    return isinstance(ref, str) and ref.startswith(REGISTRY_SCHEMES)


def load_model_ref(ref: str | os.PathLike, device):
    """A frozen model (teacher, transfer source) from a model file or a registry URI."""
    from rrm.train import load_teacher

    if is_registry_uri(ref):
        return tracking().load_registered_model(str(ref)).to(device).eval().requires_grad_(False)
    return load_teacher(ref, device)


def teacher_file(ref: str | os.PathLike, directory: str | os.PathLike, pin: str | os.PathLike | None = None):
    """The model file of teacher ``ref`` (a file, or a registry URI pulled into ``directory``) and the registry
    version it came from (None for a file), checked against ``pin``.

    ``pin`` (``--teacher-pin``) is a model file the teacher must equal, byte for byte: a DVC stage names the copy a
    pull stage wrote as its dependency, so ``dvc repro`` reruns it when the champion changes, and the stage fails
    here, before any work, when the alias has moved since that copy was pulled.
    """
    from rrm.io import sha256_file

    version = None
    if is_registry_uri(ref):
        path, _, version = tracking().pull_teacher_version(str(ref), Path(directory) / "teacher.pt")
    else:
        path = Path(ref)
    if pin is None or not path.is_file():  # a missing teacher file: loading it says so
        return path, version
    if not Path(pin).is_file():
        raise RRMError(
            f"the pinned teacher file {str(pin)!r} does not exist; pull it: rrm teacher pull {ref} --out {pin}"
        )
    found, pinned = sha256_file(path), sha256_file(pin)
    if found != pinned:
        which = f" (version {version.version} of {version.name!r})" if version is not None else ""
        raise RRMError(
            f"the teacher {ref}{which} has sha256 {found[:12]}, not that of the pinned file {str(pin)!r} "
            f"({pinned[:12]}): the alias moved since the file was pulled; pull it again (rrm teacher pull {ref} "
            f"--out {pin}, or dvc repro --force on the pull stage) and rerun"
        )
    return path, version


def prepare_job(dataset: str, out: str | os.PathLike, options: dict):
    """Load a registered dataset and write it to one file (or shards: ``options`` holds ``shards=True``); returns the
    data and its digest."""
    from rrm.data import prepare_dataset

    return prepare_dataset(dataset, out, **options)


def train_job(cfg, track: Tracking = Tracking(), teacher_pin: str | os.PathLike | None = None):
    """Train ``cfg`` (a :class:`rrm.train.TrainConfig`), teacher resolved from the registry where it is a URI and
    checked against ``teacher_pin`` where given (:func:`teacher_file`).

    Returns the :class:`rrm.train.TrainResult` and the MLflow run id (None when not tracked, on ranks other than
    the first under torchrun: only rank 0 records the run, and when the tracking store stopped answering during
    training: the run was left unfinished, which a warning on stderr has said).
    """
    from rrm.data import load_dataset
    from rrm.models import ARCHITECTURES
    from rrm.train import get_method, train
    from rrm.train.basics import progress_shown, start_line
    from rrm.train.distributed import is_main

    cfg.validate()
    method = get_method(cfg.method)
    if cfg.model not in ARCHITECTURES:
        raise unknown("model", cfg.model, ARCHITECTURES)
    if is_main() and progress_shown(cfg.progress):  # before the store, the data and the teacher: seconds
        print(start_line(cfg), file=sys.stderr, flush=True)
    takes_teacher = method.needs_teacher or bool(cfg.transplant)
    if teacher_pin is not None and not takes_teacher:
        raise RRMError(
            f"--teacher-pin checks a teacher, and method {cfg.method!r} takes none (rrm, kd, kdiga or --transplant "
            "do); drop it"
        )
    # A store that does not answer fails now, before data and model load. A local store (SQLite) cannot go away:
    # MLflow is imported and the run started by a worker process while the data loads and the training runs.
    local = is_local_store(tracking_uri())
    if track.enabled and is_main():
        if local:
            check_sqlite_directory(tracking_uri())
        else:
            tracking().store.check_store("starting the MLflow run")
    with tempfile.TemporaryDirectory() as tmp:
        # a file teacher is loaded by the trainer (after seeding); a registry one is pulled for it
        teacher, version = None, None
        if takes_teacher and cfg.teacher:
            path, version = teacher_file(cfg.teacher, tmp, teacher_pin)
            teacher = path if is_registry_uri(cfg.teacher) else None
        if not track.enabled or not is_main():
            # a fresh training is not the one a tracked run recorded: never resume that run
            if is_main() and not (cfg.resume or cfg.resume_or_start):
                (Path(cfg.out_dir) / "mlflow_run.json").unlink(missing_ok=True)  # rrm.tracking.callback.RUN_FILE
            return train(cfg, data=load_dataset(cfg.dataset), teacher=teacher), None
        from rrm.background import BackgroundCallback

        # a resumed training must know which run it continues before it goes on, a server that it answers
        wait = cfg.resume or cfg.resume_or_start or not local
        # The worker starts here (or was forked at start-up: rrm.console), before the data: MLflow loads beside the
        # data, the model and torch's compiler.
        tracker = functools.partial(_mlflow_callback, track.experiment, track.run_name, version)
        with BackgroundCallback(tracker, wait_for_start=wait) as background:
            result = train(cfg, data=load_dataset(cfg.dataset), teacher=teacher, callbacks=[background])
    recorded = background.callback
    return result, None if recorded.unfinished else recorded.run_id


def _mlflow_callback(experiment: str, run_name: str | None, teacher_version):
    """A training's MLflow callback, made in its worker (:mod:`rrm.background`; a module function, so it pickles)."""
    return tracking().MlflowCallback(experiment=experiment, run_name=run_name, teacher_version=teacher_version)


@dataclass
class RobustifyConfig:
    """Ilyas et al.'s robustified dataset: a teacher, the data and the feature-matching budget."""

    teacher: str | None = None  # a model file or a registry URI such as models:/rrm-teacher@champion
    teacher_pin: str | None = None  # a model file the teacher must equal (see teacher_file)
    dataset: str | None = None
    out: str | None = None
    steps: int = 1000
    step_size: float = 0.1
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    progress: bool | None = None


def robustify_job(cfg: RobustifyConfig):
    """Write the robustified dataset of ``cfg``; returns it."""
    from rrm.data import load_dataset
    from rrm.robustify import robustify
    from rrm.train import load_teacher, resolve_device

    require(cfg.teacher, "--teacher")
    require(cfg.dataset, "--dataset")
    require(cfg.out, "--out")
    data = load_dataset(cfg.dataset)
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_teacher(teacher_file(cfg.teacher, tmp, cfg.teacher_pin)[0], device)
    return robustify(
        model,
        data,
        cfg.out,
        steps=cfg.steps,
        step_size=cfg.step_size,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
        teacher_ref=cfg.teacher,
        progress=cfg.progress,
    )


@dataclass
class EvaluateJob:
    """One evaluation: the model, its data, where to write and what to attack (``attack``)."""

    model: str | None = None  # a model file or a registry URI
    dataset: str | None = None  # None: the dataset the model was trained on
    transfer_from: str | None = None  # the model that crafts the transfer attack: for a student, its teacher
    out: str | None = None  # None: eval_metrics.json beside a model file
    device: str = "auto"
    progress: bool | None = None
    train_run_id: str | None = None  # None: the run that logged this model file
    format: str = "rrm"  # one of EVALUATE_FORMATS
    attack: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class Evaluation:
    result: EvalResult
    out: Path
    run_id: str | None


def evaluate_job(job: EvaluateJob, track: Tracking = Tracking(experiment=None)) -> Evaluation:
    """Attack ``job.model``, write its metrics JSON and record the evaluation, linked to the training run."""
    from rrm.data import load_dataset
    from rrm.evaluate import evaluate, load_for_evaluation
    from rrm.io import sha256_file
    from rrm.train import resolve_device

    require(job.model, "MODEL (a model file or models:/NAME@ALIAS)")
    if job.out is None and is_registry_uri(job.model):
        raise RRMError(f"pass --out for the metrics of {job.model} (it has no directory to write them beside)")
    attack = job.attack.validate()
    if job.format not in EVALUATE_FORMATS:
        raise unknown("output format", job.format, EVALUATE_FORMATS)
    if job.format == "robustbench" and "autoattack" not in attack.attacks:
        raise RRMError("--format robustbench reports AutoAttack's accuracy: add autoattack to --attacks")
    device = resolve_device(job.device)
    store = tracking() if track.enabled or is_registry_uri(job.model) or is_registry_uri(job.transfer_from) else None
    if track.enabled:  # before the attack, which may take hours, not after it
        tracking().store.check_store("recording the evaluation in MLflow")
    with tempfile.TemporaryDirectory() as tmp:
        path = (
            store.pull_teacher(job.model, Path(tmp) / "model.pt")[0] if is_registry_uri(job.model) else Path(job.model)
        )
        net, meta = load_for_evaluation(path, map_location=device)
        dataset = job.dataset or (meta.get("config") or {}).get("dataset")
        require(dataset, "--dataset (the model file does not say what it was trained on)")
        data = load_dataset(dataset)
        source = load_model_ref(job.transfer_from, device) if job.transfer_from else None
        out = (
            Path(job.out)
            if job.out
            else path.with_name("eval_metrics.json" if job.format == "rrm" else "robustbench.json")
        )
        # AutoAttack's progress, beside the output: a rerun after an interruption continues from it
        result = evaluate(
            net,
            data,
            attack,
            transfer_from=source,
            progress=job.progress,
            model_sha256=sha256_file(path),
            autoattack_state=out.with_name(out.name + ".autoattack-state.json"),
        )
        if job.format == "rrm":
            result.write(out)
        else:
            write_json(out, robustbench_json(result, meta, model=str(job.model), train_run_id=job.train_run_id))
        run_id = (
            store.log_evaluation(
                result,
                model_path=path,
                train_run_id=job.train_run_id,
                experiment=track.experiment,
                metrics_path=out if job.format == "rrm" else None,
            )
            if track.enabled
            else None
        )
    return Evaluation(result, out, run_id)


def robustbench_json(result: EvalResult, meta: dict, *, model: str, train_run_id: str | None = None) -> dict:
    """``result`` in RobustBench's model_info layout (accuracies as percent strings, as its files hold them), with
    what RobustBench keeps in the directory name (threat model) and what it leaves implicit (images, source run).

    Clean accuracy is on the images AutoAttack attacked, as RobustBench's ``benchmark`` measures it. rrm trains only
    on the dataset's training split (a robustified set is made from it), so ``additional_data`` is false.
    """
    autoattack = result.autoattack or {}
    accuracy_after = autoattack.get("accuracy_after", {})
    if "autoattack" not in result.adversarial_accuracy or "clean" not in accuracy_after:
        raise RRMError("the evaluation has no AutoAttack result; run it with --attacks autoattack")
    eps = result.eps
    eps_text = f"{round(eps * 255)}/255" if eps and abs(eps * 255 - round(eps * 255)) < 1e-6 else f"{eps:g}"
    config = meta.get("config") or {}
    return {
        "link": None,
        "name": f"rrm {meta.get('method', config.get('method', '?'))} {meta.get('model', '?')}",
        "authors": None,
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": result.dataset,
        "venue": None,
        "architecture": meta.get("model", config.get("model")),
        "eps": eps_text,
        "clean_acc": f"{100 * accuracy_after['clean']:.2f}",
        "reported": None,
        "autoattack_acc": f"{100 * result.adversarial_accuracy['autoattack']:.2f}",
        "footnote": f"AutoAttack {autoattack.get('version')} ({autoattack.get('components')}; pyautoattack "
        f"{autoattack.get('package_version')}, seed {autoattack.get('seed')}) by rrm evaluate",
        "threat_model": {"linf": "Linf", "l2": "L2"}.get(result.norm or "", result.norm),
        "n_examples": autoattack.get("n_examples"),
        "source_run": {
            "model": model,
            "train_run_id": train_run_id,
            "method": meta.get("method"),
            "dataset_digest": meta.get("dataset_digest"),
        },
    }


def tune_job(cfg, track: Tracking = Tracking(), log=print):
    """Run the Optuna study ``cfg`` (a :class:`rrm.tune.TuneConfig`); returns its :class:`rrm.tune.TuneResult`."""
    from rrm.tune import tune

    teacher = None
    if is_registry_uri(cfg.train.teacher):
        from rrm.train import resolve_device

        teacher = load_model_ref(cfg.train.teacher, resolve_device(cfg.train.device))
    if track.enabled:
        tracking()
    return tune(
        cfg,
        track=track.enabled,
        experiment=track.experiment,
        log=log,
        **({"teacher": teacher} if teacher is not None else {}),
    )


@dataclass
class ReportConfig:
    """Where a pipeline's metrics are and where the report goes; paths are relative to ``root``."""

    root: str = "."
    students_dir: str = "runs/students"
    evaluations_dir: str = "metrics/students"
    teacher_dir: str = "runs/teacher"
    teacher_evaluation: str = "metrics/teacher.json"
    out_dir: str = "reports"
    attack: str | None = None  # the adversarial column: None, the strongest each evaluation ran


def report_job(cfg: ReportConfig, track: Tracking = Tracking(enabled=False)) -> dict:
    """Write the tables, plots and report.json of a pipeline's metrics; log them to MLflow when tracked."""
    from rrm.report import write_report

    out_dir = Path(cfg.out_dir)
    result = write_report(
        cfg.root,
        out_dir,
        students_dir=cfg.students_dir,
        evaluations_dir=cfg.evaluations_dir,
        teacher_dir=cfg.teacher_dir,
        teacher_evaluation=cfg.teacher_evaluation,
        attack=cfg.attack,
    )
    if track.enabled:
        tracking().log_report([out_dir / name for name in result["files"]], track.experiment or "rrm")
    return result


def require(value: object, what: str) -> None:
    """A missing input: one line naming the flag."""
    if value is None or value == () or value == "":
        raise RRMError(f"missing {what}; pass it, or set it in the --params section")


@dataclass
class ProbeConfig:
    """Where a model's robustness sits: its first layer and, given a teacher, where the two agree."""

    model: str | None = None  # a model file or a registry URI
    teacher: str | None = None  # optional: compare stage by stage with this model
    dataset: str | None = None  # None: the dataset the model was trained on
    norm: str = "linf"
    eps: float = 0.3
    n_examples: int = 200  # test images for the agreement (clean and attacked)
    steps: int = 20  # APGD iterations of the attack against the model
    seed: int = 0
    out: str | None = None  # a JSON file for the numbers


def probe_job(cfg: ProbeConfig) -> dict:
    """First-layer threshold statistics of ``cfg.model`` (and of the teacher), and their stage-by-stage agreement."""
    from rrm.attacks import check_threat
    from rrm.data import load_dataset
    from rrm.io import write_json
    from rrm.probe import layer_agreement, stem_thresholds

    require(cfg.model, "MODEL (a model file or models:/NAME@ALIAS)")
    check_threat(cfg.norm, cfg.eps)
    if cfg.n_examples < 1 or cfg.steps < 1:
        raise RRMError(f"n_examples and steps must be >= 1, got {cfg.n_examples} and {cfg.steps}")
    model = load_model_ref(cfg.model, "cpu")
    result = {
        "model": str(cfg.model),
        "norm": cfg.norm,
        "eps": cfg.eps,
        "stem": {k: v for k, v in stem_thresholds(model, cfg.eps, cfg.norm).items() if k != "per_filter"},
    }
    if cfg.teacher:
        from rrm.models import load_model

        teacher = load_model_ref(cfg.teacher, "cpu")
        result["teacher"] = str(cfg.teacher)
        result["teacher_stem"] = {
            k: v for k, v in stem_thresholds(teacher, cfg.eps, cfg.norm).items() if k != "per_filter"
        }
        dataset = cfg.dataset
        if dataset is None and not is_registry_uri(cfg.model):
            dataset = (load_model(cfg.model)[1].get("config") or {}).get("dataset")
        require(dataset, "--dataset (the model file does not say what it was trained on)")
        data = load_dataset(dataset)
        x, y = data.test_x[: cfg.n_examples], data.test_y[: cfg.n_examples]
        from rrm.data import as_tensor, to_float

        result["agreement"] = layer_agreement(
            model, teacher, to_float(as_tensor(x)), y, eps=cfg.eps, norm=cfg.norm, steps=cfg.steps, seed=cfg.seed
        )
        result["agreement"]["n_examples"] = len(y)
    if cfg.out:
        write_json(cfg.out, result)
    return result
