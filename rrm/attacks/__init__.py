"""Attacks in [0, 1] pixel space: native torch PGD/FGSM for training and quick looks, APGD-CE native and via ART."""

from rrm.attacks.apgd import apgd, art_apgd, frozen, seeded
from rrm.attacks.pgd import NORMS, ascent_step, check_threat, fgsm, n_fgsm, pgd, project, random_perturbation

__all__ = [
    "NORMS",
    "apgd",
    "art_apgd",
    "ascent_step",
    "check_threat",
    "fgsm",
    "frozen",
    "n_fgsm",
    "pgd",
    "project",
    "random_perturbation",
    "seeded",
]
