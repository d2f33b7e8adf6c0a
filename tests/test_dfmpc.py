"""DF-MPC (dfquant.dfmpc): pairing, Eq. 27's closed form, the fold into BN, re-calibration, fitted c."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfquant.dfmpc import (
    DfmpcConfig,
    check_low_bits,
    closed_form_c,
    compensate,
    nnls,
    paper_weights,
    plan_pairs,
)
from dfquant.errors import DfquantError
from dfquant.graph import analyse, fold_bn, replace_module
from dfquant.modelcheck import copy_model
from dfquant.qmodules import QuantConv2d, QuantLinear

MODES = [("dfmpc", "none"), ("dfmpc", "moments"), ("dfmpc", "synthetic"), ("fitted", "none"), ("fitted", "moments"), ("fitted", "synthetic")]


class Plain(nn.Module):
    """A plain chain c0 -> c1 -> c2 -> c3 -> c4 -> fc: paired from the end as (c4, fc), (c2, c3);
    c0 (stem) and c1 have no partner. c3 is grouped, c4 depthwise; max-pooling, LeakyReLU and a
    flatten of a 2x2 map (fc reads 12 blocks of 4 features) sit on the paths."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.c3, self.b3 = nn.Conv2d(12, 12, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(12)
        self.c4, self.b4 = nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12)
        self.pool, self.act = nn.MaxPool2d(2), nn.LeakyReLU(0.1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.b1(self.c1(x)))
        x = self.pool(torch.relu(self.b2(self.c2(x))))
        x = torch.relu(self.b3(self.c3(x)))
        x = F.adaptive_avg_pool2d(self.act(self.b4(self.c4(x))), 2)
        return self.fc(torch.flatten(x, 1))


def _plain(with_bn_stats, seed=0, exact=False):
    torch.manual_seed(seed)
    m = with_bn_stats(Plain(), seed)
    if exact:  # weights on DoReFa-8's levels (scale 1/64) and BNs with gamma / sigma = 1: quantization is exact
        for layer in m.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                w = (torch.randint(-128, 128, layer.weight.shape).float() + 0.5) / 64
                w.view(-1)[0] = 127.5 / 64
                layer.weight.data.copy_(w)
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.data.fill_(1.0)
                layer.running_var.fill_(1 - layer.eps)
    return m


def _quantized(model, plan, low_bits, high_bits, folded=False):
    """Weight-only quantized copy with the paper's quantizers: low layers of ``plan`` at ``low_bits``."""
    graph = analyse(model)
    q = copy_model(model).eval()
    if folded:
        q = fold_bn(q, graph)
    for info in graph.layers:
        layer = q.get_submodule(info.name)
        codes, qp = paper_weights(layer.weight.detach(), low_bits if info.name in plan.low_layers else high_bits)
        replace_module(q, info.name, QuantConv2d(layer, codes, qp) if isinstance(layer, nn.Conv2d) else QuantLinear(layer, codes, qp))
    return q


