"""Robustness for students whose first layer differs from the teacher's: the patch-embedding model's stages, the
teacher's stem as a frozen prefix (against a hand computation, rebuilt from its file, bit-identical after training,
no gradient into the teacher), `--transplant auto` for every zoo pair, impossible pairs refused before training, the
per-epoch monitor held out from the training images with its FLOPs counted, and the masking checks that catch an
attack failing at large eps."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from rrm import cli as rrm_cli
from rrm.errors import RRMError
from rrm.evaluation import EvalConfig, eps_growth_radii, evaluate, other_class_starts, sanity_warnings
from rrm.models import build_model, load_model, save_model
from rrm.models.transplant import choose_transplant, folded_stem, stem_prefix_spec, transplant_prefix, transplanted
from rrm.train import TrainConfig, train
from rrm.train.monitor import monitor_split

MNIST = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.13,), std=(0.31,))
FAST = dict(steps=10, restarts=1, sanity_steps=10, sanity_examples=100, n_examples=100)


def test_convmixer_embeds_patches_and_names_its_stages():
    model = build_model("convmixer", **MNIST).eval()
    patch = model.body[0]
    assert (patch.kernel_size, patch.stride) == ((4, 4), (4, 4)), "kernel = stride = patch size"
    x = torch.rand(2, 1, 28, 28)
    stages = model.stages(x)
    assert model.stage_names == ("stem", "block1", "block2", "block3", "block4", "penultimate")
    assert {k: tuple(v.shape[1:]) for k, v in stages.items()} == {
        "stem": (128, 7, 7),
        **{f"block{i}": (128, 7, 7) for i in range(1, 5)},
        "penultimate": (128,),
    }
    z = (x - 0.13) / 0.31
    assert torch.allclose(stages["stem"], F.conv2d(z, patch.weight, patch.bias, stride=4), atol=1e-6)
    assert torch.allclose(stages["penultimate"], model.features(x)) and model(x).shape == (2, 10)
    assert build_model("convmixer", **MNIST, width=0.5).feature_dim == 64


def _teacher():
    torch.manual_seed(0)
    teacher = build_model("cnn", **MNIST)
    with torch.no_grad():
        teacher.body[0].bias.uniform_(-0.5, 0.0)  # thresholds, as a robust stem has
    return teacher.eval()


@pytest.mark.parametrize("student_name", ["resnet8", "vgg11", "convmixer"])
def test_a_stem_prefix_computes_the_teachers_maps_and_feeds_the_students_first_layer(tmp_path, student_name):
    teacher = _teacher()
    student = build_model(student_name, **MNIST, stem_prefix=stem_prefix_spec(teacher))
    transplant_prefix(teacher, student)
    plain = build_model(student_name, **MNIST)
    reader, own = student.body[2], plain.body[0]
    assert reader.in_channels == 32 and (reader.out_channels, reader.kernel_size, reader.stride) == (
        own.out_channels,
        own.kernel_size,
        own.stride,
    ), "the student's first layer keeps its filters, kernel and stride, and reads the teacher's 32 maps"
    x = torch.rand(3, 1, 28, 28)
    z = (x - 0.13) / 0.31
    by_hand = torch.relu(F.conv2d(z, teacher.body[0].weight, teacher.body[0].bias, padding=1))
    student.eval()
    assert torch.allclose(torch.relu(student.stages(x, ["stem"])["stem"]), by_hand, atol=1e-6)
    assert torch.allclose(student.body[1](student.body[0](z)), by_hand, atol=1e-6)
    assert not any(p.requires_grad for p in student.body[0].parameters()), "frozen"
    save_model(student, tmp_path / "s.pt")
    loaded, _ = load_model(tmp_path / "s.pt")
    assert loaded.spec["stem_prefix"]["channels"] == 32
    assert torch.equal(loaded(x), student(x)), "the file rebuilds the prefixed architecture"


@pytest.mark.parametrize("student_name", ["resnet8", "convmixer"])
def test_a_stem_adapter_narrows_the_teachers_maps_to_the_pixels_channels_for_the_student_as_built(
    tmp_path, student_name
):
    teacher = _teacher()
    student, kind, why = transplanted(
        "stem-adapter", teacher, lambda **extra: build_model(student_name, **MNIST, **extra)
    )
    assert kind == "stem-adapter" and "narrows its 32 maps to the image's 1 channel" in why and "\n" not in why
    plain = build_model(student_name, **MNIST)
    shapes = [tuple(v.shape) for v in plain.body.state_dict().values()]
    as_built = [tuple(v.shape) for v in student.body[3:].state_dict().values()]
    assert as_built == shapes, "behind the adapter the student is its architecture as built, first layer included"
    adapter = student.body[2]
    assert (adapter.in_channels, adapter.out_channels, adapter.kernel_size) == (32, 1, (1, 1))
    assert adapter.weight.requires_grad and not any(p.requires_grad for p in student.body[0].parameters())
    x = torch.rand(3, 1, 28, 28)
    z = (x - 0.13) / 0.31
    maps = torch.relu(F.conv2d(z, teacher.body[0].weight, teacher.body[0].bias, padding=1))
    by_hand = (maps * adapter.weight.view(1, 32, 1, 1)).sum(1, keepdim=True) + adapter.bias.view(1, 1, 1, 1)
    student.eval()
    assert torch.allclose(student.body[:3](z), by_hand, atol=1e-5), "a weighted sum of the teacher's maps"
    save_model(student, tmp_path / "s.pt")
    loaded, _ = load_model(tmp_path / "s.pt")
    assert loaded.spec["stem_prefix"]["adapter"] == 1
    assert torch.equal(loaded(x), student(x)), "the file rebuilds the adapted architecture"
    with pytest.raises(RRMError, match=r"to the image's channel count \(1\), not to 3"):
        build_model(student_name, **MNIST, stem_prefix=stem_prefix_spec(teacher, adapter=3))


def test_a_teachers_batchnorm_is_folded_into_the_prefix():
    torch.manual_seed(1)
    teacher = build_model("cnn-bn", **MNIST)
    bn = teacher.body[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    teacher.eval()
    student = build_model("resnet8", **MNIST, stem_prefix=stem_prefix_spec(teacher))
    transplant_prefix(teacher, student)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(student.eval().stages(x, ["stem"])["stem"], teacher.stages(x, ["stem"])["stem"], atol=1e-5)
    weight, bias = folded_stem(teacher)
    assert torch.equal(student.body[0].weight, weight) and torch.equal(student.body[0].bias, bias)


@pytest.mark.parametrize(
    ("teacher_name", "student_name", "kind", "words"),
    [
        ("cnn", "cnn", "stem", "has the teacher's shape (32 3x3 filters)"),
        ("cnn", "cnn-bn", "stem", "has the teacher's shape (32 3x3 filters)"),
        ("cnn", "resnet8", "stem-adapter", "(16 3x3 filters) differs from the teacher's (32 3x3 filters)"),
        ("cnn", "resnet20", "stem-adapter", "(16 3x3 filters) differs"),
        ("cnn", "vgg11", "stem-adapter", "(64 3x3 filters) differs"),
        ("cnn", "convmixer", "stem-adapter", "(128 4x4 filters, stride 4) differs"),
        ("resnet8", "cnn", "stem-adapter", "(32 3x3 filters) differs from the teacher's (16 3x3 filters)"),
        ("vgg11", "resnet8", "stem-adapter", "narrows its 64 maps to the image's 1 channel"),
        ("cnn", "alexnet", "stem-adapter", "(a block, not a convolution) differs"),
        ("cnn", "resnet18", "stem-adapter", "(64 3x3 filters) differs"),  # its small-input stem
    ],
)
def test_auto_picks_the_transfer_for_each_zoo_pair_and_says_why(teacher_name, student_name, kind, words):
    size = dict(MNIST, image_size=64) if student_name == "alexnet" else MNIST  # its pooling needs more pixels
    teacher, student = build_model(teacher_name, **size), build_model(student_name, **size)
    chosen, why = choose_transplant("auto", teacher, student)
    assert chosen == kind and words in why, why
    assert "\n" not in why


def test_pairs_no_transfer_fits_are_refused_naming_what_differs():
    with pytest.raises(RRMError, match=r"first layers differ \(128 4x4 filters, stride 4 against 16 3x3 filters\).*"
                       r"its stride is 4, not 1.*use a teacher whose first layer is a stride-1"):  # fmt: skip
        choose_transplant("auto", build_model("convmixer", **MNIST), build_model("resnet8", **MNIST))
    large = dict(MNIST, image_size=64)
    with pytest.raises(RRMError, match="does not start with a convolution"):
        choose_transplant("stem-prefix", build_model("cnn", **large), build_model("alexnet", **large))
    with pytest.raises(RRMError, match="cannot run in front of a student: its stride is 4"):
        choose_transplant("stem-prefix", build_model("convmixer", **MNIST), build_model("cnn", **MNIST))


@pytest.mark.parametrize(("transplant", "kind"), [("stem-prefix", "stem-prefix"), ("auto", "stem-adapter")])
def test_a_frozen_prefix_is_bit_identical_after_training_and_the_teacher_gets_no_gradient(
    tmp_path, digits, digits_teacher, transplant, kind
):
    teacher = digits_teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for p in teacher.parameters():
        p.grad = None  # what its own training left
    cfg = TrainConfig(
        dataset="digits",
        model="resnet8",
        method="fast",
        eps=0.1,
        teacher=str(digits_teacher.model_path),
        transplant=transplant,
        epochs=2,
        lr=0.05,
        monitor_examples=0,
        progress=False,
        out_dir=str(tmp_path),
    )
    result = train(cfg, data=digits, teacher=teacher)
    weight, bias = folded_stem(teacher)
    trained = result.model.state_dict()
    assert torch.equal(trained["body.0.weight"].cpu(), weight.cpu())
    assert torch.equal(trained["body.0.bias"].cpu(), bias.cpu())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items()), "the teacher is unchanged"
    assert all(p.grad is None for p in teacher.parameters()), "no gradient reached the teacher"
    assert result.summary["transplant"] == kind
    assert ("asked for" if kind == "stem-prefix" else "differs") in result.summary["transplant_reason"]
    assert result.summary["test_accuracy"] > 0.5


def test_transplant_auto_through_the_command_line(cli_project, digits_teacher):
    result = CliRunner().invoke(
        rrm_cli.cli,
        ["train", "--dataset", "digits", "--model", "convmixer", "--method", "fast", "--eps", "0.1",
         "--teacher", str(digits_teacher.model_path), "--transplant", "auto", "--epochs", "1",
         "--monitor-examples", "0", "--no-track", "--out-dir", "out"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "transplant: stem-adapter (the student's first layer (128 4x4 filters, stride 4) differs" in result.stderr
    metrics = json.loads((cli_project / "out" / "train_metrics.json").read_text())
    assert metrics["transplant"] == "stem-adapter"
    model, meta = load_model(cli_project / "out" / "model.pt")
    assert meta["config"]["transplant"] == "auto" and model.spec["stem_prefix"] == {
        "channels": 32, "kernel": [3, 3], "padding": [1, 1], "dilation": [1, 1], "adapter": 1,
    }  # fmt: skip


def test_an_impossible_pair_is_refused_before_training(cli_project, tmp_path, digits):
    teacher = build_model("convmixer", **digits.model_kwargs())
    save_model(teacher, tmp_path / "convmixer.pt")
    result = CliRunner().invoke(
        rrm_cli.cli,
        ["train", "--dataset", "digits", "--model", "resnet8", "--method", "fast", "--teacher",
         str(tmp_path / "convmixer.pt"), "--transplant", "auto", "--epochs", "1", "--no-track", "--out-dir", "out"],
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no transplant fits teacher 'convmixer'"), result.stderr
    assert "use a teacher whose first layer is a stride-1 convolution" in lines[0]
    assert not (cli_project / "out").exists()


def test_the_monitor_reads_held_out_training_images_never_the_test_set(tmp_path, digits):
    (train_x, train_y), (monitor_x, monitor_y) = monitor_split(digits, 64)
    assert len(monitor_y) == 64 and len(train_y) == len(digits.train_y) - 64
    assert torch.equal(monitor_x, digits.train_x[-64:]) and torch.equal(train_x, digits.train_x[:-64])

    def run(data, out):
        cfg = TrainConfig(
            dataset="digits", model="cnn", method="fast", eps=0.1, epochs=2, lr=0.05, early_stop_on_co=True,
            monitor_examples=64, progress=False, out_dir=str(tmp_path / out),
        )  # fmt: skip
        return train(cfg, data=data)

    real = run(digits, "real")
    # the same run with every test image blanked: the monitor's numbers, and so its decisions, cannot change
    blank = run(dataclasses.replace(digits, test_x=torch.zeros_like(digits.test_x)), "blank")
    for key in ("monitor_robust_accuracy", "monitor_fgsm_accuracy", "loss"):
        assert [h[key] for h in real.history] == [h[key] for h in blank.history], key
    assert real.history[0]["test_accuracy"] != blank.history[0]["test_accuracy"]
    monitor_flops = real.history[0]["monitor_flops"]
    assert monitor_flops > 0 and all(h["monitor_flops"] == monitor_flops for h in real.history)
    total = sum(h["epoch_flops"] + h["monitor_flops"] for h in real.history)
    assert real.summary["total_flops"] == pytest.approx(total), "the monitor's passes count in the run's cost"
    per_image = real.history[0]["epoch_flops"] / len(train_y)
    assert monitor_flops > 0.1 * per_image * 64, "PGD-10 and FGSM over 64 images are no small change"


def test_eps_beyond_the_pixel_range_is_one_attack():
    assert eps_growth_radii("linf", 0.3) == {"x0.5": 0.15, "x1": 0.3, "x2": 0.6, "x4": 1.0}
    assert eps_growth_radii("linf", 0.1) == {"x0.5": 0.05, "x1": 0.1, "x2": 0.2, "x4": 0.4, "x8": 0.8}
    assert list(eps_growth_radii("l2", 1.0).values()) == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_other_class_starts_are_the_nearest_well_classified_image_of_another_class():
    class Threshold(nn.Module):  # class 1 where the mean pixel exceeds 0.5
        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([0.5 - m, m - 0.5], 1)

    x = torch.tensor([0.1, 0.2, 0.45, 0.9, 0.6]).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    y = torch.tensor([0, 0, 1, 1, 1])  # the third image (0.45) is labelled 1 but classified 0
    starts = other_class_starts(Threshold(), x, y)
    assert starts[:, 0, 0, 0].tolist() == pytest.approx([0.6, 0.6, 0.2, 0.2, 0.2])
    alone = other_class_starts(Threshold(), x[:2], y[:2])
    assert torch.equal(alone, x[:2]), "no other class in the batch: the image itself"


class _Quantised(nn.Module):
    """A step function on the pixels: zero gradient almost everywhere, so APGD cannot move from a random start."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.spec = inner, inner.spec

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


