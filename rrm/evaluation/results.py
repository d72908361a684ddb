"""What ``rrm evaluate`` measured, as one typed value: written once, read back by the report, tuning and tracking.

:class:`EvalResult` mirrors the metrics JSON file field by field, so ``dvc metrics show`` keeps reading the same
nested scalars and :meth:`EvalResult.to_json` of a fresh evaluation is exactly the dict that was written before the
type existed. Every field but the two accuracies is optional: hand-written or older files hold fewer keys, and keys
this version does not know are kept (``extra``) so that a file read and written again is unchanged.

An evaluation is bound to what it measured: the model file's sha256 and architecture, and the dataset's digest and
split. :meth:`EvalResult.binding_problems` says where it does not match a given model; registration
(:mod:`rrm.tracking.registry`) and the report (:mod:`rrm.report`) refuse such a result.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rrm.errors import RRMError
from rrm.io import write_json


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def spec_record(spec: Mapping) -> dict:
    """What an evaluation records of a model's architecture spec: its scalar entries (name, classes, input channels
    and size, width, feature size). The per-channel normalisation is left out, as lists would break the metrics
    file's flat scalars; the model file's sha256 covers it."""
    return {k: v for k, v in spec.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}


def _describe(spec: Mapping) -> str:
    side = spec.get("image_size", "?")
    return (
        f"{spec.get('name', '?')} on {spec.get('in_channels', '?')}x{side}x{side} images, "
        f"{spec.get('num_classes', '?')} classes"
    )


def headline_attack(accuracy: Mapping[str, float], examples: Mapping[str, int | None]) -> str | None:
    """The attack whose accuracy a result quotes: the lowest among the attacks run on the most test images (the first
    listed on a tie). AutoAttack run on fewer images stays beside it: a minimum over different images would mix two
    samples. None when no attack ran."""
    if not accuracy:
        return None
    most = max((n for n in (examples.get(a) for a in accuracy) if n is not None), default=None)
    candidates = [a for a in accuracy if most is None or examples.get(a) == most]
    return min(candidates, key=accuracy.__getitem__)


def _counted(accuracy: float, images: int | None) -> dict:
    return {"accuracy": accuracy} if images is None else {"accuracy": accuracy, "images": images}


@dataclass
class EvalResult:
    """Natural and per-attack adversarial accuracy of one model, with what ran and the gradient-masking checks."""

    natural_accuracy: float  # on the whole test split
    adversarial_accuracy: dict[str, float]  # attack name -> accuracy on the first n_examples test images
    dataset: str | None = None
    dataset_digest: str | None = None  # ImageData.digest of the data evaluated on
    split: str | None = None  # the split attacked: "test", or "validation" for a tuning split
    model_sha256: str | None = None  # sha256 of the model file evaluated (rrm.io.sha256_file)
    model_spec: dict | None = None  # spec_record of the model's architecture spec
    norm: str | None = None
    eps: float | None = None
    n_examples: int | None = None  # test images attacked
    n_test: int | None = None  # test images in the split
    natural_accuracy_attacked: float | None = None  # natural accuracy on the attacked images
    attack_settings: dict[str, dict] | None = None  # attack name -> the settings that ran
    seconds: dict[str, float] | None = None  # "natural", each attack and "sanity" -> wall-clock seconds
    # True: the gradient-masking checks ran and every check passed; False: a check that ran failed (the constraint
    # check runs with every attack); None: the masking checks did not run (older files wrote true for that)
    sanity_passed: bool | None = None
    sanity: dict | None = None  # "enabled" and each check with its numbers (see rrm.evaluation.checks)
    # AutoAttack's package, version, components and seed, its images, the accuracy after each component, the times
    autoattack: dict | None = None
    seed: int | None = None
    art_version: str | None = None
    torch_version: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # keys of other rrm versions, written back as they were

    def examples(self, attack: str) -> int | None:
        """The test images ``attack`` ran on: ``n_examples``, or AutoAttack's own first few where it ran on fewer."""
        if attack == "autoattack" and isinstance(self.autoattack, Mapping) and self.autoattack.get("n_examples"):
            return int(self.autoattack["n_examples"])
        return self.n_examples

    @property
    def headline_attack(self) -> str | None:
        """The attack to quote (:func:`headline_attack`): the lowest accuracy among those on the most images."""
        return headline_attack(self.adversarial_accuracy, {a: self.examples(a) for a in self.adversarial_accuracy})

    @property
    def headline_accuracy(self) -> float | None:
        attack = self.headline_attack
        return None if attack is None else self.adversarial_accuracy[attack]

    @property
    def worst_attack(self) -> str | None:
        """The attack that left the lowest accuracy (the first listed on a tie); None when no attack ran."""
        if not self.adversarial_accuracy:
            return None
        return min(self.adversarial_accuracy, key=self.adversarial_accuracy.get)

    @property
    def worst_accuracy(self) -> float | None:
        """The lowest adversarial accuracy over the attacks, whatever images each ran on (:attr:`headline_accuracy`
        is the number to quote)."""
        attack = self.worst_attack
        return None if attack is None else self.adversarial_accuracy[attack]

    @property
    def masking_checks_passed(self) -> bool | None:
        """Whether the gradient-masking checks passed; None when they did not run (``sanity: false``, eps 0) or the
        file does not say. ``sanity_passed`` alone reads True for checks that never ran."""
        if isinstance(self.sanity, Mapping) and self.sanity.get("enabled") is False:
            return None
        return self.sanity_passed

    @property
    def sanity_warnings(self) -> list[str]:
        """What the checks saw that weakens a number without failing it (each check's ``warning``)."""
        checks = self.sanity.values() if isinstance(self.sanity, Mapping) else []
        return [c["warning"] for c in checks if isinstance(c, Mapping) and "warning" in c]

    @property
    def sanity_status(self) -> str:
        """The checks in a word: "passed" only when the masking checks ran and every check passed, "FAILED" when a
        check that ran failed, else "not run"."""
        if self.sanity_passed is False:
            return "FAILED"
        return "passed" if self.masking_checks_passed else "not run"

    def headline(self) -> dict:
        """The numbers ``dvc metrics show`` lists (:func:`rrm.io.headline_path`): natural and each attack's accuracy,
        each with the test images it ran on, and ``checks_passed`` where the checks ran. Settings, versions and
        timings stay in the full record."""
        numbers = {"natural": _counted(self.natural_accuracy, self.n_test)}
        numbers.update({a: _counted(acc, self.examples(a)) for a, acc in self.adversarial_accuracy.items()})
        if self.sanity_status != "not run":
            numbers["checks_passed"] = self.sanity_status == "passed"
        return numbers

    def binding_problems(
        self, *, model_sha256: str | None = None, model_spec: Mapping | None = None, dataset_digest: str | None = None
    ) -> list[str]:
        """Why this result is not an evaluation, on the test split, of the model file with ``model_sha256`` and
        ``model_spec`` trained on the data with ``dataset_digest``: one phrase each, empty when it is. An argument
        left None is not checked; a result that does not record what an argument checks is a problem."""
        problems = []
        if model_sha256 is not None:
            if self.model_sha256 is None:
                problems.append(
                    "its evaluation names no model file (no model_sha256: written by hand or by an older rrm)"
                )
            elif self.model_sha256 != model_sha256:
                problems.append(
                    f"its evaluation measured another model file (sha256 {self.model_sha256[:12]}, this "
                    f"one is {model_sha256[:12]})"
                )
        if model_spec is not None:
            want = spec_record(model_spec)
            if self.model_spec is None:
                problems.append("its evaluation names no model architecture (no model_spec)")
            elif self.model_spec != want:
                problems.append(
                    f"its evaluation measured another architecture ({_describe(self.model_spec)}; "
                    f"this model: {_describe(want)})"
                )
        if dataset_digest is not None:
            if self.dataset_digest is None:
                problems.append("its evaluation names no dataset digest")
            elif self.dataset_digest != dataset_digest:
                problems.append(
                    f"its evaluation ran on dataset {self.dataset or '?'!r} with digest "
                    f"{self.dataset_digest[:12]}, not on the training data (digest {dataset_digest[:12]})"
                )
            if self.split != "test":
                problems.append(f"its evaluation ran on the {self.split or 'unrecorded'} split, not the test split")
        return problems

    def to_json(self) -> dict:
        """The metrics file's content: a dict of JSON values, without the fields the result does not hold.

        ``sanity_passed`` is written even when None (``null``: the masking checks did not run) wherever ``sanity``
        says what ran, so that a file never reads as passed by leaving the key out."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        kept = {k: v for k, v in values.items() if v is not None or (k == "sanity_passed" and self.sanity is not None)}
        return {**self.extra, **kept}

    @classmethod
    def from_json(cls, values: Mapping, source: str = "the evaluation") -> EvalResult:
        """Read what :meth:`to_json` wrote (or an older or hand-written file: only the accuracies are required).

        ``adversarial_accuracy`` may also be a single number, one attack named by ``attack``. Entries of it that are
        not numbers are left out. ``source`` names the input in the error of an incomplete one.
        """
        if not isinstance(values, Mapping):
            raise RRMError(f"{source} must hold a JSON object; pass the metrics file `rrm evaluate` writes")
        values = dict(values)
        natural, adversarial = values.get("natural_accuracy"), values.get("adversarial_accuracy")
        if _is_number(adversarial):
            adversarial = {str(values.pop("attack", "attack")): adversarial}
        if not _is_number(natural) or not isinstance(adversarial, Mapping):
            raise RRMError(f"{source} has no natural_accuracy / adversarial_accuracy; is it from `rrm evaluate`?")
        values["adversarial_accuracy"] = {str(k): v for k, v in adversarial.items() if _is_number(v)}
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        known = {k: values.pop(k) for k in names if k in values}
        if _is_number(known.get("n_examples")):  # a logged run gives every number back as a float
            known["n_examples"] = int(known["n_examples"])
        return cls(**known, extra=values)

    @classmethod
    def read(cls, path: str | os.PathLike) -> EvalResult:
        """Read a metrics file; a missing, corrupt or incomplete one is an :class:`RRMError` naming it and the fix."""
        path = Path(path)
        if not path.is_file():
            raise RRMError(
                f"evaluation metrics {str(path)!r} does not exist; run `rrm evaluate` (or the stage that "
                "writes it: dvc repro)"
            )
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RRMError(
                f"evaluation metrics {str(path)!r} is not valid JSON ({exc.__class__.__name__}); rerun "
                "`rrm evaluate` (or the stage that writes it)"
            ) from None
        return cls.from_json(values, source=f"evaluation metrics {str(path)!r}")

    def write(self, path: str | os.PathLike) -> None:
        """Write the metrics file atomically: nested dicts of scalars, as ``dvc metrics show`` reads them."""
        write_json(path, self.to_json())
