"""rrm report: tables, CSV, plot and clear errors, on small synthetic metrics files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rrm.cli import cli
from rrm.errors import RRMError
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
    (train_dir / "train_metrics.json").write_text(json.dumps({
        "epochs": epochs, "epoch_seconds_mean": mean, "epoch_seconds_ci95": ci, "total_seconds": total,
        "total_minutes": total / 60, "test_accuracy": natural, "method": name, "model": model}))
    eval_path = root / "metrics" / ("teacher.json" if name == "teacher" else f"students/{name}.json")
    eval_path.parent.mkdir(parents=True, exist_ok=True)
    eval_path.write_text(json.dumps({"natural_accuracy": natural, "adversarial_accuracy": attacks, "eps": 0.2}))


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
    assert "Table 1" in result.output and (out / "table2.md").is_file()


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

    result = CliRunner().invoke(cli, ["report", "--root", str(tmp_path), "--out-dir", str(tmp_path / "o")],
                                standalone_mode=True)
    assert result.exit_code != 0
    assert "no student runs" in result.output


def test_paper_claims_checked_against_the_rows(layout: Path, tmp_path: Path) -> None:
    report = write_report(layout, tmp_path / "reports")
    found = {c["claim"]: c for c in report["claims"]}
    assert found["rrm adversarial >= 80% of sat's"]["measured"] == pytest.approx(100 * 70 / 78)
    assert found["rrm adversarial >= natural's + 20 points"]["measured"] == pytest.approx(70.0)
    assert found["rrm adversarial >= kd's + 20 points"]["measured"] == pytest.approx(65.0)
    assert found["rrm training time <= 0.25 x sat's"]["measured"] == pytest.approx(24 / 120)
    assert "rrm adversarial >= rdt's + 20 points" not in found  # no rdt student: no claim about it
    assert all(c["met"] for c in report["claims"])
    assert json.loads((tmp_path / "reports" / "report.json").read_text())["claims"][
        "rrm training time <= 0.25 x sat's"]["met"] is True

    _write(layout, "rrm", (4, 10.0, 0.5, 40.0, 0.98, {"apgd": 0.10}), "cnn-bn")  # robustness did not transfer
    report = write_report(layout, tmp_path / "reports")
    met = {c["claim"]: c["met"] for c in report["claims"]}
    assert met == {"rrm adversarial >= 80% of sat's": False, "rrm adversarial >= natural's + 20 points": False,
                   "rrm adversarial >= kd's + 20 points": False, "rrm training time <= 0.25 x sat's": False}
    table = (tmp_path / "reports" / "table2.md").read_text()
    assert "**not met**: rrm adversarial >= 80% of sat's — measured 12.8% (10.0 vs 78.0)" in table
