"""Robustness numbers users can trust: natural and adversarial accuracy, plus automatic checks for gradient masking.

:func:`evaluate` attacks the first ``n_examples`` test images with every attack in :class:`EvalConfig` and, by
default, runs the gradient-masking checks of :mod:`rrm.evaluation.checks` on a subset with the native APGD. The result
is an :class:`~rrm.evaluation.results.EvalResult`, stored as JSON for ``dvc metrics show``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from rrm.attacks import frozen
from rrm.attacks.autoattack import AutoAttack, settings_summary
from rrm.data import ImageData, as_tensor, to_float
from rrm.errors import RRMError
from rrm.evaluation.checks import Constraint, checked, sanity_checks
from rrm.evaluation.config import EvalConfig
from rrm.evaluation.crafts import crafts
from rrm.evaluation.results import EvalResult, spec_record
from rrm.metrics import accuracy
from rrm.models import Classifier, load_model


def check_compatible(model: nn.Module, data: ImageData, role: str = "model") -> None:
    """Raise :class:`RRMError` unless ``data``'s image shape and classes are what ``model`` was built for."""
    spec = getattr(model, "spec", None)
    if not spec or not {"in_channels", "image_size", "num_classes"} <= set(spec):
        raise RRMError(
            f"the {role} has no architecture spec; evaluate models from rrm.models.build_model or "
            "load_model (a wrapper must copy the inner model's `spec`)"
        )
    want = (spec["in_channels"], spec["image_size"], spec["image_size"])
    if data.input_shape != want:
        raise RRMError(
            f"dataset {data.name!r} has {'x'.join(map(str, data.input_shape))} images but the {role} "
            f"expects {'x'.join(map(str, want))}; evaluate on the dataset the model was trained on"
        )
    if data.num_classes != spec["num_classes"]:
        raise RRMError(
            f"dataset {data.name!r} has {data.num_classes} classes but the {role} predicts "
            f"{spec['num_classes']}; evaluate on the dataset the model was trained on"
        )


def load_for_evaluation(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Load a model file or training checkpoint in eval mode and fp32 (ART's wrapper needs both); ``(model, meta)``."""
    model, meta = load_model(path, map_location=map_location)
    return model.float().eval(), meta


def _autoattack(
    attack: AutoAttack,
    x: torch.Tensor,
    y: torch.Tensor,
    config: EvalConfig,
    constraint: Constraint,
    state: str | os.PathLike | None,
    progress: bool | None,
) -> tuple[float, dict]:
    """AutoAttack on the first ``autoattack_examples`` images: its accuracy and what the metrics keep of it."""
    k = len(y) if config.autoattack_examples is None else min(config.autoattack_examples, len(y))
    run = attack.run(to_float(as_tensor(x[:k])), y[:k], state_path=state, progress=progress)
    if k:
        constraint.record(
            run.max_distance - config.eps, run.min_pixel, run.max_pixel, run.finite, math.prod(x.shape[1:])
        )
    if state is not None:
        Path(state).unlink(missing_ok=True)
    return run.accuracy, settings_summary(run, attack)


def evaluate(
    model: nn.Module,
    data: ImageData,
    config: EvalConfig,
    *,
    transfer_from: nn.Module | None = None,
    progress: bool | None = None,
    model_sha256: str | None = None,
    autoattack_state: str | os.PathLike | None = None,
) -> EvalResult:
    """Natural accuracy, adversarial accuracy per attack and the sanity checks.

    AutoAttack runs on the first ``autoattack_examples`` of the attacked images. With ``autoattack_state`` (a file
    path) it saves its progress there after every batch and resumes from it; the file is removed once it finished.

    The models are evaluated in eval mode with frozen parameters; their mode, ``requires_grad`` and ``.grad`` are
    restored afterwards. ``progress=None`` shows bars only on a terminal. ``sanity.enabled`` says whether the
    gradient-masking checks ran (they need eps > 0), while the constraint check covers every attack that ran either
    way. ``sanity_passed`` is True when the masking checks ran and every check passed, False when any check that ran
    failed, and None (not run) when the masking checks did not run: a result never reads as passed for checks it
    skipped.

    The result is bound to what it measured: ``model_sha256`` (the sha256 of the file ``model`` was loaded from,
    :func:`rrm.io.sha256_file`; the caller knows the file), the model's architecture spec, and the data's digest and
    split. Registration and the report check them (:meth:`rrm.evaluation.results.EvalResult.binding_problems`).
    """
    config.validate()
    check_compatible(model, data)
    if transfer_from is not None:
        check_compatible(transfer_from, data, "transfer model")
    if "transfer" in config.attacks and transfer_from is None:
        raise RRMError("attack 'transfer' needs the model to craft on: pass transfer_from (e.g. the teacher)")
    n_test = len(data.test_y)
    n = n_test if config.n_examples is None else config.n_examples
    if n > n_test:
        raise RRMError(f"n_examples={n} exceeds the {n_test} test images of {data.name!r}; pass at most {n_test}")
    x, y = data.test_x[:n], data.test_y[:n]
    constraint = Constraint(config.norm)
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for m in (model, transfer_from):
            if m is not None:
                stack.enter_context(frozen(m))
                m.eval()
        start = time.perf_counter()
        natural = accuracy(model, data.test_x, data.test_y, batch_size=config.batch_size)
        natural_attacked = accuracy(model, x, y, batch_size=config.batch_size)
        seconds["natural"] = time.perf_counter() - start
        table = crafts(model, config, data.num_classes, transfer_from)
        adversarial, settings = {}, {}
        autoattack = None
        for name in config.attacks:
            craft, settings[name] = table[name]
            start = time.perf_counter()
            if isinstance(craft, AutoAttack):
                adversarial[name], autoattack = _autoattack(craft, x, y, config, constraint, autoattack_state, progress)
            else:
                adversarial[name] = accuracy(
                    model,
                    x,
                    y,
                    attack=checked(craft, constraint, config.eps),
                    seed=config.seed,
                    batch_size=config.batch_size,
                    progress=progress,
                    desc=name,
                )
            seconds[name] = time.perf_counter() - start
        sanity: dict = {"enabled": config.sanity and config.eps > 0}
        if sanity["enabled"]:
            start = time.perf_counter()
            k = min(config.sanity_examples, n)
            sanity.update(
                sanity_checks(
                    model, x[:k], y[:k], config, constraint=constraint, transfer_from=transfer_from, progress=progress
                )
            )
            seconds["sanity"] = time.perf_counter() - start
    if math.isfinite(constraint.excess):
        sanity["constraint"] = constraint.result()
    passed = all(c["passed"] for c in sanity.values() if isinstance(c, dict))
    return EvalResult(
        dataset=data.name,
        dataset_digest=data.digest,
        split="validation" if "validation_of" in data.source else "test",
        model_sha256=model_sha256,
        model_spec=spec_record(model.spec),
        norm=config.norm,
        eps=config.eps,
        n_examples=n,
        n_test=n_test,
        natural_accuracy=natural,
        natural_accuracy_attacked=natural_attacked,
        adversarial_accuracy=adversarial,
        attack_settings=settings,
        seconds=seconds,
        sanity_passed=passed if sanity["enabled"] or not passed else None,
        sanity=sanity,
        autoattack=autoattack,
        seed=config.seed,
        art_version=importlib.metadata.version("adversarial-robustness-toolbox"),
        torch_version=torch.__version__,
    )
