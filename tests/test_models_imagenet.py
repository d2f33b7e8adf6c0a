"""ImageNet model definitions: torchvision's exact state-dict layout, forward, fx tracing, registry."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx

from dfquant.errors import DfquantError
from dfquant.models import create_model, input_size_of, list_models, model_spec
from dfquant.models.weights import load_weights

# name -> (state-dict keys incl. num_batches_tracked, parameter count); torchvision's numbers.
EXPECTED = {
    "resnet18": (122, 11_689_512),
    "resnet50": (320, 25_557_032),
    "mobilenet_v2": (314, 3_504_872),
}

# A few keys with their torchvision shapes, spread over stem, blocks, shortcuts and head.
KEY_SHAPES = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.bn2.num_batches_tracked": (),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "fc.weight": (1000, 2048),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.0.1.weight": (32,),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.running_mean": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.bias": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.num_batches_tracked": (),
        "classifier.1.weight": (1000, 1280),
        "classifier.1.bias": (1000,),
    },
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: create_model(name) for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registry(name):
    assert name in list_models()
    spec = model_spec(name)
    assert spec.input_size == (3, 224, 224)
    assert spec.num_classes == 1000
    assert spec.dataset == "imagenet"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_state_dict_layout(models, name):
    model = models[name]
    sd = model.state_dict()
    n_keys, n_params = EXPECTED[name]
    assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    for key, shape in KEY_SHAPES[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not model.training
    assert input_size_of(model) == (3, 224, 224)


def test_mobilenet_v2_head_and_blocks(models):
    m = models["mobilenet_v2"]
    assert len(m.features) == 19
    assert [type(x).__name__ for x in m.features[0]] == ["Conv2d", "BatchNorm2d", "ReLU6"]
    assert isinstance(m.classifier[0], torch.nn.Dropout) and m.classifier[0].p == 0.2
    assert isinstance(m.classifier[1], torch.nn.Linear)


def test_resnet50_stride_on_3x3(models):
    block = models["resnet50"].layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)


def test_custom_num_classes():
    m = create_model("resnet18", num_classes=10)
    assert m.fc.weight.shape == (10, 512)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("mobilenet_v2", 224)])
def test_forward_and_fx_trace(models, name, size):
    model = models[name]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        y = model(x)
        gm = torch.fx.symbolic_trace(model)
        y_fx = gm(x)
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y_fx)
    ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert not any("relu" in str(n.target) for n in ops), "activations must be modules"
    n_adds = sum(1 for n in ops if "add" in str(n.target))
    assert n_adds == {"resnet18": 8, "resnet50": 16, "mobilenet_v2": 10}[name]


def test_weights_round_trip(models, tmp_path: Path):
    src = models["resnet18"]
    ckpt = tmp_path / "r18.pth"
    torch.save(src.state_dict(), ckpt)
    torch.manual_seed(1)
    fresh = create_model("resnet18")
    assert not torch.equal(fresh.conv1.weight, src.conv1.weight)
    load_weights(fresh, ckpt)
    for k, v in src.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    bad = dict(src.state_dict())
    bad["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(DfquantError, match=r"layer3\.1\.conv2\.weight"):
        load_weights(create_model("resnet18"), tmp_path / "bad.pth")


def test_create_model_with_weights(models, tmp_path: Path):
    src = models["mobilenet_v2"]
    ckpt = tmp_path / "mnv2.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, ckpt)
    m = create_model("mobilenet_v2", weights=str(ckpt))
    assert torch.equal(m.classifier[1].weight, src.classifier[1].weight)
