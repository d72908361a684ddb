"""The ``rrm`` command line: a thin layer over the library.

Every command takes its options from flags or from one section of a params file (``--params params.yaml --section
train_teacher``: the file's values are defaults, flags override them). Errors are one line on stderr
(``Error: ...``) with a non-zero exit code. MLflow is imported only by the commands that track or use the registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path

import click
import yaml
from click.core import ParameterSource

from rrm.errors import RRMError, unknown
from rrm.evaluate import ATTACKS, TRANSFER_ATTACKS, EvalConfig
from rrm.models import ARCHITECTURES
from rrm.params import read_section
from rrm.train import FEATURE_LOSSES, MATCH_INPUTS, METHODS, PRECISIONS, SCHEDULES, TrainConfig, get_method

# MLflow retries an unreachable server 7 times with exponential backoff (minutes) and waits up to 120 s for each
# answer; the command line gives up in seconds instead (under a minute for a server that accepts but never answers).
# Values the user exported win.
_FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# Params-file keys and flags spelled differently from the field they set (the paper's name, not Python's).
_KEY_ALIASES = {"lambda": "lam"}
_SPELLED = {field: key for key, field in _KEY_ALIASES.items()}


class _OneLineErrors(click.Group):
    """The root group: any :class:`RRMError` or usage error becomes ``Error: ...`` on one line and exit code 1 or 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except RRMError as exc:
            _fail(str(exc), 1)
        except click.exceptions.NoArgsIsHelpError as exc:  # `rrm` or `rrm teacher` alone: the help is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            _fail(exc.format_message() + where, exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("interrupted", 130)
        sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str, code: int) -> typing.NoReturn:
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _tracking():
    """rrm.tracking (and with it MLflow, seconds to import), loaded only by commands that need it."""
    for key, value in _FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", str(sys.stderr.isatty()).lower())
    from rrm import tracking

    if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # MLflow's INFO lines (store creation) would bury our output
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    return tracking


def _from_registry(ref: str | None) -> bool:
    """Whether a teacher reference is a registry URI (loading it talks to MLflow) rather than a file."""
    return bool(ref) and ref.startswith(("models:/", "runs:/"))


def _from_file(ctx: click.Context, param: click.Parameter, value: object) -> object:
    if param.multiple and isinstance(value, Mapping):  # KEY=VALUE options given as a mapping in the file
        value = [f"{k}={json.dumps(v)}" for k, v in value.items()]
    try:
        return param.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        raise RRMError(f"{param.name} in the params file: {exc.format_message()}") from None


def from_params(default_section: str) -> Callable:
    """Add ``--params FILE --section NAME``: that section's values become defaults; flags on the command line win."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(params_file: Path | None, section: str, **kwargs):
            if params_file is not None:
                ctx = click.get_current_context()
                by_name = {p.name: p for p in ctx.command.params if p.name not in ("params_file", "section")}
                for key, value in read_section(params_file, section).items():
                    name = _KEY_ALIASES.get(str(key), str(key).replace("-", "_"))
                    if name not in by_name:
                        raise unknown(f"key in section {section!r} of {str(params_file)!r}:", key,
                                      [_SPELLED.get(n, n) for n in by_name])
                    if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None):
                        kwargs[name] = _from_file(ctx, by_name[name], value)
            return command(**kwargs)

        # click lists options in reverse order of this list: these two come last in --help.
        wrapper.__click_params__ = [
            click.Option(["--section"], default=default_section, show_default=True,
                         help="Section of the params file to read (dotted for nested ones: students.rrm)."),
            click.Option(["--params", "params_file"], type=click.Path(dir_okay=False, path_type=Path),
                         help="YAML params file (e.g. DVC's params.yaml) whose section gives the defaults."),
            *getattr(command, "__click_params__", []),
        ]
        return wrapper

    return decorate


def _need(value: object, flag: str) -> None:
    if value is None or value == ():
        raise RRMError(f"missing {flag}; pass it, or set it in the --params section")


def _key_values(pairs: tuple[str, ...], flag: str) -> dict:
    """``("a=1", "b=x")`` -> ``{"a": 1, "b": "x"}`` with YAML-typed values."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RRMError(f"{flag} takes KEY=VALUE, got {pair!r}")
        value = yaml.safe_load(raw) if raw else ""
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 as text
            with contextlib.suppress(ValueError):
                value = float(value)
        out[key.strip()] = value
    return out


