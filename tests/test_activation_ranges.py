import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dfquant
from dfquant.activation_ranges import ChannelStats, DFQ_N_SIGMA, expected_quant_mse, propagate_bn_stats, stats_range
from dfquant.graph import analyse
from dfquant.models import create_model


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


# (spelling of a classifier head, function of (module, feature map) giving the Linear's input)
GLOBAL_HEADS = {
    "AdaptiveAvgPool2d(1) -> nn.Flatten()": lambda m, x: m.flatten(m.avg1(x)),
    "AdaptiveAvgPool2d((1, 1)) -> torch.flatten(x, 1)": lambda m, x: torch.flatten(m.avg11(x), 1),
    "F.adaptive_avg_pool2d(x, 1) -> x.view(x.size(0), -1)": lambda m, x: (lambda p: p.view(p.size(0), -1))(F.adaptive_avg_pool2d(x, 1)),
    "x.mean((2, 3))": lambda m, x: x.mean((2, 3)),
    "x.mean([-1, -2], keepdim=True) -> x.reshape(x.shape[0], -1)": lambda m, x: (lambda p: p.reshape(p.shape[0], -1))(x.mean([-1, -2], keepdim=True)),
    "AdaptiveMaxPool2d(1) -> x.flatten(1)": lambda m, x: m.max1(x).flatten(1),
    "F.adaptive_max_pool2d(x, 1) -> x.reshape(x.size()[0], 8)": lambda m, x: (lambda p: p.reshape(p.size()[0], 8))(F.adaptive_max_pool2d(x, 1)),
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


def test_a_torchvision_resnet18_head_gets_its_8_bit_range_without_input_size(with_bn_stats):
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
    "AvgPool2d(8) -> x.view(x.size(0), -1)": lambda m, x: (lambda p: p.view(p.size(0), -1))(m.pool8(x)),
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
