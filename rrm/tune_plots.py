"""The plots of a tuning study, drawn from plain trial records (see ``rrm.tune._record``) on matplotlib's Agg canvas.

- ``pareto_front.png``: validation natural against adversarial accuracy of every complete trial; the Pareto front
  joined and labelled with trial numbers; the natural-accuracy floor when there is one.
- ``<knob>_vs_accuracy.png``: natural and adversarial accuracy against the first tuned knob (log axis for lambda,
  temperature, gamma, lr): the paper's Figure 4 for lambda. Pruned trials appear at their last APGD accuracy.
- ``optimization_history.png``: each trial's accuracies by trial number and the best so far.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

NATURAL, ADVERSARIAL, PRUNED = "tab:blue", "tab:red", "tab:gray"


def _complete(trials: list[dict]) -> list[dict]:
    return [t for t in trials if t["state"] == "COMPLETE" and t["natural_accuracy"] is not None]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both maximised), by the first coordinate."""
    front = [i for i, (a, b) in enumerate(points)
             if not any(c >= a and d >= b and (c > a or d > b) for c, d in points)]
    return sorted(front, key=lambda i: points[i])


def _save(fig: Figure, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return path


def _empty(ax, trials: list[dict]) -> None:
    ax.text(0.5, 0.5, f"no complete trials yet ({len(trials)} in the study)", ha="center", va="center",
            transform=ax.transAxes)


def plot_pareto(trials: list[dict], path: Path, *, floor: float = 0.0, title: str = "") -> Path:
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    done = _complete(trials)
    if not done:
        _empty(ax, trials)
    feasible = [t for t in done if t["feasible"]]
    ax.scatter([t["natural_accuracy"] for t in done], [t["adversarial_accuracy"] for t in done], c="lightgray",
               edgecolors="gray", label="trial")
    points = [(t["natural_accuracy"], t["adversarial_accuracy"]) for t in feasible]
    front = [feasible[i] for i in pareto_front(points)]
    if front:
        ax.plot([t["natural_accuracy"] for t in front], [t["adversarial_accuracy"] for t in front], "o-",
                color=ADVERSARIAL, label="Pareto front")
        for t in front:
            ax.annotate(str(t["number"]), (t["natural_accuracy"], t["adversarial_accuracy"]),
                        textcoords="offset points", xytext=(4, 4), fontsize="small")
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
    pruned = [t for t in trials if t["state"] == "PRUNED" and t["adversarial_accuracy"] is not None
              and knob in t["params"]]
    if not done and not pruned:
        _empty(ax, trials)
    x = [t["params"][knob] for t in done]
    ax.plot(x, [t["natural_accuracy"] for t in done], "o-", color=NATURAL, label="natural")
    ax.plot(x, [t["adversarial_accuracy"] for t in done], "s-", color=ADVERSARIAL, label="APGD")
    if pruned:
        ax.scatter([t["params"][knob] for t in pruned], [t["adversarial_accuracy"] for t in pruned], marker="x",
                   color=PRUNED, label="APGD when pruned")
    if log:
        ax.set_xscale("log")
    ax.set(xlabel=knob, ylabel="accuracy (validation)", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)


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
        best, so_far = [], float("-inf")
        for t in done:
            if t["feasible"]:
                so_far = max(so_far, t[key])
            best.append(so_far if so_far > float("-inf") else float("nan"))
        ax.step([t["number"] for t in done], best, where="post", color=color, alpha=0.6, label=f"best {label}")
    pruned = [t for t in trials if t["state"] == "PRUNED" and t["adversarial_accuracy"] is not None]
    if pruned:
        ax.scatter([t["number"] for t in pruned], [t["adversarial_accuracy"] for t in pruned], marker="x",
                   color=PRUNED, label="pruned (APGD)")
    failed = [t["number"] for t in trials if t["state"] == "FAIL"]
    if failed:
        ax.scatter(failed, [0] * len(failed), marker="v", color="black", label="failed")
    ax.set(xlabel="trial", ylabel="accuracy (validation)", ylim=(-0.02, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)