class _ListOf(click.ParamType):
    """A comma-separated list on the command line, a YAML list in a params file; a tuple either way."""

    def __init__(self, item: type):
        self.item = item
        self.name = f"{click.types.convert_type(item).name.upper()},..."

    def convert(self, value, param, ctx):
        items = list(value) if isinstance(value, (list, tuple)) else [
            v for v in str(value).replace(" ", "").split(",") if v]
        try:
            return tuple(self.item(v) for v in items)
        except (TypeError, ValueError):
            self.fail(f"expected a comma-separated list of {self.item.__name__}, got {value!r}", param, ctx)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="rrm", message="%(prog)s %(version)s")
def cli() -> None:
    """Robust Representation Matching: robust students from a robust teacher at about the cost of natural training.

    \b
    Example, the whole recipe on the embedded MNIST sample:
      rrm data prepare --dataset mnist5k --out data/mnist5k.safetensors
      rrm train --method sat --dataset data/mnist5k.safetensors --out-dir runs/teacher
      rrm teacher register runs/teacher/model.pt --evaluation runs/teacher/eval_metrics.json
      rrm teacher promote 1 champion
      rrm train --method rrm --model cnn-bn --teacher models:/rrm-teacher@champion --lambda 0.5

    Runs are recorded in MLflow (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db here); see them with `mlflow ui`.
    """


# ------------------------------------------------------------------------------------------------------------ data

@cli.group()
def data() -> None:
    """Datasets: prepare one versionable file per dataset."""


@data.command("prepare")
@from_params("prepare")
@click.option("--dataset", help="Registered dataset name (mnist5k, digits, ...).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output .safetensors file.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Loader option, repeatable (e.g. -o seed=1 -o test_size=500; `root` for folder datasets).")
def data_prepare(dataset: str | None, out: Path | None, options: tuple[str, ...]) -> None:
    """Load a dataset and write it to one file whose digest every run records.

    \b
    Example:
      rrm data prepare --dataset mnist5k --out data/mnist5k.safetensors -o seed=0
    """
    from rrm.data import prepare_dataset

    _need(dataset, "--dataset")
    _need(out, "--out")
    prepared, digest = prepare_dataset(dataset, out, **_key_values(options, "--option"))
    click.echo(f"wrote {out}: {prepared.name}, {len(prepared.train_y)} train / {len(prepared.test_y)} test images "
               f"{'x'.join(map(str, prepared.input_shape))}, digest {digest[:12]}")


# ----------------------------------------------------------------------------------------------------------- train

_TRAIN_HELP = {
    "dataset": "Registered dataset name, or a file from `rrm data prepare` / `rrm robustify`.",
    "model": f"Architecture: {', '.join(ARCHITECTURES)}.",
    "width": "Channel width multiplier (small models).",
    "feature_dim": "Add a linear layer so the features have this size (match the teacher's).",
    "method": f"Training method: {', '.join(METHODS)}.",
    "epochs": "Epochs (free: passes x replays, as the paper counts them).",
    "batch_size": "Batch size.",
    "lr": "Peak learning rate of SGD.",
    "momentum": "SGD momentum.",
    "weight_decay": "Weight decay.",
    "schedule": f"Learning-rate schedule: {', '.join(SCHEDULES)}. [default: the method's]",
    "milestones": "Epochs at which the step schedule multiplies the rate by --lr-gamma, e.g. 30,40.",
    "lr_gamma": "Rate multiplier at each milestone.",
    "norm": "Threat model norm: linf or l2.",
    "eps": "Threat model radius in [0, 1] pixel units (8/255 = 0.0314).",
    "step_size": "Attack step. [default: the method's]",
    "attack_steps": "PGD steps of adversarial training.",
    "random_start": "Start training attacks at a random point of the eps-ball.",
    "replays": "Free AT's minibatch replays m.",
    "teacher": "Teacher of rrm/kd/kdiga: a model file or a registry URI such as models:/rrm-teacher@champion.",
    "lam": "RRM's lambda, the weight of the cross-entropy term (> 0; the paper's plateau is 5e-5 to 1e-2).",
    "feature_loss": f"RRM's feature loss: {', '.join(FEATURE_LOSSES)}.",
    "match_inputs": f"RRM: where features are matched: {', '.join(MATCH_INPUTS)} (the last three add a perturbed "
                    "copy of each batch; teacher-* attack the teacher only).",
    "kd_weight": "RRM: weight of a KD term on the teacher's logits at --temperature (0: off).",
    "iga_weight": "RRM: weight of KDIGA's input-gradient alignment (0: off).",
    "temperature": "KD / KDIGA temperature.",
    "alpha": "KD / KDIGA weight of the distillation term.",
    "gamma": "KDIGA weight of input-gradient alignment.",
    "precision": f"Autocast precision: {', '.join(PRECISIONS)}. [default: the method's]",
    "device": "auto, cpu, cuda, cuda:N or mps.",
    "seed": "Random seed.",
    "deterministic": "Use deterministic algorithms (slower).",
    "channels_last": "Channels-last memory format (faster for conv nets).",
    "compile": "torch.compile the model's features (and the teacher's): faster on GPUs after a compile pause.",
    "data_on_device": "Keep the whole training set on the device and batch there (data that fits in its memory).",
    "sync_batchnorm": "Under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm).",
    "monitor_examples": "Test images attacked after each epoch (0 turns the monitor off).",
    "monitor_steps": "PGD steps of the per-epoch monitor.",
    "out_dir": "Directory for checkpoint.pt, model.pt and train_metrics.json.",
    "resume": "Continue from the checkpoint in --out-dir.",
    "progress": "Progress bars. [default: when stderr is a terminal]",
    "extra": "Method option KEY=VALUE, repeatable.",
}


