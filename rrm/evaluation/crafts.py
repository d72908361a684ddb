"""The attacks as an evaluation runs them: each one a craft ``(x, y, seed) -> x_adv`` (:data:`rrm.metrics.Attack`),
with the settings recorded beside its accuracy."""

from __future__ import annotations

import torch
from torch import nn

from rrm.attacks import apgd, art_apgd, fgsm, frozen, pgd, random_perturbation, seeded
from rrm.attacks.autoattack import AutoAttack
from rrm.evaluation.config import EvalConfig
from rrm.metrics import Attack, accuracy, device_of


def native_apgd(model: nn.Module, norm: str, eps: float, steps: int, restarts: int) -> Attack:
    """Native APGD-CE against ``model``, seeded by the batch's seed."""
    return lambda x, y, seed: apgd(model, x, y, norm=norm, eps=eps, steps=steps, restarts=restarts, seed=seed)


def apgd_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    steps: int,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Native APGD-CE accuracy of ``model`` on ``(x, y)`` (batch ``i`` seeded ``seed + i``), as
    :func:`rrm.evaluation.evaluate` measures it; the model's mode and gradients are left as they were."""
    with frozen(model):
        return accuracy(
            model, x, y, attack=native_apgd(model, norm, eps, steps, restarts), seed=seed, batch_size=batch_size
        )


def crafted_on(source: nn.Module, craft: Attack) -> Attack:
    """Transfer: craft on ``source``'s device, hand the images back on the caller's."""
    device = device_of(source)
    return lambda x, y, seed: craft(x.to(device), y.to(device), seed).to(x.device)


def noise(norm: str, eps: float) -> Attack:
    """Uniform noise in the eps ball, seeded by the batch's seed."""

    def craft(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        with seeded(seed):
            return x + random_perturbation(x, norm, eps)

    return craft


def crafts(model: nn.Module, config: EvalConfig, num_classes: int, transfer_from: nn.Module | None) -> dict:
    """The full-evaluation attacks by name: ``(craft, settings recorded with the result)``."""
    norm, eps = config.norm, config.eps

    def seeded_pgd(source: nn.Module) -> Attack:
        def craft(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
            with seeded(seed):
                return pgd(source, x, y, norm=norm, eps=eps, step_size=config.pgd_step, steps=config.pgd_steps)

        return craft

    def art(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        return art_apgd(
            model,
            x,
            y,
            norm=norm,
            eps=eps,
            num_classes=num_classes,
            steps=config.steps,
            restarts=config.restarts,
            batch_size=config.batch_size,
            seed=seed,
        )

    apgd_settings = {
        "steps": config.steps,
        "restarts": config.restarts,
        "eps_step_initial": 2 * eps,
        "loss": "cross_entropy",
    }
    pgd_settings = {"steps": config.pgd_steps, "step_size": config.pgd_step, "random_start": True}
    table = {
        "apgd": (native_apgd(model, norm, eps, config.steps, config.restarts), apgd_settings),
        "art-apgd": (
            art,
            {
                "max_iter": config.steps,
                "nb_random_init": config.restarts,
                "eps_step": 2 * eps,
                "batch_size": config.batch_size,
                "loss": "cross_entropy",
                "clip_values": "(0, 1)",
            },
        ),
        "pgd": (seeded_pgd(model), pgd_settings),
        "fgsm": (lambda x, y, seed: fgsm(model, x, y, norm=norm, eps=eps), {"step_size": eps, "random_start": False}),
    }
    if "autoattack" in config.attacks:
        autoattack = AutoAttack(
            model,
            norm=norm,
            eps=eps,
            num_classes=num_classes,
            version=config.autoattack_version,
            components=config.autoattack_components,
            seed=config.seed,
            batch_size=config.batch_size,
        )
        table["autoattack"] = (autoattack, autoattack.settings)
    if transfer_from is not None:
        if config.transfer_attack == "apgd":
            source, settings = native_apgd(transfer_from, norm, eps, config.steps, config.restarts), apgd_settings
        else:
            source, settings = seeded_pgd(transfer_from), pgd_settings
        table["transfer"] = (
            crafted_on(transfer_from, source),
            {"attack": config.transfer_attack, **settings, "source_model": transfer_from.spec.get("name", "?")},
        )
    return table
