"""DF-MPC in the pipeline: method dfmpc, the compensation step for the rounding methods, w_grid,
activation ranges from the compensated statistics, the CLI, and one-line errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import dfquant
from dfquant.cli import main
from dfquant.config import QuantConfig
from dfquant.dfmpc import DfmpcConfig, compensate, paper_weights, plan_pairs
from dfquant.errors import DfquantError
from dfquant.graph import replace_module
from dfquant.modelcheck import copy_model
from dfquant.qmodules import QUANT_LAYERS, QuantConv2d, QuantLinear


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class ReLU6Net(nn.Module):
    """stem -> c1 -> c2 -> fc with ReLU6 everywhere: (c1, c2) pairs only after relu6_to_relu."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act, self.fc = nn.ReLU6(), nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.b0(self.c0(x)))
        x = self.act(self.b1(self.c1(x)))
        x = self.act(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class SharedTail(nn.Module):
    """A compensable pair (c1, c2), then a conv ``s`` run twice: it is listed, not paired."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.s, self.bs = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.bs(self.s(x)))
        x = torch.relu(self.s(x))
        return self.fc(x.mean((2, 3)))


def _by_hand(model, low_bits, w_bits, cfg):
    """The dfmpc model built from the module's parts: paper_weights for every layer, plan_pairs, compensate."""
    plan = plan_pairs(model)
    q = copy_model(model).eval()
    for name, layer in list(q.named_modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            codes, qp = paper_weights(layer.weight.detach(), low_bits if name in plan.low_layers else w_bits)
            kind = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
            replace_module(q, name, kind(layer, codes, qp))
    compensate(model, q, plan, cfg, folded=False)
    return q


# ---- method dfmpc ----


def test_dfmpc_is_the_papers_protocol_weight_only_on_twn_and_dorefa_grids(digits):
    model, (x, _) = digits
    q, report = dfquant.quantize(model, "dfmpc", 6, low_bits=2)
    assert report.a_bits is None and all(m.input_quant is None for m in q.modules() if isinstance(m, QUANT_LAYERS))
    assert report.config["w_grid"] == "paper" and report.config["layer_w_bits"] == {"conv3": 2}
    bits = {r.name: r.w_bits for r in report.layers}
    assert bits == {"conv1": 6, "conv2": 6, "conv3": 2, "fc": 6}  # stem and classifier at w_bits
    for name, layer in q.named_modules():
        if isinstance(layer, QUANT_LAYERS):
            assert layer.weight_scale.numel() == 1  # per tensor
            if name == "conv3":  # ternary: codes -1..1, zero point 0
                assert layer.weight_int.abs().max() == 1 and float(layer.weight_zero_point) == 0.0
            else:  # DoReFa: no level at zero
                assert float(layer.weight_zero_point) == -0.5
    assert _state_equal(q, _by_hand(model, 2, 6, DfmpcConfig()))
    info = report.config["dfmpc"]
    assert (info["compensation"], info["bn_recal"], info["lambda1"], info["lambda2"]) == ("dfmpc", "none", 0.5, 0.0)
    assert [(p["low"], p["high"], p["low_bits"], p["high_bits"]) for p in info["pairs"]] == [("conv3", "fc", 2, 6)]
    assert [n for n, _ in info["uncompensated"]] == ["conv1", "conv2"]
    assert any(n.startswith("  conv3 (W2) -> bn3") for n in report.notes)
    assert report.format_table().startswith("dfquant: method=dfmpc W6Afp (DF-MPC MP2/6")
    assert sum(n.startswith("  uncompensated: ") for n in report.notes) == 2


def test_validated_configs_validate_to_themselves(digits):
    for cfg in (QuantConfig(method="dfmpc", a_bits=None), QuantConfig(method="rtn", w_bits=2, w_grid="twn"), QuantConfig(method="squant")):
        once = cfg.validate()
        assert once.validate() == once and QuantConfig(**{k: v for k, v in once.to_dict().items() if k != "config_version"}).validate() == once


def test_a_quantconfig_with_a_dfmpcconfig_equals_the_keyword_options(digits):
    model = digits[0]
    a, _ = dfquant.quantize(model, "dfmpc", 6, low_bits=3, bn_recal="moments", lambda1=0.25)
    b, _ = dfquant.quantize(model, QuantConfig(method="dfmpc", w_bits=6, a_bits=None), dfmpc=DfmpcConfig(low_bits=3, bn_recal="moments", lambda1=0.25))
    assert _state_equal(a, b)


def test_compensation_none_is_the_mixed_precision_model_without_c(digits):
    model = digits[0]
    plain, _ = dfquant.quantize(model, "rtn", 6, None, w_grid="paper", layer_w_bits={"conv3": 2})
    none, report = dfquant.quantize(model, "dfmpc", 6, low_bits=2, compensation="none")
    assert _state_equal(plain, none)
    assert report.config["dfmpc"]["pairs"][0]["c_min"] == report.config["dfmpc"]["pairs"][0]["c_max"] == 1.0


@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_the_compensation_step_of_a_rounding_method_keeps_its_codes_and_changes_only_the_low_bn(digits, method):
    model = digits[0]
    ref, _ = dfquant.quantize(model, method, 6, None, layer_w_bits={"conv3": 2})  # per-channel min/max, no compensation
    q, report = dfquant.quantize(model, method, 6, None, low_bits=2, compensation="dfmpc")
    assert report.config["w_grid"] is None and report.config["w_range"] == "minmax"
    changed = {k for k, v in ref.state_dict().items() if not torch.equal(v, q.state_dict()[k])}
    assert changed == {"bn3.weight", "bn3.bias"}  # c folded into the low layer's BN, nothing else
    c = report.config["dfmpc"]["pairs"][0]
    assert c["c_min"] >= 0 and (c["c_min"], c["c_max"]) != (1.0, 1.0)


def test_recalibration_without_c_moves_the_low_bn_statistics_only(digits):
    model = digits[0]
    ref, _ = dfquant.quantize(model, "squant", 6, None, layer_w_bits={"conv3": 2})
    q, report = dfquant.quantize(model, "squant", 6, None, low_bits=2, compensation="none", bn_recal="moments")
    changed = {k for k, v in ref.state_dict().items() if not torch.equal(v, q.state_dict()[k])}
    assert changed == {"bn3.running_mean", "bn3.running_var"}
    assert report.config["dfmpc"]["pairs"][0]["recal"] == "moments"


@pytest.mark.parametrize("grid, bits", [("dorefa", 4), ("dorefa", 2), ("twn", 2), ("paper", 3)])
@pytest.mark.parametrize("method", ["rtn", "squant"])
def test_w_grid_puts_every_layer_on_one_per_tensor_grid(digits, grid, bits, method):
    from dfquant.quantizer import grid_for_bits, grid_params

    model = digits[0]
    q, report = dfquant.quantize(model, method, bits, None, w_grid=grid)
    assert report.config["w_grid"] == grid and report.config["w_range"] is None
    for name, layer in q.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        w = model.get_submodule(name).weight.detach()
        g = grid_for_bits(grid, bits)
        qp = grid_params(w, bits, g)
        assert torch.equal(layer.weight_scale, qp.scale.reshape(1)) and torch.equal(layer.weight_zero_point, qp.zero_point.reshape(1))
        lo, hi = (-1, 1) if g == "twn" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        assert lo <= int(layer.weight_int.min()) and int(layer.weight_int.max()) <= hi
        if method == "rtn":  # the grid's own rule: the paper's quantizer
            assert torch.equal(layer.weight_int, paper_weights(w, bits)[0].to(torch.int8)) or g != grid_for_bits("paper", bits)


# ---- activations with DF-MPC ----


def test_the_high_layers_input_range_comes_from_the_compensated_statistics(digits):
    model = digits[0]
    q, _ = dfquant.quantize(model, "dfmpc", 6, 8, low_bits=2)
    uncompensated, _ = dfquant.quantize(model, "dfmpc", 6, 8, low_bits=2, compensation="none")
    m2 = copy.deepcopy(model)  # the float model with the compensated BN: its statistics are the compensated ones
    m2.bn3.weight.data.copy_(q.bn3.weight)
    m2.bn3.bias.data.copy_(q.bn3.bias)
    want, _ = dfquant.quantize(m2, "dfmpc", 6, 8, low_bits=2, compensation="none")
    assert q.fc.input_quant.range == pytest.approx(want.fc.input_quant.range, rel=1e-5)
    assert q.fc.input_quant.range != pytest.approx(uncompensated.fc.input_quant.range, rel=1e-3)
    assert q.conv3.input_quant.range == uncompensated.conv3.input_quant.range  # the other layers' inputs: as before


def test_int32_bias_is_applied_after_the_folded_compensation(digits):
    q, _ = dfquant.quantize(digits[0], "dfmpc", 6, 8, low_bits=2, fold_bn=True, int32_bias=True)
    assert q.conv3.weight_scale.numel() == q.conv3.out_channels  # c made the per-tensor scale per channel
    for layer in (q.conv2, q.conv3, q.fc):
        steps = layer.bias.double() / (layer.input_quant.scale * layer.weight_scale).double()
        assert torch.allclose(steps, steps.round(), atol=1e-4)


# ---- images ----


def test_fitted_and_synthetic_take_given_images_and_save_them(digits, tmp_path):
    from dfquant.io.images import load_images

    model = digits[0]
    images = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q, report = dfquant.quantize(model, "dfmpc", 6, low_bits=2, compensation="fitted", bn_recal="synthetic", synthetic=images, samples=16,
                                 save_synthetic=tmp_path / "s.safetensors")
    info = report.config["dfmpc"]
    assert info["data"]["source"] == "given" and info["data"]["n"] == 16 and info["pairs"][0]["recal"] == "synthetic"
    assert torch.equal(load_images(tmp_path / "s.safetensors"), images[:16])
    again, _ = dfquant.quantize(model, "dfmpc", 6, low_bits=2, compensation="fitted", bn_recal="synthetic", synthetic=images[:16])
    assert _state_equal(q, again)


@pytest.mark.usefixtures("one_thread")
def test_synthetic_recalibration_synthesizes_genie_d_images_from_the_seed(digits):
    model = digits[0]
    runs = [dfquant.quantize(model, "dfmpc", 6, low_bits=2, compensation="none", bn_recal="synthetic", samples=8, distill_iters=2, seed=s)
            for s in (0, 0, 1)]
    assert runs[0][1].config["dfmpc"]["data"]["source"] == "synthesized (genie)"
    assert _state_equal(runs[0][0], runs[1][0]) and not _state_equal(runs[0][0], runs[2][0])


# ---- bad input ----


@pytest.mark.parametrize(
    "kwargs, param, match",
    [
        (dict(method="dfmpc", w_bits=6, low_bits=6), "low_bits", "low_bits must be below w_bits"),
        (dict(method="rtn", w_bits=4, compensation="exact"), "compensation", "unknown compensation 'exact'"),
        (dict(method="genie", w_bits=4, low_bits=2), ("low_bits",), "low_bits belongs to DF-MPC.*not with 'genie'"),
        (dict(method="squant", w_bits=4, samples=8), ("samples",), "take the synthesis options"),
        (dict(method="dfmpc", w_bits=6, low_bits=2, samples=8), ("samples",), "samples applies only to the learned methods"),
        (dict(method="dfmpc", w_bits=6, bn_recal="synthetic", recon_iters=3), "recon_iters", "recon_iters sets Genie-M's reconstruction"),
        (dict(method="dfmpc", w_bits=6, low_bits=2, layer_w_bits={"conv3": 4}), "layer_w_bits", "conv3 4 bits, but it is the low layer"),
        (dict(method="rtn", w_bits=4, w_grid="twn"), "w_grid", "w_grid='twn' is ternary"),
        (dict(method="rtn", w_bits=4, w_grid="dorefa", w_range="lp"), "w_range", "which w_grid='dorefa' replaces"),
        (dict(method="dfmpc", w_bits=4, per_channel=False), "per_channel", "one scale per layer already"),
        (dict(method="zeroq", w_bits=4, w_grid="dorefa"), "w_grid", "learns its step sizes"),
        (dict(method="dfmpc", w_bits=6, low_bits=2, skip=("conv3",)), "method", "the low layers of all its pairs are skipped"),
        (dict(method="dfmpc", w_bits=6, dfmpc="low_bits=2"), "dfmpc", "dfmpc must be a DfmpcConfig"),
        (dict(method="dfmpc", w_bits=6, bn_recal="synthetic", genie=dfquant.GenieConfig(recon_iters=5)), "recon_iters", "recon_iters sets Genie-M's"),
        (dict(method="squant", w_bits=6, genie=dfquant.GenieConfig()), ("genie",), "genie applies only to the learned methods"),
    ],
)
def test_bad_dfmpc_settings_are_one_error_naming_the_parameter(digits, kwargs, param, match):
    with pytest.raises(DfquantError, match=match) as e:
        dfquant.quantize(digits[0], **kwargs)
    assert e.value.param == param


def test_a_model_without_a_pair_is_refused_naming_why():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 3)).eval()
    with pytest.raises(DfquantError, match="no compensable pair.*does not go to a BatchNorm2d") as e:
        dfquant.quantize(model, "dfmpc", 6, low_bits=2, input_size=(1, 6, 6))
    assert e.value.param == "method"
    with pytest.raises(DfquantError, match=r"the DF-MPC step \(compensation='dfmpc'\): the model has no compensable pair") as e:
        dfquant.quantize(model, "rtn", 6, None, compensation="dfmpc", input_size=(1, 6, 6))
    assert e.value.param == "compensation"


