"""Robustness evaluation: native APGD against ART, the gradient-masking checks, constraints and bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from rrm.attacks import apgd, art_apgd, fgsm, pgd
from rrm.data import ImageData, to_float
from rrm.errors import RRMError
from rrm.evaluation import EvalConfig, EvalResult, apgd_accuracy, evaluate, load_for_evaluation, spec_record
from rrm.metrics import accuracy
from rrm.models import save_model
from rrm.stats import epoch_time_stats

# Native APGD and ART's AutoPGD are the same algorithm but not the same code: ART keeps only each restart's last
# iterate where the native one keeps the first that fools, ART's condition 1 counts new maxima rather than loss
# increases, and the random starts differ. Over 3 seeds x 4 radii per norm on these 200 digits they differed by at
# most 1.5 points (3 images); 3 points (6 images) leaves room for seeds and platforms without hiding a broken attack,
# which shows up as tens of points.
ART_TOLERANCE = 0.03
# Radii where the natural digits CNN is neither untouched nor broken (~60% and ~55% APGD accuracy).
MID_EPS = {"linf": 0.1, "l2": 0.5}
FAST = dict(steps=10, restarts=1, sanity_steps=10, sanity_examples=100, n_examples=100)


@pytest.fixture(scope="session")
def trained(digits_natural) -> nn.Module:
    return digits_natural.model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


class SaturatedLogits(nn.Module):
    """Defensive-distillation-style masking: logits x 1e4 make the softmax exactly one-hot, so the loss gradient of
    every confidently classified image is exactly zero while predictions do not change."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.spec = inner, inner.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1e4


