"""DFQ baselines: cross-layer equalization keeps the function and equalizes the pairs' ranges; bias
correction cancels the expected output shift it is computed for; both are refused where they do not
apply, survive save/load, and bias correction beats plain round-to-nearest on the real ResNet-20."""
import pytest
import torch
import torch.nn.functional as F

import dfquant
from dfquant import DfquantError
from dfquant.activation_ranges import propagate_bn_stats
from dfquant.dfq import _channel_ranges, _folded_weight, bias_correction, equalization_pairs, equalize_cross_layer
from dfquant.graph import trace
from dfquant.io.serialization import load_quantized, save_quantized


def _resnet20_with_bn_stats(seed: int = 0):
    torch.manual_seed(seed)
    model = dfquant.create_model("resnet20")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.2, 3.0)
            m.weight.data.uniform_(0.2, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("which", ["resnet20", "digits"])
def test_equalization_keeps_the_function_and_equalizes_every_pair(which, digits):
    model = _resnet20_with_bn_stats() if which == "resnet20" else digits[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eq, record = equalize_cross_layer(model)
    assert len(record.pairs) == (9 if which == "resnet20" else 2)  # block conv1 -> conv2; digits: a chain of three convs
    x = torch.randn(8, *model.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), eq(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    for p in record.pairs:
        r1 = _channel_ranges(_folded_weight(eq, p.first, p.bn), 0)
        r2 = _channel_ranges(_folded_weight(eq, p.second, p.second_bn), 1)
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=1e-7)
    # The scales really moved something (the test can fail), and the given model is untouched.
    assert max(float(p.scales.log().abs().max()) for p in record.pairs) > 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pairs_need_a_scale_equivariant_path():
    pairs, skipped = equalization_pairs(_resnet20_with_bn_stats())
    assert all(p.first.endswith("conv1") and p.second.endswith("conv2") and p.bn.endswith("bn1") for p in pairs)
    reasons = dict(skipped)
    assert "not followed by ReLU alone" in reasons["layer1.0.conv2"]  # its output meets the shortcut first
    pairs, skipped = equalization_pairs(dfquant.create_model("mobilenet_v2"))
    assert not pairs and any("ReLU6" in why and "relu6_to_relu" in why for _, why in skipped)


def _with_bn_stats(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2.8 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) * 1.8 + 0.2)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def mobilenet_v2():
    torch.manual_seed(0)
    return _with_bn_stats(dfquant.create_model("mobilenet_v2"))


def test_mobilenet_v2_with_relu_is_equalized_through_its_depthwise_convs(mobilenet_v2):
    from dfquant.dfq import is_depthwise, replace_relu6

    relu_model, replaced = replace_relu6(mobilenet_v2)
    assert len(replaced) == 35 and not any(isinstance(m, torch.nn.ReLU6) for m in relu_model.modules())
    assert sum(isinstance(m, torch.nn.ReLU6) for m in mobilenet_v2.modules()) == 35  # the given model keeps its ReLU6
    eq, record = equalize_cross_layer(relu_model)
    # stem -> depthwise, then every inverted residual's (expand ->) depthwise -> project
    assert len(record.pairs) == 34
    assert sum(is_depthwise(eq.get_submodule(p.second)) for p in record.pairs) == 17
    assert sum(is_depthwise(eq.get_submodule(p.first)) for p in record.pairs) == 17
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = relu_model(x), eq(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    for p in record.pairs:
        second = eq.get_submodule(p.second)
        r1 = _channel_ranges(_folded_weight(eq, p.first, p.bn), 0)
        r2 = _channel_ranges(_folded_weight(eq, p.second, p.second_bn), 0 if is_depthwise(second) else 1)
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=1e-7)
    assert max(float(p.scales.log().abs().max()) for p in record.pairs) > 0.1


def test_relu6_to_relu_quantizes_saves_and_reloads_the_relu_model(mobilenet_v2, tmp_path, digits):
    qmodel, report = dfquant.quantize(mobilenet_v2, "rtn", 8, 8, cle=True, relu6_to_relu=True, per_channel=False)
    assert any("35 ReLU6 modules replaced" in n for n in report.notes) and any("34 pairs" in n for n in report.notes)
    assert not any(isinstance(m, torch.nn.ReLU6) for m in qmodel.modules())
    path, _ = save_quantized(qmodel, tmp_path / "mbv2", model_name="mobilenet_v2", config=report.config)
    reloaded, _ = load_quantized(path)
    assert not any(isinstance(m, torch.nn.ReLU6) for m in reloaded.modules())
    x = 3 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(qmodel(x), reloaded(x))
    with pytest.raises(DfquantError, match="no nn.ReLU6 module"):
        dfquant.quantize(digits[0], "rtn", 8, 8, relu6_to_relu=True)
    with pytest.raises(DfquantError, match="relu6_to_relu is a DFQ step"):
        dfquant.quantize(digits[0], "genie", 8, 8, relu6_to_relu=True)


def _input_means(model):
    return {name: found.stats.moments()[0].float() for name, found in propagate_bn_stats(trace(model), model.input_size).items() if found.stats is not None}


@pytest.mark.parametrize("name", ["layer1.1.conv2", "layer3.0.conv1", "linear"])
def test_bias_correction_cancels_the_expected_output_shift(name):
    model = _resnet20_with_bn_stats()
    means = _input_means(model)
    plain, _ = dfquant.quantize(model, "rtn", 3, None)
    corrected, report = dfquant.quantize(model, "rtn", 3, None, bias_correction=True)
    float_layer, q0, q1 = model.get_submodule(name), plain.get_submodule(name), corrected.get_submodule(name)
    mean = means[name]
    if isinstance(float_layer, torch.nn.Conv2d):
        x = mean.reshape(1, -1, 1, 1).expand(1, -1, 9, 9)  # the expected input, spatially constant

        def run(w, b):
            return F.conv2d(x, w, b, float_layer.stride, float_layer.padding)[..., 1:-1, 1:-1]  # away from the zero padding

    else:
        x = mean.reshape(1, -1)

        def run(w, b):
            return F.linear(x, w, b)

    with torch.no_grad():
        want = run(float_layer.weight, float_layer.bias)
        shift_before = (run(q0.weight, q0.bias) - want).abs().max()
        shift_after = (run(q1.weight, q1.bias) - want).abs().max()
    assert shift_before > 1e-2  # 3-bit rounding shifts the expected output...
    assert shift_after < 1e-4 * max(1.0, float(want.abs().max()))  # ...and the correction removes it
    assert torch.equal(q0.weight_int, q1.weight_int)  # only the bias changes
    assert any(l.name == name and l.note.startswith("bias corrected") for l in report.layers)
    assert next(l for l in report.layers if l.name == "conv1").note.startswith("not bias-corrected")


def test_bias_correction_of_a_grouped_conv_uses_each_groups_channels():
    torch.manual_seed(0)
    eps = torch.randn(6, 2, 3, 3)  # 3 groups of 2 input channels, 2 outputs each
    mean = torch.arange(6, dtype=torch.float32)
    x = mean.reshape(1, 6, 1, 1).expand(1, 6, 5, 5)
    expected_shift = F.conv2d(x, eps, groups=3)[0, :, 2, 2]
    torch.testing.assert_close(bias_correction(eps, mean, groups=3), -expected_shift)


def test_cle_and_bias_correction_save_and_reload_exactly(digits, tmp_path):
    model, (x, _) = digits
    qmodel, report = dfquant.quantize(model, "squant", 4, 4, cle=True, bias_correction=True)
    assert report.config["cle"] and report.config["bias_correction"]
    assert any(n.startswith("cross-layer equalization: 2 pairs") for n in report.notes)
    path, _ = save_quantized(qmodel, tmp_path / "m", model_name="digits_cnn", config=report.config)
    loaded, _ = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_refused_where_they_do_not_apply():
    model = _resnet20_with_bn_stats()
    for option in ("cle", "bias_correction"):
        with pytest.raises(DfquantError, match="DFQ step for the rounding methods"):
            dfquant.quantize(model, "genie", 4, 4, **{option: True})
    no_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    no_bn(torch.zeros(1, 3, 8, 8))
    with pytest.raises(DfquantError, match="bias correction needs BatchNorm2d statistics"):
        dfquant.quantize(no_bn, "rtn", 4, None, bias_correction=True)


@pytest.mark.slow
def test_bias_correction_beats_round_to_nearest_on_real_resnet20(resnet20, cifar10):
    data = (cifar10[0][:400], cifar10[1][:400])
    rtn, _ = dfquant.quantize(resnet20, "rtn", 4, 4)
    corrected, _ = dfquant.quantize(resnet20, "rtn", 4, 4, bias_correction=True)
    a = dfquant.evaluate(rtn, data, reference=resnet20)
    b = dfquant.evaluate(corrected, data, reference=resnet20)
    assert b["logit_mse"] < 0.85 * a["logit_mse"]
    assert b["top1"] >= a["top1"]


def test_cli_flags(capsys, digits):
    from dfquant.cli import main

    code = main(["--no-progress", "quantize", "--model", "digits_cnn", "--method", "rtn", "--cle", "--bias-correction", "--report"])
    out = capsys.readouterr().out
    assert code == 0 and "cross-layer equalization: 2 pairs" in out and "bias corrected" in out


def test_an_affine_free_bn_is_not_equalized_through(affine_free_bn_model):
    pairs, skipped = equalization_pairs(affine_free_bn_model)
    assert pairs == [] and "no affine parameters" in dict(skipped)["conv"]
    with pytest.raises(DfquantError, match="no conv -> .BN. -> ReLU -> conv pair to equalize.*no affine parameters"):
        dfquant.quantize(affine_free_bn_model, "rtn", 4, 4, input_size=(3, 8, 8), cle=True)
