"""Where a model's robustness sits: first-layer threshold statistics, and layer-by-layer agreement of a student with
its teacher on clean and on attacked inputs. These explain a transfer that failed instead of leaving a bare 0%.

On MNIST a robust model's first layer thresholds the background: a filter whose pre-activation on a background patch
sits far enough below zero stays off for any haze up to eps (Madry et al. 2018). For each first-layer filter ``f``,
on inputs in [0, 1] normalised inside the model, with the stem folded to ``w * z + b`` (:func:`folded_stem`):

- ``margin``: how far below zero the pre-activation sits on a background patch (every pixel 0);
- ``eps_gain``: the most an eps perturbation can move it: ``eps * ||w / std||_1`` (Linf) or ``_2`` (l2);
- ``silent``: the filter stays off under any background haze up to eps: ``margin >= eps * ||max(w, 0) / std||``.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from rrm.attacks import apgd
from rrm.attacks.apgd import frozen
from rrm.models import Classifier
from rrm.models.transplant import folded_stem


def stem_thresholds(model: Classifier, eps: float, norm: str = "linf") -> dict:
    """Per-filter and median first-layer threshold statistics of ``model`` (see the module's docstring)."""
    weight, bias = folded_stem(model)
    mean = torch.tensor(model.spec.get("mean") or [0.0] * weight.shape[1], dtype=weight.dtype)
    std = torch.tensor(model.spec.get("std") or [1.0] * weight.shape[1], dtype=weight.dtype)
    scaled = weight.cpu() / std.view(1, -1, 1, 1)  # the weights seen by raw [0, 1] pixels
    background = bias.cpu() - (scaled * mean.view(1, -1, 1, 1)).flatten(1).sum(1)  # all pixels 0
    margin = -background
    order = 1 if norm == "linf" else 2
    eps_gain = eps * scaled.flatten(1).norm(p=order, dim=1)
    haze_gain = eps * scaled.clamp(min=0).flatten(1).norm(p=order, dim=1)
    silent = margin >= haze_gain
    return {
        "filters": len(margin),
        "silent_fraction": float(silent.float().mean()),
        "median_background_margin": statistics.median(margin.tolist()),
        "median_eps_gain": statistics.median(eps_gain.tolist()),
        "per_filter": [
            {"margin": float(m), "eps_gain": float(g), "silent": bool(s)}
            for m, g, s in zip(margin, eps_gain, silent, strict=True)
        ],
    }


def _agreement(student: dict, teacher: dict) -> dict[str, float]:
    return {
        name: float(F.cosine_similarity(student[name].flatten(1), teacher[name].flatten(1), dim=1).mean())
        for name in student
    }


def layer_agreement(
    student: Classifier,
    teacher: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 20,
    seed: int = 0,
) -> dict:
    """Mean cosine similarity of student and teacher at every stage they share by name and shape, on ``x`` and on
    APGD examples crafted against the student; plus both models' accuracy on those examples."""
    shared = [name for name in student.stage_names if name in teacher.stage_names]
    with torch.no_grad():
        s_clean, t_clean = student.stages(x, shared), teacher.stages(x, shared)
    shared = [name for name in shared if s_clean[name].shape == t_clean[name].shape]
    with frozen(student):
        x_adv = apgd(student, x, y, norm=norm, eps=eps, steps=steps, restarts=1, seed=seed)
    with torch.no_grad():
        s_adv, t_adv = student.stages(x_adv, shared), teacher.stages(x_adv, shared)
        student_acc = float((student(x_adv).argmax(1) == y).float().mean())
        teacher_acc = float((teacher(x_adv).argmax(1) == y).float().mean())
    clean = _agreement({k: s_clean[k] for k in shared}, {k: t_clean[k] for k in shared})
    attacked = _agreement({k: s_adv[k] for k in shared}, t_adv)
    return {
        "layers": {name: {"clean": clean[name], "attacked": attacked[name]} for name in shared},
        "student_accuracy_on_attack": student_acc,
        "teacher_accuracy_on_attack": teacher_acc,
        "skipped": [n for n in student.stage_names if n in teacher.stage_names and n not in shared],
    }
