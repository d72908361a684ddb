"""The commands that run work: data prepare, train, robustify, evaluate, tune and report; each parses its input
and calls one job of :mod:`rrm.jobs`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import cloup
from click.core import ParameterSource

from rrm import jobs
from rrm.cli import cli
from rrm.cli.options import KEY_ALIASES, config_options, from_params, key_value_option, key_values, tracking_options
from rrm.cli.specs import EVALUATE, REPORT, ROBUSTIFY, TRAIN, TUNE
from rrm.errors import RRMError
from rrm.evaluation import EvalConfig
from rrm.io import check_writable
from rrm.tracking.uri import tracking_label
from rrm.train import TrainConfig
from rrm.tune import TuneConfig, parse_range

# ------------------------------------------------------------------------------------------------------------ data


@cli.group()
def data() -> None:
    """Datasets: prepare one versionable file, or directory of shards, per dataset."""


@data.command("prepare")
@from_params("prepare")
@click.option("--dataset", help="Registered dataset name (mnist5k, digits, ...).")
@click.option("--out", type=click.Path(path_type=Path), help="Output .safetensors file, or directory with --shards.")
@click.option(
    "--shards",
    is_flag=True,
    default=False,
    help="Write a directory of shards that training reads batch by batch, for datasets larger than memory; "
    "resumable: rerun the same command after an interruption.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes that decode the images of a folder dataset (--shards). [default: the CPUs]",
)
@click.option(
    "--shard-images",
    type=click.IntRange(min=1),
    default=None,
    help="Images per shard (--shards); part of the digest. [default: about 32 MiB of pixels a shard]",
)
@key_value_option("Loader option, repeatable (e.g. -o seed=1 -o test_size=500; `root` for folder datasets).")
def data_prepare(
    dataset: str | None,
    out: Path | None,
    shards: bool,
    workers: int | None,
    shard_images: int | None,
    options: tuple[str, ...],
) -> None:
    """Load a dataset and write it to one file (or a directory of shards) whose digest every run records.

    \b
    Examples:
      rrm data prepare --dataset mnist5k --out data/mnist5k.safetensors -o seed=0
      rrm data prepare --dataset restricted-imagenet --out data/rimagenet --shards -o root=~/imagenet -o image_size=224
    """
    jobs.require(dataset, "--dataset")
    jobs.require(out, "--out")
    check_writable(out, directory=shards)
    if not shards and out.is_dir():
        raise RRMError(f"--out {str(out)!r} is a directory: pass a .safetensors file, or add --shards")
    if not shards and (workers is not None or shard_images is not None):
        raise RRMError("--workers and --shard-images apply to --shards; add --shards or drop them")
    extra = {"shards": True, "workers": workers, "shard_images": shard_images} if shards else {}
    prepared, digest = jobs.prepare_job(dataset, out, {**key_values(options), **extra})
    click.echo(
        f"wrote {out}: {prepared.name}, {len(prepared.train_y)} train / {len(prepared.test_y)} test images "
        f"{'x'.join(map(str, prepared.input_shape))}"
        f"{f' in {len(prepared.train_x.shards) + len(prepared.test_x.shards)} shards' if shards else ''}, "
        f"digest {digest[:12]}"
    )


# ----------------------------------------------------------------------------------------------------------- train


_TEACHER_PIN = cloup.option(
    "--teacher-pin",
    type=click.Path(dir_okay=False),
    help="A model file the teacher must equal (a copy `rrm teacher pull` wrote, a DVC dependency): fail, before "
    "any work, when the alias of a models:/ teacher has moved since. [default: none]",
)


@cli.command(no_args_is_help=True)  # a bare `rrm train` shows how to start one rather than a 10-epoch default run
@from_params("train")
@config_options(
    TRAIN,
    TrainConfig,
    extra={"method": [_TEACHER_PIN], **tracking_options("MLflow experiment of the run.", run_name=True)},
)
def train(no_track: bool, experiment: str, run_name: str | None, teacher_pin: str | None, **options) -> None:
    """Train a model with one method; the run (params, metrics, model) is recorded in MLflow.

    \b
    Examples:
      rrm train --method sat --dataset mnist5k --eps 0.3 --epochs 15 --out-dir runs/teacher
      rrm train --method rrm --model cnn-bn --teacher models:/rrm-teacher@champion --lambda 0.5 --out-dir runs/rrm
      rrm train --method rrm --teacher models:/rrm-teacher@champion --teacher-pin runs/teacher/champion.pt ...
      rrm train --params params.yaml --section train_teacher --epochs 2    # file values, one flag overridden
      torchrun --nproc-per-node 2 -m rrm.cli train --method rrm ...       # data-parallel; --batch-size is global
    """
    from rrm.train.distributed import is_main

    cfg = TrainConfig.from_dict(options).validate()
    cfg.check_read(_typed(options))  # a flag typed for a method that ignores it
    check_writable(cfg.out_dir, directory=True)  # now, before the store, the data and the teacher are reached
    section = click.get_current_context().meta.get("rrm.section") or ""
    recipe = section.rpartition(".")[2] if "." in section else None  # students.transplant-fast: transplant-fast
    track = jobs.Tracking(not no_track, experiment, run_name, recipe=recipe)
    result, run_id = jobs.train_job(cfg, track, teacher_pin=teacher_pin)
    if not is_main():
        return
    s = result.summary
    robust = f", monitored robust accuracy {s['monitor_robust_accuracy']:.4f}" if "monitor_robust_accuracy" in s else ""
    run_line = f"\nMLflow run {run_id} in experiment {experiment!r} ({tracking_label()})" if run_id else ""
    click.echo(
        f"{cfg.method} {cfg.model} on {s['dataset']}: test accuracy {s['test_accuracy']:.4f}{robust}; "
        f"{s['epochs']} epochs, {s['epoch_seconds_mean']:.2f} +- {s['epoch_seconds_ci95']:.2f} s/epoch; "
        f"wrote {result.model_path}{run_line}"
    )


def _typed(names) -> list[str]:
    """The options among ``names`` that the user typed on the command line (not defaults, not params-file values)."""
    ctx = click.get_current_context()
    return [name for name in names if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]


# ------------------------------------------------------------------------------------------------------- robustify


@cli.command()
@from_params("robustify")
@config_options(ROBUSTIFY, jobs.RobustifyConfig)
def robustify(**options) -> None:
    """Write Ilyas et al.'s robustified dataset D_R (the input of method rdt); resumable.

    \b
    Example:
      rrm robustify --teacher models:/rrm-teacher@champion --dataset data/mnist5k.safetensors \\
                    --out data/mnist5k-robust.safetensors --steps 200
    """
    cfg = jobs.RobustifyConfig(**options)
    robust = jobs.robustify_job(cfg)
    click.echo(f"wrote {cfg.out}: {len(robust.train_y)} robustified training images, digest {robust.digest[:12]}")


# -------------------------------------------------------------------------------------------------------- evaluate

_JOB_FIELDS = [f.name for f in dataclasses.fields(jobs.EvaluateJob) if f.name not in ("model", "attack")]


@cli.command()
@from_params("evaluate")
@cloup.argument(
    "model",
    required=False,
    help="A model file or a registry URI (models:/NAME@ALIAS); required, or `model:` in the params section.",
)
@config_options(
    EVALUATE,
    EvalConfig,
    (jobs.EvaluateJob, _JOB_FIELDS),
    extra=tracking_options("MLflow experiment. [default: the training run's, else rrm]", default_experiment=None),
)
def evaluate(model: str | None, no_track: bool, experiment: str | None, **options) -> None:
    """Natural and adversarial accuracy of MODEL (a model file or registry URI) with gradient-masking checks.

    Writes a metrics JSON (for `dvc metrics show` and `rrm teacher register --evaluation`) and records an
    MLflow run linked to the training run of the model.

    \b
    Examples:
      rrm evaluate runs/teacher/model.pt --eps 0.3 --attacks apgd,pgd
      rrm evaluate runs/rrm/model.pt --attacks apgd,transfer --transfer-from models:/rrm-teacher@champion
      rrm evaluate runs/teacher/model.pt --attacks art-apgd --n-examples 1000 --out reports/teacher.json
      rrm evaluate runs/teacher/model.pt --attacks autoattack --n-examples 100 --format robustbench
    """
    if options["out"] is not None:
        check_writable(options["out"])  # now, not after the attacks
    job = jobs.EvaluateJob(
        model=model, **{k: options.pop(k) for k in _JOB_FIELDS}, attack=EvalConfig.from_dict(options)
    )
    done = jobs.evaluate_job(job, jobs.Tracking(not no_track, experiment))
    result, attack = done.result, job.attack
    attacks = ", ".join(
        f"{name} {value:.4f} ({result.examples(name)} images)" for name, value in result.adversarial_accuracy.items()
    )
    sanity = result.sanity_status + (" (see `sanity` in the metrics)" if result.sanity_passed is False else "")
    click.echo(
        f"natural accuracy {result.natural_accuracy:.4f}; adversarial ({attack.norm}, eps {attack.eps}): "
        f"{attacks or 'no attacks'}; sanity checks {sanity}; wrote {done.out}"
    )
    for warning in result.sanity_warnings:
        click.echo(f"Warning: {warning}", err=True)
    if done.run_id:
        click.echo(f"MLflow run {done.run_id} ({tracking_label()})")


# ------------------------------------------------------------------------------------------------------------ tune

# Training options `rrm tune` takes as flags, fixed for every trial (any other goes through -o KEY=VALUE); the
# others share a name with a tuning option or change per trial.
_TUNE_TRAIN = (
    "dataset",
    "model",
    "teacher",
    "norm",
    "eps",
    "epochs",
    "lr",
    "batch_size",
    "feature_loss",
    "feature_dim",
    "width",
    "device",
)
# Training options the study sets for every trial itself (TuneConfig.trial_config): -o would be ignored.
_TUNE_SETS = ("method", "out_dir", "resume", "resume_or_start", "progress", "monitor_examples", "monitor_steps")


@cli.command()
@from_params("tune")
@config_options(
    {**TRAIN, **TUNE},
    (TuneConfig, list(TUNE)),
    (TrainConfig, _TUNE_TRAIN),
    unset_defaults=True,
    extra={
        "schedule": [
            key_value_option(
                "Any other training option, repeatable (e.g. -o weight_decay=5e-5 -o "
                "schedule=step); fixed for every trial."
            )
        ],
        "method": [
            cloup.option(
                "--range",
                "ranges",
                multiple=True,
                metavar="NAME=LOW,HIGH",
                help="Search range of a knob, repeatable; a knob given a range is tuned (params file: "
                "`ranges:` mapping). [default: the knob's, e.g. lambda 1e-5,1 (log)]",
            )
        ],
        **tracking_options("MLflow experiment of the study and its trials."),
    },
)
def tune(ranges: tuple[str, ...], options: tuple[str, ...], no_track: bool, experiment: str, **values) -> None:
    """Tune a transfer method's knobs with Optuna on a validation split; evaluate the best trials on the test split.

    Each trial trains a student on the training split minus a validation split and is scored there (natural
    accuracy, APGD accuracy); the test split is used only for the best trials at the end. Writes trials.csv,
    results.json and three plots (Pareto front, accuracy against the knob, optimisation history) to --out-dir; in
    MLflow the study is one parent run with one child run per trial.

    \b
    Examples:
      rrm tune --method rrm --teacher runs/teacher/model.pt --n-trials 12 --epochs 3 --eps 0.2
      rrm tune --method kd --teacher t.pt --mode constrained --min-natural-accuracy 0.9 --pruner hyperband
      rrm tune --method rrm --teacher t.pt --range lambda=1e-4,1e-1 --range lr=0.01,0.2 --n-trials 30
      rrm tune --params params.yaml --section tune             # the DVC stage's settings
      # two workers on one study (same host), each continuing until the study has 20 finished trials:
      rrm tune --teacher t.pt --storage journal:runs/tune/study.log --study-name s1 --n-trials 20 &
      rrm tune --teacher t.pt --storage journal:runs/tune/study.log --study-name s1 --n-trials 20
    """
    base = {k: values.pop(k) for k in _TUNE_TRAIN if values.get(k) is not None}
    for k in _TUNE_TRAIN:
        values.pop(k, None)
    fixed = key_values(options)
    _check_tune_options(fixed)
    base.update(fixed)
    base.setdefault("monitor_examples", 0)
    values = {k: v for k, v in values.items() if v is not None and v != ()}
    if ranges:
        values["ranges"] = {name: parse_range(bounds) for name, bounds in key_values(ranges, "--range").items()}
    cfg = TuneConfig(**values, train=TrainConfig.from_dict({**base, "method": values.get("method", "rrm")}))
    cfg.train.check_read([KEY_ALIASES.get(k, k) for k in fixed])  # another method's option would be ignored
    check_writable(cfg.directory, directory=True)
    result = jobs.tune_job(cfg, jobs.Tracking(not no_track, experiment), log=lambda line: click.echo(line, err=True))
    click.echo(
        f"study {result.study_name} in {result.storage}: {result.finished}/{cfg.n_trials} finished trials "
        f"({len(result.ran)} run now, {result.seconds:.0f} s)"
    )
    for best in result.best:
        params = ", ".join(f"{k} {v:.4g}" for k, v in best["params"].items())
        test = best["test"]
        tested = (
            f"; test natural {test['natural_accuracy']:.4f}, APGD {test['adversarial_accuracy']:.4f}"
            if test
            else "; model file not on this host, not tested"
        )
        click.echo(
            f"  trial {best['number']}: {params}: validation natural {best['natural_accuracy']:.4f}, "
            f"APGD {best['adversarial_accuracy']:.4f}{tested}"
        )
    click.echo(f"wrote {', '.join(str(p) for p in result.files.values())}")
    if result.parent_run_id:
        click.echo(f"MLflow run {result.parent_run_id} in experiment {experiment!r} ({tracking_label()})")


def _check_tune_options(fixed: dict) -> None:
    """Refuse a ``-o KEY=VALUE`` of ``rrm tune`` that the study would not use as given."""
    for key in fixed:
        name = KEY_ALIASES.get(key, key)
        if name in _TUNE_TRAIN:
            raise RRMError(f"-o {key}=... of rrm tune: pass --{name.replace('_', '-')} instead (it has its own flag)")
        if name in _TUNE_SETS:
            raise RRMError(
                f"-o {key}=... of rrm tune: the study sets {key} for every trial, so the value would be "
                "ignored; drop it (--out-dir sets the study's directory)"
            )


# ---------------------------------------------------------------------------------------------------------- report


@cli.command()
@from_params("report")
@config_options(
    REPORT,
    jobs.ReportConfig,
    extra={
        "tracking": [
            cloup.option(
                "--track/--no-track", default=False, show_default=True, help="Log the report files to MLflow."
            ),
            cloup.option("--experiment", default="rrm", show_default=True, help="MLflow experiment of the report run."),
        ],
        "runtime": [
            cloup.option(
                "--show", is_flag=True, help="Print the tables as narrow text and write nothing (no files, no run)."
            )
        ],
    },
)
def report(track: bool, experiment: str, show: bool, **options) -> None:
    """The paper's Table 1 and Table 2 and an accuracy-against-training-time plot from a pipeline's metrics.

    With seed<N> directories: one table of means +- 95% CI over the seeds, the cost/robustness frontier plot and
    the target check (table.md, table.csv, frontier.png, report.json). Prints the tables as narrow text; every
    column is in the files.

    \b
    Examples:
      rrm report --show                            # after `dvc repro`: Tables 1 and 2 in the terminal
      rrm report --root . --out-dir reports        # writes the tables, report.json and the plot
      rrm report --students-dir runs/variants/eps0.3 --evaluations-dir metrics/variants/eps0.3 \\
                 --teacher-dir runs/variants/eps0.3/teacher --teacher-evaluation metrics/variants/eps0.3/teacher.json \\
                 --out-dir reports/variants/eps0.3
    """
    cfg = jobs.ReportConfig(**{k: None if v is None else str(v) for k, v in options.items()})
    if show:
        if track:
            raise click.UsageError("--show writes nothing, so it logs nothing: drop --track (or --show)")
        click.echo(jobs.show_report(cfg))
        return
    check_writable(cfg.out_dir, directory=True)
    result = jobs.report_job(cfg, jobs.Tracking(track, experiment))
    out_dir = Path(cfg.out_dir)
    click.echo(result["text"])
    click.echo(f"wrote {', '.join(str(out_dir / n) for n in result['files'])}")