class _Constant(nn.Module):
    """Class 0 for every image: no perturbation changes its answer, so even a start from another class fails."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.spec = inner, inner.spec

    def forward(self, x):
        return self.inner(x) * 0 + torch.eye(10, device=x.device)[0]


def test_a_start_from_another_class_tells_an_attack_failing_from_a_model(digits_natural, digits_teacher, digits):
    config = EvalConfig(eps=0.15, attacks=("apgd",), **FAST)  # x8 = 1.2, capped at 1: the ball holds every image
    masked = evaluate(_Quantised(digits_natural.model.eval()), digits, config).sanity
    assert not masked["eps_growth"]["passed"] and masked["eps_growth"]["accuracy"]["x8"] > 0.05
    assert masked["eps_growth"]["largest_eps"] == masked["reachable"]["eps"] == 1.0
    assert masked["reachable"]["passed"] and masked["reachable"]["accuracy"] <= 0.05
    assert "the attack fails from random starts" in masked["reachable"]["warning"]
    robust = evaluate(digits_teacher.model.eval(), digits, config).sanity
    assert robust["reachable"]["passed"] and robust["eps_growth"]["passed"], robust
    assert not any("warning" in check for check in robust.values() if isinstance(check, dict))
    constant = evaluate(_Constant(digits_natural.model.eval()), digits, config)
    assert not constant.sanity["reachable"]["passed"] and constant.sanity_passed is False


def test_a_larger_budget_that_lowers_accuracy_is_reported():
    checks = {
        "more_steps": {"passed": True, "accuracy": 0.60, "accuracy_more": 0.50, "lowered": True},
        "more_restarts": {"passed": True, "accuracy": 0.60, "accuracy_more": 0.59, "lowered": False},
    }
    (name, line), *others = sanity_warnings(checks, 0.02).items()
    assert name == "more_steps" and not others
    assert line.startswith("more steps lowered accuracy from 60.0% to 50.0%") and "too weak" in line


def test_the_transfer_studys_students_validate_and_take_the_teacher_they_need():
    import yaml

    study = yaml.safe_load((Path(__file__).parents[1] / "pipelines" / "transfer" / "params.yaml").read_text())[
        "transfer"
    ]
    teacherless, with_teacher = set(study["without_teacher"]), set(study["with_teacher"])
    for name, values in study["students"].items():
        cfg = TrainConfig.from_dict({**values, "eps": study["eps"]}).validate()
        assert (cfg.transplant is not None) == (name not in teacherless), name
        assert name in teacherless | with_teacher | {"filters-fast-co"}, name
