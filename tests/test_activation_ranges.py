import copy
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dfquant
from dfquant.activation_ranges import (
    DFQ_N_SIGMA,
    SQUANT_NOISE_S,
    ChannelStats,
    calibrate_on_noise,
    expected_quant_mse,
    propagate_bn_stats,
    squant_alpha,
    stats_range,
)
from dfquant.graph import analyse
from dfquant.models import create_model
from dfquant.qmodules import ActQuantizer


@pytest.mark.parametrize("lo,hi", [(None, None), (0.0, None), (0.0, 6.0), (-1.0, 1.0)])
def test_clipped_gaussian_moments_match_sampling(lo, hi):
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    s = torch.tensor([0.5, 1.0, 2.0, 1.5])
    x = mu + s * torch.randn(400_000, 4, generator=g)
    if lo is not None or hi is not None:
        x = x.clamp(min=lo, max=hi)
    m, v = ChannelStats(mu, s, lo, hi).moments()
    assert torch.allclose(m, x.mean(0), atol=0.02)
    assert torch.allclose(v, x.var(0), rtol=0.03, atol=0.02)


def test_dfq_rule_is_beta_plus_n_gamma():
    st = ChannelStats(torch.tensor([0.5, 1.0]), torch.tensor([2.0, 0.5]), 0.0, None)
    lo, hi = stats_range(st, 4, "dfq")
    assert lo == 0.0 and hi == pytest.approx(0.5 + DFQ_N_SIGMA[4] * 2.0)
    assert stats_range(st, 4, "dfq", n_sigma=1.0)[1] == pytest.approx(2.5)
    relu6 = ChannelStats(torch.tensor([3.0]), torch.tensor([4.0]), 0.0, 6.0)
    assert stats_range(relu6, 8, "dfq")[1] == 6.0


def test_mse_rule_minimises_expected_error():
    st = ChannelStats(torch.tensor([0.0]), torch.tensor([1.0]), 0.0, None)
    lo, hi = stats_range(st, 4, "mse")
    errs = expected_quant_mse(st, torch.zeros(3), torch.tensor([hi * 0.7, hi, hi * 1.4]), 4)
    assert errs[1] < errs[0] and errs[1] < errs[2]
    # fewer bits -> tighter clip
    assert stats_range(st, 2, "mse")[1] < hi < stats_range(st, 8, "mse")[1]


def _ranges(model):
    g = analyse(model)
    return propagate_bn_stats(g.traced, model.input_size)


def test_every_resnet_input_but_the_image_gets_a_range():
    r = _ranges(create_model("resnet20"))
    assert r["conv1"].stats is None and "image" in r["conv1"].reason
    missing = [k for k, v in r.items() if v.stats is None and k != "conv1"]
    assert missing == []
    # option-A shortcut: the residual sum after layer2.0 has 32 channels built from 16 + zero padding
    assert r["layer2.1.conv1"].stats.mu.numel() == 32


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_imagenet_models_get_ranges(name):
    r = _ranges(create_model(name))
    assert [k for k, v in r.items() if v.stats is None] == [next(iter(r))]


def test_residual_add_combines_both_branches():
    m = create_model("resnet20")
    with torch.no_grad():
        m.layer1[0].bn2.bias.fill_(5.0)  # shift one branch: the next block's input mean must follow
    r = _ranges(m)
    base = _ranges(create_model("resnet20"))
    assert r["layer1.1.conv1"].stats.mu.mean() > base["layer1.1.conv1"].stats.mu.mean() + 3


class NoBNAfterConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.conv3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x))))))


def test_input_without_bn_statistics_is_reported_and_left_float():
    m = NoBNAfterConv().eval()
    q, report = dfquant.quantize(m, "squant", 4, 4, input_size=(1, 8, 8))
    reasons = dict(report.float_inputs)
    assert "conv3" in reasons and "no BN" in reasons["conv3"]
    assert q.conv3.input_quant is None and q.conv2.input_quant is not None


def test_affine_free_bn_is_n01_and_a_spatial_mean_keeps_the_statistics(affine_free_bn_model):
    m = affine_free_bn_model
    r = propagate_bn_stats(analyse(m).traced, (3, 8, 8))
    st = r["conv2"].stats
    assert torch.equal(st.mu, torch.zeros(8)) and torch.equal(st.sigma, torch.ones(8)) and st.clip_lo == 0.0
    assert r["fc"].stats is not None  # x.mean((2, 3)) is global average pooling
    assert r["fc"].stats.mu.numel() == 8
    q, report = dfquant.quantize(m, "squant", 4, 4, input_size=(3, 8, 8))
    assert dict((l.name, l.a_range) for l in report.layers)["conv2"] == pytest.approx((0.0, DFQ_N_SIGMA[4]))