class QuantisedInput(nn.Module):
    """Input quantisation: a step function on pixels has zero gradient almost everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.spec = inner, inner.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 4) / 4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_native_apgd_agrees_with_art(trained, digits, norm):
    x, y = to_float(digits.test_x[:200]), digits.test_y[:200]
    eps = MID_EPS[norm]
    native = _accuracy(trained, apgd(trained, x, y, norm=norm, eps=eps, steps=20, restarts=2, seed=0), y)
    art = _accuracy(
        trained,
        art_apgd(trained, x, y, norm=norm, eps=eps, num_classes=10, steps=20, restarts=2, batch_size=200, seed=0),
        y,
    )
    assert 0.2 < art < 0.9, "the radius should leave the comparison informative"
    assert abs(native - art) <= ART_TOLERANCE, (native, art)


def test_eps_zero_gives_natural_accuracy(trained, digits):
    result = evaluate(trained, digits, EvalConfig(eps=0.0, attacks=("apgd", "art-apgd", "pgd", "fgsm"), **FAST))
    assert set(result.adversarial_accuracy.values()) == {result.natural_accuracy_attacked}
    assert result.sanity["enabled"] is False and result.sanity_passed is None, "checks that did not run: not passed"


def test_natural_model_falls_to_zero_at_large_eps(trained, digits):
    x, y = to_float(digits.test_x[:200]), digits.test_y[:200]
    assert _accuracy(trained, x, y) > 0.9
    assert _accuracy(trained, apgd(trained, x, y, norm="linf", eps=0.4, steps=20, restarts=1, seed=0), y) <= 0.01
    assert _accuracy(trained, apgd(trained, x, y, norm="l2", eps=2.0, steps=20, restarts=1, seed=0), y) <= 0.01


def test_trained_model_passes_sanity_checks(trained, digits):
    result = evaluate(
        trained, digits, EvalConfig(eps=0.1, attacks=("apgd", "pgd", "fgsm"), **FAST), transfer_from=trained
    )
    assert result.sanity_passed, result.sanity
    acc = result.adversarial_accuracy
    assert acc["apgd"] <= acc["fgsm"] and acc["apgd"] < result.natural_accuracy_attacked


def test_robust_model_passes_sanity_checks(digits_teacher, trained, digits):
    teacher = digits_teacher.model.eval()
    result = evaluate(teacher, digits, EvalConfig(eps=0.1, attacks=("apgd", "transfer"), **FAST), transfer_from=trained)
    assert result.sanity_passed, result.sanity
    assert result.adversarial_accuracy["apgd"] <= result.adversarial_accuracy["transfer"]


@pytest.mark.parametrize("mask", [SaturatedLogits, QuantisedInput])
def test_gradient_masking_is_flagged(trained, digits, mask):
    masked = mask(trained)
    result = evaluate(masked, digits, EvalConfig(eps=0.1, attacks=("apgd",), **FAST), transfer_from=trained)
    sanity = result.sanity
    assert not result.sanity_passed
    assert not sanity["eps_growth"]["passed"] and sanity["eps_growth"]["accuracy"]["x8"] > 0.05
    # Adversarial examples crafted on the unmasked model still fool the masked one.
    assert not sanity["transfer"]["passed"]
    assert sanity["transfer"]["transfer_accuracy"] < sanity["transfer"]["whitebox_accuracy"]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_adversarial_examples_respect_the_constraint(trained, digits, norm, eps):
    x, y = to_float(digits.test_x[:100]), digits.test_y[:100]
    attacks = {
        "apgd": apgd(trained, x, y, norm=norm, eps=eps, steps=10, restarts=2, seed=0),
        "art": art_apgd(trained, x, y, norm=norm, eps=eps, num_classes=10, steps=10, restarts=1, seed=0),
        "pgd": pgd(trained, x, y, norm=norm, eps=eps, step_size=eps / 4, steps=10),
        "fgsm": fgsm(trained, x, y, norm=norm, eps=eps),
    }
    for name, x_adv in attacks.items():
        delta = (x_adv.double() - x.double()).flatten(1)
        dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert dist.max().item() <= eps + 1e-5, name
        assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1, name
    result = evaluate(
        trained, digits, EvalConfig(norm=norm, eps=eps, attacks=("apgd", "pgd", "fgsm"), sanity=False, **FAST)
    )
    assert result.sanity["constraint"]["passed"]


def test_attacks_leave_the_model_alone(trained, digits):
    x, y = to_float(digits.test_x[:32]), digits.test_y[:32]
    before = [None if p.grad is None else p.grad.clone() for p in trained.parameters()]

    def untouched() -> bool:
        grads = [p.grad for p in trained.parameters()]
        same = all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(before, grads)
        )
        return trained.training and same and all(p.requires_grad for p in trained.parameters())

    trained.train()
    try:
        apgd(trained, x, y, norm="linf", eps=0.1, steps=5, restarts=1)  # no BatchNorm or dropout: mode is moot
        assert untouched()
        # ART switches to eval mode and back-propagates into the parameters; evaluate must undo both.
        evaluate(
            trained,
            digits,
            EvalConfig(eps=0.1, attacks=("art-apgd",), sanity=False, steps=5, restarts=1, n_examples=32),
        )
        assert untouched()
    finally:
        trained.eval()


def test_more_restarts_never_raise_accuracy(trained, digits):
    x, y = to_float(digits.test_x[:200]), digits.test_y[:200]
    one = _accuracy(trained, apgd(trained, x, y, norm="linf", eps=0.1, steps=10, restarts=1, seed=3), y)
    three = _accuracy(trained, apgd(trained, x, y, norm="linf", eps=0.1, steps=10, restarts=3, seed=3), y)
    assert three <= one


def test_metrics_json_is_flat_scalars(trained, digits, tmp_path):
    result = evaluate(trained, digits, EvalConfig(eps=0.1, attacks=("apgd", "fgsm"), **FAST))
    result.write(tmp_path / "metrics.json")
    loaded = json.loads((tmp_path / "metrics.json").read_text())

    def leaves(d: dict):
        for v in d.values():
            yield from leaves(v) if isinstance(v, dict) else [v]

    assert all(isinstance(v, (int, float, str, bool)) for v in leaves(loaded))
    for key in (
        "natural_accuracy",
        "adversarial_accuracy",
        "norm",
        "eps",
        "n_examples",
        "attack_settings",
        "art_version",
        "seconds",
        "sanity",
        "sanity_passed",
    ):
        assert key in loaded
    assert set(loaded["seconds"]) >= {"apgd", "fgsm", "sanity"}


def test_metrics_file_reads_back_as_it_was_written(trained, digits, tmp_path):
    result = evaluate(trained, digits, EvalConfig(eps=0.1, attacks=("apgd", "fgsm"), **FAST))
    path = tmp_path / "metrics.json"
    result.write(path)
    written = path.read_bytes()
    assert set(json.loads(written)) == {
        "dataset",
        "norm",
        "eps",
        "n_examples",
        "n_test",
        "natural_accuracy",
        "natural_accuracy_attacked",
        "adversarial_accuracy",
        "attack_settings",
        "seconds",
        "sanity_passed",
        "sanity",
        "seed",
        "art_version",
        "torch_version",
        "dataset_digest",
        "split",
        "model_spec",
    }
    again = EvalResult.read(path)
    assert again == result
    again.write(path)
    assert path.read_bytes() == written
    assert again.worst_attack == "apgd" and again.worst_accuracy == result.adversarial_accuracy["apgd"]
    assert again.masking_checks_passed is result.sanity_passed is True


def test_a_result_is_bound_to_the_model_file_and_data_it_measured(trained, digits):
    result = evaluate(
        trained, digits, EvalConfig(eps=0.1, attacks=("fgsm",), n_examples=50, sanity=False), model_sha256="ab" * 32
    )
    assert (result.model_sha256, result.dataset_digest, result.split) == ("ab" * 32, digits.digest, "test")
    assert result.model_spec == spec_record(trained.spec) and result.model_spec["image_size"] == 8
    assert "mean" not in result.model_spec, "lists stay out of the flat metrics file; the sha256 covers them"
    assert result.binding_problems(model_sha256="ab" * 32, model_spec=trained.spec, dataset_digest=digits.digest) == []
    other = dict(trained.spec, image_size=28)
    problems = result.binding_problems(model_sha256="cd" * 32, model_spec=other, dataset_digest="ef" * 32)
    assert len(problems) == 3
    assert "measured another model file (sha256 abababababab, this one is cdcdcdcdcdcd)" in problems[0]
    assert "another architecture (cnn on 1x8x8 images, 10 classes; this model: cnn on 1x28x28 images" in problems[1]
    assert "not on the training data" in problems[2]
    validation = evaluate(
        trained, digits.validation_split(), EvalConfig(eps=0.1, attacks=("fgsm",), n_examples=50, sanity=False)
    )
    assert validation.split == "validation" and validation.model_sha256 is None
    assert "not the test split" in validation.binding_problems(dataset_digest=validation.dataset_digest)[0]
    assert "names no model file" in validation.binding_problems(model_sha256="ab" * 32)[0]


def test_checks_that_did_not_run_never_read_as_passed(trained, digits, tmp_path):
    result = evaluate(trained, digits, EvalConfig(eps=0.1, attacks=("fgsm",), n_examples=50, sanity=False))
    assert result.sanity_passed is None and result.masking_checks_passed is None
    assert result.sanity_status == "not run" and result.sanity["constraint"]["passed"]
    result.write(tmp_path / "metrics.json")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert "sanity_passed" in written and written["sanity_passed"] is None, "null: not run"
    again = EvalResult.read(tmp_path / "metrics.json")
    assert again.sanity_status == "not run" and again == result
    # A check that ran and failed reads FAILED whether or not the masking checks ran.
    failed = dataclasses.replace(result, sanity_passed=False)
    assert failed.sanity_status == "FAILED" and EvalResult(0.9, {}, sanity_passed=True).sanity_status == "passed"
    # Older rrm wrote true for checks it never ran: still not passed.
    assert EvalResult.from_json({**written, "sanity_passed": True}).sanity_status == "not run"


def test_the_headline_is_the_lowest_accuracy_on_the_most_images():
    """AutoAttack on fewer images stays beside the headline; among attacks on the same images the lowest leads."""
    result = EvalResult(
        0.97, {"apgd": 0.83, "autoattack": 0.70, "transfer": 0.90}, n_examples=500, autoattack={"n_examples": 20}
    )
    assert [result.examples(a) for a in ("apgd", "autoattack", "transfer")] == [500, 20, 500]
    assert (result.headline_attack, result.headline_accuracy) == ("apgd", 0.83)
    assert result.worst_attack == "autoattack"  # the bare minimum over different images, not quoted
    everywhere = dataclasses.replace(result, autoattack={"n_examples": 500})
    assert (everywhere.headline_attack, everywhere.headline_accuracy) == ("autoattack", 0.70)
    assert EvalResult(0.9, {}).headline_attack is None
    assert EvalResult(0.9, {"pgd": 0.6, "apgd": 0.5}).headline_attack == "apgd"  # no counts: every attack counts


def test_the_headline_file_holds_each_accuracy_with_its_images_and_the_checks():
    """What `dvc metrics show` lists: numbers and the checks' verdict, each accuracy beside the images it ran on."""
    result = EvalResult(
        0.97,
        {"apgd": 0.83, "autoattack": 0.70},
        n_examples=500,
        n_test=1000,
        autoattack={"n_examples": 20},
        sanity_passed=True,
        sanity={"enabled": True},
        seconds={"apgd": 12.0},
        art_version="1.0",
    )
    assert result.headline() == {
        "natural": {"accuracy": 0.97, "images": 1000},
        "apgd": {"accuracy": 0.83, "images": 500},
        "autoattack": {"accuracy": 0.70, "images": 20},
        "checks_passed": True,
    }
    assert dataclasses.replace(result, sanity_passed=False).headline()["checks_passed"] is False
    assert EvalResult(0.9, {"apgd": 0.5}).headline() == {"natural": {"accuracy": 0.9}, "apgd": {"accuracy": 0.5}}


