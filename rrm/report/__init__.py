"""The paper's Tables 1 and 2 and its accuracy-against-training-time figure, recomputed from a pipeline's metrics.

Layout read (what ``dvc.yaml`` writes; every path is relative to ``root``, and each directory can be moved)::

    runs/teacher/train_metrics.json            # the teacher's training (optional: times with its share)
    metrics/teacher.json                       # its evaluation (optional)
    runs/students/<name>/train_metrics.json    # one directory per student; its method is read from this file
    metrics/students/<name>.json               # `rrm evaluate` of that student

Written to ``out_dir``: ``table1.md``/``table1.csv`` (every student), ``table2.md``/``table2.csv`` (the transfer
methods rdt, kd, kdiga and rrm, and stem transplants, against sat), ``report.json`` (the rows, for ``dvc metrics``) and
``accuracy_vs_time.png``.

With seed directories (``runs/students/seed<N>/<name>/``, ``metrics/students/seed<N>/<name>.json``: what
the variants pipeline writes) every number is a mean +- 95% CI over the seeds instead, written as
``table.md``/``table.csv``, ``report.json`` (with the target check) and ``frontier.png`` (AutoPGD accuracy
against training time).

The adversarial column is AutoAttack (``autoattack``) where the evaluation ran it, else IBM ART's AutoPGD
(``art-apgd``, the paper's reference), else the native APGD-CE (``apgd``); ``attack`` and ``attack_examples`` say
which and on how many test images.

Cost is counted: every speedup and cost target is a ratio of the FLOPs the runs counted (``total_flops`` in
train_metrics.json), which a loaded machine cannot change; rdt's cost with the teacher adds the ``robustify_flops``
of the robustified dataset its model file names. Measured seconds stay beside them, and a per-epoch time whose 95% CI
exceeds 25% of its mean is flagged (``timing_noisy``). Runs without FLOP counts (older files) put every ratio back
on seconds; ``cost_basis`` says which.

Each evaluation must be of the model beside its training metrics (``model.pt``): one whose ``model_sha256`` differs
from that file's is refused with a one-line error. An evaluation that records no ``model_sha256`` (written by hand,
or by rrm before evaluations were bound to their model) is read, with ``evaluation_bound`` false in its row and a
note under the table naming it; so is any evaluation whose model file is absent (not pulled from DVC).

Modules, by idea: the typed rows (:mod:`~rrm.report.rows`), reading the metrics files (:mod:`~rrm.report.reading`),
cost and speedups (:mod:`~rrm.report.costs`), averaging over seeds (:mod:`~rrm.report.averaging`), the paper's
claims and the study target (:mod:`~rrm.report.claims`), the tables (:mod:`~rrm.report.tables`), their narrow text
for a terminal (:mod:`~rrm.report.terminal`) and writing the files (:mod:`~rrm.report.writing`).
"""

from rrm.report.averaging import over_seeds
from rrm.report.claims import claims, target
from rrm.report.reading import collect, read_report
from rrm.report.rows import USES_TEACHER, Claim, Report, RunRow, SeedsRow, Speedups
from rrm.report.terminal import show
from rrm.report.writing import write_report

__all__ = [
    "USES_TEACHER",
    "Claim",
    "Report",
    "RunRow",
    "SeedsRow",
    "Speedups",
    "claims",
    "collect",
    "over_seeds",
    "read_report",
    "show",
    "target",
    "write_report",
]
