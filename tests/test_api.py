import copy

import pytest
import torch
import torch.nn as nn

import dfquant
from dfquant.errors import DfquantError
from dfquant.qmodules import QuantConv2d, QuantLinear


def test_quantize_returns_new_model_and_keeps_original(digits):
    model, _ = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q, report = dfquant.quantize(model, "squant", 4, 4)
    assert q is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules())
    qlayers = [m for m in q.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(qlayers) == 4 == len(report.layers)
    for m in qlayers:
        assert m.weight_int.dtype == torch.int8
        assert int(m.weight_int.min()) >= -8 and int(m.weight_int.max()) <= 7


def test_protocol_first_input_float_last_input_8bit(digits):
    q, report = dfquant.quantize(digits[0], "squant", 4, 4)
    assert q.conv1.input_quant is None
    assert q.conv2.input_quant.bits == 4 and q.fc.input_quant.bits == 8
    assert report.float_inputs[0][0] == "conv1"
    q2, report2 = dfquant.quantize(digits[0], "squant", 4, 4, quantize_first_input=True, last_input_bits=None)
    assert q2.fc.input_quant.bits == 4
    # the image has no BN statistics: without a given range it stays float, and the report says why
    assert q2.conv1.input_quant is None and "input_range" in dict(report2.float_inputs)["conv1"]
    q3, _ = dfquant.quantize(digits[0], "squant", 4, 4, quantize_first_input=True, input_range=(-1.0, 1.0))
    assert q3.conv1.input_quant.bits == 8 and q3.conv1.input_quant.range == pytest.approx((-1.0, 1.0), abs=0.01)


def test_report_contents(digits):
    _, report = dfquant.quantize(digits[0], "squant", 4, 4)
    d = report.to_dict()
    assert d["method"] == "squant" and d["w_bits"] == 4
    for row in report.layers:
        assert row.channel_err_max <= 0.5 + 1e-4 and row.kernel_err_max <= 1.0 + 1e-4
        assert 0 < row.rel_weight_error < 0.5
    table = report.format_table()
    assert "conv2" in table and "inputs left in float" in table
    assert str(report) == table


def test_weight_only(digits):
    q, report = dfquant.quantize(digits[0], "rtn", 8, None)
    assert all(r.a_bits is None for r in report.layers)
    x, y = digits[1]
    assert dfquant.evaluate(q, (x, y))["top1"] >= dfquant.evaluate(digits[0], (x, y))["top1"] - 1.0


def test_w8a8_close_to_fp32_on_digits(digits):
    model, data = digits
    fp = dfquant.evaluate(model, data)["top1"]
    q, _ = dfquant.quantize(model, "squant", 8, 8)
    assert dfquant.evaluate(q, data)["top1"] >= fp - 0.6


def test_same_call_same_model(digits):
    a, _ = dfquant.quantize(digits[0], "squant", 4, 4)
    b, _ = dfquant.quantize(digits[0], "squant", 4, 4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fold_bn_option(digits):
    q, report = dfquant.quantize(digits[0], "squant", 8, 8, fold_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert len(report.folded_bn) == 3
    x, y = digits[1]
    assert dfquant.evaluate(q, (x, y))["top1"] >= dfquant.evaluate(digits[0], (x, y))["top1"] - 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="nope"), "unknown method"),
        (dict(w_bits=1), "w_bits must be an integer between 2 and 8, got 1"),
        (dict(a_bits=9), "a_bits must be an integer between 2 and 8, got 9"),
        (dict(act_range="percentile"), "unknown act_range 'percentile'; choose dfq, mse"),
        (dict(skip=("nolayer",)), "names no quantizable layer"),
        (dict(bogus=1), "unknown option"),
        (dict(method="rtn", init="squant"), "applies to the learned methods"),
        (dict(a_bits=None, n_sigma=3.0), "a_bits=None quantizes none"),
        (dict(a_bits=None, quantize_first_input=True), "a_bits=None quantizes none"),
        (dict(act_range="mse", n_sigma=3.0), "does not use it"),
        (dict(input_range=(-1.0, 1.0)), "the image input stays float otherwise"),
        (dict(method="squant-k", squant_channel=False), "of method 'squant' only"),
        (dict(method="genie", squant_kernel=False), "not of 'genie'"),
        (dict(method="squant", recon_iters=10), "recon_iters applies only to the learned methods"),
        (dict(layer_w_bits={"nope": 8}), "given for no quantizable layer: nope"),
        (dict(layer_w_bits={"conv2": 9}), "weight bit-width of layer 'conv2' must be an integer between 2 and 8"),
        (dict(layer_w_bits={"conv2": 8}, skip=("conv2",)), "both skipped and given a bit-width: conv2"),
        (dict(layer_w_bits=[("conv2", 8)]), "must map layer names to bit-widths"),
        (dict(per_channel="no"), "per_channel must be True"),
        (dict(int32_bias="yes"), "int32_bias must be True or False"),
        (dict(n_sigma=-2.0), "n_sigma must be a positive finite number"),
        (dict(n_sigma=float("inf")), "n_sigma must be a positive finite number"),
        (dict(quantize_first_input=True, input_range=(1.0, 0.0)), "lo < hi"),
        (dict(quantize_first_input=True, input_range=(float("nan"), 1.0)), "two finite numbers"),
        (dict(skip="fc"), "got the string 'fc'"),
        (dict(skip=("conv1", "conv2", "conv3", "fc")), "nothing to quantize"),
        (dict(skip=("conv1",), quantize_first_input=True, input_range=(-2.0, 2.0)), "which skip leaves in float"),
        (dict(input_size=(3, 8, 8)), r"cannot run on an input of size \(3, 8, 8\)"),
    ],
)
def test_bad_arguments(digits, kwargs, match):
    args = dict(method="squant", w_bits=4, a_bits=4)
    args.update(kwargs)
    with pytest.raises(DfquantError, match=match):
        dfquant.quantize(digits[0], **args)