def config_options(config: type, helps: dict[str, str]) -> Callable:
    """One option per field of the dataclass ``config``, so the command line never drifts from the library."""
    hints = typing.get_type_hints(config)
    defaults = config()

    def decorate(command: Callable) -> Callable:
        for field in reversed(dataclasses.fields(config)):
            name, default = field.name, getattr(defaults, field.name)
            flag = "--" + _SPELLED.get(name, name).replace("_", "-")
            kind = hints[name]
            if isinstance(kind, types.UnionType):
                kind = next(t for t in typing.get_args(kind) if t is not type(None))
            shown = dict(default=default, show_default=default is not None, help=helps.get(name, ""))
            if kind is dict:
                option = click.option(flag, name, multiple=True, metavar="KEY=VALUE", help=shown["help"])
            elif kind is bool:
                option = click.option(f"{flag}/--no-{flag[2:]}", name, **shown)
            elif typing.get_origin(kind) is tuple:
                shown["default"] = ",".join(map(str, default))
                option = click.option(flag, name, type=_ListOf(typing.get_args(kind)[0]), **shown)
            else:
                option = click.option(flag, name, type=kind, **shown)
            command = option(command)
        return command

    return decorate


@cli.command()
@from_params("train")
@config_options(TrainConfig, _TRAIN_HELP)
@click.option("--no-track", is_flag=True, help="Do not record the run in MLflow.")
@click.option("--experiment", default="rrm", show_default=True, help="MLflow experiment of the run.")
@click.option("--run-name", help="MLflow run name. [default: METHOD-MODEL-DATASET]")
def train(no_track: bool, experiment: str, run_name: str | None, **options) -> None:
    """Train a model with one method; the run (params, metrics, model) is recorded in MLflow.

    \b
    Examples:
      rrm train --method sat --dataset mnist5k --eps 0.3 --epochs 15 --out-dir runs/teacher
      rrm train --method rrm --model cnn-bn --teacher models:/rrm-teacher@champion --lambda 0.5 --out-dir runs/rrm
      rrm train --params params.yaml --section train_teacher --epochs 2    # file values, one flag overridden
      torchrun --nproc-per-node 2 -m rrm.cli train --method rrm ...       # data-parallel; --batch-size is global
    """
    from rrm.data import load_dataset
    from rrm.train import train as run_training
    from rrm.train.distributed import is_main

    options["extra"] = _key_values(options["extra"], "--extra")
    cfg = TrainConfig.from_dict(options).validate()
    get_method(cfg.method)
    if cfg.model not in ARCHITECTURES:
        raise unknown("model", cfg.model, ARCHITECTURES)
    dataset = load_dataset(cfg.dataset)
    if no_track or not is_main():  # under torchrun only rank 0 records the run
        if _from_registry(cfg.teacher):
            _tracking()  # the teacher still comes from the registry
        result = run_training(cfg, data=dataset)
        run_line = ""
    else:
        tracking = _tracking()
        with tracking.MlflowCallback(experiment=experiment, run_name=run_name) as tracker:
            result = run_training(cfg, data=dataset, callbacks=[tracker])
        run_line = f"\nMLflow run {tracker.run_id} in experiment {experiment!r} ({tracking.tracking_uri()})"
    if not is_main():
        return
    s = result.summary
    robust = f", monitored robust accuracy {s['monitor_robust_accuracy']:.4f}" if "monitor_robust_accuracy" in s else ""
    click.echo(f"{cfg.method} {cfg.model} on {s['dataset']}: test accuracy {s['test_accuracy']:.4f}{robust}; "
               f"{s['epochs']} epochs, {s['epoch_seconds_mean']:.2f} +- {s['epoch_seconds_ci95']:.2f} s/epoch; "
               f"wrote {result.model_path}{run_line}")


