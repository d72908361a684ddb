"""AutoAttack through pyautoattack: the package's cascade, per-component accuracy, resuming, agreement with the native
APGD-CE, the Square masking check and the RobustBench export."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from _helpers import one_torch_thread
from click.testing import CliRunner
from torch import nn

from rrm.attacks import apgd, frozen
from rrm.attacks.autoattack import AutoAttack
from rrm.cli import cli
from rrm.data import to_float
from rrm.errors import RRMError
from rrm.evaluation import EvalConfig, EvalResult, evaluate

EPS = 0.1  # the digits teacher's training radius


@pytest.fixture(autouse=True)
def _one_thread():
    """AutoAttack's many small passes: a second intra-op thread made them many times slower on a loaded machine."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def teacher(digits_teacher) -> nn.Module:
    return digits_teacher.model.eval()


class LogitScaled(nn.Module):
    """Gradient masking that keeps the feature protocol: logits x 1e4 saturate the softmax, so the cross-entropy
    gradient of every confidently classified image is exactly zero; predictions, and so Square, are unchanged."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.spec = inner, inner.spec

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.features(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner.head(features) * 1e4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_standard_autoattack_on_the_digits_teacher(teacher, digits, tmp_path):
    state = tmp_path / "teacher.json.autoattack-state.json"
    config = EvalConfig(
        eps=EPS,
        attacks=("apgd", "autoattack"),
        n_examples=100,
        autoattack_examples=16,
        steps=20,
        restarts=1,
        batch_size=16,
        sanity=False,
    )
    result = evaluate(teacher, digits, config, autoattack_state=state)
    aa = result.autoattack
    assert aa["package"] == "pyautoattack" and aa["package_version"] == importlib.metadata.version("pyautoattack")
    assert aa["version"] == "standard" and aa["components"] == "apgd-ce,apgd-t,fab-t,square" and aa["seed"] == 0
    assert aa["n_examples"] == 16 and aa["resumed"] is False
    after = list(aa["accuracy_after"].values())
    assert list(aa["accuracy_after"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert after == sorted(after, reverse=True), "a cascade never raises accuracy"
    assert aa["accuracy_after"]["clean"] == pytest.approx(
        _accuracy(teacher, to_float(digits.test_x[:16]), digits.test_y[:16])
    )
    assert result.adversarial_accuracy["autoattack"] == after[-1] < after[0]
    budgets = result.attack_settings["autoattack"]["budgets"]
    assert budgets["square"]["n_queries"] == 5000 and budgets["apgd-t"]["n_target_classes"] == 9
    assert budgets["apgd-ce"] == {"n_iter": 100, "n_restarts": 1, "eot_iter": 1}
    assert set(aa["seconds"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert result.sanity["constraint"]["passed"]
    assert not state.exists(), "the state file goes once the result is complete"
    result.write(tmp_path / "m.json")
    assert EvalResult.read(tmp_path / "m.json") == result


def test_the_cascade_is_the_packages(teacher, digits):
    """Component by component on the still-robust images gives exactly what run_standard_evaluation gives (one
    batch here: Square's 5,000 queries cost per batch; the batches' plan is the resume test's)."""
    from pyautoattack import AutoAttack as PackageAutoAttack

    x, y = to_float(digits.test_x[:10]), digits.test_y[:10]
    with frozen(teacher):
        ours = AutoAttack(teacher, norm="linf", eps=EPS, num_classes=10, batch_size=10).run(x, y)
        package = PackageAutoAttack(teacher, norm="Linf", eps=EPS, seed=0, version="standard")
        x_adv, _ = package.run_standard_evaluation(x, y, batch_size=10)
        assert torch.equal(teacher(x_adv).argmax(1) == y, ours.robust)
    assert torch.equal(x_adv, ours.x_adv)


def test_an_interrupted_run_resumes_where_it_stopped(teacher, digits, tmp_path, monkeypatch):
    x, y = to_float(digits.test_x[:32]), digits.test_y[:32]
    settings = dict(
        norm="linf", eps=EPS, num_classes=10, version="custom", components=("apgd-ce", "apgd-dlr"), batch_size=8
    )
    state = tmp_path / "state.json"
    before = torch.random.get_rng_state()
    with frozen(teacher):
        reference = AutoAttack(teacher, **settings).run(x, y)
        assert torch.equal(torch.random.get_rng_state(), before), "the package reseeds; the caller's generator stays"

        flaky = AutoAttack(teacher, **settings)
        calls, perturb = [], flaky._perturb

        def interrupted(component, xb, yb):
            if component == "apgd-dlr" and "apgd-dlr" in calls:
                raise KeyboardInterrupt
            calls.append(component)
            return perturb(component, xb, yb)

        monkeypatch.setattr(flaky, "_perturb", interrupted)
        with pytest.raises(KeyboardInterrupt):
            flaky.run(x, y, state_path=state)
        saved = json.loads(state.read_text())
        assert saved["done"] == ["apgd-ce"] and saved["current"]["component"] == "apgd-dlr"
        assert saved["current"]["batches_done"] == 1 and "apgd-ce" in saved["accuracy_after"]

        resumed = AutoAttack(teacher, **settings).run(x, y, state_path=state)
        assert resumed.resumed and torch.equal(resumed.robust, reference.robust)
        assert resumed.accuracy_after == reference.accuracy_after
        # other images (or another model or settings) are another run: the state is not used
        assert not AutoAttack(teacher, **settings).run(x[:8], y[:8], state_path=state).resumed


def test_the_packages_own_state_file_does_not_resume(tmp_path):
    """Why rrm keeps its own state: pyautoattack 0.2.0 writes the set of attacks as its repr and then refuses its own
    file. If this starts failing, the package fixed it."""
    from pyautoattack import AutoAttack as PackageAutoAttack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    attack = PackageAutoAttack(model, norm="Linf", eps=0.1, seed=0, version="custom", attacks=["apgd-ce"])
    attack.run_standard_evaluation(x, y, batch_size=8, state_path=tmp_path / "state.json")
    with pytest.raises(ValueError, match="different set of attacks"):
        attack.run_standard_evaluation(x, y, batch_size=8, state_path=tmp_path / "state.json")


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("linf", 0.15), ("l2", 0.5)])
def test_native_apgd_ce_agrees_with_autoattacks_within_a_point(teacher, digits, norm, eps):
    """Same images, same budget (100 iterations, 1 restart): measured 0 to 1 image apart out of 297 (seeds 0, 1)."""
    x, y = to_float(digits.test_x), digits.test_y
    with frozen(teacher):
        native = _accuracy(teacher, apgd(teacher, x, y, norm=norm, eps=eps, steps=100, restarts=1, seed=0), y)
        theirs = (
            AutoAttack(
                teacher,
                norm=norm,
                eps=eps,
                num_classes=10,
                version="custom",
                components=("apgd-ce",),
                batch_size=len(y),
            )
            .run(x, y)
            .accuracy
        )
    assert 0.2 < theirs < 0.9, "the radius should leave the comparison informative"
    assert abs(native - theirs) <= 0.01, (native, theirs)


