"""Every plot rrm draws, on matplotlib's Agg canvas (``Figure`` without pyplot: no display, no global state).

Import this module only where a plot is written: matplotlib takes a second to import, and the command line starts
without it.

- A tuning study, from plain trial records (see ``rrm.tune._record``):

  - ``pareto_front.png``: validation natural against adversarial accuracy of every complete trial; the Pareto front
    joined and labelled with trial numbers; the natural-accuracy floor when there is one.
  - ``<knob>_vs_accuracy.png``: natural and adversarial accuracy against the first tuned knob (log axis for lambda,
    temperature, gamma, lr): the paper's Figure 4 for lambda. Pruned trials appear at their last APGD accuracy.
  - ``optimization_history.png``: each trial's accuracies by trial number and the best so far.

- A report's students (``rrm report``): accuracy against training time (the paper's Figures 2 and 3,
  ``accuracy_vs_time.png``) or, over seeds, the frontier with the variants study's target region (``frontier.png``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from adjustText import adjust_text
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rrm.errors import RRMError


def threat_title(dataset, norm, eps, attack) -> str:
    """What produced a figure's numbers, for its title: ``mnist5k, Linf eps 0.3, attack art-apgd``.

    Each argument is one value or a list of them (one per plotted run): distinct values are joined with ``/``, and
    one that no run recorded (an older evaluation file) shows as ``?``.
    """

    def one(values) -> str:
        values = values if isinstance(values, (list, tuple)) else [values]
        shown = dict.fromkeys(f"{v:g}" if isinstance(v, float) else str(v) for v in values if v not in (None, "", "-"))
        return "/".join(shown) or "?"

    return f"{one(dataset)}, {one(norm)} eps {one(eps)}, attack {one(attack)}"


def _save(fig: Figure, path: str | os.PathLike, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return Path(path)


# --------------------------------------------------------------------------------------------------------- tuning

NATURAL, ADVERSARIAL, PRUNED = "tab:blue", "tab:red", "tab:gray"


def _complete(trials: list[dict]) -> list[dict]:
    return [t for t in trials if t["state"] == "COMPLETE" and t["natural_accuracy"] is not None]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both maximised), by the first coordinate."""
    front = [i for i, (a, b) in enumerate(points) if not any(c >= a and d >= b and (c > a or d > b) for c, d in points)]
    return sorted(front, key=lambda i: points[i])


def _empty(ax, trials: list[dict]) -> None:
    ax.text(
        0.5,
        0.5,
        f"no complete trials yet ({len(trials)} in the study)",
        ha="center",
        va="center",
        transform=ax.transAxes,
    )


