"""The commands that run work: data prepare, train, robustify, evaluate, tune and report; each parses its input
and calls one job of :mod:`rrm.jobs`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import cloup
from click.core import ParameterSource

from rrm import jobs
from rrm.attacks import NORMS
from rrm.attacks.autoattack import COMPONENTS as AA_COMPONENTS
from rrm.attacks.autoattack import VERSIONS as AA_VERSIONS
from rrm.cli import cli
from rrm.cli.options import (
    KEY_ALIASES,
    Spec,
    config_options,
    from_params,
    key_value_option,
    key_values,
    tracking_options,
)
from rrm.errors import RRMError
from rrm.evaluate import ATTACKS, TRANSFER_ATTACKS, EvalConfig
from rrm.io import check_writable
from rrm.models import ARCHITECTURES
from rrm.train import FEATURE_LOSSES, MATCH_INPUTS, METHODS, PRECISIONS, SCHEDULES, TrainConfig, tunable_methods
from rrm.tune import MODES, PRUNERS, TuneConfig, parse_range

# ------------------------------------------------------------------------------------------------------------ data


@cli.group()
def data() -> None:
    """Datasets: prepare one versionable file per dataset."""


@data.command("prepare")
@from_params("prepare")
@click.option("--dataset", help="Registered dataset name (mnist5k, digits, ...).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output .safetensors file.")
@key_value_option("Loader option, repeatable (e.g. -o seed=1 -o test_size=500; `root` for folder datasets).")
def data_prepare(dataset: str | None, out: Path | None, options: tuple[str, ...]) -> None:
    """Load a dataset and write it to one file whose digest every run records.

    \b
    Example:
      rrm data prepare --dataset mnist5k --out data/mnist5k.safetensors -o seed=0
    """
    jobs.require(dataset, "--dataset")
    jobs.require(out, "--out")
    prepared, digest = jobs.prepare_job(dataset, out, key_values(options))
    click.echo(
        f"wrote {out}: {prepared.name}, {len(prepared.train_y)} train / {len(prepared.test_y)} test images "
        f"{'x'.join(map(str, prepared.input_shape))}, digest {digest[:12]}"
    )


# ----------------------------------------------------------------------------------------------------------- train

THREAT = {
    "norm": Spec("attack", "Threat model norm.", NORMS, "norm"),
    "eps": Spec("attack", "Threat model radius in [0, 1] pixel units (8/255 = 0.0314)."),
}
TRAIN = {
    "dataset": Spec("data", "Registered dataset name, or a file from `rrm data prepare` / `rrm robustify`."),
    "model": Spec("model", "Architecture.", tuple(ARCHITECTURES), "model"),
    "width": Spec("model", "Channel width multiplier (small models)."),
    "feature_dim": Spec("model", "Add a linear layer so the features have this size (match the teacher's)."),
    "method": Spec("method", "Training method.", tuple(METHODS), "method"),
    "teacher": Spec(
        "method", "Teacher of rrm/kd/kdiga: a model file or a registry URI such as models:/rrm-teacher@champion."
    ),
    "lam": Spec(
        "method", "rrm: lambda, the weight of the cross-entropy term (> 0; the paper's plateau is 5e-5 to 1e-2)."
    ),
    "feature_loss": Spec("method", "rrm: the feature loss.", FEATURE_LOSSES, "feature loss"),
    "match_inputs": Spec(
        "method",
        "rrm: where features are matched (the last three add a perturbed copy of each "
        "batch; teacher-* attack the teacher only).",
        MATCH_INPUTS,
        "match inputs",
    ),
    "kd_weight": Spec("method", "rrm: weight of a KD term on the teacher's logits at --temperature (0: off)."),
    "iga_weight": Spec("method", "rrm: weight of KDIGA's input-gradient alignment (0: off)."),
    "temperature": Spec("method", "kd, kdiga (and rrm's KD term): temperature."),
    "alpha": Spec("method", "kd, kdiga: weight of the distillation term."),
    "gamma": Spec("method", "kdiga: weight of input-gradient alignment."),
    "replays": Spec("method", "free: minibatch replays m."),
    "eps_warmup_epochs": Spec(
        "attack",
        "Adversarial methods: ramp the training eps linearly over these first epochs "
        "(passes for free); 0: full eps from the start.",
    ),
    "match_layers": Spec(
        "method",
        "rrm: stages matched, NAME or NAME:WEIGHT, comma-separated (stem, block1.., "
        "penultimate); a student stage of another shape is matched through an adapter.",
    ),
    "transplant": Spec(
        "method",
        "Copy the teacher's first layer into the student before training (any method; "
        "the stems must have the same shape).",
        ("stem",),
        "transplant",
    ),
    "transplant_frozen": Spec("method", "Keep the transplanted stem frozen (--no-transplant-frozen fine-tunes it)."),
    "noise_magnitude": Spec("method", "n-fgsm: radius of the uniform noise. [default: 2 * eps]"),
    "project_to_eps": Spec("method", "n-fgsm: project the perturbation back to the eps-ball (de Jorge et al. do not)."),
    "grad_align_weight": Spec(
        "method", "fast: weight of GradAlign's gradient-alignment term (0: off; about 3x the cost)."
    ),
    "early_stop_on_co": Spec(
        "method",
        "fast, n-fgsm, free: stop at catastrophic overfitting (PGD monitor accuracy "
        "collapses while single-step accuracy holds) and keep the weights before it.",
    ),
    **THREAT,
    "step_size": Spec("attack", "Attack step. [default: the method's]"),
    "attack_steps": Spec("attack", "PGD steps of adversarial training (and of rrm's teacher-pgd)."),
    "random_start": Spec("attack", "Start training attacks at a random point of the eps-ball."),
    "monitor_examples": Spec("attack", "Test images attacked after each epoch (0 turns the monitor off)."),
    "monitor_steps": Spec("attack", "PGD steps of the per-epoch monitor."),
    "epochs": Spec("schedule", "Epochs (free: passes x replays, as the paper counts them)."),
    "batch_size": Spec("schedule", "Batch size."),
    "lr": Spec("schedule", "Peak learning rate of SGD."),
    "momentum": Spec("schedule", "SGD momentum."),
    "weight_decay": Spec("schedule", "Weight decay."),
    "schedule": Spec("schedule", "Learning-rate schedule. [default: the method's]", SCHEDULES, "schedule"),
    "milestones": Spec("schedule", "Epochs at which the step schedule multiplies the rate by --lr-gamma, e.g. 30,40."),
    "lr_gamma": Spec("schedule", "Rate multiplier at each milestone."),
    "precision": Spec("runtime", "Autocast precision. [default: the method's]", PRECISIONS, "precision"),
    "device": Spec("runtime", "auto, cpu, cuda, cuda:N or mps."),
    "seed": Spec("runtime", "Random seed."),
    "deterministic": Spec("runtime", "Use deterministic algorithms (slower)."),
    "channels_last": Spec("runtime", "Channels-last memory format (faster for conv nets)."),
    "compile": Spec(
        "runtime", "torch.compile the model's features (and the teacher's): faster on GPUs after a compile pause."
    ),
    "data_on_device": Spec(
        "runtime", "Keep the whole training set on the device and batch there (data that fits in its memory)."
    ),
    "sync_batchnorm": Spec("runtime", "Under torchrun on CUDA: BatchNorm statistics over the global batch."),
    "out_dir": Spec("runtime", "Directory for checkpoint.pt, model.pt and train_metrics.json."),
    "resume": Spec(
        "runtime",
        "Continue from the checkpoint in --out-dir; with no checkpoint there, an error (a typo "
        "in --out-dir must not silently start over: see --resume-or-start).",
    ),
    "resume_or_start": Spec(
        "runtime",
        "Continue from the checkpoint in --out-dir when there is one, else start a new "
        "run (reruns of a pipeline stage).",
    ),
    "progress": Spec("runtime", "Progress bars. [default: when stderr is a terminal]"),
}


@cli.command()
@from_params("train")
@config_options(TRAIN, TrainConfig, extra=tracking_options("MLflow experiment of the run.", run_name=True))
def train(no_track: bool, experiment: str, run_name: str | None, **options) -> None:
    """Train a model with one method; the run (params, metrics, model) is recorded in MLflow.

    \b
    Examples:
      rrm train --method sat --dataset mnist5k --eps 0.3 --epochs 15 --out-dir runs/teacher
      rrm train --method rrm --model cnn-bn --teacher models:/rrm-teacher@champion --lambda 0.5 --out-dir runs/rrm
      rrm train --params params.yaml --section train_teacher --epochs 2    # file values, one flag overridden
      torchrun --nproc-per-node 2 -m rrm.cli train --method rrm ...       # data-parallel; --batch-size is global
    """
    from rrm.train.distributed import is_main

    cfg = TrainConfig.from_dict(options).validate()
    cfg.check_read(_typed(options))  # a flag typed for a method that ignores it
    check_writable(cfg.out_dir, directory=True)  # now, before the store, the data and the teacher are reached
    result, run_id = jobs.train_job(cfg, jobs.Tracking(not no_track, experiment, run_name))
    if not is_main():
        return
    s = result.summary
    robust = f", monitored robust accuracy {s['monitor_robust_accuracy']:.4f}" if "monitor_robust_accuracy" in s else ""
    run_line = (
        f"\nMLflow run {run_id} in experiment {experiment!r} ({jobs.tracking().store.tracking_label()})"
        if run_id
        else ""
    )
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

ROBUSTIFY = {
    "teacher": Spec("method", "Robust teacher: a model file or a registry URI such as models:/rrm-teacher@champion."),
    "dataset": Spec("data", "Registered dataset name or a prepared .safetensors file."),
    "out": Spec("data", "Output .safetensors file."),
    "steps": Spec("method", "Feature-matching steps per image."),
    "step_size": Spec("method", "L2 step of each update."),
    "batch_size": Spec("runtime", "Images per batch."),
    "seed": Spec("runtime", "Seed of the random start images."),
    "device": Spec("runtime", "auto, cpu, cuda, cuda:N or mps."),
    "progress": Spec("runtime", "Progress bar. [default: when stderr is a terminal]"),
}


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

EVALUATE = {
    **THREAT,
    "attacks": Spec(
        "attack",
        f"Attacks, comma-separated: {', '.join(ATTACKS)} (art-apgd is the paper's reference; "
        "autoattack is fra31's AutoAttack, RobustBench's).",
    ),
    "n_examples": Spec("data", "Test images attacked (the first n). [default: the whole test split]"),
    "batch_size": Spec("runtime", "Images per attack batch."),
    "steps": Spec("attack", "APGD iterations (native and ART)."),
    "restarts": Spec("attack", "APGD random restarts (native and ART)."),
    "pgd_steps": Spec("attack", "PGD steps of the pgd attack."),
    "pgd_step_size": Spec("attack", "PGD step. [default: 2.5 * eps / pgd-steps]"),
    "transfer_attack": Spec("attack", "How `transfer` crafts on --transfer-from.", TRANSFER_ATTACKS, "transfer attack"),
    "autoattack_version": Spec(
        "attack",
        "AutoAttack: standard (APGD-CE, APGD-T, FAB-T, Square 5000), plus, rand, or "
        "custom (--autoattack-components, standard's budgets).",
        tuple(AA_VERSIONS),
        "AutoAttack version",
    ),
    "autoattack_components": Spec(
        "attack", f"custom AutoAttack: components in order, from {', '.join(AA_COMPONENTS)}. [default: none]"
    ),
    "autoattack_examples": Spec(
        "data", "Test images AutoAttack attacks (the first n of those attacked). [default: all of them]"
    ),
    "sanity": Spec("attack", "Run the gradient-masking sanity checks."),
    "sanity_examples": Spec("attack", "Test images the sanity checks attack."),
    "sanity_steps": Spec("attack", "APGD iterations of the sanity attacks."),
    "sanity_square_queries": Spec("attack", "Queries per image of the black-box Square check."),
    "sanity_tolerance": Spec("attack", "Accuracy slack of the monotonicity checks."),
    "sanity_zero_accuracy": Spec("attack", "Accuracy the largest eps must push the model down to."),
    "seed": Spec("runtime", "Random seed of the attacks."),
    "dataset": Spec("data", "Dataset name or prepared file. [default: the one the model was trained on]"),
    "transfer_from": Spec(
        "model", "Model that crafts the `transfer` attack and check (file or registry URI): for a student, its teacher."
    ),
    "out": Spec(
        "data", "Metrics JSON to write. [default: eval_metrics.json, or robustbench.json, beside a model file]"
    ),
    "device": Spec("runtime", "auto, cpu, cuda, cuda:N or mps."),
    "progress": Spec("runtime", "Progress bars. [default: when stderr is a terminal]"),
    "train_run_id": Spec("tracking", "Training run to link to. [default: the run that logged this model file]"),
    "format": Spec(
        "data",
        "What --out holds: rrm (every number and the sanity checks) or robustbench (RobustBench's "
        "model_info JSON; needs autoattack).",
        jobs.EVALUATE_FORMATS,
        "output format",
    ),
}
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
    attacks = ", ".join(f"{name} {value:.4f}" for name, value in result.adversarial_accuracy.items())
    sanity = result.sanity_status + (" (see `sanity` in the metrics)" if result.sanity_passed is False else "")
    click.echo(
        f"natural accuracy {result.natural_accuracy:.4f}; adversarial ({attack.norm}, eps {attack.eps}, "
        f"{result.n_examples} images): {attacks or 'no attacks'}; sanity checks {sanity}; wrote {done.out}"
    )
    if done.run_id:
        click.echo(f"MLflow run {done.run_id} ({jobs.tracking().store.tracking_label()})")


# ------------------------------------------------------------------------------------------------------------ tune

TUNE = {
    "method": Spec("method", "Method whose knobs are tuned.", tunable_methods(), "tuning method"),
    "mode": Spec(
        "method",
        "pareto: maximise natural and APGD accuracy, the Pareto front is the answer; "
        "constrained: maximise APGD accuracy with a natural-accuracy floor, with pruning.",
        MODES,
        "tuning mode",
    ),
    "n_trials": Spec(
        "method", "Finished trials the study should have (a restart continues up to it; workers share it)."
    ),
    "knobs": Spec(
        "method",
        "Knobs to tune, comma-separated: the method's own (lambda; temperature, alpha; gamma) "
        "and lr, epochs. [default: the method's]",
    ),
    "min_natural_accuracy": Spec("method", "Validation natural-accuracy floor, a constraint in either mode."),
    "pruner": Spec(
        "method",
        "Pruner (constrained mode only). [default: median when constrained, none for pareto]",
        PRUNERS,
        "pruner",
    ),
    "prune_below": Spec("method", "Threshold pruner: stop a trial whose APGD accuracy falls below this."),
    "storage": Spec(
        "runtime",
        "Optuna storage: sqlite:///FILE.db (one process), journal:FILE.log (several "
        "processes on one host), postgresql://USER:PASSWORD@HOST:PORT/DB (many hosts).",
    ),
    "study_name": Spec("runtime", "Study to create or resume. [default: METHOD-MODEL-DATASET]"),
    "seed": Spec("runtime", "Sampler seed, also every trial's training seed."),
    "validation_size": Spec("data", "Fraction of the training split held out to score trials."),
    "attack_examples": Spec("attack", "Validation images attacked by APGD after each epoch."),
    "attack_steps": Spec("attack", "APGD iterations of the per-epoch score."),
    "best_trials": Spec("attack", "Best trials evaluated on the test split."),
    "test_examples": Spec("attack", "Test images attacked in that evaluation. [default: all]"),
    "test_steps": Spec("attack", "APGD iterations of that evaluation."),
    "test_restarts": Spec("attack", "APGD restarts of that evaluation."),
    "out_dir": Spec(
        "runtime", "Directory for trials.csv, results.json, the plots and trials/N/model.pt. [default: runs/tune/STUDY]"
    ),
}
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
        click.echo(
            f"MLflow run {result.parent_run_id} in experiment {experiment!r} ({jobs.tracking().store.tracking_label()})"
        )


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

REPORT = {
    "root": Spec("data", "Directory the paths below are relative to."),
    "students_dir": Spec(
        "data", "Student runs: <name>/train_metrics.json, or seed<N>/<name>/train_metrics.json to average over seeds."
    ),
    "evaluations_dir": Spec("data", "Their evaluations: <name>.json, or seed<N>/<name>.json."),
    "teacher_dir": Spec("data", "The teacher's run (train_metrics.json; optional)."),
    "teacher_evaluation": Spec("data", "The teacher's evaluation."),
    "out_dir": Spec("data", "Directory for the tables (.md, .csv), report.json and the plot."),
}


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
        ]
    },
)
def report(track: bool, experiment: str, **options) -> None:
    """The paper's Table 1 and Table 2 and an accuracy-against-training-time plot from a pipeline's metrics.

    With seed<N> directories: one table of means +- 95% CI over the seeds, the cost/robustness frontier plot and
    the target check (table.md, table.csv, frontier.png, report.json).

    \b
    Examples:
      rrm report --root . --out-dir reports        # after `dvc repro`; prints Table 1
      rrm report --students-dir runs/variants/eps0.3 --evaluations-dir metrics/variants/eps0.3 \\
                 --teacher-dir runs/variants/eps0.3/teacher --teacher-evaluation metrics/variants/eps0.3/teacher.json \\
                 --out-dir reports/variants/eps0.3
    """
    cfg = jobs.ReportConfig(**{k: str(v) for k, v in options.items()})
    check_writable(cfg.out_dir, directory=True)
    result = jobs.report_job(cfg, jobs.Tracking(track, experiment))
    out_dir = Path(cfg.out_dir)
    click.echo((out_dir / result["table"]).read_text().rstrip())
    click.echo(f"wrote {', '.join(str(out_dir / n) for n in result['files'])}")
