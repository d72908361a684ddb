"""RRM's matching variants: each loss and each input mode against a hand computation, the threat model, a frozen
teacher, a short run of every variant on digits, and one-line errors for bad values."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from rrm import cli as rrm_cli
from rrm.errors import RRMError
from rrm.models import Classifier, build_model, load_model
from rrm.train import TrainConfig, train
from rrm.train.losses import direction_norm_feature_loss
from rrm.train.methods import RRM
from rrm.train.trainer import CHECKPOINT

# ------------------------------------------------------------------------------ tiny linear models, by hand

# Images are 1x1x2 "pixels" x; features g = W x; logits z = H g (no biases, normalisation the identity).
W_S, H_S = [[1.0, 0.5], [0.0, 2.0]], [[1.0, -1.0], [0.5, 1.0]]
W_T, H_T = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]
X = [[0.95, 0.05], [0.95, 0.5]]
Y = [0, 1]


def _linear_classifier(w, h) -> Classifier:
    layer = nn.Linear(2, 2, bias=False)
    model = Classifier(nn.Sequential(nn.Flatten(), layer), penultimate_dim=2, num_classes=2, mean=[0.0], std=[1.0])
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w))
        model.head.weight.copy_(torch.tensor(h))
        model.head.bias.zero_()
    return model.eval()


def _images(rows) -> torch.Tensor:
    return torch.tensor(rows).view(-1, 1, 1, 2)


def _matvec(m, v):
    return [sum(a * b for a, b in zip(row, v)) for row in m]


def _transpose(m):
    return [list(col) for col in zip(*m)]


def _softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def _norm(v):
    return math.sqrt(sum(a * a for a in v))


def _feature_loss(name, s, t):
    cos = sum(a * b for a, b in zip(s, t)) / (_norm(s) * _norm(t))
    if name == "cosine":
        return 1 - cos
    if name == "l2":
        return _norm([a - b for a, b in zip(s, t)]) / _norm(t)
    return 1 - cos + (_norm(s) / _norm(t) - 1) ** 2


def _input_gradient(w, h, x, y):
    """d CE / d x of the linear model: W^T H^T (softmax(H W x) - onehot(y))."""
    p = _softmax(_matvec(h, _matvec(w, x)))
    p[y] -= 1
    return _matvec(_transpose(w), _matvec(_transpose(h), p))


def _hand_terms(rows, labels, n_clean, cfg) -> dict[str, float]:
    """Every term of the RRM loss, computed in plain Python over the matched rows (clean rows first)."""
    T = cfg.temperature
    representation = kd = alignment = ce = 0.0
    for i, (x, y) in enumerate(zip(rows, labels)):
        s, t = _matvec(W_S, x), _matvec(W_T, x)
        zs, zt = _matvec(H_S, s), _matvec(H_T, t)
        representation += _feature_loss(cfg.feature_loss, s, t) / len(rows)
        ps, pt = _softmax([v / T for v in zs]), _softmax([v / T for v in zt])
        kd += T * T * sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt)) / len(rows)
        gs, gt = _input_gradient(W_S, H_S, x, y), _input_gradient(W_T, H_T, x, y)
        alignment += _norm([a - b for a, b in zip(gs, gt)]) / len(rows)
        if i < n_clean:
            ce += -math.log(_softmax(zs)[y]) / n_clean
    loss = cfg.lam * ce + representation + cfg.kd_weight * kd + cfg.iga_weight * alignment
    return {"loss": loss, "ce": ce, "representation": representation, "kd": kd, "alignment": alignment}


def _method(**kw) -> RRM:
    cfg = TrainConfig(method="rrm", eps=0.1, lam=0.5, temperature=2.0, **kw).validate()
    return RRM(cfg, _linear_classifier(W_T, H_T).requires_grad_(False))


def test_direction_norm_loss_by_hand():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[6.0, 8.0], [0.0, 2.0]])
    # parallel at half the norm: 0 + 0.25; orthogonal at half the norm: 1 + 0.25
    assert direction_norm_feature_loss(s, t).item() == pytest.approx((0.25 + 1.25) / 2)
    assert direction_norm_feature_loss(t, t.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_matched_inputs_by_hand():
    x, y = _images(X), torch.tensor(Y)
    assert torch.equal(_method().matched_inputs(x, y), x)

    method = _method(match_inputs="noise")
    torch.manual_seed(3)
    noise = torch.empty_like(x).uniform_(-0.1, 0.1)
    torch.manual_seed(3)
    matched = method.matched_inputs(x, y)
    assert torch.equal(matched[:2], x)
    assert torch.allclose(matched[2:], (x + noise).clamp(0, 1))

    # For two classes the sign of the teacher's CE gradient is fixed: sign(W_T^T (h_other - h_y)) = (-1, 1) for
    # y = 0 and (1, -1) for y = 1. A step that always reaches the boundary leaves x + eps * sign, clipped to [0, 1].
    expected = _images([[0.85, 0.15], [1.0, 0.4]])
    fgsm = _method(match_inputs="teacher-fgsm", step_size=0.2).matched_inputs(x, y)
    pgd = _method(match_inputs="teacher-pgd", attack_steps=3, random_start=False).matched_inputs(x, y)
    for matched in (fgsm, pgd):
        assert torch.equal(matched[:2], x)
        assert torch.allclose(matched[2:], expected, atol=1e-6)
    assert _method(match_inputs="teacher-fgsm").step_size == pytest.approx(0.125)  # Wong et al.'s 1.25 * eps
    assert _method(match_inputs="teacher-pgd", attack_steps=5).step_size == pytest.approx(0.05)  # 2.5 * eps / 5


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(feature_loss="direction-norm", kd_weight=0.5),
        dict(feature_loss="l2", iga_weight=2.0),
        dict(match_inputs="noise", feature_loss="direction-norm"),
        dict(match_inputs="teacher-fgsm", kd_weight=0.5, iga_weight=2.0),
        dict(match_inputs="teacher-pgd", feature_loss="l2", kd_weight=1.0),
        dict(match_inputs="teacher-pgd", feature_loss="direction-norm", kd_weight=0.5, iga_weight=2.0),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "paper",
)
def test_every_term_matches_a_hand_computation(kw):
    method = _method(**kw)
    student = _linear_classifier(W_S, H_S).train()
    x, y = _images(X), torch.tensor(Y)
    torch.manual_seed(0)
    rows = method.matched_inputs(x, y).view(-1, 2).tolist()
    torch.manual_seed(0)  # the same random start or noise inside the loss
    terms = method.loss(student, x, y)
    expected = _hand_terms(rows, Y * (len(rows) // 2), 2, method.cfg)
    used = {"loss", "ce", "representation"} | {
        name for name, weight in [("kd", method.cfg.kd_weight), ("alignment", method.cfg.iga_weight)] if weight
    }
    assert set(terms) == used | {"logits"}
    for name in used:
        assert terms[name].item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert torch.allclose(terms["logits"], student(x))  # the clean half's logits
    terms["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())


@pytest.fixture(scope="module")
def teacher_file(digits_natural):
    return str(digits_natural.model_path)


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0)])
@pytest.mark.parametrize("mode", ["noise", "teacher-fgsm", "teacher-pgd"])
def test_perturbations_stay_within_eps_and_the_pixel_range(digits, teacher_file, norm, eps, mode):
    teacher, _ = load_model(teacher_file)
    method = RRM(TrainConfig(method="rrm", norm=norm, eps=eps, match_inputs=mode, attack_steps=3), teacher.eval())
    x, y = digits.train_x[:128], digits.train_y[:128]
    matched = method.matched_inputs(x, y)
    assert torch.equal(matched[:128], x)
    delta = (matched[128:] - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5 and size.max() > 0
    assert matched.min() >= 0 and matched.max() <= 1
    if mode != "noise":  # crafted on the teacher: its loss goes up
        loss = nn.functional.cross_entropy
        with torch.no_grad():
            assert loss(teacher(matched[128:]), y) > loss(teacher(x), y)


def test_teacher_gets_no_gradient_even_if_left_trainable(digits, teacher_file):
    teacher, _ = load_model(teacher_file)
    teacher.eval()
    assert all(p.requires_grad for p in teacher.parameters())
    student = build_model("cnn-bn", **digits.model_kwargs(), feature_dim=teacher.feature_dim)
    cfg = TrainConfig(method="rrm", eps=0.2, match_inputs="teacher-pgd", attack_steps=2, kd_weight=1.0, iga_weight=1.0)
    method = RRM(cfg, teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)

    def step(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    before = [p.detach().clone() for p in teacher.parameters()]
    method.train_batch(student, digits.train_x[:64], digits.train_y[:64], step)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert not teacher.training


@pytest.mark.parametrize(
    "kw",
    [
        dict(match_inputs="clean", feature_loss="direction-norm", kd_weight=0.5),
        dict(match_inputs="noise", iga_weight=1.0),
        dict(match_inputs="teacher-fgsm", feature_loss="l2"),
        dict(match_inputs="teacher-pgd", attack_steps=3, feature_loss="direction-norm", kd_weight=0.5, iga_weight=1.0),
    ],
    ids=lambda kw: kw["match_inputs"],
)
def test_every_variant_trains_one_epoch_on_digits(tmp_path, digits, teacher_file, kw):
    cfg = TrainConfig(
        dataset="digits",
        model="cnn-bn",
        method="rrm",
        teacher=teacher_file,
        eps=0.1,
        lam=0.5,
        lr=0.05,
        epochs=1,
        monitor_examples=0,
        progress=False,
        out_dir=str(tmp_path),
        **kw,
    )
    result = train(cfg, data=digits)
    metrics = result.history[0]
    assert {"loss", "ce", "representation"} <= set(metrics) and all(math.isfinite(v) for v in metrics.values())
    assert ("kd" in metrics) == bool(cfg.kd_weight) and ("alignment" in metrics) == bool(cfg.iga_weight)
    assert metrics["test_accuracy"] > 0.3  # learning, not guessing (one epoch at lambda 0.5)
    _, meta = load_model(result.model_path)
    assert {k: meta["config"][k] for k in kw} == kw


def test_checkpoint_from_before_the_variants_resumes(tmp_path, digits, teacher_file):
    cfg = TrainConfig(
        dataset="digits",
        model="cnn-bn",
        method="rrm",
        teacher=teacher_file,
        lam=0.05,
        lr=0.05,
        epochs=1,
        monitor_examples=0,
        progress=False,
        out_dir=str(tmp_path),
    )
    train(cfg, data=digits)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    for key in ("match_inputs", "kd_weight", "iga_weight"):
        del state["config"][key]
    torch.save(state, tmp_path / CHECKPOINT)
    assert len(train(cfg.replace(epochs=2, resume=True), data=digits).history) == 2


def test_a_study_from_before_the_variants_resumes(tmp_path):
    import optuna

    from rrm.tune import TuneConfig, open_study

    cfg = TuneConfig(train=TrainConfig(method="rrm"), storage=f"sqlite:///{tmp_path}/o.db", study_name="old")
    storage = optuna.storages.InMemoryStorage()
    study = open_study(cfg, storage)
    old = study.user_attrs["rrm.settings"]
    for key in ("match_inputs", "kd_weight", "iga_weight"):
        del old["train"][key]
    study.set_user_attr("rrm.settings", old)
    open_study(cfg, storage)
    cfg.train = cfg.train.replace(kd_weight=0.5)
    with pytest.raises(RRMError, match=r"other settings \(train.kd_weight\)"):
        open_study(cfg, storage)


# ------------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="rrm", match_inputs="adversarial"), "unknown match inputs 'adversarial'; choose one of: clean,"),
        (dict(method="rrm", feature_loss="norm"), "choose one of: cosine, direction-norm, l2"),
        (dict(method="rrm", kd_weight=-0.1), "kd_weight must be a number >= 0"),
        (dict(method="rrm", iga_weight=float("nan")), "iga_weight must be a number >= 0"),
        (
            dict(method="kd", match_inputs="noise"),
            "match_inputs is an option of method 'rrm', not 'kd'; use --method rrm",
        ),
        (dict(method="sat", kd_weight=1.0, iga_weight=1.0), "kd_weight, iga_weight are options of method 'rrm'"),
    ],
)
def test_bad_values_raise_errors_that_name_the_fix(kw, match):
    with pytest.raises(RRMError, match=match):
        TrainConfig(**kw).validate()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--match-inputs", "bogus"], "unknown match inputs 'bogus'"),
        (["--kd-weight", "-1"], "kd_weight must be a number >= 0"),
        (["--iga-weight", "-2"], "iga_weight must be a number >= 0"),
        (["--method", "kd", "--match-inputs", "teacher-pgd"], "use --method rrm"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(rrm_cli.cli, ["train", "--method", "rrm", *args, "--no-track"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


def test_cli_trains_a_variant(tmp_path, monkeypatch, teacher_file):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        rrm_cli.cli,
        [
            "train",
            "--method",
            "rrm",
            "--teacher",
            teacher_file,
            "--dataset",
            "digits",
            "--model",
            "cnn",
            "--epochs",
            "1",
            "--eps",
            "0.1",
            "--match-inputs",
            "teacher-fgsm",
            "--feature-loss",
            "direction-norm",
            "--kd-weight",
            "0.5",
            "--iga-weight",
            "0.5",
            "--monitor-examples",
            "0",
            "--no-progress",
            "--out-dir",
            "run",
            "--no-track",
        ],
    )
    assert result.exit_code == 0, result.output
    _, meta = load_model(tmp_path / "run" / "model.pt")
    assert (meta["config"]["match_inputs"], meta["config"]["feature_loss"]) == ("teacher-fgsm", "direction-norm")
    assert (meta["config"]["kd_weight"], meta["config"]["iga_weight"]) == (0.5, 0.5)
