"""Attacks in [0, 1] pixel space: native torch PGD/FGSM for training and quick looks."""

from rrm.attacks.pgd import NORMS, ascent_step, check_threat, fgsm, pgd, project, random_perturbation

__all__ = ["NORMS", "ascent_step", "check_threat", "fgsm", "pgd", "project", "random_perturbation"]