def test_square_flags_a_gradient_masked_model_that_apgd_ce_alone_passes(teacher, digits):
    masked = LogitScaled(teacher)
    config = EvalConfig(  # Square's default budget: 100 queries per image
        eps=EPS, attacks=("apgd",), n_examples=100, steps=10, restarts=1, sanity_examples=100, sanity_steps=10
    )
    alone = evaluate(masked, digits, config.replace(sanity=False))
    assert alone.sanity_passed is None, "APGD-CE alone: no check runs, so nothing flags it"
    assert alone.adversarial_accuracy["apgd"] >= alone.natural_accuracy_attacked - 0.03, "and it looks robust"

    flagged = evaluate(masked, digits, config).sanity["square"]
    assert not flagged["passed"]
    assert flagged["square_accuracy"] < flagged["whitebox_accuracy"] - 0.05 and flagged["queries"] == 100
    honest = evaluate(teacher, digits, config).sanity["square"]
    assert honest["passed"], honest
    # Square sees the model through its outputs only: masked or not, it measures the same robustness
    assert flagged["square_accuracy"] == pytest.approx(honest["square_accuracy"], abs=0.03)


def test_robustbench_export(digits_teacher, cli_project):
    model = Path(digits_teacher.out_dir) / "model.pt"
    out = cli_project / "robustbench.json"
    args = [
        "evaluate",
        str(model),
        "--dataset",
        "digits",
        "--eps",
        "0.1",
        "--attacks",
        "autoattack",
        "--autoattack-version",
        "custom",
        "--autoattack-components",
        "apgd-ce,square",
        "--n-examples",
        "20",
        "--no-sanity",
        "--no-track",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(cli, [*args, "--format", "robustbench"])
    assert result.exit_code == 0, result.output
    entry = json.loads(out.read_text())
    assert {
        "clean_acc",
        "autoattack_acc",
        "additional_data",
        "eps",
        "dataset",
        "architecture",
        "name",
        "number_forward_passes",
        "threat_model",
        "n_examples",
        "source_run",
    } <= set(entry)
    assert entry["threat_model"] == "Linf" and entry["eps"] == "0.1" and entry["n_examples"] == 20
    assert entry["additional_data"] is False and entry["architecture"] == "cnn" and entry["dataset"] == "digits"
    assert float(entry["autoattack_acc"]) <= float(entry["clean_acc"]) <= 100
    assert entry["source_run"]["model"] == str(model) and entry["source_run"]["method"] == "sat"
    assert not list(cli_project.glob("*autoattack-state*"))

    refused = CliRunner().invoke(cli, [*args, "--attacks", "apgd", "--format", "robustbench"])
    assert refused.exit_code != 0 and "add autoattack to --attacks" in refused.output


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(autoattack_version="custom"), "needs its components"),
        (dict(autoattack_components=("apgd-ce",)), "are for version 'custom'"),
        (dict(autoattack_version="custom", autoattack_components=("apgd-ce", "fgsm")), "unknown AutoAttack component"),
        (dict(autoattack_version="fast"), "unknown AutoAttack version"),
        (dict(autoattack_examples=0), "autoattack_examples must be >= 1"),
        (dict(sanity_square_queries=0), "sanity_square_queries must be >= 1"),
    ],
)
def test_bad_autoattack_settings_are_one_line_errors(changes, match):
    with pytest.raises(RRMError, match=match):
        EvalConfig(attacks=("autoattack",), **changes).validate()


def test_components_come_from_a_params_list():
    config = EvalConfig.from_dict(
        {
            "attacks": ["apgd", "autoattack"],
            "autoattack_version": "custom",
            "autoattack_components": ["apgd-ce", "square"],
        }
    )
    assert config.validate().autoattack_components == ("apgd-ce", "square")
