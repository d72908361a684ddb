"""The cheap adversarial-training baselines: N-FGSM's perturbation, GradAlign's term and the detector of
catastrophic overfitting, each against a hand computation; short runs through the real trainer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rrm.attacks import n_fgsm
from rrm.errors import RRMError
from rrm.models import load_model
from rrm.train import Callback, TrainConfig, train
from rrm.train.losses import gradient_alignment
from rrm.train.methods import NFGSM
from rrm.train.overfitting import collapse_epoch


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """By hand for a linear model: d/dx sum CE = (softmax(Wx + b) - onehot(y)) W."""
    w = model[1].weight
    p = F.softmax(model(x), dim=1)
    return ((p - F.one_hot(y, 3).float()) @ w).view_as(x)


def test_n_fgsm_adds_noise_of_twice_eps_then_one_unprojected_signed_step():
    model, eps = _linear(), 0.1
    x = torch.rand(64, 1, 4, 4) * 0.6 + 0.2  # away from the pixel bounds, so the clamps rarely bite
    y = torch.randint(0, 3, (64,))
    torch.manual_seed(5)
    x_adv = n_fgsm(model, x, y, norm="linf", eps=eps, noise_magnitude=2 * eps, step_size=eps)
    torch.manual_seed(5)
    noise = torch.empty_like(x).uniform_(-2 * eps, 2 * eps)
    noisy = (x + noise).clamp(0, 1)
    with torch.no_grad():
        expected = (noisy + eps * _input_grad(model, noisy, y).sign()).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    delta = (x_adv - x).abs()
    assert delta.max() <= 3 * eps + 1e-6  # noise 2 eps plus a step of eps
    assert delta.max() > eps + 1e-3, "the step is not projected back to the eps-ball"
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_n_fgsm_projects_and_clamps_when_asked():
    model, eps = _linear(), 0.1
    x = torch.rand(64, 1, 4, 4)
    y = torch.randint(0, 3, (64,))
    x_adv = n_fgsm(model, x, y, norm="linf", eps=eps, noise_magnitude=2 * eps, step_size=eps, project_to_eps=True)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_n_fgsm_defaults_are_de_jorge_et_al():
    method = NFGSM(TrainConfig(method="n-fgsm", eps=0.3))
    assert method.noise_magnitude == pytest.approx(0.6) and method.step_size == pytest.approx(0.3)
    method = NFGSM(TrainConfig(method="n-fgsm", eps=0.3, noise_magnitude=0.0, step_size=0.2))
    assert method.noise_magnitude == 0.0 and method.step_size == pytest.approx(0.2)


def test_gradient_alignment_is_one_minus_the_mean_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]], requires_grad=True)
    term = gradient_alignment(a, b)
    assert term.item() == pytest.approx(((1 - 0.0) + (1 - 1.0)) / 2)
    term.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0  # the noisy gradient is differentiated again
    assert a.grad is None  # the clean gradient is a constant


def _history(pgd, fgsm):
    return [
        {"epoch": i + 1, "monitor_robust_accuracy": p, "monitor_fgsm_accuracy": f}
        for i, (p, f) in enumerate(zip(pgd, fgsm, strict=True))
    ]


def test_the_detector_fires_when_pgd_collapses_while_single_step_holds():
    assert collapse_epoch(_history([0.30, 0.45, 0.50, 0.05, 0.0], [0.40, 0.55, 0.60, 0.85, 0.95])) == 4
    # a healthy run: PGD accuracy rises and wobbles a little
    assert collapse_epoch(_history([0.30, 0.45, 0.43, 0.50, 0.52], [0.40, 0.55, 0.54, 0.60, 0.62])) is None
    # both fall together (a bad learning rate, not catastrophic overfitting)
    assert collapse_epoch(_history([0.40, 0.50, 0.10], [0.50, 0.60, 0.15])) is None
    # epochs without the single-step monitor are skipped
    assert collapse_epoch([{"epoch": 1, "monitor_robust_accuracy": 0.5}]) is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(method="sat", noise_magnitude=0.1), "noise_magnitude is an option of method 'n-fgsm', not 'sat'"),
        (dict(method="natural", grad_align_weight=0.2), "grad_align_weight is an option of method 'fast'"),
        (dict(method="sat", early_stop_on_co=True), "early_stop_on_co is an option of method 'fast' or 'n-fgsm' or"),
        (dict(method="n-fgsm", noise_magnitude=float("nan")), "noise_magnitude must be a number >= 0"),
        (dict(method="fast", grad_align_weight=-1.0), "grad_align_weight must be a number >= 0"),
        (dict(method="fast", early_stop_on_co=True, monitor_examples=0), "set monitor_examples > 0"),
    ],
)
def test_bad_cheap_at_options_are_refused_before_training(kw, message):
    with pytest.raises(RRMError, match=message):
        TrainConfig(**kw).validate()


@pytest.mark.parametrize("kw", [dict(method="n-fgsm"), dict(method="fast", grad_align_weight=0.5)])
def test_a_short_digits_run(tmp_path, digits, kw):
    cfg = TrainConfig(
        dataset="digits",
        model="cnn",
        epochs=2,
        lr=0.05,
        eps=0.1,
        monitor_examples=64,
        progress=False,
        out_dir=str(tmp_path),
        **kw,
    )
    result = train(cfg, data=digits)
    assert result.summary["test_accuracy"] > 0.5
    assert 0 <= result.summary["monitor_robust_accuracy"] <= 1
    if kw.get("grad_align_weight"):
        assert all(h["grad_align"] >= 0 for h in result.history)


class _Weights(Callback):
    """Copies of the model's weights at the end of every epoch."""

    def on_train_start(self, cfg, data, model):
        self.model, self.by_epoch = model, {}

    def on_epoch_end(self, epoch, metrics):
        self.by_epoch[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}