def _images(n=24, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---- pairing ----


def _pairs(plan):
    return [(p.low, p.bn, p.high) for p in plan.pairs]


def test_cifar_resnet20_pairs_conv1_with_conv2_of_every_block_and_leaves_stem_and_classifier():
    from dfquant.models import create_model

    plan = plan_pairs(create_model("resnet20").eval())
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert _pairs(plan) == [(f"{k}.conv1", f"{k}.bn1", f"{k}.conv2") for k in blocks]
    assert all(p.activation == "relu" for p in plan.pairs)
    why = dict(plan.unpaired)
    assert set(why) == {"conv1", "linear"}
    assert "stem" in why["conv1"] and "classifier" in why["linear"]


def test_bottleneck_resnet50_pairs_the_3x3_with_the_last_1x1_and_leaves_the_first_1x1_high():
    from dfquant.models.imagenet import resnet50

    m = resnet50().eval()
    plan = plan_pairs(m)
    blocks = [n for n, mod in m.named_modules() if type(mod).__name__ == "Bottleneck"]
    assert len(blocks) == 16
    assert _pairs(plan) == [(f"{b}.conv2", f"{b}.bn2", f"{b}.conv3") for b in blocks]
    why = dict(plan.unpaired)
    assert all("paired from its end" in why[f"{b}.conv1"] for b in blocks)
    downsample = [n for n, mod in m.named_modules() if n.endswith("downsample.0")]
    assert downsample and all(n in why and "residual addition" in why[n] for n in downsample)
    assert "stem" in why["conv1"] and "classifier" in why["fc"]


def test_mobilenet_v2_lists_relu6_pairs_as_skipped_and_pairs_them_after_relu6_to_relu():
    from dfquant.dfq import replace_relu6
    from dfquant.models.imagenet import mobilenet_v2

    m = mobilenet_v2().eval()
    plan = plan_pairs(m)
    relu6 = [name for name, why in plan.unpaired if "ReLU6 is not positively homogeneous; use relu6_to_relu" in why]
    depthwise = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1]
    assert set(depthwise) <= set(relu6)  # every depthwise conv reaches the next layer through ReLU6
    assert all(p.activation == "none" for p in plan.pairs)  # only project -> BN -> expand links pair

    plan6 = plan_pairs(replace_relu6(m)[0])
    assert not any("ReLU6" in why for _, why in plan6.unpaired)
    residual = [n for n, mod in m.named_modules() if getattr(mod, "use_res_connect", False)]
    for block in residual:  # expand (high, unpaired), depthwise low, project high
        assert (f"{block}.conv.1.0", f"{block}.conv.1.1", f"{block}.conv.2") in _pairs(plan6)
    assert ("features.18.0", "features.18.1", "classifier.1") in _pairs(plan6)


def test_a_plain_chain_is_paired_from_its_end_and_never_makes_the_stem_low(with_bn_stats):
    plan = plan_pairs(_plain(with_bn_stats))
    assert _pairs(plan) == [("c2", "b2", "c3"), ("c4", "b4", "fc")]
    assert [p.activation for p in plan.pairs] == ["relu+max_pool2d", "leaky_relu+avg_pool2d"]
    why = dict(plan.unpaired)
    assert set(why) == {"c0", "c1"} and "stem" in why["c0"] and "stem c0" in why["c1"]


def test_other_activations_on_the_path_are_listed_not_paired(with_bn_stats):
    m = with_bn_stats(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.SiLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ))
    plan = plan_pairs(m)
    assert _pairs(plan) == [("9", "10", "13")]  # conv 6 -> conv 9 would pair too, but 9 is taken from the end
    why = dict(plan.unpaired)
    assert "SiLU" in why["3"] and "only ReLU" in why["3"]


def test_shared_layers_are_never_paired_and_say_why(shared_conv_model):
    plan = plan_pairs(shared_conv_model)
    assert plan.pairs == []
    why = dict(plan.unpaired)
    assert "called 2 times" in why["c"]


# ---- closed form, NNLS ----


@pytest.mark.parametrize("lambda1, lambda2", [(0.5, 0.0), (0.0, 0.0), (0.1, 0.01), (2.0, 0.5)])
def test_closed_form_equals_a_brute_force_minimiser_of_the_channel_loss(lambda1, lambda2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 20, generator=g, dtype=torch.float64)
    x_hat = 0.8 * x + 0.3 * torch.randn(7, 20, generator=g, dtype=torch.float64)
    x_hat[0] = -x[0]  # anti-correlated: the optimum over c >= 0 is 0
    y, y_hat = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    y_hat[0] = -y[0]
    c = closed_form_c(x_hat, x, y_hat, y, lambda1, lambda2)
    grid = torch.linspace(0, 4, 40001, dtype=torch.float64)
    loss = ((grid[:, None, None] * x_hat - x) ** 2).sum(2) + lambda1 * (grid[:, None] * y_hat - y) ** 2 + lambda2 * grid[:, None] ** 2
    best = grid[loss.argmin(0)]
    assert torch.allclose(c, best, atol=2e-4)
    assert c[0] == 0