def test_a_layer_run_twice_gets_one_range_covering_both_inputs(shared_conv_model):
    m = shared_conv_model
    with torch.no_grad():
        m.b1.bias.fill_(0.0), m.b1.weight.fill_(1.0)
        m.b0.bias.fill_(3.0), m.b0.weight.fill_(0.5)  # the first run's input reaches furthest
    r = propagate_bn_stats(analyse(m).traced, (3, 8, 8))
    assert r["c"].calls == 2 and r["c"].stats.mu.numel() == 16
    lo, hi = stats_range(r["c"].stats, 4, "dfq")
    assert hi == pytest.approx(max(3.0 + DFQ_N_SIGMA[4] * 0.5, DFQ_N_SIGMA[4]))
    _, report = dfquant.quantize(m, "rtn", 4, 4, input_size=(3, 8, 8), bias_correction=True)
    assert "runs 2 times" in {l.name: l.note for l in report.layers}["c"]


def test_a_linear_over_the_width_axis_gets_no_channel_statistics(with_bn_stats):
    class Mixer(nn.Module):  # a Linear applied to the last (width) axis of a feature map
        def __init__(self, width):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.mix, self.fc = nn.Linear(width, width), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.mix(torch.relu(self.bn(self.c1(x)))).mean((2, 3)))

    for width in (6, 8):  # 8: as many features as BN channels, which must not fool it
        m = with_bn_stats(Mixer(width))
        _, report = dfquant.quantize(m, "rtn", 8, 8, input_size=(3, 6, width), bias_correction=True)
        reasons = dict(report.float_inputs)
        assert "4-D tensor" in reasons["mix"]


def test_a_sum_of_relu_outputs_keeps_its_zero_floor_but_not_false_moments(with_bn_stats):
    class TwoReLUs(nn.Module):  # relu(a) + relu(b) feeds a conv directly (no ReLU after the sum)
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn_a, self.bn_b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.c(torch.relu(self.bn_a(self.a(x))) + torch.relu(self.bn_b(self.b(x))))

    m = with_bn_stats(TwoReLUs())
    st = propagate_bn_stats(analyse(m).traced, (3, 8, 8))["c"].stats
    assert st.floor == 0.0 and st.clip_lo is None
    ma, _ = ChannelStats(m.bn_a.bias.detach(), m.bn_a.weight.detach().abs(), 0.0).moments()
    mb, _ = ChannelStats(m.bn_b.bias.detach(), m.bn_b.weight.detach().abs(), 0.0).moments()
    assert torch.allclose(st.moments()[0], ma + mb)  # the mean bias correction uses is the sum's
    for rule in ("dfq", "mse"):
        assert stats_range(st, 4, rule)[0] == 0.0


def _view_by_size(p):
    return p.view(p.size(0), -1)


def _reshape_by_shape(p):
    return p.reshape(p.shape[0], -1)


def _reshape_by_size_tuple(p):
    return p.reshape(p.size()[0], 8)


# (spelling of a classifier head, function of (module, feature map) giving the Linear's input)
GLOBAL_HEADS = {
    "AdaptiveAvgPool2d(1) -> nn.Flatten()": lambda m, x: m.flatten(m.avg1(x)),
    "AdaptiveAvgPool2d((1, 1)) -> torch.flatten(x, 1)": lambda m, x: torch.flatten(m.avg11(x), 1),
    "F.adaptive_avg_pool2d(x, 1) -> x.view(x.size(0), -1)": lambda m, x: _view_by_size(F.adaptive_avg_pool2d(x, 1)),
    "x.mean((2, 3))": lambda m, x: x.mean((2, 3)),
    "x.mean([-1, -2], keepdim=True) -> x.reshape(x.shape[0], -1)": lambda m, x: _reshape_by_shape(x.mean([-1, -2], keepdim=True)),
    "AdaptiveMaxPool2d(1) -> x.flatten(1)": lambda m, x: m.max1(x).flatten(1),
    "F.adaptive_max_pool2d(x, 1) -> x.reshape(x.size()[0], 8)": lambda m, x: _reshape_by_size_tuple(F.adaptive_max_pool2d(x, 1)),
    "F.adaptive_avg_pool2d(x, (1, 1)) -> x.view(-1, 8)": lambda m, x: F.adaptive_avg_pool2d(x, (1, 1)).view(-1, 8),
}


