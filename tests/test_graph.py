import torch
import torch.nn as nn

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