def test_relu6_pairs_are_listed_and_refused_until_relu6_to_relu(with_bn_stats):
    model = with_bn_stats(ReLU6Net())
    with pytest.raises(DfquantError, match="ReLU6 is not positively homogeneous.*relu6_to_relu=True replaces ReLU6"):
        dfquant.quantize(model, "dfmpc", 6, low_bits=2, input_size=(3, 8, 8))
    q, report = dfquant.quantize(model, "dfmpc", 6, low_bits=2, relu6_to_relu=True, input_size=(3, 8, 8))
    assert [(p["low"], p["high"]) for p in report.config["dfmpc"]["pairs"]] == [("c1", "c2")]
    assert report.config["layer_w_bits"] == {"c1": 2}


def test_shared_layers_are_left_uncompensated_and_listed(with_bn_stats):
    model = with_bn_stats(SharedTail())
    q, report = dfquant.quantize(model, "dfmpc", 6, low_bits=2, input_size=(3, 8, 8))
    info = report.config["dfmpc"]
    assert [(p["low"], p["high"]) for p in info["pairs"]] == [("c1", "c2")]
    assert "called 2 times" in dict(info["uncompensated"])["s"]
    with torch.no_grad():
        assert torch.isfinite(q(torch.randn(2, 3, 8, 8))).all()