def test_early_stopping_on_a_collapse_keeps_the_weights_from_before_it(tmp_path, digits, monkeypatch):
    import rrm.train.trainer as trainer

    monkeypatch.setattr(trainer, "collapse_epoch", lambda history: 2)  # a collapse in the second epoch
    weights = _Weights()
    cfg = TrainConfig(
        dataset="digits",
        model="cnn",
        method="n-fgsm",
        epochs=4,
        lr=0.05,
        eps=0.1,
        monitor_examples=32,
        progress=False,
        out_dir=str(tmp_path),
        early_stop_on_co=True,
    )
    result = train(cfg, data=digits, callbacks=[weights])
    assert len(result.history) == 2 and result.history[-1]["early_stopped"]
    assert result.summary["catastrophic_overfitting_epoch"] == 2 and result.summary["early_stopped_at_epoch"] == 2
    assert result.summary["test_accuracy"] == result.history[0]["test_accuracy"]
    saved, _ = load_model(tmp_path / "model.pt")
    for key, value in saved.state_dict().items():
        assert torch.equal(value, weights.by_epoch[1][key]), key  # bit-identical to the end of epoch 1
    resumed = train(cfg.replace(resume=True), data=digits)  # an early-stopped run is finished
    assert len(resumed.history) == 2


def test_the_detector_watches_single_step_methods_only(tmp_path, digits):
    common = dict(dataset="digits", model="cnn", epochs=1, lr=0.05, eps=0.1, monitor_examples=32, progress=False)
    fast = train(TrainConfig(method="fast", out_dir=str(tmp_path / "fast"), **common), data=digits)
    sat = train(TrainConfig(method="sat", attack_steps=2, out_dir=str(tmp_path / "sat"), **common), data=digits)
    assert 0 <= fast.history[0]["monitor_fgsm_accuracy"] <= 1
    assert "monitor_fgsm_accuracy" not in sat.history[0]


def test_eps_warm_up_ramps_the_training_attack_linearly():
    method = NFGSM(TrainConfig(method="n-fgsm", eps=0.3, eps_warmup_epochs=3))
    seen = []
    for epoch in range(5):
        method.start_epoch(epoch)
        seen.append(method.eps)
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    assert method.step_size == pytest.approx(0.3) and method.noise_magnitude == pytest.approx(0.6)
    with pytest.raises(RRMError, match="eps_warmup_epochs is an option of method"):
        TrainConfig(method="rrm", eps_warmup_epochs=2).validate()
