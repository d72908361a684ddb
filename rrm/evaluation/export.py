"""An evaluation in other layouts: RobustBench's model_info file (``rrm evaluate --format robustbench``)."""

from __future__ import annotations

from rrm.errors import RRMError
from rrm.evaluation.results import EvalResult


def robustbench_json(result: EvalResult, meta: dict, *, model: str, train_run_id: str | None = None) -> dict:
    """``result`` in RobustBench's model_info layout (accuracies as percent strings, as its files hold them), with
    what RobustBench keeps in the directory name (threat model) and what it leaves implicit (images, source run).

    Clean accuracy is on the images AutoAttack attacked, as RobustBench's ``benchmark`` measures it. rrm trains only
    on the dataset's training split (a robustified set is made from it), so ``additional_data`` is false.
    """
    autoattack = result.autoattack or {}
    accuracy_after = autoattack.get("accuracy_after", {})
    if "autoattack" not in result.adversarial_accuracy or "clean" not in accuracy_after:
        raise RRMError("the evaluation has no AutoAttack result; run it with --attacks autoattack")
    eps = result.eps
    eps_text = f"{round(eps * 255)}/255" if eps and abs(eps * 255 - round(eps * 255)) < 1e-6 else f"{eps:g}"
    config = meta.get("config") or {}
    return {
        "link": None,
        "name": f"rrm {meta.get('method', config.get('method', '?'))} {meta.get('model', '?')}",
        "authors": None,
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": result.dataset,
        "venue": None,
        "architecture": meta.get("model", config.get("model")),
        "eps": eps_text,
        "clean_acc": f"{100 * accuracy_after['clean']:.2f}",
        "reported": None,
        "autoattack_acc": f"{100 * result.adversarial_accuracy['autoattack']:.2f}",
        "footnote": f"AutoAttack {autoattack.get('version')} ({autoattack.get('components')}; pyautoattack "
        f"{autoattack.get('package_version')}, seed {autoattack.get('seed')}) by rrm evaluate",
        "threat_model": {"linf": "Linf", "l2": "L2"}.get(result.norm or "", result.norm),
        "n_examples": autoattack.get("n_examples"),
        "source_run": {
            "model": model,
            "train_run_id": train_run_id,
            "method": meta.get("method"),
            "dataset_digest": meta.get("dataset_digest"),
        },
    }
