import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dfquant
from dfquant.graph import analyse, fold_bn
from dfquant.models import create_model


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def test_layers_in_execution_order_and_bn_pairs():
    g = analyse(create_model("resnet20"))
    names = [l.name for l in g.layers]
    assert names[0] == "conv1" and names[-1] == "linear" and len(names) == 20
    assert g.conv_bn["layer1.0.conv2"] == "layer1.0.bn2"
    assert len(g.conv_bn) == 19


def test_fold_bn_keeps_outputs_and_leaves_original_alone():
    m = _randomize_bn(create_model("resnet20"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    f = fold_bn(m)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), f(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(isinstance(x, nn.BatchNorm2d) for x in f.modules())


def test_fold_bn_mobilenet():
    m = _randomize_bn(create_model("mobilenet_v2"))
    f = fold_bn(m)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = m.features(x), f.features(x)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.temporal = nn.Conv1d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.temporal(x.unsqueeze(-1)).squeeze(-1))


def test_unsupported_layers_left_float_and_listed():
    m = WithUnsupported().eval()
    q, report = dfquant.quantize(m, "squant", 4, None)
    assert report.unsupported == ["temporal"]
    assert isinstance(q.temporal, nn.Conv1d)
    assert "unsupported layers left in float: temporal" in report.format_table()
    assert torch.isfinite(q(torch.randn(2, 1, 6, 6))).all()


def test_a_shared_conv_takes_no_fold_and_folding_keeps_the_function(shared_conv_model):
    m = shared_conv_model
    assert analyse(m).conv_bn == {"c0": "b0"}
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fold_bn(m)(x), m(x), atol=1e-5)


def test_an_affine_free_bn_folds_with_gamma_one_and_beta_zero(affine_free_bn_model):
    m = affine_free_bn_model
    assert analyse(m).conv_bn == {"conv": "bn", "conv2": "bn2"}
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fold_bn(m)(x), m(x), atol=1e-5)


class StandardizedConv(nn.Conv2d):
    """Weight standardization: a forward of its own, which a plain quantized conv would drop."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PlainSubclassConv(nn.Conv2d):
    pass


class WithConvSubclasses(nn.Module):
    def __init__(self, branch: bool = False):
        super().__init__()
        self.branch = branch
        self.c1, self.bn = PlainSubclassConv(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = StandardizedConv(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        if self.branch and x.sum() > 0:  # data-dependent: not fx-traceable
            x = x * 1.0
        return self.fc(self.c2(x).mean((2, 3)))


@pytest.mark.parametrize("branch", [False, True])
def test_a_conv_subclass_with_its_own_forward_stays_float_and_listed(branch):
    m = WithConvSubclasses(branch).eval()
    q, report = dfquant.quantize(m, "rtn", 8, None, input_size=(3, 8, 8))
    assert [l.name for l in report.layers] == ["c1", "fc"] and report.unsupported == ["c2"]
    assert type(q.c2) is StandardizedConv and type(q.c1).__name__ == "QuantConv2d"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(q(x), m(x), rtol=0.05, atol=0.02)


class Aliased(nn.Module):
    """The layer the forward calls is also registered under another name (``self.last = features[3]``)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.last = self.features[3]
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        f = self.features
        x = torch.relu(f[4](self.last(f[2](f[1](f[0](x))))))
        return self.fc(x.mean((2, 3)))


def test_an_aliased_layer_is_quantized_under_every_name_and_saves(tmp_path, with_bn_stats):
    m = with_bn_stats(Aliased())
    q, report = dfquant.quantize(m, "squant", 4, 4, input_size=(3, 8, 8), fold_bn=True)
    assert q.last is q.features[3] and type(q.last).__name__ == "QuantConv2d"
    assert isinstance(q.features[4], nn.Identity)  # its BN folded into it
    x = torch.randn(2, 3, 8, 8)
    dfquant.save_quantized(q, tmp_path / "a")
    r, _ = dfquant.load_quantized(tmp_path / "a.safetensors", model=Aliased())
    with torch.no_grad():
        assert torch.equal(r(x), q(x))


class KeywordCalls(nn.Module):
    """Layers, a BN and torch.cat called with keyword arguments, and a channel concat at dim=-3."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.c, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(16, 4)

    def forward(self, x):
        a = torch.relu(self.bn_a(input=self.a(x)))
        b = torch.relu(self.bn_b(self.b(input=x)))
        self.c(input=torch.cat(tensors=[a, b], dim=1))  # run by keyword, result unused
        return self.fc(torch.cat([a, b], dim=-3).mean((2, 3)).repeat(1, 2))


def test_keyword_calls_keep_the_analysis_and_the_quantized_model_runs(with_bn_stats):
    m = with_bn_stats(KeywordCalls())
    g = analyse(m)
    assert g.conv_bn == {"a": "bn_a", "b": "bn_b"}
    q, report = dfquant.quantize(m, "squant", 8, 8, input_size=(3, 8, 8), fold_bn=True)
    assert dict((l.name, l.a_bits) for l in report.layers)["c"] == 8
    # both branches are ReLU outputs: their concatenation is >= 0, so the range starts at 0
    assert dict((l.name, l.a_range) for l in report.layers)["c"][0] == 0.0
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(q(x), m(x), rtol=0.05, atol=0.05)


def test_parametrized_and_root_level_weights_are_reported_truthfully():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3))).eval()
    q, report = dfquant.quantize(m, "rtn", 8, None)
    assert [l.name for l in report.layers] == ["0", "3"] and report.unsupported == []

    class RootWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.conv2d(x, self.w).mean((2, 3)))

    _, report = dfquant.quantize(RootWeight().eval(), "rtn", 8, None)
    assert report.unsupported == ["(the model's own parameters)"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()), "TorchScript"),
        (lambda: nn.DataParallel(nn.Sequential(nn.Conv2d(3, 4, 3))), "model.module"),
        (lambda: nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))), "remove_weight_norm"),
    ],
)
def test_models_dfquant_cannot_rebuild_are_clear_errors(make, match):
    with pytest.warns(FutureWarning) if "weight_norm" in match else contextlib.nullcontext():
        model = make()
    with pytest.raises(dfquant.DfquantError, match=match):
        dfquant.quantize(model, "rtn", 8, None)
