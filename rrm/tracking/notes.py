"""What a training run found, in one paragraph: its MLflow note (the run's description in ``mlflow ui``).

Written when the training ends and rewritten when ``rrm evaluate`` records an evaluation of its model: what was
trained, on what, from which teacher, and the headline numbers, each with its attack and test-image count. Numbers
are rounded to what they mean: accuracies to a tenth of a percent, costs to three figures.
"""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import Run

from rrm.evaluation import EvalResult
from rrm.train import may_teach

__all__ = ["NOTE_TAG", "flops", "percent", "run_note", "write_note"]

NOTE_TAG = "mlflow.note.content"  # what mlflow ui shows as a run's description


def percent(value: float) -> str:
    """An accuracy as people quote it: ``0.69999998807907`` is ``70.0%``."""
    return f"{100 * value:.1f}%"


def flops(value: float) -> str:
    """A count of floating-point operations, three figures: ``6.45e13`` is ``64.5 TFLOPs``."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}FLOPs"
    return f"{value:.3g} FLOPs"


def _training(run: Run) -> str:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    method = params.get("method", "?")
    what = f"{method} `{params.get('model', '?')}` on {tags.get('rrm.dataset', '?')}"
    if may_teach(method) and params.get("eps"):  # trained adversarially: at its threat model
        what += f" at {params.get('norm', 'linf').capitalize()} eps {float(params['eps']):g}"
    if tags.get("rrm.teacher_uri"):
        version = tags.get("rrm.teacher_version")
        what += f", from teacher {tags['rrm.teacher_uri']}" + (f" (version {version})" if version else "")
    if params.get("transplant"):
        what += f", transplant {params['transplant']}"
    epochs = metrics.get("epochs", params.get("epochs"))
    parts = [f"Trained {what}: {int(float(epochs))} epochs, seed {params.get('seed', '?')}"]
    if "test_accuracy" in metrics:
        parts.append(f"test accuracy {percent(metrics['test_accuracy'])} (natural)")
    if "total_flops" in metrics:
        parts.append(f"{flops(metrics['total_flops'])} to train")
    return "; ".join(parts) + "."


def _evaluation(result: EvalResult) -> str:
    threat = f"{result.norm.capitalize()} eps {result.eps:g}" if result.eps is not None else "no attack"
    numbers = [f"natural {percent(result.natural_accuracy)}" + (f" on {result.n_test}" if result.n_test else "")]
    for attack, accuracy in result.adversarial_accuracy.items():
        examples = result.examples(attack)
        numbers.append(f"{attack} {percent(accuracy)}" + (f" on {examples}" if examples else ""))
    headline = ""
    if result.headline_attack is not None:
        headline = (
            f" Robust accuracy: {percent(result.headline_accuracy)} under {result.headline_attack} "
            f"({result.examples(result.headline_attack)} test images)."
        )
    checks = f" Gradient-masking checks: {result.sanity_status}."
    return f"Evaluated at {threat} (test images): {', '.join(numbers)}.{headline}{checks}"


def run_note(run: Run, evaluation: EvalResult | None = None) -> str:
    """The paragraph of a finished training run, with its evaluation's numbers when there is one."""
    if evaluation is None:
        return f"{_training(run)} Not evaluated yet: `rrm evaluate` on its model records its robustness here."
    return f"{_training(run)} {_evaluation(evaluation)}"


def write_note(client: MlflowClient, run_id: str, evaluation: EvalResult | None = None) -> None:
    """Write (or rewrite) the note of training run ``run_id``."""
    client.set_tag(run_id, NOTE_TAG, run_note(client.get_run(run_id), evaluation))
