"""The Keras Applications rules of the classifier constructors: one assertion per rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbone import resnet18, resnet50v2, vgg16

SMALL = {"width": 8}


@pytest.fixture
def weights_file(tmp_path: Path) -> str:
    path = tmp_path / "r18.pth"
    torch.save(resnet18(**SMALL).state_dict(), path)
    return str(path)


def test_weights_must_be_none_imagenet_or_file() -> None:
    with pytest.raises(ValueError, match=r"weights='/no/such/file.pth'.*None.*'imagenet'.*path"):
        resnet18(weights="/no/such/file.pth")


def test_weights_imagenet_with_top_needs_1000_classes() -> None:
    with pytest.raises(ValueError, match=r"classes=10:.*1000"):
        resnet18(weights="imagenet", classes=10)


def test_weights_imagenet_with_top_needs_224_input() -> None:
    with pytest.raises(ValueError, match=r"input_shape=\(200, 200, 3\).*224x224"):
        resnet18(weights="imagenet", input_shape=(200, 200, 3))


def test_input_shape_needs_three_channels() -> None:
    with pytest.raises(ValueError, match=r"input_shape=\(64, 64, 1\).*exactly 3 channels"):
        resnet18(include_top=False, input_shape=(64, 64, 1))


def test_input_shape_needs_three_values() -> None:
    with pytest.raises(ValueError, match=r"input_shape=\(64, 64\).*three integers"):
        resnet18(include_top=False, input_shape=(64, 64))


def test_input_sides_at_least_32() -> None:
    with pytest.raises(ValueError, match=r"input_shape=\(3, 31, 64\).*at least 32"):
        resnet18(include_top=False, input_shape=(3, 31, 64))


def test_include_top_needs_static_shape() -> None:
    with pytest.raises(ValueError, match=r"include_top=True needs a static input shape"):
        resnet18(include_top=True, input_shape=(None, None, 3))


def test_pooling_values() -> None:
    with pytest.raises(ValueError, match=r"pooling='mean'.*None.*'avg'.*'max'"):
        resnet18(include_top=False, pooling="mean")


def test_classes_positive() -> None:
    with pytest.raises(ValueError, match=r"classes=0"):
        resnet18(classes=0)


def test_channels_first_and_last_both_accepted() -> None:
    a = resnet18(include_top=False, input_shape=(64, 96, 3), **SMALL)
    b = resnet18(include_top=False, input_shape=(3, 64, 96), **SMALL)
    assert a.input_shape == b.input_shape == (3, 64, 96)


def test_outputs_by_top_and_pooling() -> None:
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert resnet18(classes=7, **SMALL).eval()(x).shape == (2, 7)
        assert resnet18(include_top=False, pooling="avg", **SMALL)(x).shape == (2, 64)
        assert resnet18(include_top=False, pooling="max", **SMALL)(x).shape == (2, 64)
        assert resnet18(include_top=False, **SMALL)(x).shape == (2, 64, 2, 3)
        assert resnet50v2(include_top=False, **SMALL).eval()(x).shape == (2, 256, 2, 3)
        assert vgg16(include_top=False, pooling="avg", **SMALL)(x).shape == (2, 64)


def test_forward_checks_declared_input_shape() -> None:
    model = resnet18(include_top=False, input_shape=(64, 64, 3), **SMALL)
    with pytest.raises(ValueError, match=r"built for input_shape \(3, 64, 64\)"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"expected 3 channels.*permute"):
        model(torch.randn(1, 64, 64, 3))


def test_file_weights_load_and_strict_mismatch(weights_file: str) -> None:
    model = resnet18(weights=weights_file, **SMALL)
    assert model.load_report.ok
    with pytest.raises(ValueError, match="mismatched"):
        resnet18(weights=weights_file, width=16)


def test_file_weights_without_top_set_head_aside(weights_file: str) -> None:
    model = resnet18(include_top=False, weights=weights_file, **SMALL)
    assert model.load_report.ignored == ["fc.weight", "fc.bias"]
