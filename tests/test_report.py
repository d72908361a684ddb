"""rrm report: tables, CSV, plot and clear errors, on small synthetic metrics files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rrm.cli import cli
from rrm.data import read_dataset, to_float
from rrm.errors import RRMError
from rrm.io import sha256_file
from rrm.plots import FRONTIER_PANELS, plot_students
from rrm.report import collect, write_report

# method: (epochs, epoch seconds mean, ci95, total seconds, natural, {attack: accuracy})
STUDENTS = {
    "natural": (4, 3.0, 0.2, 12.0, 0.99, {"apgd": 0.0}),
    "sat": (4, 30.0, 1.0, 120.0, 0.97, {"apgd": 0.80, "art-apgd": 0.78}),
    "rrm": (4, 6.0, 0.5, 24.0, 0.98, {"apgd": 0.70}),
    "kd": (4, 4.0, 0.1, 16.0, 0.98, {"apgd": 0.05}),
}
TEACHER = (8, 15.0, 0.4, 120.0, 0.96, {"apgd": 0.85})


def _write(root: Path, name: str, values: tuple, model: str) -> None:
    epochs, mean, ci, total, natural, attacks = values
    train_dir = root / "runs" / ("teacher" if name == "teacher" else f"students/{name}")
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "train_metrics.json").write_text(
        json.dumps(
            {
                "epochs": epochs,
                "epoch_seconds_mean": mean,
                "epoch_seconds_ci95": ci,
                "total_seconds": total,
                "total_minutes": total / 60,
                "test_accuracy": natural,
                "method": name,
                "model": model,
            }
        )
    )
    eval_path = root / "metrics" / ("teacher.json" if name == "teacher" else f"students/{name}.json")
    eval_path.parent.mkdir(parents=True, exist_ok=True)
    eval_path.write_text(
        json.dumps(
            {
                "natural_accuracy": natural,
                "adversarial_accuracy": attacks,
                "dataset": "digits",
                "norm": "Linf",
                "eps": 0.2,
            }
        )
    )


# What `rrm report` writes over seeds
SEEDS_REPORT_FILES = ["frontier.png", "report.headline.json", "report.json", "table.csv", "table.md"]


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    for name, values in STUDENTS.items():
        _write(tmp_path, name, values, "cnn-bn")
    _write(tmp_path, "teacher", TEACHER, "cnn")
    return tmp_path


def test_tables_numbers(layout: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    report = write_report(layout, out)
    rows = {r["method"]: r for r in report["students"]}
    assert [r["method"] for r in report["students"]] == ["natural", "sat", "kd", "rrm"]  # the paper's order
    assert rows["sat"]["attack"] == "art-apgd" and rows["sat"]["adversarial_pct"] == pytest.approx(78.0)
    assert rows["rrm"]["attack"] == "apgd" and rows["rrm"]["adversarial_pct"] == pytest.approx(70.0)
    assert rows["rrm"]["speedup_vs_sat"] == pytest.approx(5.0)
    assert rows["rrm"]["speedup_vs_sat_with_teacher"] == pytest.approx(120 / 144)
    assert rows["natural"]["speedup_vs_sat_with_teacher"] == pytest.approx(10.0)  # no teacher needed
    assert rows["rrm"]["adversarial_of_sat_pct"] == pytest.approx(100 * 70 / 78)
    for name in ("table1.md", "table1.csv", "table2.md", "table2.csv", "report.json", "accuracy_vs_time.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "accuracy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "table1.md").read_text()
    assert "| rrm | cnn-bn | 4 | 6.00 ± 0.50 | 0.40 | 98.0 | 70.0 | apgd | 5.00 | 0.83 |" in md
    assert "| teacher | cnn | 8 |" in md
    with (out / "table2.csv").open() as f:
        table2 = {r["method"]: r for r in csv.DictReader(f)}
    assert set(table2) == {"sat", "kd", "rrm"}
    assert float(table2["kd"]["adversarial_pct"]) == pytest.approx(5.0)
    assert float(table2["rrm"]["total_minutes_with_teacher"]) == pytest.approx(2.4)
    assert json.loads((out / "report.json").read_text())["rrm"]["speedup_vs_sat"] == pytest.approx(5.0)


def test_without_teacher_or_sat(tmp_path: Path) -> None:
    _write(tmp_path, "rrm", STUDENTS["rrm"], "cnn-bn")
    report = collect(tmp_path)
    assert report["teacher"] is None
    row = report["students"][0]
    assert row["speedup_vs_sat"] is None and row["speedup_vs_sat_with_teacher"] is None


def test_cli(layout: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-reports"
    result = CliRunner().invoke(cli, ["report", "--root", str(layout), "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "Table 1" in result.output and "Table 2" in result.output and (out / "table2.md").is_file()


def test_a_tracked_report_is_a_run_with_its_files_and_headline_numbers(layout: Path, mlflow_store: Path) -> None:
    """`rrm report --track` (the pipeline's report stage): a "report" run holding the tables, the plot and the
    headline file as artifacts, and each student's headline numbers as metrics."""
    from mlflow import MlflowClient

    result = CliRunner().invoke(cli, ["report", "--root", str(layout), "--out-dir", "tracked", "--track"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{mlflow_store}")
    (run,) = client.search_runs([client.get_experiment_by_name("rrm").experiment_id])
    assert run.info.run_name == "report" and run.info.status == "FINISHED"
    headline = json.loads((mlflow_store.parent / "tracked" / "report.headline.json").read_text())
    assert run.data.metrics["sat/adversarial_pct"] == pytest.approx(headline["sat"]["adversarial_pct"]) == 78.0
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"table1.md", "table2.md", "report.json", "report.headline.json", "accuracy_vs_time.png"} <= logged


def test_show_prints_narrow_tables_and_writes_nothing(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rrm report --show`: Tables 1 and 2 in a terminal's width, each robust accuracy beside its attack and images,
    the claims checked; no file and no directory written."""
    monkeypatch.chdir(layout)  # where the default --out-dir (reports) would go
    sat_eval = layout / "metrics" / "students" / "sat.json"
    sat_eval.write_text(json.dumps({**json.loads(sat_eval.read_text()), "n_examples": 500}))
    before = sorted(layout.rglob("*"))
    result = CliRunner().invoke(cli, ["report", "--show"])
    assert result.exit_code == 0, result.output
    assert sorted(layout.rglob("*")) == before
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    sat = next(line for line in lines if line.startswith("sat "))
    assert sat.split()[1:5] == ["97.0", "78.0", "art-apgd", "(500)"], sat
    assert "Table 2: the students of the teacher against SAT" in result.output
    assert any(line.startswith(("met: rrm", "NOT MET: rrm")) for line in lines), result.output
    refused = CliRunner().invoke(cli, ["report", "--root", str(layout), "--show", "--track"])
    assert refused.exit_code == 2 and "drop --track" in refused.output


def test_missing_and_corrupt_inputs(layout: Path, tmp_path: Path) -> None:
    with pytest.raises(RRMError, match="no student runs"):
        collect(tmp_path / "empty")
    (layout / "metrics" / "students" / "kd.json").unlink()
    with pytest.raises(RRMError, match=r"kd\.json.*does not exist"):
        collect(layout)
    (layout / "metrics" / "students" / "kd.json").write_text("{not json")
    with pytest.raises(RRMError, match="not valid JSON"):
        collect(layout)
    (layout / "metrics" / "students" / "kd.json").write_text(json.dumps({"natural_accuracy": 0.9}))
    with pytest.raises(RRMError, match="adversarial_accuracy"):
        collect(layout)
    _write(layout, "kd", STUDENTS["kd"], "cnn-bn")
    (layout / "runs" / "students" / "kd" / "train_metrics.json").write_text(json.dumps({"epochs": 4}))
    with pytest.raises(RRMError, match="epoch_seconds_mean"):
        collect(layout)


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    from rrm.cli import main  # noqa: F401  (the root group turns RRMError into one line)

    result = CliRunner().invoke(
        cli, ["report", "--root", str(tmp_path), "--out-dir", str(tmp_path / "o")], standalone_mode=True
    )
    assert result.exit_code != 0
    assert "no student runs" in result.output


def _bind(layout: Path, name: str, sha256: str | None = None) -> Path:
    """Give student ``name`` a model.pt and its evaluation a model_sha256 (the file's, unless ``sha256``)."""
    model = layout / "runs" / "students" / name / "model.pt"
    model.write_bytes(f"the {name} student".encode())
    path = layout / "metrics" / "students" / f"{name}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_sha256": sha256 or sha256_file(model)}))
    return model


def test_evaluations_are_checked_against_the_model_beside_them(layout: Path, tmp_path: Path) -> None:
    _bind(layout, "rrm")
    report = write_report(layout, tmp_path / "reports")
    rows = {r["name"]: r for r in report["students"]}
    assert rows["rrm"]["evaluation_bound"] is True
    # Files without a digest (by hand, older rrm) are read, and the table says they were not checked.
    assert rows["kd"]["evaluation_bound"] is False and report["teacher"]["evaluation_bound"] is False
    note = next(
        line
        for line in (tmp_path / "reports" / "table1.md").read_text().splitlines()
        if line.startswith("Not checked against their model file")
    )
    assert note.endswith(": teacher, natural, sat, kd; evaluate them again (dvc repro) to check them.")
    assert json.loads((tmp_path / "reports" / "report.json").read_text())["kd"]["evaluation_bound"] is False

    model = _bind(layout, "kd", sha256="0" * 64)  # the evaluation of another model file
    result = CliRunner().invoke(cli, ["report", "--root", str(layout), "--out-dir", str(tmp_path / "refused")])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: evaluation metrics") and f"are not of {str(model)!r}" in line
    assert f"measured another model file (sha256 000000000000, this one is {sha256_file(model)[:12]})" in line
    assert not (tmp_path / "refused" / "table1.md").exists()


def test_seed_tables_note_unchecked_evaluations(seeded: Path, tmp_path: Path) -> None:
    report = write_report(seeded, tmp_path / "out", **LAYOUT)
    assert all(r["evaluation_bound"] is False for r in report["students"])
    assert "Not checked against their model file" in (tmp_path / "out" / "table.md").read_text()


def test_paper_claims_checked_against_the_rows(layout: Path, tmp_path: Path) -> None:
    report = write_report(layout, tmp_path / "reports")
    found = {c["claim"]: c for c in report["claims"]}
    assert found["rrm adversarial >= 80% of sat's"]["measured"] == pytest.approx(100 * 70 / 78)
    assert found["rrm adversarial >= natural's + 20 points"]["measured"] == pytest.approx(70.0)
    assert found["rrm adversarial >= kd's + 20 points"]["measured"] == pytest.approx(65.0)
    assert found["rrm training time <= 0.25 x sat's"]["measured"] == pytest.approx(24 / 120)
    assert "rrm adversarial >= rdt's + 20 points" not in found  # no rdt student: no claim about it
    assert all(c["met"] for c in report["claims"])
    assert (
        json.loads((tmp_path / "reports" / "report.json").read_text())["claims"]["rrm training time <= 0.25 x sat's"][
            "met"
        ]
        is True
    )

    _write(layout, "rrm", (4, 10.0, 0.5, 40.0, 0.98, {"apgd": 0.10}), "cnn-bn")  # robustness did not transfer
    report = write_report(layout, tmp_path / "reports")
    met = {c["claim"]: c["met"] for c in report["claims"]}
    assert met == {
        "rrm adversarial >= 80% of sat's": False,
        "rrm adversarial >= natural's + 20 points": False,
        "rrm adversarial >= kd's + 20 points": False,
        "rrm training time <= 0.25 x sat's": False,
    }
    table = (tmp_path / "reports" / "table2.md").read_text()
    assert "**not met**: rrm adversarial >= 80% of sat's — measured 12.8% (10.0 vs 78.0)" in table


# The variants study's layout: runs/variants/eps0.3/seed<N>/<name>/, metrics/variants/eps0.3/seed<N>/<name>.json.
# name: (method, {seed: (total seconds, natural, {attack: accuracy}, sanity passed)})
SEEDED = {
    "natural": (
        "natural",
        {0: (60, 0.99, {"apgd": 0.0, "transfer": 0.5}, True), 1: (60, 0.97, {"apgd": 0.0, "transfer": 0.5}, True)},
    ),
    "sat": (
        "sat",
        {0: (600, 0.96, {"apgd": 0.80, "transfer": 0.9}, True), 1: (480, 0.94, {"apgd": 0.76, "transfer": 0.9}, True)},
    ),
    "rrm": ("rrm", {0: (120, 0.98, {"apgd": 0.10, "transfer": 0.7}, True), 1: (120, 0.98, {"apgd": 0.12}, True)}),
    "rrm-teacher-pgd": (
        "rrm",
        {
            0: (150, 0.97, {"apgd": 0.66, "transfer": 0.85}, True),
            1: (180, 0.95, {"apgd": 0.62, "transfer": 0.85}, True),
        },
    ),
    "kd": (
        "kd",
        {
            0: (60, 0.98, {"apgd": 0.70, "transfer": 0.8}, False),  # robust-looking, but masked gradients
            1: (60, 0.98, {"apgd": 0.70, "transfer": 0.8}, True),
        },
    ),
}
T_975_1 = 12.706204736174694  # Student's t, 97.5% quantile, 1 degree of freedom (two seeds)
LAYOUT = {
    "students_dir": "runs/variants/eps0.3",
    "evaluations_dir": "metrics/variants/eps0.3",
    "teacher_dir": "runs/variants/eps0.3/teacher",
    "teacher_evaluation": "metrics/variants/eps0.3/teacher.json",
}


def _write_run(
    train_dir: Path, eval_path: Path, method: str, total: float, natural: float, attacks: dict, sanity: bool
) -> None:
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "train_metrics.json").write_text(
        json.dumps(
            {
                "epochs": 5,
                "epoch_seconds_mean": total / 5,
                "epoch_seconds_ci95": 0.0,
                "total_seconds": total,
                "method": method,
                "model": "cnn-bn",
            }
        )
    )
    eval_path.parent.mkdir(parents=True, exist_ok=True)
    eval_path.write_text(
        json.dumps({"natural_accuracy": natural, "adversarial_accuracy": attacks, "sanity_passed": sanity})
    )


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    for name, (method, seeds) in SEEDED.items():
        for seed, values in seeds.items():
            _write_run(
                root / LAYOUT["students_dir"] / f"seed{seed}" / name,
                root / LAYOUT["evaluations_dir"] / f"seed{seed}" / f"{name}.json",
                method,
                *values,
            )
    _write_run(
        root / LAYOUT["teacher_dir"], root / LAYOUT["teacher_evaluation"], "sat", 900, 0.97, {"apgd": 0.85}, True
    )
    return root


def test_seeds_are_averaged_with_their_ci(seeded: Path, tmp_path: Path) -> None:
    report = write_report(seeded, tmp_path / "out", **LAYOUT)
    assert report["seeds"] == [0, 1] and report["table"] == "table.md"
    rows = {r["name"]: r for r in report["students"]}
    assert list(rows) == ["natural", "sat", "kd", "rrm", "rrm-teacher-pgd"]  # variants after their method
    sat, pgd = rows["sat"], rows["rrm-teacher-pgd"]
    assert pgd["method"] == "rrm" and pgd["seeds"] == 2
    # two seeds: mean (a + b) / 2, 95% CI half-width t(0.975, 1) * |a - b| / 2
    assert sat["adversarial_pct"] == pytest.approx(78.0)
    assert sat["adversarial_pct_ci95"] == pytest.approx(T_975_1 * 2.0)
    assert sat["natural_pct"] == pytest.approx(95.0) and sat["natural_pct_ci95"] == pytest.approx(T_975_1 * 1.0)
    assert sat["total_minutes"] == pytest.approx(9.0) and sat["total_minutes_ci95"] == pytest.approx(T_975_1 * 1.0)
    assert sat["total_minutes_with_teacher"] == pytest.approx(9.0)  # sat needs no teacher
    assert pgd["adversarial_pct"] == pytest.approx(64.0) and pgd["transfer_pct"] == pytest.approx(85.0)
    assert pgd["transfer_pct_ci95"] == pytest.approx(0.0)
    assert pgd["total_minutes"] == pytest.approx(2.75) and pgd["total_minutes_ci95"] == pytest.approx(T_975_1 * 0.25)
    # the teacher's 15 minutes follow the method (rrm), not the directory name
    assert pgd["total_minutes_with_teacher"] == pytest.approx(17.75)
    assert pgd["total_minutes_with_teacher_ci95"] == pytest.approx(T_975_1 * 0.25)
    assert pgd["adversarial_of_sat_pct"] == pytest.approx(100 * 64 / 78)
    assert pgd["time_of_sat"] == pytest.approx(2.75 / 9)
    assert pgd["adversarial_min_pct"] == pytest.approx(62.0) and pgd["worst_seed_of_sat_pct"] == pytest.approx(
        6200 / 78
    )
    assert rows["rrm"]["transfer_pct"] is None  # seed 1 did not run the transfer attack
    assert rows["kd"]["sanity_passed"] is False and rows["natural"]["sanity_passed"] is True
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == SEEDS_REPORT_FILES
    headline = json.loads((out / "report.headline.json").read_text())  # what a tracked report logs as metrics
    assert pgd["total_flops"] is None  # these files count no FLOPs: the headline leaves the key out, not null
    assert headline["rrm-teacher-pgd"] == {
        "natural_pct": pytest.approx(96.0),
        "adversarial_pct": pytest.approx(64.0),
        "sanity_passed": pgd["sanity_passed"],
    }
    assert headline["target_met"] is report["target"]["met"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "table.md").read_text()
    assert (
        f"| rrm-teacher-pgd | rrm | cnn-bn | 2 | 96.0 ± {T_975_1:.1f} | 64.0 ± {T_975_1 * 2:.1f} | 62.0 | apgd | "
        f"85.0 ± 0.0 | 2.75 ± {T_975_1 * 0.25:.2f} | 17.75 ± {T_975_1 * 0.25:.2f} | 82.1 | 0.31 | passed |"
    ) in md
    with (out / "table.csv").open() as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert float(table["sat"]["total_minutes_ci95"]) == pytest.approx(T_975_1)
    assert table["rrm"]["transfer_pct"] == ""


def test_target_check_over_seeds(seeded: Path, tmp_path: Path) -> None:
    goal = write_report(seeded, tmp_path / "out", **LAYOUT)["target"]
    # sat: 78% in 9 min -> a cheap variant needs >= 62.4% in <= 3 min
    assert goal["sat"] == {
        "name": "sat",
        "adversarial_pct": pytest.approx(78.0),
        "total_minutes": pytest.approx(9.0),
        "sanity_passed": True,
    }
    assert goal["thresholds"] == {"adversarial_pct": pytest.approx(62.4), "total_minutes": pytest.approx(3.0)}
    assert set(goal["candidates"]) == {"kd", "rrm", "rrm-teacher-pgd"}  # the students that use the teacher
    assert goal["candidates"]["rrm"]["met"] is False  # 11% is too little
    assert goal["candidates"]["kd"]["met"] is False  # fast and robust-looking, but a seed failed the checks
    assert goal["met_by"] == ["rrm-teacher-pgd"] and goal["met"] is True
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["target"]["met_by"] == ["rrm-teacher-pgd"] and saved["seeds"] == [0, 1]
    assert saved["teacher"]["total_minutes"] == pytest.approx(15.0)
    md = (tmp_path / "out" / "table.md").read_text()
    assert goal["discriminating"] is True and "does not discriminate" not in (tmp_path / "out" / "table.md").read_text()
    natural = goal["natural_adversarial_pct"]
    assert natural == pytest.approx(0.0)  # both seeds of the natural student: 0% APGD
    assert goal["candidates"]["rrm"]["over_natural_points"] == pytest.approx(
        goal["candidates"]["rrm"]["adversarial_pct"] - natural
    )
    md = (tmp_path / "out" / "table.md").read_text()
    assert (
        f"- met: rrm-teacher-pgd — 64.0% (82.1% of sat's, {64.0 - natural:+.1f} points over natural) in 2.75 min "
        "(0.31 x sat's)"
    ) in md
    assert (
        f"- **not met**: kd — 70.0% (89.7% of sat's, {70.0 - natural:+.1f} points over natural) in 1.00 min "
        "(0.11 x sat's), checks FAILED"
    ) in md
    assert "Met by: rrm-teacher-pgd." in md
    # students without the teacher (sat excepted) are checked against the same bar: what to use instead
    assert set(goal["without_teacher"]) == {"natural"} and goal["met_without_teacher"] == []
    assert goal["without_teacher"]["natural"]["met"] is False
    assert "No student without the teacher clears the same bar either." in md

    _write_run(
        seeded / LAYOUT["students_dir"] / "seed1" / "rrm-teacher-pgd",  # slower on seed 1: 4 min
        seeded / LAYOUT["evaluations_dir"] / "seed1" / "rrm-teacher-pgd.json",
        "rrm",
        240,
        0.95,
        {"apgd": 0.62, "transfer": 0.85},
        True,
    )
    goal = write_report(seeded, tmp_path / "out", **LAYOUT)["target"]
    assert goal["candidates"]["rrm-teacher-pgd"]["total_minutes"] == pytest.approx(3.25)
    assert goal["met_by"] == [] and goal["met"] is False
    assert "Met by no student." in (tmp_path / "out" / "table.md").read_text()


def test_a_natural_student_that_clears_the_bar_makes_the_target_say_so(seeded: Path, tmp_path: Path) -> None:
    """MNIST at eps 0.1: natural training alone reached 88% of SAT's APGD accuracy, so "met" would mislead."""
    for seed in (0, 1):
        _write_run(
            seeded / LAYOUT["students_dir"] / f"seed{seed}" / "natural",
            seeded / LAYOUT["evaluations_dir"] / f"seed{seed}" / "natural.json",
            "natural",
            60,
            0.99,
            {"apgd": 0.70, "transfer": 0.8},
            True,
        )
    goal = write_report(seeded, tmp_path / "out", **LAYOUT)["target"]
    assert goal["natural_adversarial_pct"] == pytest.approx(70.0) and goal["discriminating"] is False
    assert goal["candidates"]["rrm-teacher-pgd"]["over_natural_points"] == pytest.approx(-6.0)
    md = (tmp_path / "out" / "table.md").read_text()
    assert (
        "**The target does not discriminate here**: the natural student, with no teacher and no attack, reaches "
        "70.0% >= 62.4%" in md
    )
    assert goal["met_without_teacher"] == ["natural"]
    assert "Without the teacher, the same bar is cleared by: natural (70.0% in 1.00 min, 0.11 x sat's)." in md


def test_a_sat_reference_named_otherwise_is_found_by_its_method(seeded: Path, tmp_path: Path) -> None:
    """A study's SAT student with the teacher's eps warm-up (``sat-warmup``) is the reference when no row is named
    sat: the same ratios and target as under its plain name, and the notes name it."""
    plain = write_report(seeded, tmp_path / "plain", **LAYOUT)
    for seed in (0, 1):
        for base in (LAYOUT["students_dir"], LAYOUT["evaluations_dir"]):
            old = seeded / base / f"seed{seed}" / ("sat" if base == LAYOUT["students_dir"] else "sat.json")
            old.rename(old.with_name(old.name.replace("sat", "sat-warmup")))
    renamed = write_report(seeded, tmp_path / "renamed", **LAYOUT)
    assert renamed["target"]["sat"]["name"] == "sat-warmup" and renamed["target"]["met_by"] == plain["target"]["met_by"]
    rows = {r["name"]: r for r in renamed["students"]}
    assert rows["rrm-teacher-pgd"]["adversarial_of_sat_pct"] == pytest.approx(100 * 64 / 78)
    assert "sat-warmup: 78.0%" in (tmp_path / "renamed" / "table.md").read_text()


def test_cli_report_over_seeds(seeded: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in LAYOUT.items()]
    result = CliRunner().invoke(cli, ["report", "--root", str(seeded), *flags, "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "over seeds" in result.output and "Target met by: rrm-teacher-pgd." in result.output
    assert max(map(len, result.output.splitlines()[:-1])) <= 100  # the last line lists the files written
    assert (out / "frontier.png").is_file()


# Counted cost: FLOPs per run, in TFLOPs. SAT costs 8x natural by count but its time was measured on a busy machine.
FLOPS = {"natural": 1e12, "sat": 8e12, "rrm": 1.2e12, "kd": 1.1e12, "teacher": 6e12}


def _count_flops(root: Path, flops: dict[str, float]) -> None:
    for name, value in flops.items():
        path = root / "runs" / ("teacher" if name == "teacher" else f"students/{name}") / "train_metrics.json"
        metrics = json.loads(path.read_text())
        path.write_text(json.dumps({**metrics, "total_flops": value, "flops_per_epoch": value / metrics["epochs"]}))


def test_speedups_and_cost_targets_come_from_counted_flops(layout: Path, tmp_path: Path) -> None:
    _count_flops(layout, FLOPS)
    report = write_report(layout, tmp_path / "reports")
    rows = {r["name"]: r for r in report["students"]}
    rrm = rows["rrm"]
    assert rrm["cost_basis"] == "flops"
    assert rrm["speedup_vs_sat"] == pytest.approx(8e12 / 1.2e12)  # counted, not 120 s / 24 s
    assert rrm["speedup_vs_sat_measured"] == pytest.approx(5.0)  # the measured seconds stay beside it
    assert rrm["total_flops_with_teacher"] == pytest.approx(7.2e12)
    assert rrm["speedup_vs_sat_with_teacher"] == pytest.approx(8 / 7.2)
    assert rows["natural"]["speedup_vs_sat_with_teacher"] == pytest.approx(8.0)  # no teacher needed
    cost = next(c for c in report["claims"] if "cost" in c["claim"])
    assert cost["claim"] == "rrm training cost <= 0.25 x sat's (counted FLOPs)"
    assert cost["measured"] == pytest.approx(0.15) and cost["met"]
    assert "measured time 0.20 x" in cost["text"]
    md = (tmp_path / "reports" / "table1.md").read_text()
    assert "| rrm | cnn-bn | 4 | 6.00 ± 0.50 | 0.40 | 98.0 | 70.0 | apgd | 6.67 | 1.11 | 1.2 | 7.2 | 5.00 |" in md
    assert "ratios of counted training FLOPs" in md
    with (tmp_path / "reports" / "table2.csv").open() as f:
        table2 = {r["name"]: r for r in csv.DictReader(f)}
    assert float(table2["rrm"]["total_flops"]) == 1.2e12 and table2["rrm"]["cost_basis"] == "flops"
    assert float(table2["rrm"]["speedup_vs_sat_measured"]) == pytest.approx(5.0)

    # one run without a count (an older metrics file): every ratio falls back to seconds, and says so
    _write(layout, "kd", STUDENTS["kd"], "cnn-bn")
    report = write_report(layout, tmp_path / "reports")
    assert {r["cost_basis"] for r in report["students"]} == {"seconds"}
    assert {r["name"]: r for r in report["students"]}["rrm"]["speedup_vs_sat"] == pytest.approx(5.0)
    assert "ratios of measured training time" in (tmp_path / "reports" / "table1.md").read_text()


def test_a_timing_measured_on_a_busy_machine_is_flagged(layout: Path, tmp_path: Path) -> None:
    _write(layout, "kd", (4, 4.0, 1.2, 16.0, 0.98, {"apgd": 0.05}), "cnn-bn")  # CI 30% of the mean
    report = write_report(layout, tmp_path / "reports")
    noisy = {r["name"]: r["timing_noisy"] for r in report["students"]}
    assert noisy == {"natural": False, "sat": False, "kd": True, "rrm": False}  # rrm: 0.5 of 6.0 is 8%
    md = (tmp_path / "reports" / "table1.md").read_text()
    assert "| kd | cnn-bn | 4 | 4.00 ± 1.20 (noisy) |" in md
    assert "**Noisy timing** (per-epoch 95% CI wider than 25% of the mean: a busy machine): kd." in md
    assert json.loads((tmp_path / "reports" / "report.json").read_text())["kd"]["timing_noisy"] is True


def test_autoattack_is_the_headline_column(layout: Path, tmp_path: Path) -> None:
    path = layout / "metrics" / "students" / "sat.json"
    path.write_text(
        json.dumps(
            {
                "natural_accuracy": 0.97,
                "n_examples": 500,
                "eps": 0.2,
                "adversarial_accuracy": {"apgd": 0.80, "art-apgd": 0.78, "autoattack": 0.75},
                "autoattack": {"n_examples": 100, "version": "standard"},
            }
        )
    )
    rows = {r["name"]: r for r in write_report(layout, tmp_path / "reports")["students"]}
    assert rows["sat"]["attack"] == "autoattack" and rows["sat"]["adversarial_pct"] == pytest.approx(75.0)
    assert rows["sat"]["attack_examples"] == 100 and rows["sat"]["apgd_pct"] == pytest.approx(80.0)
    assert rows["rrm"]["attack"] == "apgd" and rows["rrm"]["attack_examples"] is None  # no count in that file
    md = (tmp_path / "reports" / "table1.md").read_text()
    sat_line = next(line for line in md.splitlines() if line.startswith("| sat |"))
    assert "| 75.0 | autoattack |" in sat_line and sat_line.endswith("| 80.0 | 100 |")


def test_one_attack_can_be_chosen_for_every_row(layout: Path, tmp_path: Path) -> None:
    sat = layout / "metrics" / "students" / "sat.json"
    sat.write_text(
        json.dumps({"natural_accuracy": 0.97, "adversarial_accuracy": {"apgd": 0.80, "autoattack": 0.75}, "eps": 0.2})
    )
    rows = {r["name"]: r for r in write_report(layout, tmp_path / "apgd", attack="apgd")["students"]}
    assert {r["attack"] for r in rows.values()} == {"apgd"} and rows["sat"]["adversarial_pct"] == pytest.approx(80.0)
    with pytest.raises(RRMError, match=r"metrics/teacher\.json' has no 'autoattack' accuracy; rerun"):
        write_report(layout, tmp_path / "aa", attack="autoattack")
    assert not (tmp_path / "aa").exists()
    result = CliRunner().invoke(
        cli, ["report", "--root", str(layout), "--out-dir", str(tmp_path / "cli"), "--attack", "apgd"]
    )
    assert result.exit_code == 0, result.output
    assert "| sat | cnn-bn |" in (tmp_path / "cli" / "table1.md").read_text()


def test_rdt_pays_for_robustifying_its_data(layout: Path, tmp_path: Path, digits_teacher, digits) -> None:
    from rrm.models import save_model
    from rrm.robustify import match_features, robustify
    from rrm.train.flops import FlopCounter

    teacher = digits_teacher.model
    small = digits.subset(n_train=24, n_test=8)
    robust = robustify(
        teacher, small, layout / "data" / "robust.safetensors", steps=3, step_size=0.1, batch_size=10, progress=False
    )
    with FlopCounter() as counter:  # by hand: one image's feature matching, as robustify counts a batch per image
        match_features(teacher, to_float(small.train_x[:1]), to_float(small.train_x[1:2]), 3, 0.1)
    assert counter.get_total_flops() > 0
    assert robust.source["robustify_flops"] == pytest.approx(24 * counter.get_total_flops())
    assert (
        read_dataset(layout / "data" / "robust.safetensors").source["robustify_flops"]
        == robust.source["robustify_flops"]
    )

    _write(layout, "rdt", (4, 3.0, 0.2, 12.0, 0.90, {"apgd": 0.0}), "cnn-bn")
    save_model(
        teacher,
        layout / "runs" / "students" / "rdt" / "model.pt",
        {"method": "rdt", "config": {"dataset": "data/robust.safetensors"}},
    )  # relative to the root
    _count_flops(layout, {**FLOPS, "rdt": 1e12})
    rdt = {r["name"]: r for r in collect(layout)["students"]}["rdt"]
    assert rdt["data_flops"] == robust.source["robustify_flops"]
    assert rdt["total_flops_with_teacher"] == pytest.approx(1e12 + 6e12 + robust.source["robustify_flops"])
    assert rdt["speedup_vs_sat"] == pytest.approx(8.0)  # the student alone


def test_catastrophic_overfitting_is_marked_in_the_tables(seeded: Path, layout: Path, tmp_path: Path) -> None:
    # one seed of the seeded study's kd student collapsed; in the one-run layout, fast collapsed and was stopped
    metrics = seeded / LAYOUT["students_dir"] / "seed1" / "kd" / "train_metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "catastrophic_overfitting_epoch": 3}))
    report = write_report(seeded, tmp_path / "seeds", **LAYOUT)
    rows = {r["name"]: r for r in report["students"]}
    assert rows["kd"]["co_seeds"] == 1 and rows["sat"]["co_seeds"] == 0
    md = (tmp_path / "seeds" / "table.md").read_text()
    assert "| kd (CO in 1 of 2 seeds) | kd |" in md and "| sat | sat |" in md

    kd = layout / "runs" / "students" / "kd" / "train_metrics.json"
    values = json.loads(kd.read_text())
    kd.write_text(json.dumps({**values, "catastrophic_overfitting_epoch": 4, "early_stopped_at_epoch": 3}))
    write_report(layout, tmp_path / "one")
    assert "| kd (CO at epoch 4, kept epoch 3) | cnn-bn |" in (tmp_path / "one" / "table1.md").read_text()
    assert "| rrm | cnn-bn |" in (tmp_path / "one" / "table1.md").read_text()
    with (tmp_path / "one" / "table1.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["name"] == "kd")
    assert (row["co_epoch"], row["early_stopped_at_epoch"]) == ("4", "3")


def test_a_stem_transplant_is_a_student_of_the_teacher_whatever_its_method(seeded: Path, tmp_path: Path) -> None:
    # fast from the teacher's stem: its cost with the teacher includes the teacher's, and the target weighs it
    for seed, (total, accuracy) in {0: (150, 0.74), 1: (150, 0.70)}.items():
        train_dir = seeded / LAYOUT["students_dir"] / f"seed{seed}" / "transplant-fast"
        _write_run(
            train_dir,
            seeded / LAYOUT["evaluations_dir"] / f"seed{seed}" / "transplant-fast.json",
            "fast",
            total,
            0.97,
            {"apgd": accuracy},
            True,
        )
        metrics = json.loads((train_dir / "train_metrics.json").read_text())
        (train_dir / "train_metrics.json").write_text(json.dumps({**metrics, "transplant": "stem"}))
    report = write_report(seeded, tmp_path / "out", **LAYOUT)
    row = next(r for r in report["students"] if r["name"] == "transplant-fast")
    assert row["method"] == "fast" and row["uses_teacher"] and row["transplant"] == "stem"
    assert row["total_minutes_with_teacher"] == pytest.approx(2.5 + 15)  # the teacher's 900 s added
    goal = report["target"]
    assert "transplant-fast" in goal["candidates"] and goal["candidates"]["transplant-fast"]["met"]  # 72% >= 62.4%
    assert "transplant-fast" in goal["met_by"]


def _frontier_rows(n: int, **over) -> list[dict]:
    return [
        {
            "name": f"student{k}",
            "total_minutes": 1.0 + k,
            "total_minutes_ci95": 0.5,
            "total_minutes_with_teacher": 5.0 + k,
            "total_minutes_with_teacher_ci95": 0.5,
            "adversarial_pct": 40.0 + k,
            "adversarial_pct_ci95": 3.0,
            "sanity_passed": k not in (1, 11),  # two that failed the checks: hollow, never sharing a style
            "dataset": "mnist5k",
            "norm": "Linf",
            "eps": 0.3,
            "attack": "art-apgd",
            **over,
        }
        for k in range(n)
    ]


def _points(fig) -> list:
    """The data line of every error bar in the figure's first panel."""
    return [container.lines[0] for container in fig.axes[0].containers]


def test_report_rows_carry_the_threat_model_of_their_evaluation(layout: Path) -> None:
    rows = {r["method"]: r for r in collect(layout)["students"]}
    assert (rows["rrm"]["dataset"], rows["rrm"]["norm"], rows["rrm"]["eps"]) == ("digits", "Linf", 0.2)


def test_every_student_has_its_own_colour_and_marker(tmp_path: Path) -> None:
    from matplotlib.colors import to_rgba

    fig = plot_students(_frontier_rows(14), tmp_path / "frontier.png", panels=FRONTIER_PANELS, frontier=True)
    styles = [(to_rgba(line.get_color()), line.get_marker()) for line in _points(fig)]
    assert len(styles) == 14 and len(set(styles)) == 14
    assert sorted(line.get_fillstyle() for line in _points(fig)).count("none") == 2, "failed checks: hollow"


def test_figure_title_names_dataset_threat_model_eps_and_attack(tmp_path: Path) -> None:
    fig = plot_students(_frontier_rows(3), tmp_path / "frontier.png", panels=FRONTIER_PANELS)
    assert fig.get_suptitle() == "mnist5k, Linf eps 0.3, attack art-apgd"
    older = _frontier_rows(2, dataset=None, norm=None, eps=None)
    older[1]["attack"] = "apgd"
    assert plot_students(older, tmp_path / "older.png").get_suptitle() == "?, ? eps ?, attack art-apgd/apgd"


def test_error_bars_stay_within_0_and_100_percent(tmp_path: Path) -> None:
    row = _frontier_rows(1, adversarial_pct=99.0, adversarial_pct_ci95=5.0, total_minutes=0.2)[0]
    fig = plot_students([row], tmp_path / "frontier.png", panels=FRONTIER_PANELS)
    bars = [seg for collection in fig.axes[0].containers[0].lines[2] for seg in collection.get_segments()]
    vertical = [seg[:, 1] for seg in bars if seg[0, 0] == seg[1, 0]]
    horizontal = [seg[:, 0] for seg in bars if seg[0, 1] == seg[1, 1]]
    assert [sorted(v) for v in vertical] == [[94.0, 100.0]], "99 +- 5 drawn as 94 .. 100"
    assert [sorted(h) for h in horizontal] == [[0.0, 0.7]], "0.2 +- 0.5 minutes drawn from 0"


def test_labels_of_students_close_together_do_not_overlap(tmp_path: Path) -> None:
    """Four students within a point of each other on both axes, two far off (the transfer study's prefix rows
    beside its natural and SAT students): every name is drawn, and no two names cover each other."""
    rows = _frontier_rows(6)
    for k, row in enumerate(rows[:4]):
        row.update(total_minutes=20 + 0.5 * k, adversarial_pct=85 + 0.5 * k, adversarial_pct_ci95=None)
    rows[4].update(total_minutes=10, adversarial_pct=0.0)
    rows[5].update(total_minutes=65, adversarial_pct=64.0)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot_students(rows, tmp_path / "close.png", panels=FRONTIER_PANELS)
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(r["name"] for r in rows)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_no_students_to_plot_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(RRMError, match="no students to plot"):
        plot_students([], tmp_path / "empty.png")


def test_the_frontier_is_drawn_against_counted_flops_where_the_target_is(seeded: Path, tmp_path: Path, monkeypatch):
    import rrm.plots

    for path in seeded.rglob("train_metrics.json"):  # every run counted its FLOPs: 1e9 per training second
        values = json.loads(path.read_text())
        path.write_text(json.dumps({**values, "total_flops": values["total_seconds"] * 1e9}))
    drawn = {}
    real = rrm.plots.plot_students

    def spy(rows, path, **kwargs):
        drawn.update(kwargs, rows=rows)
        return real(rows, path, **kwargs)

    monkeypatch.setattr(rrm.plots, "plot_students", spy)
    report = write_report(seeded, tmp_path / "out", **LAYOUT)
    assert report["target"]["cost_basis"] == "flops"
    assert drawn["panels"] == rrm.plots.FRONTIER_FLOP_PANELS
    assert drawn["target_box"][0] == pytest.approx(report["target"]["thresholds"]["total_flops"] / 1e12)
    sat = next(r for r in drawn["rows"] if r["name"] == "sat")
    assert sat["total_tflops"] == pytest.approx(sat["total_flops"] / 1e12) == pytest.approx(0.54)  # (600 + 480) / 2 s
    assert (tmp_path / "out" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
