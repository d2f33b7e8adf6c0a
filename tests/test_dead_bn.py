"""Dead BatchNorm channels (running variance down to 1e-36, weight ~0, as real ImageNet checkpoints
have them) and a depthwise conv: every method, range rule and fold setting gives finite outputs,
scales, ranges and losses."""
import math

import pytest
import torch
import torch.nn as nn

import dfquant
from dfquant.qmodules import QUANT_LAYERS

SIZE = (3, 16, 16)
DEAD = [0, 3]  # channels whose BN is dead in every BN


class DeadNet(nn.Module):
    """conv -> BN -> ReLU -> depthwise conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.dw(x)))
        x = self.relu(self.bn3(self.pw(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def dead_net() -> nn.Module:
    torch.manual_seed(0)
    model = DeadNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_var[DEAD] = 1e-36
            bn.weight[DEAD] = torch.tensor([0.0, 1e-30])
            bn.bias[DEAD[0]] = 0.0
            bn.running_mean[DEAD] = 0.0
        model.dw.weight[DEAD] = torch.tensor([0.0, 1e-30]).reshape(2, 1, 1, 1)  # dead depthwise filters too
        model.conv1.weight[DEAD[0]] = 0.0  # an all-zero output channel: zero range, zero batch variance
        model.pw.weight[1] = 0.0
    return model


def _finite(value, where="") -> None:
    """Every number inside ``value`` (tensors, floats, dicts, lists) is finite."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"non-finite tensor at {where}"
    elif isinstance(value, float):
        assert math.isfinite(value), f"non-finite value {value} at {where}"
    elif isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(v, f"{where}[{i}]")


def _check(q: nn.Module, report) -> None:
    for name, t in q.state_dict().items():
        _finite(t, name)
    for name, m in q.named_modules():
        if isinstance(m, QUANT_LAYERS):
            assert (m.weight_scale > 0).all(), name
            if m.input_quant is not None:
                assert float(m.input_quant.scale) > 0 and all(math.isfinite(v) for v in m.input_quant.range), name
    x = torch.rand(4, *SIZE) * 2 - 1
    _finite(q(x), "output")
    _finite(report.to_dict(), "report")


ROUNDING_RUNS = [
    (method, dict(act_range=rule, fold_bn=fold))
    for method in ("rtn", "squant", "squant-e", "squant-k", "squant-c")
    for rule in ("dfq", "mse", "squant")
    for fold in (False, True)
]
ROUNDING_RUNS += [
    ("rtn", dict(cle=True, bias_correction=True)),
    ("rtn", dict(cle=True, bias_correction=True, per_channel=False)),
    ("squant", dict(cle=True, bias_correction=True, fold_bn=True)),
    ("rtn", dict(protocol="genie")),
    ("squant", dict(protocol="squant")),
]


@pytest.mark.parametrize("method,options", ROUNDING_RUNS, ids=lambda v: str(v))
def test_rounding_methods_stay_finite(method, options):
    q, report = dfquant.quantize(dead_net(), method, 4, 4, input_size=SIZE, **options)
    _check(q, report)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(bn_recal="moments"), dict(compensation="none", bn_recal="moments"), dict(fold_bn=True), dict(a_bits=4)],
    ids=lambda v: str(v),
)
def test_dfmpc_stays_finite(options):
    options = dict(options)
    a_bits = options.pop("a_bits", None)
    q, report = dfquant.quantize(dead_net(), "dfmpc", 4, a_bits, input_size=SIZE, low_bits=2, **options)
    _check(q, report)


TINY = dict(samples=8, distill_iters=2, recon_iters=3, batch_size=4, device="cpu")


@pytest.mark.parametrize(
    "method,options",
    [("genie", dict()), ("genie", dict(act_calib="bn", fold_bn=True)), ("zeroq", dict()), ("genie", dict(protocol="genie"))],
    ids=lambda v: str(v),
)
def test_learned_methods_stay_finite(method, options, one_thread):
    q, report = dfquant.quantize(dead_net(), method, 4, 4, input_size=SIZE, **TINY, **options)
    _check(q, report)
    for unit in report.config["genie"]["units"]:
        assert math.isfinite(unit["before"]) and math.isfinite(unit["after"]), unit["name"]


@pytest.mark.parametrize("options", [dict(compensation="fitted"), dict(bn_recal="synthetic")], ids=lambda v: str(v))
def test_dfmpc_with_synthetic_images_stays_finite(options, one_thread):
    q, report = dfquant.quantize(dead_net(), "dfmpc", 4, None, input_size=SIZE, low_bits=2, samples=8, distill_iters=2, device="cpu", **options)
    _check(q, report)


@pytest.mark.parametrize("method", ["genie", "zeroq"])
def test_synthesis_losses_stay_finite(method, one_thread):
    from dfquant.genie import GenieConfig, synthesize
    from dfquant.genie.bns_loss import bn_statistics_loss

    cfg = GenieConfig(samples=4, distill_iters=3, device="cpu").validate().resolve("cpu", method)
    images = synthesize(dead_net(), 4, cfg, method=method, input_size=SIZE)
    _finite(images, "images")
    _finite(bn_statistics_loss(dead_net(), images, per_sample=method == "zeroq"), "BN-statistics loss")
