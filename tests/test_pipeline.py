"""params.yaml and dvc.yaml agree with the rrm command line; the pipeline never caches the MLflow store."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _helpers import copy_store, override, override_yaml, undo_cli_settings
from click.testing import CliRunner
from test_report import SEEDS_REPORT_FILES

from rrm.cli import cli
from rrm.evaluation import EvalConfig
from rrm.params import read_section
from rrm.report import USES_TEACHER
from rrm.tracking import flatten
from rrm.train import METHODS, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
STUDIES = ("variants", "stem", "transfer")  # each study's settings beside its pipeline: pipelines/NAME/params.yaml
STUDENTS = ("natural", "sat", "fast", "pgd-fast", "free", "rrm", "kd", "kdiga", "rdt", "transplant-fast")


def params_file(section: str, root: Path = ROOT) -> Path:
    """The params file that holds ``section``: its study's, or the main pipeline's."""
    study = section.split(".")[0]
    return root / "pipelines" / study / "params.yaml" if study in STUDIES else root / "params.yaml"


VARIANTS = read_section(params_file("variants"), "variants")
VARIANT_STUDENTS = (*VARIANTS["without_teacher"], *VARIANTS["with_teacher"])
# section -> the command that reads it
SECTIONS = {
    "prepare": ("data", "prepare"),
    "train_teacher": ("train",),
    "evaluate": ("evaluate",),
    "evaluate_transfer": ("evaluate",),
    "register": ("teacher", "register"),
    "robustify": ("robustify",),
    "report": ("report",),
    "tune": ("tune",),
    **{f"students.{m}": ("train",) for m in STUDENTS},
    "variants.teacher": ("train",),
    "variants.evaluate_teacher": ("evaluate",),
    "variants.evaluate": ("evaluate",),
    "variants.register": ("teacher", "register"),
    **{f"variants.students.{m}": ("train",) for m in VARIANT_STUDENTS},
}


def _command(path: tuple[str, ...]):
    command = cli
    for name in path:
        command = command.get_command(None, name)
    return command


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_section_keys_are_options(section: str) -> None:
    names = {p.name for p in _command(SECTIONS[section]).params}
    for key in read_section(params_file(section), section):
        assert {"lambda": "lam"}.get(key, key.replace("-", "_")) in names, f"{section}: unknown key {key!r}"


@pytest.mark.parametrize("section", ["train_teacher", *(f"students.{m}" for m in STUDENTS)])
def test_train_sections_validate(section: str) -> None:
    values = {("lam" if k == "lambda" else k): v for k, v in read_section(params_file(section), section).items()}
    values["milestones"] = tuple(values.get("milestones", ()))
    cfg = TrainConfig.from_dict(values).validate()
    assert cfg.method in METHODS
    if section.startswith("students."):  # a student is named after its method, or a variant of it (transplant-fast)
        name = section.split(".")[1]
        assert cfg.method == name or (name == f"transplant-{cfg.method}" and cfg.transplant == "stem")


@pytest.mark.parametrize("name", VARIANT_STUDENTS)
def test_variant_sections_validate(name: str) -> None:
    """Each named student of the variants study is a valid run of the method its name starts with, at every eps, and
    sits in the list (with or without the teacher) that its method needs."""
    section = f"variants.students.{name}"
    values = {("lam" if k == "lambda" else k): v for k, v in read_section(params_file(section), section).items()}
    assert "eps" not in values and "seed" not in values, "eps and seed come from the variants lists"
    for eps in VARIANTS["eps"]:
        cfg = TrainConfig.from_dict({**values, "eps": eps}).validate()
        assert name == cfg.method or name.startswith(f"{cfg.method}-")  # method names may hold "-" (n-fgsm)
    assert (cfg.method in USES_TEACHER) == (name in VARIANTS["with_teacher"])


@pytest.mark.parametrize("section", ["evaluate", "evaluate_transfer", "variants.evaluate_teacher", "variants.evaluate"])
def test_eval_sections_validate(section: str) -> None:
    values = {k: v for k, v in read_section(params_file(section), section).items() if k != "progress"}
    EvalConfig.from_dict(values).validate()


def test_dvc_yaml_stages_and_outputs() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {
        "prepare",
        "train_teacher",
        "evaluate_teacher",
        "register_teacher",
        "pull_teacher",
        "robustify",
        "train_student",
        "distill_student",
        "train_rdt",
        "evaluate_student",
        "evaluate_distilled",
        "report",
    } <= set(stages)
    trained = set(stages["train_student"]["foreach"]) | set(stages["distill_student"]["foreach"]) | {"rdt"}
    evaluated = set(stages["evaluate_student"]["foreach"]) | set(stages["evaluate_distilled"]["foreach"])
    assert trained == evaluated == set(STUDENTS)
    text = (ROOT / "dvc.yaml").read_text()
    for stage in stages.values():
        body = stage.get("do", stage)
        assert body["cmd"].startswith("rrm ")
        for kind in ("outs", "metrics", "plots"):
            for out in body.get(kind, []):
                path = out if isinstance(out, str) else next(iter(out))
                assert not any(s in path for s in ("mlflow.db", "mlruns", "mlartifacts", "optuna")), path
    assert "transfer-from" in stages["evaluate_distilled"]["do"]["cmd"]
    assert "mlflow.db" not in text.split("stages:")[1].replace("(mlflow.db", "")
    # Through the registry: every stage that uses the teacher takes the alias of `register`, pinned to the pulled copy
    # it depends on; none reads the training run's model.pt.
    champion, pinned = "models:/${register.name}@${register.alias}", "${train_teacher.out_dir}/${register.alias}.pt"
    assert stages["pull_teacher"]["outs"] == [pinned]
    for name in ("robustify", "distill_student"):
        body = stages[name].get("do", stages[name])
        assert f"--teacher {champion} --teacher-pin {pinned}" in " ".join(body["cmd"].split()), name
        assert pinned in body["deps"] and "${train_teacher.out_dir}/model.pt" not in body["deps"], name
    assert not any("teacher" in read_section(PARAMS, f"students.{m}") for m in STUDENTS), "the pipeline passes it"
    assert read_section(PARAMS, "register")["alias"] == "champion"


def test_tune_section_and_optional_stage() -> None:
    from rrm.tune import TuneConfig, parse_range

    values = read_section(PARAMS, "tune")
    train_keys = {"dataset", "model", "eps", "epochs", "lr"}
    cfg = TuneConfig(
        **{k: v for k, v in values.items() if k not in train_keys | {"ranges"}},
        ranges={k: parse_range(v) for k, v in values["ranges"].items()},
        train=TrainConfig.from_dict(
            {k: values[k] for k in train_keys} | {"method": values["method"], "teacher": "models:/rrm-teacher@champion"}
        ),
    )
    cfg.validate()
    assert cfg.tuned == ("lambda",)
    main = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert not any("tune" in name for name in main), "plain `dvc repro` must not tune"
    stage = yaml.safe_load((ROOT / "pipelines" / "tune" / "pipeline.yaml").read_text())["stages"]["tune"]
    assert stage["wdir"] == "../.." and stage["cmd"] == (
        "rrm tune --params params.yaml --section tune --teacher models:/${register.name}@${register.alias}"
    )
    assert set(stage) & {"metrics", "plots"} == set(), "plain outputs: the default dvc views list the main pipeline's"
    declared = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
    assert all(path.startswith(f"{cfg.out_dir}/") for path in declared)
    assert not any(s in path for path in declared for s in ("optuna", ".db", ".log", "/trials/", "mlflow"))
    assert {d for d in stage["deps"] if not d.startswith("rrm/")} == {
        "${tune.dataset}",
        "${train_teacher.out_dir}/${register.alias}.pt",
    }


def test_variants_pipeline_stages(tmp_path: Path) -> None:
    """The variants study's optional pipeline: thin `rrm` stages from the root, each student evaluated against its eps's
    teacher, outputs where the report reads them, no MLflow store among them; `dvc status` accepts it."""
    text = (ROOT / "pipelines" / "variants" / "pipeline.yaml").read_text()
    stages = yaml.safe_load(text)["stages"]
    assert set(stages) == {
        "teacher",
        "evaluate_teacher",
        "register_teacher",
        "pull_teacher",
        "train",
        "distill",
        "evaluate",
        "evaluate_distilled",
        "report",
    }
    for name, stage in stages.items():
        body = stage.get("do", stage)
        assert body["wdir"] == "../.." and body["cmd"].startswith("rrm "), name
        assert set(body) & {"metrics", "plots"} == set(), f"{name}: plain outputs, out of the default dvc views"
        for kind in ("outs", "metrics", "plots"):
            for out in body.get(kind, []):
                path = out if isinstance(out, str) else next(iter(out))
                assert path.startswith(
                    ("runs/variants/eps${item", "metrics/variants/eps${item", "reports/variants/eps${item}/")
                ), path
                assert not any(s in path for s in ("mlflow", "mlruns", "mlartifacts", "optuna")), path
    pinned = "runs/variants/eps${item.eps}/teacher/${variants.register.alias}.pt"
    for name in ("evaluate", "evaluate_distilled"):
        assert f"--transfer-from {pinned}" in stages[name]["cmd"]
    champion = "models:/${variants.register.name}-eps${item.eps}@${variants.register.alias}"
    assert f"--teacher {champion} --teacher-pin {pinned}" in " ".join(stages["distill"]["cmd"].split())
    assert (
        stages["evaluate"]["matrix"]["student"] == stages["train"]["matrix"]["student"] == "${variants.without_teacher}"
    )
    assert (
        stages["evaluate_distilled"]["matrix"]["student"]
        == stages["distill"]["matrix"]["student"]
        == "${variants.with_teacher}"
    )
    assert "--teacher " not in stages["train"]["cmd"] and "--teacher " in stages["distill"]["cmd"]
    TrainConfig.from_dict(read_section(params_file("variants"), "variants.teacher")).validate()
    work, env, dvc = _pipeline(tmp_path, shrink=False)
    assert _rrm(work, env, "pipeline", "link", "variants").returncode == 0
    status = subprocess.run(
        [dvc, "status", "pipelines/variants/dvc.yaml"], cwd=work, env=env, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    n_runs = len(VARIANTS["eps"]) * len(VARIANTS["seeds"]) * len(VARIANT_STUDENTS)
    assert status.stdout.count("pipelines/variants/dvc.yaml:") == 5 * len(VARIANTS["eps"]) + 2 * n_runs


def _shrink_variants(work: Path, students: tuple[str, ...]) -> None:
    """One eps, one seed, ``students``, one epoch each, a short evaluation (on top of ``_pipeline``'s shrink)."""
    variants = read_section(params_file("variants", work), "variants")
    override_yaml(
        params_file("variants", work),
        {
            "variants.eps": [0.1],
            "variants.seeds": [0],
            "variants.without_teacher": [s for s in students if s in variants["without_teacher"]],
            "variants.with_teacher": [s for s in students if s in variants["with_teacher"]],
            "variants.teacher.epochs": 1,
            "variants.teacher.milestones": [],
            "variants.students.*.epochs": 1,
            **{f"variants.students.{m}.milestones": [] for m in ("sat", "kd", "kdiga")},
            **{
                f"variants.{section}.{key}": value
                for section in ("evaluate_teacher", "evaluate")
                for key, value in (("steps", 5), ("sanity_examples", 50), ("sanity_steps", 5))
            },
        },
    )


def test_mlproject_entry_points() -> None:
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert {"prepare", "train", "evaluate", "robustify", "report", "tune"} <= set(project["entry_points"])
    assert "students.{method}" in project["entry_points"]["train"]["command"]
    assert (ROOT / project["python_env"]).is_file()


# ``_pipeline``'s shrink of params.yaml: the 8x8 digits, one epoch each, short evaluations. Every key must exist
# (``override`` raises otherwise), so a renamed option fails here instead of leaving a stage at full size.
DIGITS = "data/digits.safetensors"
SHRINK = {
    "prepare.dataset": "digits",
    "prepare.out": DIGITS,
    "prepare.options.test_size": 300,
    "train_teacher.dataset": DIGITS,
    "train_teacher.epochs": 1,
    "train_teacher.milestones": [],
    **{
        f"{section}.{key}": value
        for section in ("evaluate", "evaluate_transfer")
        for key, value in (("n_examples", 100), ("steps", 5))
    },
    "robustify.dataset": DIGITS,
    "robustify.out": "data/digits-robust.safetensors",
    "robustify.steps": 5,
    "students.*.dataset": DIGITS,
    "students.*.epochs": 1,
    **{f"students.{m}.milestones": [] for m in ("sat", "kd", "kdiga", "rdt")},
    "students.free.replays": 1,
    "students.rdt.dataset": "data/digits-robust.safetensors",
    "tune.dataset": DIGITS,
    "tune.epochs": 1,
    "variants.teacher.dataset": DIGITS,
    "variants.students.*.dataset": DIGITS,
    **{f"variants.students.{m}.milestones": [] for m in ("sat", "kd", "kdiga")},
    "variants.evaluate_teacher.n_examples": 100,
    "variants.evaluate.n_examples": 100,
}


def _shrink(root: Path) -> None:
    """:data:`SHRINK` applied to the params files under ``root``, each key to the file that holds its section."""
    files: dict[Path, dict[str, object]] = {}
    for key, value in SHRINK.items():
        files.setdefault(params_file(key, root), {})[key] = value
    for path, overrides in files.items():
        override_yaml(path, overrides)


def _pipeline(tmp_path: Path, shrink: bool = True) -> tuple[Path, dict, str]:
    """This checkout's dvc.yaml, pipelines/, params.yaml, .dvcignore and rrm/ (the stages' code dependencies) in a
    fresh repository; ``shrink``: :data:`SHRINK`. The stages run this checkout's rrm (PYTHONPATH), not the copy."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(ROOT / "dvc.yaml", work)
    shutil.copytree(ROOT / "pipelines", work / "pipelines", ignore=shutil.ignore_patterns("dvc.yaml", "dvc.lock"))
    shutil.copytree(ROOT / "rrm", work / "rrm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PARAMS, work / "params.yaml")
    if shrink:
        _shrink(work)
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
    }
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=work, env=env, check=True)
    shutil.copy(ROOT / ".dvcignore", work)  # after `dvc init`, which writes its own
    return work, env, dvc


def test_override_sets_existing_keys_and_refuses_unknown_ones() -> None:
    params = {"evaluate": {"steps": 20, "eps": 0.2}, "students": {"a": {"epochs": 3}, "b": {"epochs": 3, "x": 1}}}
    assert override(params, {"evaluate.steps": 5, "students.*.epochs": 1, "students.b.x": 2}) == {
        "evaluate": {"steps": 5, "eps": 0.2},
        "students": {"a": {"epochs": 1}, "b": {"epochs": 1, "x": 2}},
    }
    for key in ("evaluate.step", "evaluat.steps", "students.c.epochs", "students.*.x", "evaluate.steps.n", "*.eps"):
        with pytest.raises(KeyError, match="override"):
            override(params, {key: 0})
    assert params["evaluate"] == {"steps": 5, "eps": 0.2}


def test_shrink_overrides_existing_keys() -> None:
    """``SHRINK`` names keys of this checkout's params.yaml (``override`` raises otherwise) and shrinks the
    evaluations too (a text edit once matched only robustify's `steps: 20 `)."""
    params = override(
        {**yaml.safe_load(PARAMS.read_text()), "variants": read_section(params_file("variants"), "variants")}, SHRINK
    )
    assert params["evaluate"]["steps"] == params["evaluate_transfer"]["steps"] == params["robustify"]["steps"] == 5
    assert {s["epochs"] for s in params["students"].values()} == {1}
    assert {s["dataset"] for s in params["students"].values()} == {DIGITS, params["robustify"]["out"]}


# A stage's package code, by its command (see dvc.yaml's header): what `dvc status` must watch.
TRAIN_CODE = {"rrm/attacks", "rrm/data", "rrm/models", "rrm/train", "rrm/config.py"}
# rrm/evaluation and the top-level modules it imports: never rrm/train.
EVAL_CODE = {
    "rrm/attacks",
    "rrm/data",
    "rrm/evaluation",
    "rrm/models",
    "rrm/config.py",
    "rrm/errors.py",
    "rrm/io.py",
    "rrm/metrics.py",
}
CODE = {
    "rrm data prepare": {"rrm/data"},
    "rrm train": TRAIN_CODE,
    "rrm evaluate": EVAL_CODE,
    "rrm teacher register": {"rrm/models", "rrm/train"},
    "rrm teacher pull": {"rrm/models", "rrm/train"},
    "rrm robustify": TRAIN_CODE | {"rrm/robustify.py"},
    "rrm report": {"rrm/report", "rrm/stats.py", "rrm/plots.py", "rrm/train"},
    "rrm tune": TRAIN_CODE | EVAL_CODE,
}


@pytest.mark.parametrize("pipeline", ["dvc.yaml", "pipelines/tune/pipeline.yaml", "pipelines/variants/pipeline.yaml"])
def test_stages_depend_on_their_code(pipeline: str) -> None:
    """Every stage lists its command's package code among its deps, each one a path of this checkout (from the
    repository root, which is every pipelines/ stage's wdir)."""
    stages = yaml.safe_load((ROOT / pipeline).read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        assert (ROOT / pipeline).parent.joinpath(body.get("wdir", ".")).resolve() == ROOT, name
        command = next(c for c in sorted(CODE, key=len, reverse=True) if body["cmd"].startswith(c + " "))
        code = {d for d in body["deps"] if d.startswith("rrm")}
        assert code == CODE[command], f"{pipeline}: {name}"
        assert all((ROOT / d).exists() for d in code), f"{pipeline}: {name}: {sorted(code)}"


@pytest.mark.parametrize(
    "pipeline",
    [
        "dvc.yaml",
        "pipelines/stem/pipeline.yaml",
        "pipelines/transfer/pipeline.yaml",
        "pipelines/variants/pipeline.yaml",
    ],
)
def test_students_take_their_teacher_from_the_registry_pinned_to_a_pulled_copy(pipeline: str) -> None:
    stages = yaml.safe_load((ROOT / pipeline).read_text())["stages"]
    commands = {name: stage.get("do", stage)["cmd"] for name, stage in stages.items()}
    assert any(c.startswith("rrm teacher register") for c in commands.values()), pipeline
    assert any(c.startswith("rrm teacher pull") for c in commands.values()), pipeline
    taking = {name: c for name, c in commands.items() if c.startswith("rrm train") and "--teacher " in c}
    assert taking, pipeline
    for name, command in taking.items():
        assert "--teacher models:/" in command and "--teacher-pin " in command, f"{pipeline}: {name}"


def _commit_outputs(work: Path, *targets: str) -> set[str]:
    """Record ``targets`` (dvc.yaml files or ``dvc.yaml:stage``) in dvc.lock as if they had run: a placeholder file
    for every output, then `dvc commit --force` (DVC's own function, in this process), which hashes deps and outputs
    without running anything. Returns the names of the stages recorded."""
    from dvc.repo import Repo

    names = set()
    with contextlib.chdir(work), Repo(".") as repo:  # where the command line runs: targets are read from the cwd
        for target in targets:
            for stage in repo.stage.collect(target):
                names.add(stage.name)
                for out in stage.outs:
                    path = Path(out.fs_path)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"placeholder of {stage.addressing}\n")
        for target in targets:
            repo.commit(target, force=True)
    return names


def _changed(work: Path, target: str = "dvc.yaml") -> dict[str, set[str]]:
    """`dvc status` (DVC's own function, in this process: what `dvc status --json` prints): each changed stage with
    the deps it reports changed."""
    from dvc.repo import Repo

    with contextlib.chdir(work), Repo(".") as repo:
        status = repo.status(targets=[target])
    return {
        stage: {dep for entry in entries if isinstance(entry, dict) for dep in entry.get("changed deps", {})}
        for stage, entries in status.items()
    }


def _append(path: Path, text: str) -> str:
    source = path.read_text()
    path.write_text(source + text)
    return source


def test_code_edits_change_the_stages_that_run_that_code(tmp_path: Path) -> None:
    """After an edit to rrm/train/methods.py `dvc status` reports every stage that runs it as changed: all but
    prepare and the evaluations (the report and the registry read the methods' facts there); edits to rrm/evaluation
    and rrm/report only the stages running them, and an edit to an attack every stage that trains or evaluates."""
    work = _pipeline(tmp_path)[0]
    names = _commit_outputs(work, "dvc.yaml")
    assert _changed(work) == {}
    trained = {n for n in names if n.startswith(("train_", "distill_student@"))}
    evaluated = {n for n in names if n.startswith("evaluate_")}
    assert {"train_teacher", "train_rdt", "train_student@natural", "distill_student@rrm"} <= trained
    assert {"evaluate_teacher", "evaluate_distilled@rrm"} <= evaluated
    assert trained | evaluated | {"robustify", "register_teacher", "pull_teacher", "report", "prepare"} == names

    methods = work / "rrm" / "train" / "methods.py"
    source = _append(methods, "# an edit\n")
    assert _changed(work) == {name: {"rrm/train"} for name in names - {"prepare"} - evaluated}
    methods.write_text(source)  # back to the committed code: only the edits below count
    run, writing = work / "rrm" / "evaluation" / "run.py", work / "rrm" / "report" / "writing.py"
    sources = _append(run, "# an edit\n"), _append(writing, "# an edit\n")
    assert _changed(work) == {**{name: {"rrm/evaluation"} for name in evaluated}, "report": {"rrm/report"}}
    run.write_text(sources[0])
    writing.write_text(sources[1])
    _append(work / "rrm" / "attacks" / "pgd.py", "# an edit\n")
    assert _changed(work) == {name: {"rrm/attacks"} for name in trained | evaluated | {"robustify"}}


def test_plain_dvc_status_reads_the_main_pipeline_and_the_linked_studies(tmp_path: Path) -> None:
    """Once the main pipeline has run, a plain `dvc status` is clean: the studies stay out of DVC's view until `rrm
    pipeline link` (or `run`) puts one in, and `unlink` takes it out again; `dvc metrics show` never lists them."""
    work, env, dvc = _pipeline(tmp_path)
    _commit_outputs(work, "dvc.yaml")

    def status() -> str:
        return subprocess.run([dvc, "status"], cwd=work, env=env, check=True, capture_output=True, text=True).stdout

    assert status().strip() == "Data and pipelines are up to date."
    linked = _rrm(work, env, "pipeline", "link", "stem")
    assert linked.returncode == 0 and "pipelines/stem/dvc.yaml -> pipeline.yaml" in linked.stdout, linked.stderr
    assert os.readlink(work / "pipelines" / "stem" / "dvc.yaml") == "pipeline.yaml"  # relative: the clone can move
    listed = _rrm(work, env, "pipeline", "list").stdout.splitlines()
    assert [line.split()[:2] for line in listed] == [
        ["stem", "linked"],
        ["transfer", "not"],
        ["tune", "not"],
        ["variants", "not"],
    ]
    stages = [line for line in status().splitlines() if line and not line.startswith("\t")]  # "FILE:STAGE:"
    assert "pipelines/stem/dvc.yaml:teacher@0.3:" in stages, stages
    assert all(line.startswith("pipelines/stem/dvc.yaml:") for line in stages), stages
    shown = subprocess.run([dvc, "metrics", "show", "--json"], cwd=work, env=env, check=True, capture_output=True)
    (workspace,) = json.loads(shown.stdout).values()
    assert set(workspace.get("data", {})) <= _declared_metrics(work)
    assert _rrm(work, env, "pipeline", "unlink", "stem").returncode == 0
    assert status().strip() == "Data and pipelines are up to date."
    assert not (work / "pipelines" / "stem" / "dvc.yaml").exists()


def test_pipeline_commands_refuse_unknown_names_and_foreign_files(tmp_path: Path) -> None:
    work, env, _ = _pipeline(tmp_path)
    unknown = _rrm(work, env, "pipeline", "run", "stems")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert "unknown pipeline 'stems': choose from stem, transfer, tune, variants" in unknown.stderr
    own = work / "pipelines" / "tune" / "dvc.yaml"
    own.write_text("stages: {}\n")  # a dvc.yaml of the user's: never replaced
    refused = _rrm(work, env, "pipeline", "run", "tune", "--dry")
    assert refused.returncode == 1 and "exists and is not a link to pipeline.yaml" in refused.stderr, refused.stderr
    assert own.read_text() == "stages: {}\n"
    elsewhere = _rrm(work / "pipelines", env, "pipeline", "list")
    assert elsewhere.returncode == 1 and "run rrm pipeline from the repository root" in elsewhere.stderr


def test_bytecode_does_not_change_code_deps(tmp_path: Path) -> None:
    work = _pipeline(tmp_path)[0]
    _commit_outputs(work, "dvc.yaml:prepare")
    cache = work / "rrm" / "data" / "__pycache__"
    cache.mkdir()
    (cache / f"core.{sys.implementation.cache_tag}.pyc").write_bytes(b"bytecode")
    assert _changed(work, "dvc.yaml:prepare") == {}


def _set(work: Path, section: str, **values) -> None:
    override_yaml(work / "params.yaml", {f"students.{section}.{key}": value for key, value in values.items()})


def test_dvc_repro_stops_on_bad_params_and_keeps_earlier_outputs(tmp_path: Path) -> None:
    """Each bad student setting stops `dvc repro` at that stage with the CLI's one-line error; upstream (recorded as
    run: the student's options are refused before its teacher is read) stays intact."""
    work, env, dvc = _pipeline(tmp_path)
    upstream_stages = ("prepare", "train_teacher", "evaluate_teacher", "register_teacher", "pull_teacher")
    _commit_outputs(work, *(f"dvc.yaml:{stage}" for stage in upstream_stages))
    upstream = ["data/digits.safetensors", "runs/teacher/model.pt", "metrics/teacher.json", "runs/teacher/champion.pt"]
    cases = [
        ({"lambda": -0.5}, "lambda must be > 0"),
        ({"method": "rmm"}, "unknown method 'rmm'"),
        ({"feature_loss": "cos"}, "unknown feature loss 'cos'"),
    ]
    digests = None
    for values, message in cases:
        _set(work, "rrm", **values)
        run = subprocess.run([dvc, "repro", "distill_student@rrm"], cwd=work, env=env, capture_output=True, text=True)
        output = run.stdout + run.stderr
        assert run.returncode != 0, output
        errors = [line for line in output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and message in errors[0], output
        assert "failed to reproduce 'distill_student@rrm'" in output
        assert not (work / "runs" / "students" / "rrm").exists()  # nothing half-written
        now = {path: (work / path).read_bytes() for path in upstream}
        assert digests in (None, now)  # upstream outputs untouched by the failing stage
        digests = now
        _set(work, "rrm", **{"lambda": 0.05, "method": "rrm", "feature_loss": "cosine"})
    status = subprocess.run([dvc, "status", "register_teacher"], cwd=work, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout  # prepare -> register stayed reproduced


@pytest.mark.slow
def test_dvc_repro_smoke(tmp_path: Path) -> None:
    """The whole pipeline on the 8x8 digits data with one epoch each; a second repro does nothing, and a plain `dvc
    status` says that all is up to date."""
    work, env, dvc = _pipeline(tmp_path)
    subprocess.run([dvc, "repro"], cwd=work, env=env, check=True)
    assert (work / "reports" / "table1.md").is_file() and (work / "reports" / "accuracy_vs_time.png").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (report,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "run_name = 'report'")
    assert "report.headline.json" in {a.path for a in client.list_artifacts(report.info.run_id)}
    second = subprocess.run([dvc, "repro"], cwd=work, env=env, check=True, capture_output=True, text=True)
    assert "Running stage" not in second.stdout
    status = subprocess.run([dvc, "status"], cwd=work, env=env, check=True, capture_output=True, text=True)
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason=(
        "measured 2026-11-27 on the default pipeline (mnist5k, Linf eps 0.2, cnn-bn students, 3 epochs): "
        "the RRM student "
        "reached 1.8% APGD against SAT's 83.8% (natural 14.4%, KD 19.8%, RDT 0.0%) while matching the teacher's "
        "features (transfer attack 75.6%); plain RRM does not transfer robustness on this data (notebook/studies.md). "
        "strict: if it ever passes, the README's statement is out of date"
    ),
)
def test_default_pipeline_shows_the_papers_ordering(tmp_path: Path) -> None:
    """The paper's claims on the default (mnist5k) pipeline, as `rrm report` checks them: the RRM student reaches at
    least 80% of the SAT student's adversarial accuracy, 20 points above the natural, KD and RDT students, in at most
    a quarter of SAT's training time."""
    work, env, dvc = _pipeline(tmp_path, shrink=False)
    subprocess.run([dvc, "repro"], cwd=work, env=env, check=True)
    claims = json.loads((work / "reports" / "report.json").read_text())["claims"]
    assert len(claims) == 5, claims
    failed = {name: round(claim["measured"], 2) for name, claim in claims.items() if not claim["met"]}
    assert not failed, f"not met on this data: {failed}; table: {(work / 'reports' / 'table2.md').read_text()}"


@pytest.mark.slow
def test_variants_pipeline_smoke(tmp_path: Path) -> None:
    """The variants pipeline on the digits with one eps, one seed and three students (a variant among them): the report
    per eps (tables, frontier plot, report.json with the target check) appears; a second repro does nothing."""
    work, env, dvc = _pipeline(tmp_path)
    _shrink_variants(work, ("sat", "rrm", "rrm-teacher-pgd"))
    first = _rrm(work, env, "pipeline", "run", "variants")
    assert first.returncode == 0, first.stdout + first.stderr
    out = work / "reports" / "variants" / "eps0.1"
    assert sorted(p.name for p in out.iterdir()) == SEEDS_REPORT_FILES
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0] and set(report["target"]["candidates"]) == {"rrm", "rrm-teacher-pgd"}
    assert report["rrm-teacher-pgd"]["method"] == "rrm" and report["rrm-teacher-pgd"]["transfer_pct"] is not None
    assert report["rrm"]["total_minutes_with_teacher"] > report["rrm"]["total_minutes"]  # the teacher's share
    assert "| rrm-teacher-pgd | rrm | cnn-bn | 1 |" in (out / "table.md").read_text()
    assert (work / "metrics" / "variants" / "eps0.1" / "seed0" / "sat.json").is_file()
    second = subprocess.run(
        [dvc, "repro", "pipelines/variants/dvc.yaml"], cwd=work, env=env, check=True, capture_output=True, text=True
    )
    assert "Running stage" not in second.stdout
    status = subprocess.run(
        [dvc, "status", "pipelines/variants/dvc.yaml"], cwd=work, env=env, check=True, capture_output=True, text=True
    )
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout


def _rrm(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("rrm")), *args], cwd=work, env=env, capture_output=True, text=True
    )