# ------------------------------------------------------------------------------------------------------- robustify

@cli.command()
@from_params("robustify")
@click.option("--teacher", help="Robust teacher: a model file or a registry URI such as models:/rrm-teacher@champion.")
@click.option("--dataset", help="Registered dataset name or a prepared .safetensors file.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output .safetensors file.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Feature-matching steps per image.")
@click.option("--step-size", type=float, default=0.1, show_default=True, help="L2 step of each update.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Images per batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random start images.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: when stderr is a terminal]")
def robustify(teacher: str | None, dataset: str | None, out: Path | None, steps: int, step_size: float,
              batch_size: int, seed: int, device: str, progress: bool | None) -> None:
    """Write Ilyas et al.'s robustified dataset D_R (the input of method rdt); resumable.

    \b
    Example:
      rrm robustify --teacher models:/rrm-teacher@champion --dataset data/mnist5k.safetensors \\
                    --out data/mnist5k-robust.safetensors --steps 200
    """
    from rrm.data import load_dataset
    from rrm.robustify import robustify as run_robustify
    from rrm.train import load_teacher, resolve_device

    _need(teacher, "--teacher")
    _need(dataset, "--dataset")
    _need(out, "--out")
    data = load_dataset(dataset)
    target = resolve_device(device)
    if _from_registry(teacher):
        _tracking()
    model = load_teacher(teacher, target)
    robust = run_robustify(model, data, out, steps=steps, step_size=step_size, batch_size=batch_size, seed=seed,
                           device=target, teacher_ref=teacher, progress=progress)
    click.echo(f"wrote {out}: {len(robust.train_y)} robustified training images, digest {robust.digest[:12]}")


# -------------------------------------------------------------------------------------------------------- evaluate

_EVAL_HELP = {
    "norm": "Threat model norm: linf or l2.",
    "eps": "Threat model radius in [0, 1] pixel units (8/255 = 0.0314).",
    "attacks": f"Attacks, comma-separated: {', '.join(ATTACKS)} (art-apgd is the paper's reference).",
    "n_examples": "Test images attacked (the first n). [default: the whole test split]",
    "batch_size": "Images per attack batch.",
    "steps": "APGD iterations (native and ART).",
    "restarts": "APGD random restarts (native and ART).",
    "pgd_steps": "PGD steps of the pgd attack.",
    "pgd_step_size": "PGD step. [default: 2.5 * eps / pgd-steps]",
    "transfer_attack": f"How `transfer` crafts on --transfer-from: {', '.join(TRANSFER_ATTACKS)}.",
    "sanity": "Run the gradient-masking sanity checks.",
    "sanity_examples": "Test images the sanity checks attack.",
    "sanity_steps": "APGD iterations of the sanity attacks.",
    "sanity_tolerance": "Accuracy slack of the monotonicity checks.",
    "sanity_zero_accuracy": "Accuracy the largest eps must push the model down to.",
    "seed": "Random seed of the attacks.",
}


@cli.command()
@from_params("evaluate")
@click.argument("model", required=False)
@config_options(EvalConfig, _EVAL_HELP)
@click.option("--dataset", help="Dataset name or prepared file. [default: the one the model was trained on]")
@click.option("--transfer-from", help="Model that crafts the `transfer` attack and check (file or registry URI): "
                                      "for a student, its teacher.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Metrics JSON to write. [default: eval_metrics.json beside a model file]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--progress/--no-progress", default=None, help="Progress bars. [default: when stderr is a terminal]")