def test_older_and_partial_metrics_files_read(tmp_path):
    old = {
        "natural_accuracy": 0.9,
        "adversarial_accuracy": {"pgd": 0.6, "apgd": 0.5, "note": "x"},
        "eps": 0.2,
        "sanity_passed": True,
        "sanity": {"enabled": False},
        "from_another_version": {"k": 1},
    }
    result = EvalResult.from_json(old)
    assert result.adversarial_accuracy == {"pgd": 0.6, "apgd": 0.5}  # what is not a number is not an accuracy
    assert (result.worst_attack, result.worst_accuracy) == ("apgd", 0.5)
    assert result.masking_checks_passed is None, "checks that never ran did not pass"
    assert result.to_json() == {**old, "adversarial_accuracy": {"pgd": 0.6, "apgd": 0.5}}
    single = EvalResult.from_json(
        {"natural_accuracy": 0.9, "adversarial_accuracy": 0.4, "attack": "apgd", "n_examples": 100.0}
    )
    assert single.adversarial_accuracy == {"apgd": 0.4} and single.n_examples == 100
    none = EvalResult.from_json({"natural_accuracy": 0.9, "adversarial_accuracy": {}})
    assert none.worst_attack is None and none.worst_accuracy is None and none.masking_checks_passed is None


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "does not exist; run `rrm evaluate`"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"natural_accuracy": 0.9}', "has no natural_accuracy / adversarial_accuracy"),
        ('{"natural_accuracy": "high", "adversarial_accuracy": {"apgd": 0.1}}', "has no natural_accuracy"),
    ],
)
def test_bad_metrics_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "eval.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RRMError, match=match) as error:
        EvalResult.read(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_accuracy_counts_batch_by_batch_with_seeded_attacks(trained, digits):
    x, y = digits.test_x[:70], digits.test_y[:70]

    def counted(images: torch.Tensor) -> float:
        with torch.no_grad():
            return int((trained(images).argmax(1) == y).sum()) / len(y)

    assert accuracy(trained, x, y, batch_size=32) == counted(to_float(x))
    seeds = []

    def blank(xb: torch.Tensor, yb: torch.Tensor, seed: int) -> torch.Tensor:
        seeds.append(seed)
        return torch.zeros_like(xb)

    assert accuracy(trained, x, y, attack=blank, seed=5, batch_size=32) == counted(torch.zeros_like(to_float(x)))
    assert seeds == [5, 6, 7]
    trained.train()
    try:
        apgd_accuracy(trained, x, y, norm="linf", eps=0.1, steps=2)
        assert trained.training, "the tuning score leaves the model's mode alone"
    finally:
        trained.eval()


def test_load_for_evaluation(trained, tmp_path):
    save_model(trained, tmp_path / "model.pt", meta={"method": "natural"})
    model, meta = load_for_evaluation(tmp_path / "model.pt")
    assert not model.training and meta["method"] == "natural"
    with pytest.raises(RRMError, match="does not exist"):
        load_for_evaluation(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(RRMError, match="corrupt"):
        load_for_evaluation(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(eps=-0.1), "eps must be >= 0"),
        (dict(norm="l1"), "unknown norm"),
        (dict(attacks=("cw",)), "unknown attack"),
        (dict(attacks="apgd"), "list of names"),
        (dict(n_examples=0), "n_examples"),
        (dict(steps=0), "steps"),
        (dict(transfer_attack="fgsm"), "unknown transfer attack"),
    ],
)
def test_bad_config_is_an_rrm_error(changes, match):
    with pytest.raises(RRMError, match=match):
        EvalConfig(**changes).validate()