def test_model_without_bn_needs_weight_only():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(DfquantError, match="no BatchNorm"):
        dfquant.quantize(m, "squant", 4, 4)
    q, _ = dfquant.quantize(m, "squant", 4, None)
    assert q(torch.randn(1, 1, 4, 4)).shape == (1, 2)


def test_not_a_module():
    with pytest.raises(DfquantError, match="torch.nn.Module"):
        dfquant.quantize("resnet20", "squant", 4, 4)


# --- the real CIFAR-10 ResNet-20 (skips without ../shared) -------------------------------------


@pytest.mark.slow
def test_cifar_resnet20_fp32_accuracy(resnet20, cifar10):
    assert dfquant.evaluate(resnet20, cifar10)["top1"] == pytest.approx(91.73, abs=0.01)


@pytest.mark.slow
def test_cifar_resnet20_w8a8_within_half_point(resnet20, cifar10):
    fp = dfquant.evaluate(resnet20, cifar10)["top1"]
    q, _ = dfquant.quantize(resnet20, "squant", 8, 8)
    assert dfquant.evaluate(q, cifar10)["top1"] >= fp - 0.5


@pytest.mark.slow
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (3, None)])
def test_cifar_resnet20_squant_beats_rtn_at_low_bits(resnet20, cifar10, w_bits, a_bits):
    rtn, _ = dfquant.quantize(resnet20, "rtn", w_bits, a_bits)
    sq, _ = dfquant.quantize(resnet20, "squant", w_bits, a_bits)
    a_rtn = dfquant.evaluate(rtn, cifar10)["top1"]
    a_sq = dfquant.evaluate(sq, cifar10)["top1"]
    assert a_sq > a_rtn + 1.0, (a_sq, a_rtn)