def test_the_pipeline_goes_through_the_registry(
    tmp_path: Path, migrated_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shrunk `dvc repro` of a student of the teacher: the teacher is registered and promoted to the alias of
    params.yaml, then pulled; `rrm teacher pull models:/rrm-teacher@champion` works afterwards; the student's run names
    the teacher's name, version and run; the teacher's run is named and tagged as a teacher's and carries its
    evaluation once; an alias that moved stops a student before any work; what ran is up to date for `dvc status`, and
    `dvc metrics show` lists the default pipeline's files only."""
    from mlflow import MlflowClient

    from rrm.io import sha256_file

    work, env, dvc = _pipeline(tmp_path)
    copy_store(migrated_mlflow_db, work / "mlflow.db")
    run = subprocess.run([dvc, "repro", "distill_student@kd"], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    teacher, pinned = work / "runs" / "teacher" / "model.pt", work / "runs" / "teacher" / "champion.pt"
    # The commands after the pipeline run in this process (the stages ran as processes): the same code and store
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    undo_cli_settings(monkeypatch)
    pulled = CliRunner().invoke(cli, ["teacher", "pull", "models:/rrm-teacher@champion", "--out", "again.pt"])
    assert pulled.exit_code == 0, pulled.output
    assert sha256_file(work / "again.pt") == sha256_file(pinned) == sha256_file(teacher)
    assert "models:/rrm-teacher@champion -> version 1" in (work / "runs" / "teacher" / "registered.txt").read_text()

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    (student,) = client.search_runs(experiments, "tags.`rrm.teacher_uri` = 'models:/rrm-teacher@champion'")
    (trained,) = client.search_runs(experiments, "tags.`rrm.role` = 'teacher'")
    tags = student.data.tags
    assert (tags["rrm.teacher_name"], tags["rrm.teacher_version"]) == ("rrm-teacher", "1")
    assert tags["rrm.teacher_run_id"] == trained.info.run_id and tags["rrm.teacher_sha256"] == sha256_file(teacher)
    assert trained.info.run_name == "teacher · sat-cnn-digits" and student.info.run_name == "kd-cnn-bn-digits"
    assert {"robust/apgd", "robust/autoattack", "checks/passed"} <= set(trained.data.metrics)
    evaluations = client.search_runs(experiments, f"tags.`rrm.train_run_id` = '{trained.info.run_id}'")
    assert len(evaluations) == 1, "registering with the evaluation's metrics file logged it a second time"
    assert evaluations[0].info.run_name == "apgd+autoattack linf eps=0.2 · sat-cnn-digits"  # named before registering

    # The champion moved since it was pulled (the pin is another file): one line, nothing written, no run.
    moved = CliRunner().invoke(
        cli,
        [
            *("train", "--params", "params.yaml", "--section", "students.kd", "--out-dir", "runs/moved"),
            *("--teacher", "models:/rrm-teacher@champion", "--teacher-pin", "runs/students/kd/model.pt"),
        ],
    )
    assert moved.exit_code == 1 and moved.stderr.count("\n") == 1, moved.output
    assert "the alias moved since the file was pulled" in moved.stderr and "version 1 of 'rrm-teacher'" in moved.stderr
    assert not (work / "runs" / "moved").exists()
    assert len(client.search_runs(experiments)) == 3  # teacher, its evaluation, the student
    bad_alias = _rrm(
        work,
        env,
        "teacher",
        "register",
        "runs/teacher/model.pt",
        "--evaluation",
        "metrics/teacher.json",
        "--alias",
        "latest",
    )
    assert bad_alias.returncode == 1 and "invalid alias 'latest'" in bad_alias.stderr
    assert len(client.search_model_versions("name = 'rrm-teacher'")) == 1

    status = subprocess.run(
        [dvc, "status", "--with-deps", "distill_student@kd"], cwd=work, env=env, capture_output=True, text=True
    )
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    shown = subprocess.run([dvc, "metrics", "show", "--json"], cwd=work, env=env, capture_output=True, text=True)
    (workspace,) = json.loads(shown.stdout).values()  # one revision: the workspace
    files = set(workspace["data"])
    declared = _declared_metrics(work)
    assert files and files <= declared, sorted(files - declared)
    assert {"runs/teacher/train_metrics.headline.json", "runs/students/kd/train_metrics.headline.json"} <= files
    # Headline numbers only: accuracies with their image counts, FLOPs, the checks; no settings, versions or times
    teacher = workspace["data"]["metrics/teacher.headline.json"]["data"]
    assert teacher["natural"]["images"] > 0 and teacher["apgd"]["images"] > teacher["autoattack"]["images"] > 0
    assert teacher["checks_passed"] is True
    assert set(workspace["data"]["runs/students/kd/train_metrics.headline.json"]["data"]) == {
        "test_accuracy",
        "train_loss",
        "epochs",
        "total_flops",
    }
    written = [entry["data"] for entry in workspace["data"].values() if "data" in entry]  # stages not run: "error"
    leaves = dict(kv for data in written for kv in flatten.leaves(data))
    assert leaves and all(isinstance(v, int | float) for v in leaves.values()), leaves
    assert len(leaves) <= 13, sorted(leaves)  # the columns of `dvc metrics show`: 449 before headline files


def _declared_metrics(work: Path) -> set[str]:
    """The metrics files the main dvc.yaml declares, as paths."""
    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        return {
            str(Path(out.fs_path).relative_to(work))
            for stage in repo.stage.collect(str(work / "dvc.yaml"))
            for out in stage.outs
            if out.metric
        }