class Head(nn.Module):
    """conv -> BN -> ReLU, then the head ``spelling`` and a Linear of ``features`` inputs."""

    def __init__(self, spelling, features=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.avg1, self.avg11, self.max1 = nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((1, 1)), nn.AdaptiveMaxPool2d(1)
        self.avg2, self.pool2, self.pool8, self.flatten = nn.AdaptiveAvgPool2d(2), nn.AvgPool2d(2), nn.AvgPool2d(8), nn.Flatten()
        self.spelling = spelling
        self.fc = nn.Linear(features, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc((GLOBAL_HEADS | LOCAL_HEADS)[self.spelling](self, x))


def _fc_input(model, **options):
    q, report = dfquant.quantize(model, "squant", 4, 4, **options)
    return q.fc.input_quant, dict(report.float_inputs).get("fc", ""), {l.name: l.a_range for l in report.layers}["fc"]


@pytest.mark.parametrize("spelling", list(GLOBAL_HEADS))
def test_a_global_pooling_head_keeps_the_classifier_range_without_input_size(spelling, with_bn_stats):
    m = with_bn_stats(Head(spelling))
    act, why, a_range = _fc_input(m)
    assert act is not None and why == "", why
    ref, _, ref_range = _fc_input(m, input_size=(3, 8, 8))
    assert act.bits == 8 and a_range == ref_range and a_range[1] > 0
    assert torch.equal(act.scale, ref.scale) and torch.equal(act.zero_point, ref.zero_point)


def test_a_torchvision_resnet18_head_gets_its_8_bit_range_without_input_size(with_bn_stats, one_thread):
    from dfquant.models.imagenet import resnet18

    m = with_bn_stats(resnet18(num_classes=10))
    assert getattr(m, "input_size", None) is None  # no size to fall back on
    act, why, a_range = _fc_input(m)
    assert act is not None and why == "", why
    ref, _, ref_range = _fc_input(m, input_size=(3, 32, 32))  # a 1x1 pool: any input size gives the same
    assert act.bits == 8 and a_range == ref_range and torch.equal(act.scale, ref.scale)


# heads whose flattened features are channels at several positions: (spelling, Linear features at 8x8 input)
LOCAL_HEADS = {
    "AdaptiveAvgPool2d(2) -> nn.Flatten()": lambda m, x: m.flatten(m.avg2(x)),
    "AvgPool2d(2) -> torch.flatten(x, 1)": lambda m, x: torch.flatten(m.pool2(x), 1),
    "AvgPool2d(8) -> x.view(x.size(0), -1)": lambda m, x: _view_by_size(m.pool8(x)),
}


@pytest.mark.parametrize(
    "spelling,features,without,with_size",
    [
        ("AdaptiveAvgPool2d(2) -> nn.Flatten()", 32, "2x2 map", "2x2 map"),  # 2x2 at any input size
        ("AvgPool2d(2) -> torch.flatten(x, 1)", 128, "input size", "4x4 map"),
        ("AvgPool2d(8) -> x.view(x.size(0), -1)", 8, "input size", None),  # 1x1 only at an 8x8 input
    ],
)
def test_a_flatten_of_a_spatial_map_stays_float_with_the_reason(spelling, features, without, with_size, with_bn_stats):
    m = with_bn_stats(Head(spelling, features))
    act, why, _ = _fc_input(m)
    assert act is None and without in why, why
    act, why, _ = _fc_input(m, input_size=(3, 8, 8))
    if with_size is None:
        assert act is not None and why == ""
    else:
        assert act is None and with_size in why, why


def test_a_linear_over_the_width_axis_gets_no_statistics_without_input_size(with_bn_stats):
    class Mixer(nn.Module):  # as many width positions as BN channels: only the rank tells them apart
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.mix, self.fc = nn.Linear(8, 8), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.mix(torch.relu(self.bn(self.c1(x)))).mean((2, 3)))

    _, report = dfquant.quantize(with_bn_stats(Mixer()), "rtn", 8, 8)
    assert "4-D tensor" in dict(report.float_inputs)["mix"]


# ---- the SQuant authors' noise rule (calibrate_on_noise) ----------------------------------------

def _stdev(values):
    return statistics.stdev(float(v) for v in values)  # the unbiased (n - 1) standard deviation


def test_the_noise_rule_takes_s_times_the_std_of_the_positive_values_of_an_unsigned_input():
    x = torch.tensor([[0.0, 0.0, 1.0], [2.0, 3.0, 10.0]])
    sd = _stdev([1, 2, 3, 10])  # the zeros are left out
    assert squant_alpha(x, 8, 25.0) == (pytest.approx(25 * sd), False)
    assert squant_alpha(x, 4, 0.5) == (pytest.approx(0.5 * sd), False)  # below max(x): no clip


def test_the_noise_rule_takes_s_times_the_std_over_1_25_of_a_signed_input():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 5.0, 0.5])
    sd = _stdev(x.tolist())  # every value, the zero included
    assert squant_alpha(x, 8, 25.0) == (pytest.approx(25 * sd / 1.25), True)


