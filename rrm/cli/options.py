"""How commands get their options: generated from the typed configs, grouped in ``--help``, overridable from a
section of a params file. The command line therefore never drifts from the library's configs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import click
import cloup
import yaml
from click.core import ParameterSource

from rrm.errors import RRMError, unknown

# Params-file keys and flags spelled differently from the field they set (the paper's name, not Python's).
KEY_ALIASES = {"lambda": "lam"}
SPELLED = {field: key for key, field in KEY_ALIASES.items()}
# The order of the option groups in every command's --help.
GROUPS = ("data", "model", "method", "attack", "schedule", "runtime", "tracking")


class OneOf(click.ParamType):
    """A value from a fixed set, shown as the set in ``--help``; anything else is ``unknown KIND 'x'; choose ...``."""

    def __init__(self, kind: str, choices: Sequence[str]):
        self.kind, self.choices = kind, tuple(choices)
        self.name = "|".join(self.choices)

    def get_metavar(self, param, ctx=None) -> str:
        return f"[{self.name}]"

    def convert(self, value, param, ctx):
        if value not in self.choices:
            raise unknown(self.kind, value, self.choices)
        return value


class ListOf(click.ParamType):
    """A comma-separated list on the command line, a YAML list in a params file; a tuple either way."""

    def __init__(self, item: type):
        self.item = item
        self.name = f"{click.types.convert_type(item).name.upper()},..."

    def convert(self, value, param, ctx):
        items = (
            list(value)
            if isinstance(value, (list, tuple))
            else [v for v in str(value).replace(" ", "").split(",") if v]
        )
        try:
            return tuple(self.item(v) for v in items)
        except (TypeError, ValueError):
            self.fail(f"expected a comma-separated list of {self.item.__name__}, got {value!r}", param, ctx)


def key_values(pairs: tuple[str, ...] | Mapping, flag: str = "--option") -> dict:
    """``("a=1", "b=x")`` -> ``{"a": 1, "b": "x"}`` with YAML-typed values."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RRMError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:  # not YAML (a control character, "a: b"): the text as typed
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 as text
            with contextlib.suppress(ValueError):
                value = float(value)
        out[key.strip()] = value
    return out


