"""What an evaluation attacks and how (:class:`EvalConfig`), validated at the edge; :func:`rrm.evaluation.evaluate`
runs it."""

from __future__ import annotations

from dataclasses import dataclass

from rrm.attacks.autoattack import components_of
from rrm.attacks.pgd import check_threat
from rrm.config import Config
from rrm.errors import require, unknown

ATTACKS = ("apgd", "art-apgd", "pgd", "fgsm", "transfer", "autoattack")
TRANSFER_ATTACKS = ("apgd", "pgd")
EPS_MULTIPLES = (0.5, 1.0, 2.0, 4.0, 8.0)
# The larger budgets of the monotonicity checks, relative to the sanity attack's.
MORE_STEPS_FACTOR = 4
MORE_RESTARTS = 4


@dataclass
class EvalConfig(Config):
    """What to attack and how. The defaults are the paper's APGD budget (50 iterations x 10 restarts)."""

    KIND = "evaluation"
    LISTS = ("attacks", "autoattack_components")

    norm: str = "linf"
    eps: float = 0.3
    # Native "apgd" is the fast default; final reports add "art-apgd", the paper's reference implementation.
    attacks: tuple[str, ...] = ("apgd",)
    n_examples: int | None = None  # the first n test images are attacked (the splits are shuffled); None: all
    batch_size: int = 128
    steps: int = 50  # APGD iterations, native and ART
    restarts: int = 10  # APGD random restarts, native and ART
    pgd_steps: int = 20
    pgd_step_size: float | None = None  # None: 2.5 * eps / pgd_steps (Madry et al.)
    transfer_attack: str = "apgd"  # how "transfer" crafts on the transfer_from model
    # "autoattack": fra31's AutoAttack (pyautoattack). standard: APGD-CE, APGD-T, FAB-T, Square (5,000 queries);
    # plus, rand; custom runs autoattack_components with standard's budgets.
    autoattack_version: str = "standard"
    autoattack_components: tuple[str, ...] = ()
    autoattack_examples: int | None = None  # AutoAttack on the first n attacked images (it costs more); None: all
    sanity: bool = True
    sanity_examples: int = 200
    sanity_steps: int = 20  # native APGD iterations (1 restart) of the sanity attacks
    # Square's queries per image in the masking check: 1/50 of AutoAttack's 5,000, enough for gross masking (a
    # saturated softmax, a step function) at about 3 s per mnist5k student on 100 images on 2 CPU cores
    sanity_square_queries: int = 100
    sanity_tolerance: float = 0.02
    sanity_zero_accuracy: float = 0.05
    seed: int = 0

    @property
    def pgd_step(self) -> float:
        return self.pgd_step_size if self.pgd_step_size is not None else 2.5 * self.eps / self.pgd_steps

    def _validate_autoattack(self) -> None:
        components_of(self.autoattack_version, tuple(self.autoattack_components))
        require(
            self.autoattack_examples is None or self.autoattack_examples >= 1,
            f"autoattack_examples must be >= 1 (or unset for every attacked image), got {self.autoattack_examples}",
        )
        require(
            self.sanity_square_queries >= 1, f"sanity_square_queries must be >= 1, got {self.sanity_square_queries}"
        )

    def validate(self) -> EvalConfig:
        """Raise :class:`RRMError` for any value out of range; returns self for chaining."""
        require(not isinstance(self.attacks, str), f"attacks must be a list of names, got the string {self.attacks!r}")
        self.check_types()
        check_threat(self.norm, self.eps)
        for name in self.attacks:
            if name not in ATTACKS:
                raise unknown("attack", name, ATTACKS)
        require(len(set(self.attacks)) == len(self.attacks), f"attacks are listed twice in {list(self.attacks)}")
        if self.transfer_attack not in TRANSFER_ATTACKS:
            raise unknown("transfer attack", self.transfer_attack, TRANSFER_ATTACKS)
        self._validate_autoattack()
        require(
            self.n_examples is None or self.n_examples >= 1,
            f"n_examples must be >= 1 (or unset for the whole test split), got {self.n_examples}",
        )
        for name in ("batch_size", "steps", "restarts", "pgd_steps", "sanity_examples", "sanity_steps"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(
            self.pgd_step_size is None or self.pgd_step_size > 0, f"pgd_step_size must be > 0, got {self.pgd_step_size}"
        )
        require(0 <= self.sanity_tolerance < 1, f"sanity_tolerance must be in [0, 1), got {self.sanity_tolerance}")
        require(
            0 <= self.sanity_zero_accuracy < 1,
            f"sanity_zero_accuracy must be in [0, 1), got {self.sanity_zero_accuracy}",
        )
        self.check_finite()
        return self
