import pytest
import torch
import torch.nn as nn

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