def test_c_is_never_negative_and_a_zero_denominator_gives_one():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 9, generator=g)
    c = closed_form_c(-x + 0.1 * torch.randn(50, 9, generator=g), x, torch.randn(50, generator=g), torch.randn(50, generator=g))
    assert torch.all(c >= 0) and torch.any(c == 0)
    zero = closed_form_c(torch.zeros(2, 9), x[:2], torch.zeros(2), torch.ones(2), 0.5, 0.0)
    assert torch.equal(zero, torch.ones(2, dtype=torch.float64))


def test_nnls_meets_the_kkt_conditions():
    g = torch.Generator().manual_seed(5)
    for n in (1, 6, 30):
        a = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
        b = torch.randn(3 * n, generator=g, dtype=torch.float64)
        G, rhs = a.T @ a, a.T @ b
        c = nnls(G, rhs)
        grad = G @ c - rhs
        scale = rhs.abs().max()
        assert torch.all(c >= 0)
        assert torch.all(grad >= -1e-8 * scale)  # no descent direction into c >= 0
        assert torch.all((c * grad).abs() <= 1e-8 * scale)  # complementary slackness


def _brute_gram(layer, x, t, channels):
    outs = []
    for j in range(channels):
        keep = torch.zeros(channels, dtype=x.dtype)
        keep[j] = 1
        xj = (x.reshape(x.shape[0], channels, -1) * keep.reshape(1, -1, 1)).reshape(x.shape)
        out = layer(xj) - (0 if layer.bias is None else layer(torch.zeros_like(xj)))
        outs.append(out.reshape(-1).double())
    z = torch.stack(outs)
    return z @ z.T, z @ t.reshape(-1).double()


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(6, 4, 3, padding=1), (5, 6, 7, 7)),
        (nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2), (5, 6, 7, 7)),
        (nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6), (5, 6, 7, 7)),
        (nn.Conv2d(6, 4, 1, stride=2), (5, 6, 7, 7)),
        (nn.Linear(24, 3), (5, 24)),
    ],
)
def test_the_fitted_normal_equations_equal_per_channel_forwards(layer, shape):
    from dfquant.dfmpc import _gram

    torch.manual_seed(6)
    x = torch.randn(*shape)
    with torch.no_grad():
        t = torch.randn_like(layer(x))
        G, g = _gram(layer, x, t, 6)
        G0, g0 = _brute_gram(layer, x, t, 6)
    assert torch.allclose(G, G0, rtol=1e-5, atol=1e-6) and torch.allclose(g, g0, rtol=1e-5, atol=1e-6)


# ---- compensation on a model ----


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("compensation, bn_recal", MODES)
def test_c_is_one_when_the_quantized_weights_equal_the_float_ones(with_bn_stats, folded, compensation, bn_recal):
    m = _plain(with_bn_stats, exact=True)
    plan = plan_pairs(m)
    q = _quantized(m, plan, 8, 8, folded)
    ref = fold_bn(m) if folded else m
    assert all(torch.equal(q.get_submodule(n).weight, ref.get_submodule(n).weight) for n in ("c2", "c3", "c4", "fc"))  # exact
    rec = compensate(m, q, plan, DfmpcConfig(compensation=compensation, bn_recal=bn_recal), folded=folded, images=_images())
    for p in rec.pairs:
        assert torch.allclose(p.c.double(), torch.ones_like(p.c).double(), atol=1e-5), (p.low, p.c)


