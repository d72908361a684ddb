"""Matching at several depths, stem transplant and the probe: each stage's maps and every matching term against hand
computations, adapters absent from the saved model, no gradient into the teacher, a frozen transplanted stem that
training leaves bit-identical, threshold statistics with a known answer, and bad combinations refused up front."""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from rrm import cli as rrm_cli
from rrm.errors import RRMError
from rrm.evaluation import layer_agreement, stem_thresholds
from rrm.models import build_model, load_model
from rrm.models.transplant import folded_stem, transplant_stem
from rrm.train import TrainConfig, train
from rrm.train.losses import cosine_feature_loss, l2_feature_loss
from rrm.train.methods import RRM
from rrm.train.stages import parse_match_layers, stage_adapter

SHAPE = dict(num_classes=10, in_channels=1, image_size=8)


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name, **SHAPE, mean=(0.5,), std=(0.25,))
    for module in model.modules():  # non-trivial BatchNorm statistics, so folding is tested for real
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_stages_are_the_pre_activation_maps():
    x = torch.rand(3, 1, 8, 8)
    cnn, cnn_bn = _model("cnn"), _model("cnn-bn")
    z = (x - 0.5) / 0.25
    stages = cnn.stages(x)
    assert cnn.stage_names == ("stem", "block1", "penultimate")
    assert torch.allclose(stages["stem"], F.conv2d(z, cnn.body[0].weight, cnn.body[0].bias, padding=1))
    assert (stages["stem"] < 0).any(), "a pre-activation map, not the ReLU's output"
    block1 = F.conv2d(F.max_pool2d(torch.relu(stages["stem"]), 2), cnn.body[3].weight, cnn.body[3].bias, padding=1)
    assert torch.allclose(stages["block1"], block1, atol=1e-6)
    assert torch.allclose(stages["penultimate"], cnn.features(x))
    bn = cnn_bn.body[1]
    by_hand = (F.conv2d(z, cnn_bn.body[0].weight, padding=1) - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + bn.eps
    ) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(cnn_bn.stages(x, ["stem"])["stem"], by_hand, atol=1e-5)
    assert _model("resnet8").stage_names == ("stem", "block1", "block2", "block3", "penultimate")


def test_every_matching_term_against_the_hand_computation():
    teacher, student = _model("cnn", 0), _model("cnn", 1)
    cfg = TrainConfig(method="rrm", lam=0.5, match_layers=("stem:0.5", "block1:0.25", "penultimate"))
    method = RRM(cfg, teacher)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    method.check(type("D", (), {"input_shape": (1, 8, 8), "num_classes": 10, "name": "t"})(), student)
    assert len(method.adapters) == 0  # same architecture: no adapter
    terms = method.loss(student, x, y)
    s, t = student.stages(x), teacher.stages(x)
    stem = l2_feature_loss(s["stem"].flatten(1), t["stem"].flatten(1))
    block1 = l2_feature_loss(s["block1"].flatten(1), t["block1"].flatten(1))
    penultimate = cosine_feature_loss(s["penultimate"], t["penultimate"])
    ce = F.cross_entropy(student(x), y)
    assert terms["match_stem"].item() == pytest.approx(stem.item(), rel=1e-5)
    assert terms["match_block1"].item() == pytest.approx(block1.item(), rel=1e-5)
    assert terms["match_penultimate"].item() == pytest.approx(penultimate.item(), rel=1e-5)
    expected = 0.5 * ce + 0.5 * stem + 0.25 * block1 + penultimate
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_paper_default_matches_the_penultimate_layer_only():
    teacher, student = _model("cnn", 0), _model("cnn", 1)
    method = RRM(TrainConfig(method="rrm", lam=0.5), teacher)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    terms = method.loss(student, x, y)
    expected = 0.5 * F.cross_entropy(student(x), y) + cosine_feature_loss(student.features(x), teacher.features(x))
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert not any(k.startswith("match_") for k in terms)