@pytest.mark.slow
@pytest.mark.parametrize("w_bits,a_bits", [(8, None), (4, 4)])
def test_cifar_resnet20_squant_lowers_output_error(resnet20, cifar10, w_bits, a_bits):
    """Less noisy than accuracy on 846 images: SQuant's logits are closer to FP32's than RTN's."""
    x = cifar10[0][:256], cifar10[1][:256]
    rtn, _ = dfquant.quantize(resnet20, "rtn", w_bits, a_bits)
    sq, _ = dfquant.quantize(resnet20, "squant", w_bits, a_bits)
    e_rtn = dfquant.evaluate(rtn, x, reference=resnet20)["logit_mse"]
    e_sq = dfquant.evaluate(sq, x, reference=resnet20)["logit_mse"]
    assert e_sq < e_rtn, (e_sq, e_rtn)


def test_weight_range_rule_defaults_and_errors(digits):
    import dfquant

    model, _ = digits
    _, r = dfquant.quantize(model, "squant", 4, 4)
    assert r.config["w_range"] == "minmax"  # SQuant's protocol
    q, r = dfquant.quantize(model, "rtn", 2, None, w_range="lp")
    assert r.config["w_range"] == "lp"
    mm, _ = dfquant.quantize(model, "rtn", 2, None)
    w = model.conv2.weight
    assert (q.conv2.weight - w).norm() < (mm.conv2.weight - w).norm()  # clipping helps at 2 bits
    with pytest.raises(dfquant.DfquantError, match="unknown w_range 'max'"):
        dfquant.quantize(model, "rtn", 4, 4, w_range="max")


def test_squant_on_symmetric_grids_keeps_zero_points_at_zero_and_beats_rtn_there(digits):
    import dfquant
    from dfquant.qmodules import QUANT_LAYERS

    model, data = digits
    sq, r = dfquant.quantize(model, "squant", 3, None, w_range="symmetric")
    rtn, _ = dfquant.quantize(model, "rtn", 3, None, w_range="symmetric")
    assert r.config["w_range"] == "symmetric"
    layers = [m for m in sq.modules() if isinstance(m, QUANT_LAYERS)]
    assert layers and all(float(m.weight_zero_point.abs().max()) == 0.0 for m in layers)
    assert all(int(m.weight_int.min()) >= -4 and int(m.weight_int.max()) <= 3 for m in layers)
    e_sq = dfquant.evaluate(sq, data, reference=model)["logit_mse"]
    e_rtn = dfquant.evaluate(rtn, data, reference=model)["logit_mse"]
    assert e_sq < e_rtn, (e_sq, e_rtn)


def test_per_layer_weight_bits_override_and_survive_save_load(digits, tmp_path):
    from dfquant.qmodules import QUANT_LAYERS

    model, (x, _) = digits
    qmodel, report = dfquant.quantize(model, "squant", 2, 4, layer_w_bits={"conv2": 8, "fc": 6})
    bits = {l.name: l.w_bits for l in report.layers}
    assert bits == {"conv1": 2, "conv2": 8, "conv3": 2, "fc": 6}
    for name, layer in qmodel.named_modules():
        if isinstance(layer, QUANT_LAYERS):
            lo, hi = -(2 ** (bits[name] - 1)), 2 ** (bits[name] - 1) - 1
            assert layer.w_bits == bits[name] and lo <= int(layer.weight_int.min()) and int(layer.weight_int.max()) <= hi
    # 8 bits where the 2-bit model hurts most makes that layer's weights nearly exact
    assert next(l for l in report.layers if l.name == "conv2").rel_weight_error < 0.01
    path, _ = dfquant.save_quantized(qmodel, tmp_path / "mixed", model_name="digits_cnn", config=report.config)
    loaded, info = dfquant.load_quantized(path)
    assert info["config"]["layer_w_bits"] == {"conv2": 8, "fc": 6}
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_a_model_in_training_mode_is_left_untouched(digits):
    model, (x, _) = digits
    want, _ = dfquant.quantize(model, "squant", 4, 4)
    model.train()
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        got, report = dfquant.quantize(model, "squant", 4, 4)
        assert model.training
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BN running stats too
    finally:
        model.eval()
    assert any("training mode" in n for n in report.notes)
    with torch.no_grad():
        assert torch.equal(got(x), want(x))  # the eval-mode function, as from the eval-mode model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_quantized_as_float32(digits, dtype):
    model, (x, _) = digits
    low = copy.deepcopy(model).to(dtype)
    q, report = dfquant.quantize(low, "squant", 8, 8)
    assert any("converted to float32" in n for n in report.notes)
    assert next(low.parameters()).dtype == dtype  # the given model is not converted
    with torch.no_grad():
        out = q(x)
    assert out.dtype == torch.float32 and (out.argmax(1) == model(x).argmax(1)).float().mean() > 0.95