@click.option("--no-track", is_flag=True, help="Do not record the evaluation in MLflow.")
@click.option("--experiment", help="MLflow experiment. [default: the training run's, else rrm]")
@click.option("--train-run-id", help="Training run to link to. [default: the run that logged this model file]")
def evaluate(model: str | None, dataset: str | None, transfer_from: str | None, out: Path | None, device: str,
             progress: bool | None, no_track: bool, experiment: str | None, train_run_id: str | None,
             **options) -> None:
    """Natural and adversarial accuracy of MODEL (a model file or registry URI) with gradient-masking checks.

    Writes a metrics JSON (for `dvc metrics show` and `rrm teacher register --evaluation`) and records an
    MLflow run linked to the training run of the model.

    \b
    Examples:
      rrm evaluate runs/teacher/model.pt --eps 0.3 --attacks apgd,pgd
      rrm evaluate runs/rrm/model.pt --attacks apgd,transfer --transfer-from models:/rrm-teacher@champion
      rrm evaluate runs/teacher/model.pt --attacks art-apgd --n-examples 1000 --out reports/teacher.json
    """
    from rrm.data import load_dataset
    from rrm.evaluate import evaluate as run_evaluation
    from rrm.evaluate import load_for_evaluation, write_metrics
    from rrm.train import load_teacher, resolve_device

    _need(model, "MODEL (a model file or models:/NAME@ALIAS)")
    if out is None and _from_registry(model):
        raise RRMError(f"pass --out for the metrics of {model} (it has no directory to write them beside)")
    config = EvalConfig.from_dict(options).validate()
    target = resolve_device(device)
    uses_mlflow = not no_track or _from_registry(model) or _from_registry(transfer_from)
    tracking = _tracking() if uses_mlflow else None
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.pull_teacher(model, Path(tmp) / "model.pt")[0] if _from_registry(model) else Path(model)
        net, meta = load_for_evaluation(path, map_location=target)
        dataset = dataset or (meta.get("config") or {}).get("dataset")
        _need(dataset, "--dataset (the model file does not say what it was trained on)")
        data = load_dataset(dataset)
        source = load_teacher(transfer_from, target) if transfer_from else None
        result = run_evaluation(net, data, config, transfer_from=source, progress=progress)
        out = out or path.with_name("eval_metrics.json")
        write_metrics(out, result)
        run_id = None if no_track else tracking.log_evaluation(
            result, model_path=path, train_run_id=train_run_id, experiment=experiment, metrics_path=out)
    attacks = ", ".join(f"{name} {value:.4f}" for name, value in result["adversarial_accuracy"].items())
    sanity = "passed" if result["sanity_passed"] else "FAILED (see `sanity` in the metrics)"
    click.echo(f"natural accuracy {result['natural_accuracy']:.4f}; adversarial ({config.norm}, eps {config.eps}, "
               f"{result['n_examples']} images): {attacks or 'no attacks'}; sanity checks {sanity}; wrote {out}")
    if run_id:
        click.echo(f"MLflow run {run_id} ({tracking.tracking_uri()})")


# --------------------------------------------------------------------------------------------------------- teacher

@cli.group()
def teacher() -> None:
    """Robust teachers in the MLflow model registry: register, list, show, pull, promote."""


@teacher.command("register")
@from_params("register")
@click.argument("source", required=False)
@click.option("--name", default="rrm-teacher", show_default=True, help="Registered model name.")
@click.option("--evaluation", type=click.Path(dir_okay=False, path_type=Path),
              help="Metrics JSON from `rrm evaluate`. [default: the newest evaluation run of the training run]")
@click.option("--force", is_flag=True, help="Register even without an evaluation or adversarial training.")
@click.option("--experiment", default="rrm", show_default=True,
              help="Experiment for the import run of a model file that no tracked run produced.")