def test_adapters_map_shapes_and_stay_out_of_the_saved_model(tmp_path, digits, digits_teacher):
    assert stage_adapter((32, 8, 8), (32, 8, 8)) is None
    adapter = stage_adapter((16, 8, 8), (32, 4, 4))
    assert adapter(torch.rand(2, 16, 8, 8)).shape == (2, 32, 4, 4)
    assert stage_adapter((16, 2, 2), (32, 4, 4))(torch.rand(2, 16, 2, 2)).shape == (2, 32, 4, 4)
    assert stage_adapter((64,), (128,))(torch.rand(2, 64)).shape == (2, 128)
    with pytest.raises(RRMError, match="maps with maps"):
        stage_adapter((64,), (32, 4, 4))
    cfg = TrainConfig(
        dataset="digits",
        model="resnet8",
        method="rrm",
        teacher=str(digits_teacher.model_path),
        lam=0.5,
        feature_dim=128,
        match_layers=("stem", "penultimate"),
        epochs=1,
        lr=0.05,
        monitor_examples=0,
        progress=False,
        out_dir=str(tmp_path),
    )
    result = train(cfg, data=digits)
    assert "match_stem" in result.history[0]
    saved, _ = load_model(tmp_path / "model.pt")
    fresh = build_model("resnet8", **digits.model_kwargs(), feature_dim=128)
    assert set(saved.state_dict()) == set(fresh.state_dict()), "the adapter is not part of the model"
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(checkpoint["method"]) == {"stem.0.weight", "stem.0.bias"}  # ... but its weights resume with the run


def test_no_gradient_reaches_the_teacher():
    teacher, student = _model("cnn", 0), _model("cnn-bn", 1).train()
    before = [p.clone() for p in teacher.parameters()]
    method = RRM(TrainConfig(method="rrm", match_layers=("stem", "penultimate"), iga_weight=1.0), teacher)
    method.check(type("D", (), {"input_shape": (1, 8, 8), "num_classes": 10, "name": "t"})(), student)
    terms = method.loss(student, torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


@pytest.mark.parametrize(
    ("teacher_name", "student_name"), [("cnn", "cnn-bn"), ("cnn-bn", "cnn"), ("cnn", "cnn"), ("cnn-bn", "cnn-bn")]
)
def test_a_transplanted_stem_computes_the_teachers_pre_activations(teacher_name, student_name):
    teacher, student = _model(teacher_name, 0), _model(student_name, 1)
    transplant_stem(teacher, student)
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(student.stages(x, ["stem"])["stem"], teacher.stages(x, ["stem"])["stem"], atol=1e-5)
    weight, bias = folded_stem(student)
    assert torch.allclose(weight, folded_stem(teacher)[0], atol=1e-6) and torch.allclose(
        bias, folded_stem(teacher)[1], atol=1e-6
    )


@pytest.mark.parametrize("teacher_name", ["cnn", "cnn-bn"])
def test_stem_filters_copies_the_filters_the_teachers_next_layer_reads_most(teacher_name):
    teacher, student = _model(teacher_name, 0), _model("resnet8", 1)  # 32 filters into 16
    following = [m for m in teacher.body.modules() if isinstance(m, torch.nn.Conv2d)][1]
    by_hand = sorted(
        sorted(range(32), key=lambda j: -following.weight[:, j].pow(2).sum().item())[:16]
    )  # the 16 input channels with the largest squared weights
    index = transplant_stem(teacher, student, filters=True)
    assert index.tolist() == by_hand
    x = torch.rand(5, 1, 8, 8)
    teacher_maps = teacher.stages(x, ["stem"])["stem"]
    assert torch.allclose(student.stages(x, ["stem"])["stem"], teacher_maps[:, index], atol=1e-5)
    with pytest.raises(RRMError, match="--transplant stem-filters"):
        transplant_stem(teacher, _model("resnet8", 1))  # the whole stem does not fit, and the error says what does
    with pytest.raises(RRMError, match=r"channels \(1, 16\) in the teacher, \(1, 32\) in the student"):
        transplant_stem(student, _model("cnn", 2), filters=True)  # more filters than the teacher has: refused


def test_a_frozen_transplanted_stem_is_bit_identical_after_training(tmp_path, digits, digits_teacher):
    cfg = TrainConfig(
        dataset="digits",
        model="cnn-bn",
        method="natural",
        teacher=str(digits_teacher.model_path),
        transplant="stem",
        epochs=2,
        lr=0.05,
        monitor_examples=0,
        progress=False,
        out_dir=str(tmp_path),
    )
    result = train(cfg, data=digits)
    reference = build_model("cnn-bn", **digits.model_kwargs())
    transplant_stem(digits_teacher.model, reference)
    trained = result.model.state_dict()
    for key in ("body.0.weight", "body.1.weight", "body.1.bias", "body.1.running_mean", "body.1.running_var"):
        assert torch.equal(trained[key].cpu(), reference.state_dict()[key]), key
    assert not torch.equal(trained["body.3.weight"].cpu(), reference.state_dict()["body.3.weight"]), "the rest trains"
    assert result.summary["test_accuracy"] > 0.8


def test_a_fine_tuned_transplant_trains_the_stem(tmp_path, digits, digits_teacher):
    cfg = TrainConfig(
        dataset="digits",
        model="cnn",
        method="rrm",
        lam=0.5,
        teacher=str(digits_teacher.model_path),
        transplant="stem",
        transplant_frozen=False,
        epochs=1,
        lr=0.05,
        monitor_examples=0,
        progress=False,
        out_dir=str(tmp_path),
    )
    result = train(cfg, data=digits)
    assert not torch.equal(result.model.body[0].weight.cpu(), digits_teacher.model.body[0].weight.cpu())


def test_threshold_statistics_of_a_hand_built_first_layer():
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8)  # mean 0, std 1: raw pixels
    conv = model.body[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 0, 1, 1] = 1.0  # one positive tap: silent under haze of 0.3 only with a margin of 0.3
        conv.bias[0] = -0.5  # margin 0.5 >= haze gain 0.3: silent
        conv.weight[1, 0] = 0.1  # nine taps of 0.1: haze gain 0.27, eps-gain 0.27
        conv.bias[1] = -0.2  # margin 0.2 < 0.27: fires under haze
        conv.weight[2, 0, 0, 0] = -1.0  # a negative tap: haze only lowers it
        conv.bias[2] = 0.1  # margin -0.1: on for the background already, so not silent
    stats = stem_thresholds(model, eps=0.3)
    f0, f1, f2 = stats["per_filter"][:3]
    assert (f0["margin"], f0["eps_gain"], f0["silent"]) == (pytest.approx(0.5), pytest.approx(0.3), True)
    assert (f1["margin"], f1["eps_gain"], f1["silent"]) == (pytest.approx(0.2), pytest.approx(0.27), False)
    assert (f2["margin"], f2["eps_gain"], f2["silent"]) == (pytest.approx(-0.1), pytest.approx(0.3), False)
    # the other 29 filters are all zero: margin 0 >= haze gain 0, silent
    assert stats["silent_fraction"] == pytest.approx(30 / 32)
    assert stats["median_background_margin"] == pytest.approx(0.0)


