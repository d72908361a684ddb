"""The report job: a pipeline's metrics as tables, plots and report.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rrm.jobs.common import Tracking, tracking

__all__ = ["ReportConfig", "report_job", "show_report"]


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


def _layout(cfg: ReportConfig) -> dict:
    return {
        "students_dir": cfg.students_dir,
        "evaluations_dir": cfg.evaluations_dir,
        "teacher_dir": cfg.teacher_dir,
        "teacher_evaluation": cfg.teacher_evaluation,
        "attack": cfg.attack,
    }


def show_report(cfg: ReportConfig) -> str:
    """Tables 1 and 2 (or the table over seeds) of a pipeline's metrics as narrow text; writes nothing."""
    from rrm.report import read_report, show

    return show(read_report(cfg.root, **_layout(cfg)))


def report_job(cfg: ReportConfig, track: Tracking = Tracking(enabled=False)) -> dict:
    """Write the tables, plots and report.json of a pipeline's metrics; log them to MLflow when tracked."""
    from rrm.report import write_report

    out_dir = Path(cfg.out_dir)
    result = write_report(cfg.root, out_dir, **_layout(cfg))
    if track.enabled:
        tracking().log_report(
            [out_dir / name for name in result["files"]], track.experiment or "rrm", metrics=result["headline"]
        )
    return result