def plot_pareto(trials: list[dict], path: Path, *, floor: float = 0.0, title: str = "") -> Path:
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    done = _complete(trials)
    if not done:
        _empty(ax, trials)
    feasible = [t for t in done if t["feasible"]]
    ax.scatter(
        [t["natural_accuracy"] for t in done],
        [t["adversarial_accuracy"] for t in done],
        c="lightgray",
        edgecolors="gray",
        label="trial",
    )
    points = [(t["natural_accuracy"], t["adversarial_accuracy"]) for t in feasible]
    front = [feasible[i] for i in pareto_front(points)]
    if front:
        ax.plot(
            [t["natural_accuracy"] for t in front],
            [t["adversarial_accuracy"] for t in front],
            "o-",
            color=ADVERSARIAL,
            label="Pareto front",
        )
        for t in front:
            ax.annotate(
                str(t["number"]),
                (t["natural_accuracy"], t["adversarial_accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="small",
            )
    if floor > 0:
        ax.axvline(floor, color="black", linestyle="--", linewidth=1, label=f"natural floor {floor:g}")
    ax.set(xlabel="natural accuracy (validation)", ylabel="APGD accuracy (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)


def plot_knob(trials: list[dict], knob: str, log: bool, path: Path, *, title: str = "") -> Path:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    done = sorted(_complete(trials), key=lambda t: t["params"][knob])
    pruned = [
        t for t in trials if t["state"] == "PRUNED" and t["adversarial_accuracy"] is not None and knob in t["params"]
    ]
    if not done and not pruned:
        _empty(ax, trials)
    x = [t["params"][knob] for t in done]
    ax.plot(x, [t["natural_accuracy"] for t in done], "o-", color=NATURAL, label="natural")
    ax.plot(x, [t["adversarial_accuracy"] for t in done], "s-", color=ADVERSARIAL, label="APGD")
    if pruned:
        ax.scatter(
            [t["params"][knob] for t in pruned],
            [t["adversarial_accuracy"] for t in pruned],
            marker="x",
            color=PRUNED,
            label="APGD when pruned",
        )
    if log:
        ax.set_xscale("log")
    ax.set(xlabel=knob, ylabel="accuracy (validation)", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)


def running_best(trials: list[dict], key: str) -> tuple[list[float], list[tuple[int, float]]]:
    """The best ``key`` among feasible trials so far at each trial (nan before the first), and the (trial, value)
    points where it improved."""
    best, better, so_far = [], [], float("-inf")
    for t in trials:
        if t["feasible"] and t[key] > so_far:
            so_far = t[key]
            better.append((t["number"], so_far))
        best.append(so_far if so_far > float("-inf") else float("nan"))
    return best, better


def plot_history(trials: list[dict], mode: str, path: Path, *, title: str = "") -> Path:
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    if not _complete(trials):
        _empty(ax, trials)
    series = [("natural_accuracy", NATURAL, "natural"), ("adversarial_accuracy", ADVERSARIAL, "APGD")]
    if mode != "pareto":
        series = series[1:]  # the objective; natural accuracy is the constraint
    done = _complete(trials)
    for key, color, label in series:
        ax.scatter([t["number"] for t in done], [t[key] for t in done], color=color, label=label)
        best, better = running_best(done, key)
        ax.step([t["number"] for t in done], best, where="post", color=color, alpha=0.6, label=f"best {label}")
        if better:  # each improvement ringed: the last one, on the last trial, has no step after it to show it
            ax.scatter(*zip(*better), s=90, facecolors="none", edgecolors=color)
    pruned = [t for t in trials if t["state"] == "PRUNED" and t["adversarial_accuracy"] is not None]
    if pruned:
        ax.scatter(
            [t["number"] for t in pruned],
            [t["adversarial_accuracy"] for t in pruned],
            marker="x",
            color=PRUNED,
            label="pruned (APGD)",
        )
    failed = [t["number"] for t in trials if t["state"] == "FAIL"]
    if failed:
        ax.scatter(failed, [0] * len(failed), marker="v", color="black", label="failed")
    ax.set(xlabel="trial", ylabel="accuracy (validation)", ylim=(-0.02, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)


# --------------------------------------------------------------------------------------------------------- report

ACCURACY_PANELS = (
    ("total_minutes", "training time (min)", "adversarial_pct", "adversarial accuracy (%)"),
    ("total_minutes", "training time (min)", "natural_pct", "natural accuracy (%)"),
)
# Students cycle through tab20's colours and these markers together; as 20 and 9 share no factor, the first 180
# students all differ in (colour, marker).
MARKERS = "osD^vP*<>"
COLOURS = tuple(colormaps["tab20"].colors)
LABELLED_POINTS = 10  # up to this many students, each point is also labelled with its name
FRONTIER_PANELS = (
    ("total_minutes", "student training time (min)", "adversarial_pct", "adversarial accuracy (%)"),
    (
        "total_minutes_with_teacher",
        "training time incl. the teacher's (min)",
        "adversarial_pct",
        "adversarial accuracy (%)",
    ),
)


# The same, against counted training FLOPs (``total_tflops``: ``total_flops`` / 1e12), where every run counted them.
FRONTIER_FLOP_PANELS = (
    ("total_tflops", "student training TFLOPs", "adversarial_pct", "adversarial accuracy (%)"),
    ("total_tflops_with_teacher", "training TFLOPs incl. the teacher's", "adversarial_pct", "adversarial accuracy (%)"),
)


def student_styles(names: list[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """One (colour, marker) pair per student, none shared (see :data:`MARKERS`)."""
    return {name: (COLOURS[k % len(COLOURS)], MARKERS[k % len(MARKERS)]) for k, name in enumerate(names)}


def _error(value: float, ci: float | None, low: float, high: float) -> list[list[float]] | None:
    """Asymmetric error bars for ``value`` +- ``ci``, cut at ``low`` and ``high`` (0 and 100 for a percentage)."""
    if ci is None:
        return None
    return [[min(ci, max(value - low, 0.0))], [min(ci, max(high - value, 0.0))]]


def plot_students(
    rows: list[dict],
    path: Path,
    panels=ACCURACY_PANELS,
    target_box: tuple[float, float] | None = None,
    frontier: bool = False,
) -> Figure:
    """One panel per ``(x key, x label, y key, y label)``, a point per row (Figures 2 and 3 by default); returns the
    figure it saved.

    Each student has its own colour and marker in every panel, named in a legend beside the panels; the title names
    the dataset, threat model, eps and attack of the rows (``dataset``, ``norm``, ``eps``, ``attack``). Rows holding
    ``<key>_ci95`` (means over seeds) get 95% CI error bars, cut at 0 and 100 for percentages (``*_pct``) and at 0
    for times; rows whose evaluation failed the gradient-masking checks are hollow markers. ``frontier`` joins the
    points that passed them and that no other such point beats on both time and accuracy; ``target_box`` ``(max x,
    min y)`` shades the target region on the first panel.
    """
    if not rows:
        raise RRMError("no students to plot: the report found no train_metrics.json with an evaluation")
    # with many students (the variants study's 13, most at 0% at eps 0.3) labels next to the points would overlap,
    # so only few get them.
    failed = {r["name"] for r in rows if r.get("sanity_passed") is False}
    style = student_styles([r["name"] for r in rows])
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    handles = {}
    for i, (ax, (x, x_label, y, y_label)) in enumerate(zip(axes[0], panels)):
        shown = sorted((r for r in rows if r.get(x) is not None and r.get(y) is not None), key=lambda r: (r[x], -r[y]))
        labels = []
        for r in shown:
            color, marker = style[r["name"]]
            y_high = 100.0 if y.endswith("_pct") else math.inf
            handles[r["name"]] = ax.errorbar(
                r[x],
                r[y],
                xerr=_error(r[x], r.get(f"{x}_ci95"), 0.0, math.inf),
                yerr=_error(r[y], r.get(f"{y}_ci95"), 0.0 if y.endswith("_pct") else -math.inf, y_high),
                capsize=3,
                fmt=marker,
                color=color,
                fillstyle="none" if r["name"] in failed else "full",
            )
            if len(rows) <= LABELLED_POINTS:
                labels.append(ax.text(r[x], r[y], r["name"], fontsize=8))
        if frontier:
            best, front = -math.inf, []
            for r in shown:
                if r.get("sanity_passed") is not False and r[y] > best:
                    best = r[y]
                    front.append((r[x], r[y]))
            if front:
                ax.plot(*zip(*front), drawstyle="steps-post", color="grey", alpha=0.6, label="frontier")
        if target_box is not None and i == 0:
            ax.fill_between(
                [0, target_box[0]],
                target_box[1],
                100,
                color="tab:green",
                alpha=0.12,
                label="target: >= 80% of sat's accuracy, <= 1/3 of its cost",
            )
        if frontier or target_box is not None:
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(y_label.replace(" (%)", "") + " against " + x_label.replace(" (min)", ""), fontsize=10)
        ax.grid(alpha=0.3)
        if labels:  # moved apart where students sit close together, each joined to its point by a line
            adjust_text(labels, ax=ax, arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    fig.suptitle(threat_title(*([r.get(key) for r in rows] for key in ("dataset", "norm", "eps", "attack"))))
    names = [r["name"] for r in rows if r["name"] in handles]
    fig.tight_layout()
    fig.legend(
        [handles[n] for n in names],
        [n + (" (checks failed)" if n in failed else "") for n in names],
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        title="student",
        title_fontsize=8,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