def _scaled_inputs(layer, c, channels):
    """A float copy of ``layer`` with its input channel j's weights times c_j (Eq. 7)."""
    w = layer.weight.detach().clone()
    if isinstance(layer, QuantLinear):
        w = (w.reshape(w.shape[0], channels, -1) * c.reshape(1, -1, 1)).reshape(w.shape)
        new = nn.Linear(w.shape[1], w.shape[0])
    else:
        groups, out = layer.groups, w.shape[0]
        per = channels // groups  # input channel j = group k, local i: weights w[k-th output block, i]
        cj = c.reshape(groups, per).repeat_interleave(out // groups, dim=0)  # (out, per)
        w = w * cj.reshape(out, per, 1, 1)
        new = nn.Conv2d(layer.in_channels, out, layer.kernel_size, layer.stride, layer.padding, layer.dilation, groups)
    new.weight.data.copy_(w)
    new.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
    return new


@pytest.mark.parametrize("folded", [False, True])
def test_folding_c_into_the_bn_equals_scaling_the_next_layers_input_channels(with_bn_stats, folded):
    m = _plain(with_bn_stats, seed=2)
    plan = plan_pairs(m)
    q = _quantized(m, plan, 2, 4, folded)
    ref = copy.deepcopy(q)
    rec = compensate(m, q, plan, DfmpcConfig(), folded=folded)
    assert any((p.c - 1).abs().max() > 1e-3 for p in rec.pairs)  # c does something here
    for p in rec.pairs:
        replace_module(ref, p.high, _scaled_inputs(ref.get_submodule(p.high), p.c, m.get_submodule(p.low).out_channels))
    x = _images()
    with torch.no_grad():
        assert torch.allclose(q(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("compensation, bn_recal", MODES)
def test_compensation_never_changes_codes_or_the_high_layers(with_bn_stats, folded, compensation, bn_recal):
    m = _plain(with_bn_stats, seed=3)
    plan = plan_pairs(m)
    q = _quantized(m, plan, 2, 6, folded)
    before = {n: copy.deepcopy(mod.state_dict()) for n, mod in q.named_modules() if isinstance(mod, (QuantConv2d, QuantLinear))}
    compensate(m, q, plan, DfmpcConfig(compensation=compensation, bn_recal=bn_recal), folded=folded, images=_images())
    for name, state in before.items():
        now = q.get_submodule(name).state_dict()
        assert torch.equal(now["weight_int"], state["weight_int"]), name
        if name not in plan.low_layers:  # the high layers (and the unpaired ones) are untouched
            assert all(torch.equal(now[k], v) for k, v in state.items()), name


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("compensation, bn_recal", MODES)
def test_dead_channels_give_finite_c_and_a_finite_model(with_bn_stats, folded, compensation, bn_recal):
    m = _plain(with_bn_stats, seed=4)
    with torch.no_grad():
        m.c2.weight[0].zero_()  # all-zero codes in channel 0
        m.b2.running_var[:2] = 1e-36  # dead channels, as real models have
        m.b2.weight[1] = 1e-20
        m.c4.weight[3].zero_()
        m.b4.running_var[3] = 1e-36
    plan = plan_pairs(m)
    q = _quantized(m, plan, 2, 6, folded)
    rec = compensate(m, q, plan, DfmpcConfig(compensation=compensation, bn_recal=bn_recal, lambda1=0.0), folded=folded, images=_images())
    assert all(torch.isfinite(p.c).all() and (p.c >= 0).all() for p in rec.pairs)
    assert all(torch.isfinite(t).all() for t in list(q.state_dict().values()) if t.is_floating_point())
    with torch.no_grad():
        assert torch.isfinite(q(_images())).all()


class _MomentsNet(nn.Module):
    """conv1's input is ReLU(BN0 output), a clipped Gaussian the BN statistics describe exactly."""

    def __init__(self, groups):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1, groups=groups), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a = torch.relu(self.bn0(self.conv0(x)))
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(a)))))
        return self.fc(torch.relu(h + a).mean((2, 3)))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("folded", [False, True])