@pytest.mark.parametrize("compensation, bn_recal", [("dfmpc", "none"), ("dfmpc", "moments"), ("none", "moments"), ("fitted", "synthetic")])
@pytest.mark.parametrize("fold_bn", [False, True])
def test_dead_bn_channels_give_a_finite_model(digits, compensation, bn_recal, fold_bn):
    model, (x, _) = digits
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.conv3.weight[0].zero_()
        model.bn3.running_var[:3] = 1e-36
        model.bn3.weight[1] = 1e-20
    q, report = dfquant.quantize(model, "dfmpc", 6, 8, low_bits=2, compensation=compensation, bn_recal=bn_recal, fold_bn=fold_bn, synthetic=x[:32] if compensation == "fitted" else None)
    assert all(torch.isfinite(t).all() for t in q.state_dict().values() if t.is_floating_point())
    with torch.no_grad():
        assert torch.isfinite(q(x[:16])).all()


# ---- the real CIFAR-10 ResNet-20 (skips without ../shared) ----


@pytest.mark.slow
def test_cifar_resnet20_literal_mp2_6_reproduces_the_prototype(resnet20, cifar10):
    """The design note's independent prototype: 12.41 % without compensation, 13.12 % with (846 images)."""
    one_image = 100 / 846 + 1e-6
    none, _ = dfquant.quantize(resnet20, "dfmpc", 6, low_bits=2, compensation="none")
    literal, report = dfquant.quantize(resnet20, "dfmpc", 6, low_bits=2)
    assert dfquant.evaluate(none, cifar10)["top1"] == pytest.approx(12.41, abs=one_image)
    assert dfquant.evaluate(literal, cifar10)["top1"] == pytest.approx(13.12, abs=one_image)
    assert len(report.config["dfmpc"]["pairs"]) == 9 and {n for n, _ in report.config["dfmpc"]["uncompensated"]} == {"conv1", "linear"}


