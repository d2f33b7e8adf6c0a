"""dfquant.inspect (the pre-flight check) names exactly what quantize then does, and changes nothing."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import dfquant
from dfquant.cli import main
from dfquant.models import create_model
from dfquant.qmodules import QUANT_LAYERS


class WithUnsupported(nn.Module):
    """A conv net with a ConvTranspose2d (unsupported: stays float) and a conv without BN after it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(self.up(x))))
        x = self.conv3(x)
        return self.fc(x.mean((2, 3)))


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


CASES = {
    "resnet20": (lambda: create_model("resnet20"), None),
    "mobilenet_v2": (lambda: create_model("mobilenet_v2"), None),
    "hand-written": (lambda: WithUnsupported(), (3, 8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_names_what_quantize_then_does(case):
    make, size = CASES[case]
    torch.manual_seed(0)
    model = _randomize_bn(make())
    before = copy.deepcopy(model.state_dict())
    insp = dfquant.inspect(model, input_size=size)
    qmodel, report = dfquant.quantize(model, "squant", 4, 4, input_size=size)
    quantized = {n for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)}
    assert {r.name for r in insp.layers if r.quantized} == quantized
    assert {r.name for r in insp.layers if not r.quantized} == set(report.unsupported)
    float_inputs = {n for n, _ in report.float_inputs}
    assert {r.name for r in insp.layers if r.quantized and r.input.startswith("float")} == float_inputs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed


def test_inspect_shows_pairs_units_and_warnings():
    model = _randomize_bn(create_model("mobilenet_v2"))
    model.features[1].conv[2].running_var[:2] = 1e-36  # two dead channels
    insp = dfquant.inspect(model)
    rows = {r.name: r for r in insp.layers}
    assert any("ReLU6" in w for w in insp.warnings) and any("dead BN channel" in w for w in insp.warnings)
    assert all(r.genie_unit for r in insp.layers if r.quantized)
    resnet = dfquant.inspect(_randomize_bn(create_model("resnet20")))
    rows = {r.name: r for r in resnet.layers}
    assert rows["layer1.0.conv1"].cle_partner == "-> layer1.0.conv2"
    assert rows["layer1.0.conv1"].dfmpc == "low -> layer1.0.conv2" and rows["layer1.0.conv2"].dfmpc == "high <- layer1.0.conv1"
    assert rows["layer1.0.conv1"].genie_unit == "layer1.0"
    hand = dfquant.inspect(_randomize_bn(WithUnsupported()), input_size=(3, 8, 8))
    rows = {r.name: r for r in hand.layers}
    assert not rows["up"].quantized and "ConvTranspose2d" in rows["up"].why_float
    assert rows["fc"].input.startswith("float")  # conv3 has no BN after it: the fc input has no statistics


def test_inspect_from_the_command_line(capsys):
    code = main(["--no-progress", "inspect", "--model", "resnet20", "--random-init", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["summary"]["quantized_layers"] == 20 and len(doc["layers"]) == 20
