"""Evaluation jobs: attack a model and record it beside its training run; probe where its robustness sits."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rrm.config import resolve_device
from rrm.errors import RRMError, unknown
from rrm.evaluation import (
    EvalConfig,
    EvalResult,
    evaluate,
    layer_agreement,
    load_for_evaluation,
    robustbench_json,
    stem_thresholds,
)
from rrm.io import headline_path, write_json
from rrm.jobs.common import Tracking, is_registry_uri, require, tracking
from rrm.jobs.teacher import load_model_ref

# What `rrm evaluate` writes: every number with the sanity checks, or RobustBench's model_info layout.
EVALUATE_FORMATS = ("rrm", "robustbench")

__all__ = ["EVALUATE_FORMATS", "EvaluateJob", "Evaluation", "ProbeConfig", "evaluate_job", "probe_job"]


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
    from rrm.io import sha256_file

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
        tracking().check_store("recording the evaluation in MLflow")
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
            write_json(headline_path(out), result.headline())
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