def test_moments_recal_gives_the_low_bn_output_the_float_mean_and_std(with_bn_stats, groups, folded):
    torch.manual_seed(7)
    m = with_bn_stats(_MomentsNet(groups), 7)
    g = torch.Generator().manual_seed(8)
    gamma0, beta0 = m.bn0.weight.detach(), m.bn0.bias.detach()
    a = torch.relu(beta0.reshape(1, -1, 1, 1) + gamma0.reshape(1, -1, 1, 1) * torch.randn(200_000, 4, 3, 3, generator=g))
    with torch.no_grad():  # the float BN's statistics: the exact moments of conv1's output on such inputs
        u = F.conv2d(a, m.conv1.weight, m.conv1.bias, groups=groups).flatten(1)
        m.bn1.running_mean.copy_(u.mean(0))
        m.bn1.running_var.copy_(u.var(0))
    plan = plan_pairs(m)
    assert _pairs(plan) == [("conv1", "bn1", "conv2")]
    q = _quantized(m, plan, 2, 8, folded)
    rec = compensate(m, q, plan, DfmpcConfig(bn_recal="moments"), folded=folded)
    c = rec.pairs[0].c
    with torch.no_grad():  # what the compensated low layer and its BN give on the same inputs (interior taps: no padding)
        low = q.conv1
        z = F.conv2d(a, low.weight, low.bias, groups=groups)
        if not folded:
            z = q.bn1(z)
        z = z.flatten(1)
    beta, gamma = m.bn1.bias.detach(), m.bn1.weight.detach()
    assert rec.pairs[0].recal == "moments"
    assert torch.allclose(z.mean(0), c * beta, atol=0.02 * float(gamma.abs().max()))
    live = q.conv1.weight_int.flatten(1).abs().sum(1) > 0  # a channel whose codes are all 0 has no variance to restore
    assert live.sum() >= 4
    assert torch.allclose(z.std(0)[live], (c * gamma.abs())[live], rtol=0.02)


def test_fitted_c_undoes_a_known_scaling_of_the_low_layers_output(with_bn_stats):
    m = _plain(with_bn_stats, exact=True)
    plan = plan_pairs(m)
    q = _quantized(m, plan, 8, 8)
    k = {p.bn: torch.rand(m.get_submodule(p.bn).num_features, generator=torch.Generator().manual_seed(9)) * 1.5 + 0.5 for p in plan.pairs}
    with torch.no_grad():
        for bn, s in k.items():
            q.get_submodule(bn).weight.div_(s)
            q.get_submodule(bn).bias.div_(s)
    rec = compensate(m, q, plan, DfmpcConfig(compensation="fitted"), folded=False, images=_images())
    for p in rec.pairs:
        assert torch.allclose(p.c.double(), k[p.bn].double(), rtol=1e-4), p.low


def test_the_record_names_bits_c_and_every_uncompensated_layer(with_bn_stats):
    m = _plain(with_bn_stats, seed=5)
    plan = plan_pairs(m)
    q = _quantized(m, plan, 2, 6)
    rec = compensate(m, q, plan, DfmpcConfig(bn_recal="moments"), folded=False)
    assert [(p.low, p.high, p.low_bits, p.high_bits) for p in rec.pairs] == [("c2", "c3", 2, 6), ("c4", "fc", 2, 6)]
    for p in rec.pairs:
        assert (p.c_min, p.c_max) == (float(p.c.min()), float(p.c.max())) and p.c_min <= p.c_mean <= p.c_max
    assert [n for n, _ in rec.uncompensated] == ["c0", "c1"]
    assert len(rec.lines()) == 1 + len(rec.pairs) + len(rec.uncompensated)


def test_moments_without_bn_statistics_falls_back_to_none_and_says_so(with_bn_stats):
    m = _plain(with_bn_stats, seed=5)
    plan = plan_pairs(m)
    rec = compensate(m, _quantized(m, plan, 2, 6), plan, DfmpcConfig(bn_recal="moments"), folded=False, stats={})
    assert all(p.recal.startswith("none (moments fell back") for p in rec.pairs)


