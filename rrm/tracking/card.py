"""The model card of a registered teacher, and the reasons a registration is refused unless forced."""

from __future__ import annotations

import math

from rrm.evaluation import EvalResult
from rrm.train import may_teach, teacher_methods

__all__ = ["MIN_EXAMPLES", "model_card", "refusals"]

# A headline on fewer test images is refused unless asked for: on 100 images a 95% interval is about ±8 points.
MIN_EXAMPLES = 100


def model_card(
    meta: dict, spec: dict, feature_dim: int, evaluation: EvalResult | None, run_id: str, sha256: str, forced: list[str]
) -> str:
    """The card (markdown) of a registered teacher: what it is, what its evaluation measured, what was forced."""
    summary = meta.get("summary") or {}
    config = meta.get("config") or {}

    def pct(value: object) -> str:
        return f"{100 * float(value):.2f}%" if isinstance(value, (int, float)) else "not evaluated"

    attack = "not evaluated (registered with --force)"
    if evaluation is not None:
        headline = evaluation.headline_attack
        details = [f"{headline} on {evaluation.examples(headline)} test images"]
        details += [f"{evaluation.norm} eps {evaluation.eps}"] if evaluation.norm else []
        details.append(f"sanity checks {evaluation.sanity_status}")
        others = [
            f"{name} {pct(value)} on {evaluation.examples(name)}"
            for name, value in evaluation.adversarial_accuracy.items()
            if name != headline
        ]
        details += [f"also {', '.join(others)}"] if others else []
        attack = f"{pct(evaluation.headline_accuracy)} ({'; '.join(details)})"
    natural = evaluation.natural_accuracy if evaluation else summary.get("test_accuracy")
    rows = [
        ("architecture", f"{spec.get('name')} (width {spec.get('width', 1.0)})"),
        ("feature size", str(feature_dim)),
        (
            "input",
            f"{spec.get('in_channels')}x{spec.get('image_size')}x{spec.get('image_size')} in [0, 1], "
            f"{spec.get('num_classes')} classes",
        ),
        ("threat model (training)", f"{meta.get('norm', '?')}, eps {meta.get('eps', '?')}"),
        ("training method", f"{meta.get('method', '?')}, {summary.get('epochs', config.get('epochs', '?'))} epochs"),
        ("dataset", f"{meta.get('dataset', '?')} (digest {meta.get('dataset_digest', '?')})"),
        ("natural accuracy", pct(natural)),
        ("adversarial accuracy", attack),
        ("source run", run_id),
        ("model file sha256", sha256),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    title = f"{spec.get('name')} trained with {meta.get('method', '?')} on {meta.get('dataset', '?')}"
    overridden = f"**Registered with --force**, overriding: {'; '.join(forced)}.\n\n" if forced else ""
    return (
        f"# rrm teacher: {title}\n\n"
        f"| field | value |\n|---|---|\n{table}\n\n{overridden}"
        f"Load it with `rrm teacher pull` or `rrm train --method rrm --teacher models:/NAME@ALIAS`.\n"
    )


def _same_number(a: object, b: object) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)


def refusals(
    meta: dict, spec: dict, sha256: str, evaluation: EvalResult | None, min_examples: int = MIN_EXAMPLES
) -> list[str]:
    """Why the card of this model would claim what nobody measured, or claim it on fewer than ``min_examples`` test
    images: one phrase each, empty when nothing does."""
    problems = []
    method = meta.get("method")
    if not may_teach(method):
        what = f"trained with {method!r}" if method else "without training metadata (a checkpoint?)"
        problems.append(
            f"it was {what}; a teacher must be adversarially trained ({', '.join(sorted(teacher_methods()))})"
        )
    if evaluation is None or evaluation.headline_attack is None:
        problems.append(
            "it has no evaluation: run `rrm evaluate` on it (and pass --evaluation with its metrics file "
            "if it was not tracked)"
        )
        return problems
    problems += evaluation.binding_problems(
        model_sha256=sha256, model_spec=spec, dataset_digest=meta.get("dataset_digest")
    )
    if not meta.get("dataset_digest"):
        problems.append(
            "the model file records no training data digest, so the data of its evaluation cannot be checked"
        )
    norm, eps = meta.get("norm"), meta.get("eps")
    if evaluation.norm != norm or not _same_number(evaluation.eps, eps):
        problems.append(
            f"its evaluation is for {evaluation.norm or '?'} eps {evaluation.eps}, not the threat model "
            f"the model was trained for and the card states ({norm or '?'} eps {eps})"
        )
    images = evaluation.examples(evaluation.headline_attack)
    if images is not None and images < min_examples:
        half = 100 * 1.96 * math.sqrt(0.25 / images)
        problems.append(
            f"its headline accuracy ({evaluation.headline_attack}) is on {images} test images, fewer than "
            f"{min_examples} (a 95% interval of up to ±{half:.0f} points): evaluate on more (`rrm evaluate "
            f"--n-examples`), or pass --min-examples {images} to accept it"
        )
    if evaluation.sanity_passed is False:
        problems.append(
            "its evaluation failed its gradient-masking sanity checks, so its adversarial accuracy is not "
            "trustworthy (see `sanity` in its metrics)"
        )
    elif evaluation.masking_checks_passed is None:
        problems.append(
            "its gradient-masking sanity checks did not run (`rrm evaluate --no-sanity`, eps 0 or a file "
            "that does not say), so nothing shows its gradients are not masked"
        )
    return problems
