"""The protocols: dfquant's (unchanged), and the Genie release's (8-bit first/last weights, the
second layer's and the classifier's inputs at 8 bits, residual shortcuts on the block input's
quantizer) in the simulated model, Genie-M, save/load, ONNX export, the CLI and the report."""
import json

import pytest
import torch
import torch.nn as nn

import dfquant
from dfquant.cli import main
from dfquant.genie.quantizer import GenieLayer
from dfquant.genie.units import tie_shared_inputs
from dfquant.models import create_model
from dfquant.qmodules import QuantConv2d, QuantShortcut
from dfquant.quantizer import rtn_round, to_grid, weight_params

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    with torch.no_grad():  # BN statistics away from the init's (0, 1), so the ranges differ per layer
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _blocks(q):
    return [b for layer in (q.layer1, q.layer2, q.layer3) for b in layer]


def _on_grid(x: torch.Tensor, aq) -> bool:
    codes = x / aq.scale + aq.zero_point
    return bool(torch.allclose(codes, codes.round(), atol=1e-3))


def test_genie_protocol_bits_and_shortcuts_on_resnet20(resnet20):
    q, report = dfquant.quantize(resnet20, "rtn", 4, 4, protocol="genie", input_size=SIZE)
    assert q.conv1.w_bits == 8 and q.linear.w_bits == 8 and q.layer1[0].conv2.w_bits == 4
    assert q.conv1.input_quant is None  # the image input stays float (the release: bit_a None)
    assert q.layer1[0].conv1.input_quant.bits == 8 and q.linear.input_quant.bits == 8  # second layer, classifier
    assert q.layer1[0].conv2.input_quant.bits == 4 and q.layer1[1].conv1.input_quant.bits == 4
    seen = {}
    for i, block in enumerate(_blocks(q)):
        assert isinstance(block.shortcut, QuantShortcut)
        assert block.shortcut.input_quant is block.conv1.input_quant  # the block input's quantizer, the object
        block.shortcut.inner.register_forward_pre_hook(lambda m, a, _i=i: seen.__setitem__(_i, a[0]))
    assert q.layer1[0].shortcut.input_quant.bits == 8  # shares the second layer's 8-bit quantizer
    q(torch.randn(4, *SIZE))
    for i, block in enumerate(_blocks(q)):  # what reaches the residual add is on the block input's grid
        x = seen[i]
        assert _on_grid(x, block.conv1.input_quant) and x.unique().numel() <= 2 ** block.conv1.input_quant.bits
    assert report.config["protocol"] == "genie" and report.config["quantize_shortcuts"] and report.config["second_input_bits"] == 8
    assert "protocol genie" in report.format_table().splitlines()[0]
    assert any("9 residual shortcuts quantized" in n for n in report.notes)


def test_dfquant_protocol_is_unchanged(resnet20):
    """No shortcut quantized, no quantizer shared, every weight at w_bits, the second input at
    a_bits, and the codes are RTN's on the per-channel min/max grid computed here directly."""
    q, report = dfquant.quantize(resnet20, "rtn", 4, 4, input_size=SIZE)
    assert report.config["protocol"] == "dfquant" and not report.config["quantize_shortcuts"]
    assert not any(isinstance(m, QuantShortcut) for m in q.modules())
    quantizers = [m.input_quant for m in q.modules() if isinstance(m, QuantConv2d) and m.input_quant is not None]
    assert len({id(a) for a in quantizers}) == len(quantizers)
    assert q.conv1.w_bits == 4 and q.linear.w_bits == 4 and q.layer1[0].conv1.input_quant.bits == 4 and q.linear.input_quant.bits == 8
    for name, m in resnet20.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            qp = weight_params(m.weight.detach(), 4, "minmax", per_channel=True)
            want = rtn_round(to_grid(m.weight.detach(), qp), qp.qmin, qp.qmax)
            assert torch.equal(q.get_submodule(name).weight_int.to(want.dtype), want)


def test_genie_protocol_fixes_its_settings_and_allows_the_learned_methods():
    cfg = dfquant.QuantConfig(method="genie", protocol="genie", first_last_w_bits=8, second_input_bits=8, quantize_shortcuts=True).validate()
    assert cfg.protocol == "genie"
    for options, param in ((dict(first_last_w_bits=4), "first_last_w_bits"), (dict(quantize_shortcuts=False), "quantize_shortcuts"), (dict(second_input_bits=4), "second_input_bits")):
        base = dict(method="rtn", protocol="genie", first_last_w_bits=8, second_input_bits=8, quantize_shortcuts=True)
        with pytest.raises(dfquant.DfquantError) as err:
            dfquant.QuantConfig(**dict(base, **options)).validate()
        assert err.value.param == param
    with pytest.raises(dfquant.DfquantError) as err:
        dfquant.QuantConfig(method="genie", protocol="squant", act_range="squant").validate()
    assert err.value.param == "protocol"