# ---- settings and bad input ----


@pytest.mark.parametrize(
    "field, value",
    [("lambda1", -0.1), ("lambda1", float("nan")), ("lambda2", True), ("low_bits", 9), ("low_bits", 2.0), ("compensation", "exact"), ("bn_recal", "data")],
)
def test_bad_settings_are_one_error_naming_the_parameter(field, value):
    with pytest.raises(DfquantError, match=field) as e:
        DfmpcConfig(**{field: value}).validate()
    assert e.value.param == field


def test_low_bits_must_lie_below_w_bits():
    assert check_low_bits(None, 6) is None and check_low_bits(2, 6) == 2
    with pytest.raises(DfquantError, match="low_bits must be below w_bits") as e:
        check_low_bits(6, 6)
    assert e.value.param == "low_bits"


def test_validate_returns_a_config_with_floats_and_leaves_the_original():
    cfg = DfmpcConfig(lambda1=1, low_bits=2)
    v = cfg.validate()
    assert isinstance(v.lambda1, float) and v.lambda1 == 1.0 and cfg.lambda1 == 1


def test_fitted_and_synthetic_need_images_and_folded_must_match_the_model(with_bn_stats):
    m = _plain(with_bn_stats)
    plan = plan_pairs(m)
    q = _quantized(m, plan, 2, 6)
    for cfg in (DfmpcConfig(compensation="fitted"), DfmpcConfig(bn_recal="synthetic")):
        with pytest.raises(DfquantError, match="needs synthetic images") as e:
            compensate(m, q, plan, cfg, folded=False)
        assert e.value.param == "images"
    with pytest.raises(DfquantError, match="images must be"):
        compensate(m, q, plan, DfmpcConfig(compensation="fitted"), folded=False, images=torch.zeros(3, 8, 8))
    with pytest.raises(DfquantError, match="folded=True") as e:
        compensate(m, q, plan, DfmpcConfig(), folded=True)
    assert e.value.param == "fold_bn"


def test_compensation_is_deterministic(with_bn_stats):
    m = _plain(with_bn_stats, seed=6)
    plan = plan_pairs(m)
    cs = []
    for _ in range(2):
        q = _quantized(m, plan, 2, 6)
        cs.append([p.c for p in compensate(m, q, plan, DfmpcConfig(compensation="fitted", bn_recal="synthetic"), folded=False, images=_images()).pairs])
    assert all(torch.equal(a, b) for a, b in zip(*cs))


def test_compensated_input_stats_equal_the_statistics_of_the_compensated_bns(with_bn_stats):
    from dfquant.activation_ranges import propagate_bn_stats
    from dfquant.dfmpc import compensated_input_stats
    from dfquant.graph import trace

    m = _plain(with_bn_stats, seed=8)
    plan = plan_pairs(m)
    q = _quantized(m, plan, 2, 6)
    rec = compensate(m, q, plan, DfmpcConfig(bn_recal="moments"), folded=False)
    ranges = compensated_input_stats(propagate_bn_stats(trace(m)), rec)
    m2 = copy.deepcopy(m)  # the float model with the compensated BN affine parameters
    for p in plan.pairs:
        m2.get_submodule(p.bn).weight.data.copy_(q.get_submodule(p.bn).weight)
        m2.get_submodule(p.bn).bias.data.copy_(q.get_submodule(p.bn).bias)
    want = propagate_bn_stats(trace(m2))
    assert ranges["c3"].stats is not None  # c2 -> b2 -> ReLU -> max-pool -> c3 carries statistics
    for name, r in want.items():
        got = ranges[name]
        assert (got.stats is None) == (r.stats is None), name
        if r.stats is not None:
            assert torch.allclose(got.stats.mu, r.stats.mu) and torch.allclose(got.stats.sigma, r.stats.sigma), name