def test_layer_agreement_of_a_transplanted_student(digits, digits_teacher):
    student = build_model("cnn-bn", **digits.model_kwargs()).eval()
    transplant_stem(digits_teacher.model, student)
    x, y = digits.test_x[:32].float(), digits.test_y[:32]
    found = layer_agreement(student, digits_teacher.model, x, y, eps=0.1, steps=3)
    assert found["layers"]["stem"]["clean"] == pytest.approx(1.0, abs=1e-5)
    assert found["layers"]["stem"]["attacked"] == pytest.approx(1.0, abs=1e-5)
    assert "block1" in found["skipped"]


def test_match_layers_parse_with_weights():
    assert parse_match_layers(["stem:0.5", "penultimate"]) == {"stem": 0.5, "penultimate": 1.0}
    for bad, message in (
        (["stem:-1"], "must be a number >= 0"),
        (["stem:x"], "NAME or NAME:WEIGHT"),
        (["stem", "stem"], "listed twice"),
        ([], "at least one"),
    ):
        with pytest.raises(RRMError, match=message):
            parse_match_layers(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "rrm", "--match-layers", "stem,nose"], "--match-layers names nose"),
        (["--method", "rrm", "--match-layers", "stem:-0.5,penultimate"], "must be a number >= 0"),
        (["--method", "natural", "--transplant", "stem", "--model", "resnet8"], "cannot transplant the teacher's stem"),
        (["--method", "natural", "--transplant", "gills"], "unknown transplant 'gills'"),
        (["--method", "sat", "--match-layers", "stem,penultimate"], "match_layers is an option of method 'rrm'"),
    ],
)
def test_bad_combinations_fail_in_one_line_before_training(cli_project, digits_teacher, args, message):
    result = CliRunner().invoke(
        rrm_cli.cli,
        [
            "train",
            "--dataset",
            "digits",
            "--teacher",
            str(digits_teacher.model_path),
            "--epochs",
            "1",
            "--no-track",
            "--out-dir",
            "out",
            *args,
        ],
    )
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert not (cli_project / "out" / "checkpoint.pt").exists()


def test_probe_through_the_command_line(cli_project, digits_teacher):
    result = CliRunner().invoke(
        rrm_cli.cli,
        [
            "probe",
            str(digits_teacher.model_path),
            "--teacher",
            str(digits_teacher.model_path),
            "--eps",
            "0.1",
            "--n-examples",
            "32",
            "--steps",
            "3",
            "--out",
            "probe.json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "filters silent under haze" in result.output and "penultimate  clean 1.000" in result.output
    assert (cli_project / "probe.json").is_file()