@pytest.mark.parametrize("signed", [False, True])
def test_the_noise_rule_clips_alpha_at_the_maximum_below_6_bits_only(signed):
    x = torch.tensor([-1.0, 0.5, 1.0, 2.0, 4.0]) if signed else torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0])
    unclipped = squant_alpha(x, 6, 12.0)[0]
    assert unclipped > 4.0  # s * std is wider than the data
    assert squant_alpha(x, 5, 12.0)[0] == 4.0 and squant_alpha(x, 2, 12.0)[0] == 4.0
    assert squant_alpha(x, 7, 12.0)[0] == unclipped == squant_alpha(x, 8, 12.0)[0]


class SmallNet(nn.Module):
    """conv-BN-ReLU, conv-BN (a signed input next), conv-BN-ReLU, a global pool and a classifier."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


SIZE = (3, 8, 8)


@pytest.fixture
def small_qmodel(with_bn_stats):
    torch.manual_seed(0)
    q, _ = dfquant.quantize(with_bn_stats(SmallNet()), "squant", 4, 4, input_size=SIZE)
    assert q.c1.input_quant is None and all(getattr(q, n).input_quant is not None for n in ("c2", "c3", "fc"))
    return q


def _noise(seed, batch=256):
    return torch.rand((batch, *SIZE), generator=torch.Generator().manual_seed(seed))


def _inputs(qmodel, x, names):
    seen = {}
    hooks = [qmodel.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].clone())) for n in names]
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    return seen


def test_calibration_is_sequential_each_range_from_the_already_quantized_earlier_layers(small_qmodel):
    q = copy.deepcopy(small_qmodel)
    got = calibrate_on_noise(q, SIZE, seed=3)
    assert list(got) == ["c2", "c3", "fc"]  # execution order
    s = SQUANT_NOISE_S[4]
    # by hand: layer k's range from its input while the ranges before it are set and quantizing
    ref = copy.deepcopy(small_qmodel)
    x = _noise(3)
    order = ["c2", "c3", "fc"]
    for k, name in enumerate(order):
        acts = {n: ref.get_submodule(n).input_quant for n in order}
        for later in order[k:]:
            ref.get_submodule(later).input_quant = None  # not quantizing yet
        inp = _inputs(ref, x, [name])[name]
        for n in order:
            ref.get_submodule(n).input_quant = acts[n]
        alpha, signed = squant_alpha(inp, acts[name].bits, s)
        new = ActQuantizer(acts[name].bits, -alpha if signed else 0.0, alpha)
        acts[name].scale.copy_(new.scale), acts[name].zero_point.copy_(new.zero_point)
        assert got[name].alpha == pytest.approx(alpha, rel=1e-6) and got[name].signed == signed
        assert torch.allclose(q.get_submodule(name).input_quant.scale, new.scale, rtol=1e-6)
    # and it matters: with the earlier quantizers off, the later inputs give other ranges
    floatq = copy.deepcopy(small_qmodel)
    for n in order:
        floatq.get_submodule(n).input_quant = None
    float_inputs = _inputs(floatq, x, order)
    off = {n: squant_alpha(float_inputs[n], got[n].bits, s)[0] for n in order}
    assert off["c2"] == pytest.approx(got["c2"].alpha, rel=1e-6)  # the first quantized input has nothing before it
    for n in ("c3", "fc"):  # far beyond the tolerance the by-hand comparison above holds to
        assert off[n] != pytest.approx(got[n].alpha, rel=1e-4)


def test_signed_and_unsigned_inputs_get_their_ranges_and_the_classifier_the_runs_s(small_qmodel):
    got = calibrate_on_noise(small_qmodel, SIZE)
    assert got["c3"].signed and not got["c2"].signed and not got["fc"].signed
    for name, r in got.items():
        lo, hi = small_qmodel.get_submodule(name).input_quant.range
        assert (lo, hi) == r.range
        if r.signed:  # [-alpha, alpha] on 2^b levels with zero on one: half a step off at each end
            half = r.alpha / (2**r.bits - 1)
            assert lo == pytest.approx(-r.alpha, abs=half * 1.01) and hi == pytest.approx(r.alpha, abs=half * 1.01)
            assert hi - lo == pytest.approx(2 * r.alpha, rel=1e-5)
        else:
            assert lo == 0.0 and hi == pytest.approx(r.alpha, rel=1e-6)
    assert got["fc"].bits == 8 and got["c2"].bits == 4
    assert {r.s for r in got.values()} == {SQUANT_NOISE_S[4]}  # one s per run, the 8-bit input included


def test_the_same_seed_gives_the_same_ranges_and_another_seed_others(small_qmodel):
    runs = [calibrate_on_noise(copy.deepcopy(small_qmodel), SIZE, seed=seed, batch=16) for seed in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert all(runs[0][n].alpha != runs[2][n].alpha for n in runs[0])


def test_calibration_leaves_no_hooks_the_modes_and_bn_statistics_and_the_global_rng_untouched(small_qmodel):
    q = small_qmodel.train()
    bn_before = {k: v.clone() for k, v in q.state_dict().items() if "running" in k}
    rng = torch.get_rng_state()
    calibrate_on_noise(q, SIZE, batch=8)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in q.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in q.modules())
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in bn_before.items())  # the pass ran in eval mode
    torch.manual_seed(123)  # the global seed does not enter
    a = calibrate_on_noise(copy.deepcopy(q), SIZE, batch=8)
    torch.manual_seed(456)
    assert calibrate_on_noise(copy.deepcopy(q), SIZE, batch=8) == a
    with pytest.raises(dfquant.DfquantError):  # a failing pass cleans up as well
        calibrate_on_noise(q, (4, 8, 8))  # 4 channels: the first conv reads 3
    assert all(not m._forward_pre_hooks for m in q.modules()) and all(m.training for m in q.modules())


def test_a_fixed_quantizer_keeps_its_range_and_quantizes_during_the_pass(small_qmodel):
    before = small_qmodel.c2.input_quant.range
    got = calibrate_on_noise(small_qmodel, SIZE, fixed=("c2",))
    assert list(got) == ["c3", "fc"] and small_qmodel.c2.input_quant.range == before


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(input_size=None), "input_size"),
        (dict(input_size=(3, 8)), "input_size"),  # the model does not run on it
        (dict(a_bits=5), "a_bits"),  # the authors give no s for 5 bits
        (dict(s=0.0), "s"),
        (dict(batch=0), "batch"),
        (dict(seed=1.5), "seed"),
        (dict(fixed=("nope",)), "fixed"),
    ],
)
def test_bad_calibration_arguments_are_one_error_naming_the_parameter(small_qmodel, kwargs, param):
    args = dict(input_size=SIZE) | kwargs
    with pytest.raises(dfquant.DfquantError) as err:
        calibrate_on_noise(small_qmodel, args.pop("input_size"), **args)
    assert err.value.param == param and "\n" not in str(err.value)
    assert calibrate_on_noise(small_qmodel, SIZE, a_bits=5, s=10.0)["c2"].s == 10.0  # with s, any bit-width


def test_a_model_without_activation_quantizers_is_refused(with_bn_stats):
    q, _ = dfquant.quantize(with_bn_stats(SmallNet()), "rtn", 4, None, input_size=SIZE)
    with pytest.raises(dfquant.DfquantError) as err:
        calibrate_on_noise(q, SIZE)
    assert err.value.param == "qmodel"


def test_the_noise_rule_on_resnet20_w4a4_is_closer_to_fp32_than_the_bn_rule(resnet20, cifar10, one_thread):
    """act_range="squant" reproduces the authors'-rule emulation (90.66 % at noise seed 0 and 91.73 % at
    seed 1, logit MSE about 2.1), and is closer to FP32 than the BN (dfq) rule."""
    bn_rule, _ = dfquant.quantize(resnet20, "squant", 4, 4)
    noise_rule, report = dfquant.quantize(resnet20, "squant", 4, 4, act_range="squant", noise_seed=0)
    assert all(r.a_range is not None for r in report.layers[1:]) and "uniform noise" in report.notes[-1]
    ev = {k: dfquant.evaluate(m, cifar10, reference=resnet20) for k, m in (("bn", bn_rule), ("noise", noise_rule))}
    assert abs(ev["noise"]["top1"] - 90.66) <= 100 / 846 + 1e-6 and 1.9 < ev["noise"]["logit_mse"] < 2.4
    assert ev["noise"]["logit_mse"] < ev["bn"]["logit_mse"]


def test_act_range_squant_in_quantize_is_calibrate_on_noise_after_the_weights(small_qmodel, with_bn_stats):
    """The pipeline's rule is the function's: the same scales as calibrating the BN-ranged model by hand."""
    model = with_bn_stats(SmallNet())
    by_hand, _ = dfquant.quantize(model, "rtn", 4, 4, input_size=SIZE)
    calibrate_on_noise(by_hand, SIZE, a_bits=4, seed=3)
    wired, report = dfquant.quantize(model, "rtn", 4, 4, input_size=SIZE, act_range="squant", noise_seed=3)
    acts = [(n, m.input_quant) for n, m in wired.named_modules() if getattr(m, "input_quant", None) is not None]
    assert acts and all(torch.equal(a.scale, by_hand.get_submodule(n).input_quant.scale) for n, a in acts)
    assert all(torch.equal(a.zero_point, by_hand.get_submodule(n).input_quant.zero_point) for n, a in acts)
    x = torch.randn(4, *SIZE)
    assert torch.equal(wired(x), by_hand(x))


def test_the_noise_rule_needs_no_batchnorm():
    """BN-statistics rules cannot range a model without BN; the authors' noise rule can."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with pytest.raises(dfquant.DfquantError, match="BatchNorm2d"):
        dfquant.quantize(model, "rtn", 4, 4, input_size=SIZE)
    q, report = dfquant.quantize(model, "rtn", 4, 4, input_size=SIZE, act_range="squant")
    assert q[3].input_quant is not None and report.layers[1].a_range is not None
    assert torch.isfinite(q(torch.rand(2, *SIZE))).all()