def test_bad_data_is_an_rrm_error(trained, digits):
    wrong_shape = ImageData(
        name="big",
        train_x=torch.zeros(4, 1, 16, 16),
        train_y=torch.zeros(4, dtype=torch.long),
        test_x=torch.zeros(4, 1, 16, 16),
        test_y=torch.zeros(4, dtype=torch.long),
        classes=tuple("0123456789"),
    )
    with pytest.raises(RRMError, match="1x16x16 images but the model expects 1x8x8"):
        evaluate(trained, wrong_shape, EvalConfig())
    with pytest.raises(RRMError, match="3 classes"):
        evaluate(trained, _with_classes(digits, 3), EvalConfig())
    with pytest.raises(RRMError, match="transfer_from"):
        evaluate(trained, digits, EvalConfig(attacks=("transfer",)))
    with pytest.raises(RRMError, match="exceeds"):
        evaluate(trained, digits, EvalConfig(n_examples=10_000))


def _with_classes(data: ImageData, k: int) -> ImageData:
    return dataclasses.replace(data, classes=tuple(str(i) for i in range(k)))


def test_epoch_time_stats_counts_free_at_replays():
    plain = epoch_time_stats([10.0, 12.0, 11.0])
    assert plain["epochs"] == 3 and plain["total_seconds"] == pytest.approx(33.0)
    assert plain["epoch_seconds_mean"] == pytest.approx(11.0) and plain["epoch_seconds_ci95"] > 0
    free = epoch_time_stats([16.0, 16.0], replays=8)  # 2 passes x 8 replays = 16 paper epochs of 2 s
    assert free["epochs"] == 16 and free["epoch_seconds_mean"] == pytest.approx(2.0)
    assert free["total_seconds"] == pytest.approx(32.0)
    assert math.isclose(free["epoch_seconds_mean"] * free["epochs"], free["total_seconds"])
    with pytest.raises(RRMError):
        epoch_time_stats([])
    with pytest.raises(RRMError):
        epoch_time_stats([1.0], replays=0)
