"""The feature protocol for every registered model, with and without ``feature_dim``; model files round-trip."""

import pytest
import torch

from rrm.errors import RRMError
from rrm.models import ARCHITECTURES, build_model, load_model, save_model

SMALL = [(1, 28), (3, 32)]


def _check_protocol(model, channels, size, feature_dim=None):
    model.eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        features = model.features(x)
        logits = model(x)
    assert features.shape == (2, model.feature_dim)
    if feature_dim is not None:
        assert model.feature_dim == feature_dim
    assert logits.shape == (2, model.num_classes)
    assert torch.allclose(model.head(features), logits, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("channels,size", SMALL)
def test_feature_protocol_small_inputs(name, channels, size):
    _check_protocol(build_model(name, num_classes=10, in_channels=channels, image_size=size), channels, size)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_feature_dim_adds_a_trained_projection(name):
    model = build_model(name, num_classes=9, in_channels=3, image_size=32, feature_dim=48)
    _check_protocol(model, 3, 32, feature_dim=48)
    assert isinstance(model.projection, torch.nn.Linear) and model.projection.out_features == 48
    assert model.projection.weight.requires_grad


@pytest.mark.parametrize("name,width", [("alexnet", 1.0), ("resnet18", 1.0), ("vgg11", 0.25)])
def test_imagenet_layouts_for_large_inputs(name, width):
    model = build_model(name, num_classes=9, in_channels=3, image_size=64, width=width)
    _check_protocol(model, 3, 64)


def test_paper_penultimate_sizes():
    assert build_model("resnet50", num_classes=10).feature_dim == 2048
    assert build_model("resnet50", num_classes=10, feature_dim=512).feature_dim == 512
    assert build_model("resnet18", num_classes=10).feature_dim == 512
    assert build_model("vgg11", num_classes=10).feature_dim == 512
    assert build_model("alexnet", num_classes=9, image_size=64).feature_dim == 4096


def test_normalisation_lives_inside_the_model():
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8, mean=[0.5], std=[0.25])
    x = torch.full((1, 1, 8, 8), 0.75)
    assert torch.allclose(model.normalize(x), torch.ones_like(x))


def test_width_scales_thin_models_only():
    assert build_model("resnet8", num_classes=10, width=2).feature_dim == 128
    with pytest.raises(RRMError, match="fixed width"):
        build_model("resnet50", num_classes=10, width=0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="resnet1000"), "unknown model"),
        (dict(name="cnn", feature_dim=0), "feature_dim"),
        (dict(name="cnn", mean=[0.1, 0.2]), "one per channel"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(RRMError, match=match):
        build_model(num_classes=10, in_channels=1, image_size=28, **kwargs)


def test_save_and_load_round_trip(tmp_path):
    model = build_model("cnn-bn", num_classes=10, in_channels=1, image_size=28, feature_dim=64).eval()
    save_model(model, tmp_path / "m.pt", {"method": "sat"})
    loaded, meta = load_model(tmp_path / "m.pt")
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(loaded.features(x), model.features(x))
    assert meta == {"method": "sat"} and not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(RRMError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(RRMError, match="corrupt"):
        load_model(bad)