def teacher_register(source: str | None, name: str, evaluation: Path | None, force: bool, experiment: str) -> None:
    """Register SOURCE (a training run id or a model.pt) as a new teacher version with a model card.

    \b
    Examples:
      rrm teacher register 3f2a9c...                      # a tracked run, evaluated by `rrm evaluate`
      rrm teacher register runs/teacher/model.pt --evaluation runs/teacher/eval_metrics.json
    """
    _need(source, "SOURCE (a run id or a model file)")
    version = _tracking().register_teacher(source, name, evaluation=evaluation, force=force, experiment=experiment)
    click.echo(f"registered {version.uri} (natural {version.tags['natural_accuracy']}, adversarial "
               f"{version.tags['adversarial_accuracy']}); promote it with `rrm teacher promote {version.version} "
               f"champion --name {name}`")


@teacher.command("list")
@from_params("list")
@click.option("--name", help="Only versions of this registered model. [default: all teachers]")
def teacher_list(name: str | None) -> None:
    """List registered teachers, newest version first.

    \b
    Example:
      rrm teacher list --name rrm-teacher
    """
    found = _tracking().list_teachers(name)
    if not found:
        click.echo("no teachers registered; add one with `rrm teacher register`")
        return
    columns = ("uri", "aliases", "method", "architecture", "norm", "eps", "natural_accuracy", "adversarial_accuracy",
               "dataset")
    rows = [[t.uri, ",".join(t.aliases) or "-", *(_short(t.tags.get(c, "?")) for c in columns[2:])] for t in found]
    widths = [max(len(str(r[i])) for r in [list(columns), *rows]) for i in range(len(columns))]
    for row in [list(columns), *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


@teacher.command("show")
@from_params("show")
@click.argument("uri", required=False)
def teacher_show(uri: str | None) -> None:
    """Show the model card, aliases and tags of a registered teacher.

    \b
    Example:
      rrm teacher show models:/rrm-teacher@champion
    """
    _need(uri, "URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    found = _tracking().show_teacher(uri)
    click.echo(f"{found.uri}  aliases: {', '.join(found.aliases) or '-'}\n")
    click.echo(found.description.rstrip() or "(no model card)")
    click.echo("\ntags:")
    for key, value in sorted(found.tags.items()):
        click.echo(f"  {key}: {value}")


@teacher.command("pull")
@from_params("pull")
@click.argument("uri", required=False)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Model file to write.")
def teacher_pull(uri: str | None, out: Path | None) -> None:
    """Download a registered teacher to a model file (features and head intact).

    \b
    Example:
      rrm teacher pull models:/rrm-teacher@champion --out teachers/champion.pt
    """
    _need(uri, "URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    _need(out, "--out")
    path, meta = _tracking().pull_teacher(uri, out)
    click.echo(f"wrote {path}: {meta.get('model')} trained with {meta.get('method')} on {meta.get('dataset')} "
               f"({meta.get('norm')}, eps {meta.get('eps')})")


@teacher.command("promote")
@from_params("promote")
@click.argument("version", required=False)
@click.argument("alias", required=False)
@click.option("--name", default="rrm-teacher", show_default=True, help="Registered model name.")
def teacher_promote(version: str | None, alias: str | None, name: str) -> None:
    """Point ALIAS (champion, candidate, ...) at VERSION; students use models:/NAME@ALIAS.

    \b
    Example:
      rrm teacher promote 3 champion
    """
    _need(version, "VERSION")
    _need(alias, "ALIAS")
    found = _tracking().promote(name, version, alias)
    click.echo(f"models:/{name}@{alias} -> version {found.version}")


# ------------------------------------------------------------------------------------------------------------ tune

# Training options `rrm tune` takes as flags (any other TrainConfig field goes through --train-option).
_TUNE_TRAIN = ("dataset", "model", "teacher", "norm", "eps", "epochs", "lr", "batch_size", "feature_loss",
               "feature_dim", "width", "device")


@cli.command()
@from_params("tune")
@click.option("--method", help="Method whose knobs are tuned: rrm (lambda), kd (temperature, alpha), kdiga (gamma, "
                               "temperature). [default: rrm]")
@click.option("--mode", help="pareto: maximise natural and APGD accuracy, the Pareto front is the answer; "
                             "constrained: maximise APGD accuracy with a natural-accuracy floor, with pruning. "
                             "[default: pareto]")
@click.option("--n-trials", type=int, help="Finished trials the study should have (a restart continues up to it; "
                                           "workers share it). [default: 20]")
@click.option("--knobs", type=_ListOf(str), help="Knobs to tune, comma-separated: lambda, temperature, alpha, gamma, "
                                                 "lr, epochs. [default: the method's]")
@click.option("--range", "ranges", multiple=True, metavar="NAME=LOW,HIGH",
              help="Search range of a knob, repeatable; a knob given a range is tuned (params file: `ranges:` "
                   "mapping). [default: lambda 1e-5,1 (log); temperature 1,50 (log); alpha 0,1; gamma 0.5,100 "
                   "(log); lr 1e-3,0.5 (log); epochs 1,20]")
@click.option("--min-natural-accuracy", type=float,
              help="Validation natural-accuracy floor, a constraint in either mode. [default: 0, none]")
@click.option("--pruner", help="median, hyperband, threshold or none (constrained mode only). "
                               "[default: median when constrained, none for pareto]")
@click.option("--prune-below", type=float, help="Threshold pruner: stop a trial whose APGD accuracy falls below this.")
@click.option("--storage", help="Optuna storage: sqlite:///FILE.db (one process), journal:FILE.log (several "
                                "processes on one host), postgresql://USER:PASSWORD@HOST:PORT/DB (many hosts). "
                                "[default: sqlite:///optuna.db]")
@click.option("--study-name", help="Study to create or resume. [default: METHOD-MODEL-DATASET]")
@click.option("--seed", type=int, help="Sampler seed, also every trial's training seed. [default: 0]")
@click.option("--validation-size", type=float,
              help="Fraction of the training split held out to score trials. [default: 0.2]")
@click.option("--attack-examples", type=int,
              help="Validation images attacked by APGD after each epoch. [default: 256]")
@click.option("--attack-steps", type=int, help="APGD iterations of the per-epoch score. [default: 20]")
@click.option("--best-trials", type=int, help="Best trials evaluated on the test split. [default: 3]")
@click.option("--test-examples", type=int, help="Test images attacked in that evaluation. [default: all]")
@click.option("--test-steps", type=int, help="APGD iterations of that evaluation. [default: 50]")
@click.option("--test-restarts", type=int, help="APGD restarts of that evaluation. [default: 1]")
@click.option("--out-dir", help="Directory for trials.csv, results.json, the plots and trials/N/model.pt. "
                                "[default: runs/tune/STUDY]")
@click.option("--dataset", help="Registered dataset name or a prepared file. [default: mnist5k]")
@click.option("--model", help=f"Student architecture: {', '.join(ARCHITECTURES)}. [default: cnn]")
@click.option("--teacher", help="Teacher: a model file or a registry URI such as models:/rrm-teacher@champion.")
@click.option("--norm", help="Threat model norm: linf or l2. [default: linf]")
@click.option("--eps", type=float, help="Threat model radius of the APGD scores. [default: 0.3]")
@click.option("--epochs", type=int, help="Epochs per trial (unless tuned). [default: 10]")
@click.option("--lr", type=float, help="Learning rate (unless tuned). [default: 0.1]")
@click.option("--batch-size", type=int, help="Batch size. [default: 128]")
@click.option("--feature-loss", help=f"RRM's feature loss: {', '.join(FEATURE_LOSSES)}. [default: cosine]")
@click.option("--feature-dim", type=int, help="Add a linear layer so the student's features match the teacher's.")
@click.option("--width", type=float, help="Channel width multiplier. [default: 1]")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto]")
@click.option("--train-option", "-o", "train_options", multiple=True, metavar="KEY=VALUE",
              help="Any other training option, repeatable (e.g. -o weight_decay=5e-5 -o schedule=step); fixed for "
                   "every trial.")
@click.option("--no-track", is_flag=True, help="Do not record the study in MLflow.")
@click.option("--experiment", default="rrm", show_default=True, help="MLflow experiment of the study and its trials.")
def tune(ranges: tuple[str, ...], train_options: tuple[str, ...], no_track: bool, experiment: str,
         **options) -> None:
    """Tune a transfer method's knobs with Optuna on a validation split; evaluate the best trials on the test split.

    Each trial trains a student on the training split minus a validation split and is scored there (natural
    accuracy, native APGD accuracy); the test split is used only for the best trials at the end. Writes
    trials.csv, results.json and three plots (Pareto front, accuracy against the knob, optimisation history) to
    --out-dir; in MLflow the study is one parent run with one child run per trial.

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
    from rrm.tune import TuneConfig, parse_range
    from rrm.tune import tune as run_tuning

    base = {k: options.pop(k) for k in _TUNE_TRAIN if options.get(k) is not None}
    for k in _TUNE_TRAIN:
        options.pop(k, None)
    base.update(_key_values(train_options, "--train-option"))
    base.setdefault("monitor_examples", 0)
    values = {k: v for k, v in options.items() if v is not None and v != ()}
    if ranges:
        values["ranges"] = {name: parse_range(bounds) for name, bounds in _key_values(ranges, "--range").items()}
    cfg = TuneConfig(**values, train=TrainConfig.from_dict({**base, "method": values.get("method", "rrm")}))
    tracking = None if no_track else _tracking()
    if tracking is None and _from_registry(cfg.train.teacher):
        _tracking()
    result = run_tuning(cfg, track=not no_track, experiment=experiment, log=lambda line: click.echo(line, err=True))
    click.echo(f"study {result.study_name} in {result.storage}: {result.finished}/{cfg.n_trials} finished trials "
               f"({len(result.ran)} run now, {result.seconds:.0f} s)")
    for best in result.best:
        params = ", ".join(f"{k} {v:.4g}" for k, v in best["params"].items())
        test = best["test"]
        tested = (f"; test natural {test['natural_accuracy']:.4f}, APGD {test['adversarial_accuracy']:.4f}"
                  if test else "; model file not on this host, not tested")
        click.echo(f"  trial {best['number']}: {params}: validation natural {best['natural_accuracy']:.4f}, "
                   f"APGD {best['adversarial_accuracy']:.4f}{tested}")
    click.echo(f"wrote {', '.join(str(p) for p in result.files.values())}")
    if result.parent_run_id:
        click.echo(f"MLflow run {result.parent_run_id} in experiment {experiment!r} ({tracking.tracking_uri()})")


# ---------------------------------------------------------------------------------------------------------- report

@cli.command()
@from_params("report")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Directory the paths below are relative to.")
@click.option("--students-dir", default="runs/students", show_default=True,
              help="Student runs: <name>/train_metrics.json, or seed<N>/<name>/train_metrics.json to average over "
                   "seeds.")
@click.option("--evaluations-dir", default="metrics/students", show_default=True,
              help="Their evaluations: <name>.json, or seed<N>/<name>.json.")
@click.option("--teacher-dir", default="runs/teacher", show_default=True,
              help="The teacher's run (train_metrics.json; optional).")
@click.option("--teacher-evaluation", default="metrics/teacher.json", show_default=True,
              help="The teacher's evaluation.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True, help="Directory for the tables (.md, .csv), report.json and the plot.")
@click.option("--track/--no-track", default=False, show_default=True, help="Log the report files to MLflow.")
@click.option("--experiment", default="rrm", show_default=True, help="MLflow experiment of the report run.")
def report(root: Path, students_dir: str, evaluations_dir: str, teacher_dir: str, teacher_evaluation: str,
           out_dir: Path, track: bool, experiment: str) -> None:
    """The paper's Table 1 and Table 2 and an accuracy-against-training-time plot from a pipeline's metrics.

    With seed<N> directories: one table of means +- 95% CI over the seeds, the cost/robustness frontier plot and
    issue 8's target check (table.md, table.csv, frontier.png, report.json).

    \b
    Examples:
      rrm report --root . --out-dir reports        # after `dvc repro`; prints Table 1
      rrm report --students-dir runs/variants/eps0.3 --evaluations-dir metrics/variants/eps0.3 \\
                 --teacher-dir runs/variants/eps0.3/teacher --teacher-evaluation metrics/variants/eps0.3/teacher.json \\
                 --out-dir reports/variants/eps0.3
    """
    from rrm.report import write_report

    result = write_report(root, out_dir, students_dir=students_dir, evaluations_dir=evaluations_dir,
                          teacher_dir=teacher_dir, teacher_evaluation=teacher_evaluation)
    if track:
        _tracking().log_report([out_dir / name for name in result["files"]], experiment)
    click.echo((out_dir / result["table"]).read_text().rstrip())
    click.echo(f"wrote {', '.join(str(out_dir / n) for n in result['files'])}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="rrm")


if __name__ == "__main__":
    main()