@pytest.mark.parametrize(
    "options, param",
    [
        (dict(a_bits=3, act_range="squant"), "noise_s"),  # no authors' s for 3 bits
        (dict(noise_seed=1), "noise_seed"),  # a squant-rule setting with the dfq rule
        (dict(noise_s=10.0, act_range="mse"), "noise_s"),
        (dict(act_range="squant", noise_s=-1.0), "noise_s"),
        (dict(a_bits=None, act_range="squant"), "act_range"),
    ],
)
def test_bad_noise_rule_settings_are_one_error_naming_the_parameter(options, param):
    with pytest.raises(dfquant.DfquantError) as err:
        dfquant.QuantConfig(**dict(dict(method="rtn", w_bits=4, a_bits=4), **options)).validate()
    assert err.value.param == param and "\n" not in str(err.value)
    assert dfquant.QuantConfig(method="rtn", w_bits=4, a_bits=3, act_range="squant", noise_s=9.0).validate()


def test_leaky_relu_carries_the_exact_mean_and_variance_of_its_output():
    """Tiny Darknet's LeakyReLU(0.1): the next layer gets statistics whose moments are the output's."""
    import dfquant.activation_ranges as ar

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1), nn.Conv2d(4, 2, 1)).eval()
    model[1].weight.data = torch.tensor([1.0, 2.0, 0.5, 1.5])
    model[1].bias.data = torch.tensor([0.0, -1.0, 0.3, 2.0])
    found = ar.propagate_bn_stats(torch.fx.symbolic_trace(model), (3, 8, 8))["3"]
    assert found.stats is not None
    z = torch.randn(400000, 4) * model[1].weight.data + model[1].bias.data  # the BN output model
    y = torch.nn.functional.leaky_relu(z, 0.1)
    assert torch.allclose(found.stats.mu, y.mean(0), atol=0.01)
    assert torch.allclose(found.stats.sigma, y.std(0), atol=0.01)
    q, report = dfquant.quantize(model, "squant", 4, 4, input_size=(3, 8, 8))
    assert [n for n, _ in report.float_inputs] == ["0"]  # the second conv's input gets a range