def test_a_meta_device_model_is_a_clear_error():
    with torch.device("meta"):
        model = dfquant.create_model("digits_cnn")
    with pytest.raises(DfquantError, match="meta device"):
        dfquant.quantize(model, "rtn", 4, 4)


def test_a_conv_with_non_zero_padding_stays_float_and_is_listed():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()
    q, report = dfquant.quantize(model, "rtn", 8, 8, input_size=(3, 16, 16))
    assert report.unsupported == ["3"] and [l.name for l in report.layers] == ["0", "8"]
    assert type(q.get_submodule("3")) is nn.Conv2d


def test_batchnorm1d_is_named_when_no_batchnorm2d_is_found():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with pytest.raises(DfquantError, match="no BatchNorm2d layer \\(it has BatchNorm1d"):
        dfquant.quantize(model, "rtn", 4, 4, input_size=(3, 2, 2))


def test_quantized_layers_take_keyword_inputs_and_the_report_gives_the_grid_range(digits):
    q, report = dfquant.quantize(digits[0], "squant", 4, 4)
    x = torch.randn(2, *digits[0].input_size)
    with torch.no_grad():
        assert torch.equal(q.conv1(input=x), q.conv1(x))
    for row in report.layers:
        if row.a_bits:
            assert row.a_range == q.get_submodule(row.name).input_quant.range


@pytest.mark.parametrize("size", [12, "3,8,8", (3, 0, 8), (3.0, 8, 8), torch.zeros(3, 8, 8)])
def test_input_size_must_be_positive_integers(digits, size):
    with pytest.raises(DfquantError, match="input_size must be a tuple of positive integers"):
        dfquant.quantize(digits[0], "rtn", 8, 8, input_size=size)


def test_the_input_size_given_is_kept_for_export():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    q, _ = dfquant.quantize(m, "rtn", 8, 8, input_size=(1, 6, 6))
    assert q.input_size == (1, 6, 6) and not hasattr(m, "input_size")


def test_non_finite_weights_or_statistics_are_named(digits, tmp_path):
    bad = copy.deepcopy(digits[0])
    with torch.no_grad():
        bad.bn1.running_var[0] = float("inf")
    for method in ("rtn", "squant"):
        with pytest.raises(DfquantError, match="NaN or inf values in bn1.running_var"):
            dfquant.quantize(bad, method, 8, 8)
    torch.save(bad.state_dict(), tmp_path / "bad.pth")
    with pytest.raises(DfquantError, match="bad.pth has NaN or inf values in bn1.running_var"):
        dfquant.create_model("digits_cnn", weights=str(tmp_path / "bad.pth"))