def test_genie_protocol_weight_only_keeps_8_bit_ends(resnet20):
    q, report = dfquant.quantize(resnet20, "rtn", 4, None, protocol="genie", input_size=SIZE)
    assert q.conv1.w_bits == 8 and q.linear.w_bits == 8 and not any(isinstance(m, QuantShortcut) for m in q.modules())


class _DownBlock(nn.Module):
    """A block with a conv downsample shortcut (torchvision's layout, the release's ResNets)."""

    def __init__(self, direct: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.downsample = nn.Sequential(nn.Conv2d(8, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
        self.direct = direct

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.direct else self.downsample(x)))


class _Net(nn.Module):
    def __init__(self, direct: bool = False):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.stem2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.block = _DownBlock()
        self.tail = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.direct = direct
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.bn2(self.stem2(x)))
        x = self.block(x)
        y = self.bn3(self.tail(x))
        x = torch.relu(y + x) if self.direct else torch.relu(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_a_downsample_conv_shares_the_block_input_quantizer():
    torch.manual_seed(0)
    q, report = dfquant.quantize(_Net().eval(), "rtn", 4, 4, protocol="genie", input_size=(3, 16, 16))
    assert q.block.downsample[0].input_quant is q.block.conv1.input_quant and q.block.conv1.input_quant.bits == 4
    assert q.stem2.input_quant.bits == 8
    row = next(r for r in report.layers if r.name == "block.downsample.0")
    assert "shared with block.conv1" in row.note
    wrap = [GenieLayer(m, torch.zeros_like(m.weight_int, dtype=torch.float), 0.5, torch.Generator()) for m in (q.block.conv1, q.block.downsample[0])]
    with tie_shared_inputs(q.block, wrap):  # Genie-M learns one step for the shared quantizer
        assert wrap[1].a_scale is wrap[0].a_scale


def test_an_add_without_a_shortcut_module_is_refused():
    with pytest.raises(dfquant.DfquantError) as err:
        dfquant.quantize(_Net(direct=True).eval(), "rtn", 4, 4, protocol="genie", input_size=(3, 16, 16))
    assert err.value.param == "protocol" and "nn.Identity" in str(err.value)
    dfquant.quantize(_Net(direct=True).eval(), "rtn", 4, 4, input_size=(3, 16, 16))  # dfquant's protocol: fine


def test_save_load_keeps_the_genie_protocol_model(resnet20, tmp_path):
    q, report = dfquant.quantize(resnet20, "squant", 4, 4, protocol="genie", input_size=SIZE)
    path, _ = dfquant.save_quantized(q, tmp_path / "m", model_name="resnet20", config=report.config)
    q2, info = dfquant.load_quantized(path)
    assert info["config"]["protocol"] == "genie" and len(info["shortcuts"]) == 9
    x = torch.randn(4, *SIZE)
    assert torch.equal(q(x), q2(x))
    a, b = q.state_dict(), q2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for block in _blocks(q2):
        assert isinstance(block.shortcut, QuantShortcut) and block.shortcut.input_quant is block.conv1.input_quant
    from dfquant.io.serialization import file_info

    assert file_info(path)["protocol"]["protocol"] == "genie"


def test_onnx_export_of_the_genie_protocol_model(resnet20, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dfquant.io.export import check_onnx

    q, _ = dfquant.quantize(resnet20, "rtn", 4, 4, protocol="genie", input_size=SIZE)
    dfquant.export_onnx(q, tmp_path / "m.onnx", input_size=SIZE)
    assert check_onnx(q, tmp_path / "m.onnx", torch.rand(4, *SIZE))["verdict"] == "ok"


def test_genie_m_trains_one_step_per_shared_quantizer(resnet20, one_thread):
    q, report = dfquant.quantize(resnet20, "genie", 4, 4, protocol="genie", input_size=SIZE, samples=8, distill_iters=1, recon_iters=2, batch_size=4)
    for block in _blocks(q):
        assert block.shortcut.input_quant is block.conv1.input_quant
    assert report.config["protocol"] == "genie"
    block = q.layer2[0]  # the tie itself: one a_scale, and the shortcut reads the learned quantizer
    conv1 = GenieLayer(block.conv1, resnet20.layer2[0].conv1.weight, 0.5, torch.Generator())
    conv2 = GenieLayer(block.conv2, resnet20.layer2[0].conv2.weight, 0.5, torch.Generator())
    with tie_shared_inputs(block, [conv1, conv2]):
        assert block.shortcut.input_quant.wrapper is conv1 and conv2.a_scale is not conv1.a_scale
    assert block.shortcut.input_quant is block.conv1.input_quant


def test_cli_protocol_genie_json_names_it(capsys):
    code = main(["--no-progress", "quantize", "--model", "resnet20", "--random-init", "--method", "rtn", "--protocol", "genie", "--eval", "none", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["protocol"]["protocol"] == "genie" and res["protocol"]["quantize_shortcuts"] is True