@pytest.mark.slow
@pytest.mark.parametrize("compensation", ["none", "dfmpc"])
def test_cifar_resnet20_moments_recalibration_is_closer_to_fp32_than_no_compensation(resnet20, cifar10, compensation):
    x = cifar10[0][:256], cifar10[1][:256]
    base, _ = dfquant.quantize(resnet20, "dfmpc", 6, low_bits=2, compensation="none")
    recal, _ = dfquant.quantize(resnet20, "dfmpc", 6, low_bits=2, compensation=compensation, bn_recal="moments")
    e_base = dfquant.evaluate(base, x, reference=resnet20, predictions=True)["logit_sq_err"]
    e_recal = dfquant.evaluate(recal, x, reference=resnet20, predictions=True)["logit_sq_err"]
    test = dfquant.paired_error_comparison(e_recal, e_base)
    assert test["a_closer"] > test["b_closer"] and test["p_value"] < 1e-6, test


# ---- command line ----


def run(capsys, *argv):
    code = main(["--no-progress", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_method_dfmpc_saves_and_evaluates_again(capsys, digits, tmp_path):
    code, out, err = run(capsys, "quantize", "--model", "digits_cnn", "--method", "dfmpc", "--w-bits", "6", "--low-bits", "2", "--out", str(tmp_path / "m"), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["method"] == "dfmpc" and res["w_bits"] == 6 and res["a_bits"] is None
    assert [p["low"] for p in res["dfmpc"]["pairs"]] == ["conv3"] and any("conv3 (W2)" in n for n in res["notes"])
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "m.safetensors"), "--json")
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(res["quant_top1"])


def test_cli_compensate_flags_with_a_rounding_method(capsys, digits, tmp_path):
    from dfquant.io.images import save_images

    images = save_images(torch.randn(16, 1, 8, 8), tmp_path / "s.safetensors", metadata={"model": "digits_cnn"})
    code, out, err = run(capsys, "quantize", "--model", "digits_cnn", "--method", "squant", "--w-bits", "6", "--a-bits", "8", "--low-bits", "2",
                         "--compensate", "fitted", "--bn-recal", "synthetic", "--synthetic", str(images), "--eval", "none", "--json")
    assert code == 0, err
    info = json.loads(out)["dfmpc"]
    assert (info["compensation"], info["bn_recal"], info["data"]["source"]) == ("fitted", "synthetic", "files")
    code, out, err = run(capsys, "quantize", "--model", "digits_cnn", "--method", "rtn", "--w-bits", "6", "--compensate", "none", "--bn-recal", "moments",
                         "--low-bits", "2", "--eval", "none", "--report")
    assert code == 0 and "bn_recal=moments" in out and "DF-MPC low layer" in out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "dfmpc", "--w-bits", "6", "--low-bits", "6"], "--low-bits must be below --w-bits (6), got 6"),
        (["--method", "genie", "--compensate", "dfmpc"], "--compensate belongs to DF-MPC, which runs as method dfmpc"),
        (["--method", "dfmpc", "--bn-recal", "synthetic", "--recon-iters", "3"], "--recon-iters sets Genie-M's reconstruction"),
        (["--method", "rtn", "--w-grid", "twn"], "--w-grid twn is ternary"),
        (["--method", "dfmpc", "--per-tensor"], "--per-tensor: the grids of --w-grid paper have one scale per layer already"),
        (["--method", "dfmpc", "--low-bits", "2", "--samples", "8"], "--samples applies only to the learned methods"),
    ],
)
def test_cli_dfmpc_errors_are_one_line_naming_the_flag(capsys, digits, argv, message):
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", *argv, "--eval", "none")
    lines = [l for l in err.strip().splitlines() if l]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