def key_value_option(help_text: str) -> Callable:
    """The one spelling of free-form options: ``-o/--option KEY=VALUE``, repeatable (a mapping in a params file)."""
    return click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE", help=help_text)


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one config field appears on the command line: its group, help and, for names, the allowed values."""

    group: str
    help: str
    choices: tuple[str, ...] | None = None
    kind: str = ""  # what an unknown choice is called in the error ("feature loss")


def config_options(
    specs: Mapping[str, Spec],
    *sources: type | tuple[type, Sequence[str]],
    unset_defaults: bool = False,
    extra: Mapping[str, list] | None = None,
) -> Callable:
    """One option per field of each dataclass in ``sources`` (a class, or a class and the fields to take), placed in
    the groups of ``specs``.

    ``unset_defaults``: every option defaults to None, so the caller sees only what the user set (the config's
    default shows in the help). ``extra``: more options by group (``--no-track`` under tracking).
    """
    grouped: dict[str, list] = {g: [] for g in GROUPS}
    for source in sources:
        config, fields = source if isinstance(source, tuple) else (source, None)
        hints = typing.get_type_hints(config)
        defaults = config()
        for name in fields if fields is not None else [f.name for f in dataclasses.fields(config)]:
            grouped[specs[name].group].append(
                _option(name, specs[name], hints[name], getattr(defaults, name), unset_defaults)
            )
    for group, options in (extra or {}).items():
        grouped[group].extend(options)

    def decorate(command: Callable) -> Callable:
        for group in reversed(GROUPS):
            if grouped[group]:
                command = cloup.option_group(f"{group.capitalize()} options", *grouped[group])(command)
        return command

    return decorate


def _option(name: str, spec: Spec, kind: object, default: object, unset_defaults: bool) -> Callable:
    flag = "--" + SPELLED.get(name, name).replace("_", "-")
    if isinstance(kind, types.UnionType):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    is_tuple = typing.get_origin(kind) is tuple
    help_text = spec.help
    if default is None and "[default:" not in help_text:
        help_text += " [default: none]"
    elif "[default:" not in help_text and (unset_defaults or is_tuple):
        help_text += f" [default: {','.join(map(str, default)) if is_tuple else default}]"
    shown = dict(
        default=None if unset_defaults else default,
        show_default=not (unset_defaults or is_tuple) and default is not None,
        help=help_text,
    )
    if kind is bool:
        return cloup.option(f"{flag}/--no-{flag[2:]}", name, **shown)
    if is_tuple:
        if not unset_defaults:
            shown["default"] = ",".join(map(str, default))
        return cloup.option(flag, name, type=ListOf(typing.get_args(kind)[0]), **shown)
    if spec.choices is not None:
        return cloup.option(flag, name, type=OneOf(spec.kind or name.replace("_", " "), spec.choices), **shown)
    return cloup.option(flag, name, type=kind, **shown)


def tracking_options(experiment_help: str, *, run_name: bool = False, default_experiment: str | None = "rrm"):
    """``--no-track``, ``--experiment`` (and ``--run-name``) in the tracking group."""
    options = [
        cloup.option("--no-track", is_flag=True, help="Do not record the run in MLflow."),
        cloup.option(
            "--experiment",
            default=default_experiment,
            show_default=default_experiment is not None,
            help=experiment_help,
        ),
    ]
    if run_name:
        options.append(
            cloup.option(
                "--run-name",
                help="MLflow run name. [default: METHOD-MODEL-DATASET, with the params section's last name (as in "
                "students.transplant-fast) for METHOD]",
            )
        )
    return {"tracking": options}


def _from_file(ctx: click.Context, param: click.Parameter, value: object, where: str) -> object:
    """A params-file value as the option's value. Its YAML type must be the option's: click would turn 1.5 or
    ``true`` into the integer 1 and a list into its text, and the run would go on with something nobody wrote."""
    if value is None:
        if param.default is None and not param.required:
            return None  # an empty key is the option's default
        raise RRMError(f"{where} has no value; give it {_expected(param)}, or remove the key for the default")
    if param.multiple:  # KEY=VALUE options: a mapping (or a list of KEY=VALUE texts)
        if isinstance(value, Mapping):
            value = [f"{k}={json.dumps(v)}" for k, v in value.items()]
        elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise RRMError(f"{where} must be a mapping of KEY: VALUE, got {value!r}")
    elif isinstance(param.type, ListOf):
        items = value if isinstance(value, list) else [value]
        if not (isinstance(value, str) or all(_is_a(param.type.item, v) for v in items)):
            raise RRMError(f"{where} must be {_expected(param)}, got {value!r}")
    elif not _is_a(param.type, value):
        raise RRMError(f"{where} must be {_expected(param)}, got {value!r}")
    try:
        return param.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        raise RRMError(f"{where}: {exc.format_message()}") from None


def _is_a(kind: object, value: object) -> bool:
    """Whether a YAML value has the type of a click parameter type (or of a list item's type)."""
    if kind is int or isinstance(kind, click.types.IntParamType):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float or isinstance(kind, click.types.FloatParamType):
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 as text
            try:
                float(value)
            except ValueError:
                return False
            return True
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool or isinstance(kind, click.types.BoolParamType):
        return isinstance(value, bool)
    if kind is str or isinstance(kind, (click.types.StringParamType, click.Path)):
        return isinstance(value, str)
    return not isinstance(value, (dict, list))  # OneOf and the like check the value themselves


def _expected(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(kind, ListOf):
        return f"a list of {({int: 'integers', float: 'numbers'}).get(kind.item, 'texts')}"
    if isinstance(kind, OneOf):
        return f"one of {', '.join(kind.choices)}"
    for kinds, text in (
        (click.types.IntParamType, "an integer"),
        (click.types.FloatParamType, "a number"),
        (click.types.BoolParamType, "true or false"),
        ((click.types.StringParamType, click.Path), "text"),
    ):
        if isinstance(kind, kinds):
            return text
    return "a value"


def from_params(default_section: str) -> Callable:
    """Add ``--params FILE --section NAME``: that section's values become defaults; flags on the command line win."""
    from rrm.params import read_section

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(params_file: Path | None, section: str, **kwargs):
            if params_file is not None:
                ctx = click.get_current_context()
                ctx.meta["rrm.section"] = section  # a run may be named after it
                by_name = {p.name: p for p in ctx.command.params if p.name not in ("params_file", "section")}
                for key, value in read_section(params_file, section).items():
                    name = KEY_ALIASES.get(str(key), str(key).replace("-", "_"))
                    if name not in by_name:
                        raise unknown(
                            f"key in section {section!r} of {str(params_file)!r}:",
                            key,
                            [SPELLED.get(n, n) for n in by_name],
                        )
                    if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None):
                        where = f"{key} in section {section!r} of {str(params_file)!r}"
                        kwargs[name] = _from_file(ctx, by_name[name], value, where)
            return command(**kwargs)

        return cloup.option_group(
            "Params file options",
            cloup.option(
                "--params",
                "params_file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="YAML params file (e.g. DVC's params.yaml) whose section gives the defaults.",
            ),
            cloup.option(
                "--section",
                default=default_section,
                show_default=True,
                help="Section of the params file to read (dotted for nested ones: students.rrm).",
            ),
        )(wrapper)

    return decorate