@pytest.mark.parametrize("method", ["rtn", "squant"])
@pytest.mark.parametrize(
    "options",
    [dict(fold_bn=True, cle=True, bias_correction=True)]
    + [
        pytest.param(o, marks=pytest.mark.slow)
        for o in (dict(), dict(fold_bn=True), dict(cle=True), dict(bias_correction=True), dict(act_range="mse"), dict(per_channel=False, bias_correction=True), dict(w_range="lp"))
    ],
)
def test_one_and_two_threads_give_the_same_model_on_resnet20(resnet20, method, options):
    """Everything that decides a rounding must not depend on how torch splits its sums over threads."""
    before = torch.get_num_threads()
    models = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            models.append(dfquant.quantize(resnet20, method, 3, 4, **options)[0].state_dict())
    finally:
        torch.set_num_threads(before)
    one, two = models
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []


def test_the_squant_protocol_is_the_papers_settings_with_the_authors_noise_rule(digits):
    model = digits[0]
    q, report = dfquant.quantize(model, "squant", 4, 4, protocol="squant")
    same, _ = dfquant.quantize(model, "squant", 4, 4, act_range="squant")
    assert report.config["protocol"] == "squant" and report.config["act_range"] == "squant"
    a, b = q.state_dict(), same.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dfquant.quantize(model, "rtn", 4, None, protocol="squant")[1].config["act_range"] == "dfq"  # weight-only: no activation rule
    for options, param in ((dict(act_range="dfq"), "act_range"), (dict(last_input_bits=4), "last_input_bits"), (dict(method="genie"), "protocol")):
        with pytest.raises(dfquant.DfquantError) as err:
            dfquant.QuantConfig(**dict(dict(method="squant", protocol="squant", act_range="squant"), **options)).validate()
        assert err.value.param == param


_CPU_CASES = {
    "rtn": ("rtn", 3, 4, {}),
    "squant": ("squant", 3, 4, {}),
    "squant_fold_cle_bc": ("squant", 4, 8, dict(fold_bn=True, cle=True, bias_correction=True)),
    "rtn_per_tensor_bc": ("rtn", 4, 8, dict(per_channel=False, cle=True, bias_correction=True)),
    "rtn_lp_mse": ("rtn", 3, 4, dict(w_range="lp", act_range="mse")),
    "dfmpc": ("dfmpc", 2, None, {}),
    "squant_protocol": ("squant", 4, 4, dict(protocol="squant")),
}
_CPU_SCRIPT = """
import sys, torch, dfquant
torch.set_num_threads(1)
model = dfquant.create_model("resnet20")
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
cases = {cases!r}
torch.save({{name: dfquant.quantize(model, m, w, a, **o)[0].state_dict() for name, (m, w, a, o) in cases.items()}}, sys.argv[2])
"""


@pytest.mark.slow
def test_the_cpu_instruction_set_does_not_change_any_code(resnet20, tmp_path):
    """torch picks its kernels by the CPU's instruction set (ATEN_CPU_CAPABILITY); forcing the plain
    (non-SIMD) kernels in one process stands in for another CPU. Every weight code, weight scale and
    BN-statistics range must be bit-identical. The SQuant authors' noise rule reads a float forward
    pass, whose convolutions differ in the last bits between kernels: its activation scales may
    differ by float32 rounding, never a weight code."""
    import os
    import subprocess
    import sys

    native = torch.backends.cpu.get_cpu_capability()
    if native == "DEFAULT":
        pytest.skip("this CPU runs torch's plain kernels only: nothing to compare")
    torch.save(resnet20.state_dict(), tmp_path / "r20.pt")
    script = _CPU_SCRIPT.format(cases=_CPU_CASES)
    runs = {}
    for capability in ("default", native.lower()):
        out = tmp_path / f"{capability}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "r20.pt"), str(out)], check=True, env=env, timeout=600)
        runs[capability] = torch.load(out, weights_only=True)
    plain, simd = runs.values()
    for case, state in plain.items():
        differ = [k for k in state if not torch.equal(state[k], simd[case][k])]
        if case == "squant_protocol":
            assert all(k.endswith("input_quant.scale") for k in differ), differ
            assert all(torch.allclose(state[k], simd[case][k], rtol=1e-6, atol=0) for k in differ)
        else:
            assert differ == [], case
