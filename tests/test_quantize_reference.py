"""``dfquant.quantize`` traces once, copies once and carries BN statistics once; these tests rebuild
its models with the lower-level functions, each tracing and copying on its own (shapes from
``torch.fx``'s ShapeProp, as the pipeline took them before), and ask for identical tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

import dfquant
import dfquant.api
import dfquant.dfq
import dfquant.graph
import dfquant.modelcheck
from dfquant.activation_ranges import propagate_bn_stats, stats_range
from dfquant.api import _weight_codes
from dfquant.config import QuantConfig
from dfquant.dfq import bias_correction, equalize_cross_layer, replace_relu6
from dfquant.graph import analyse, fold_bn, replace_module, trace
from dfquant.modelcheck import copy_model
from dfquant.qmodules import ActQuantizer, QuantConv2d, QuantLinear
from dfquant.quantizer import from_grid


def _shapeprop_stats(model: nn.Module, input_size):
    gm = trace(model)
    ShapeProp(gm).propagate(torch.zeros(1, *input_size))
    shapes = {n.name: n.meta["tensor_meta"].shape for n in gm.graph.nodes if hasattr(n.meta.get("tensor_meta"), "shape")}
    return propagate_bn_stats(gm, input_size, shapes)


def _by_hand(model: nn.Module, report, input_size, **options) -> nn.Module:
    """The rounding pipeline from its parts: DFQ's float steps, BN statistics, fold_bn, each layer's
    codes (and bias correction), its input quantizer; the per-layer bits as the report gives them."""
    cfg = QuantConfig(**{k: v for k, v in report.config.items() if k != "config_version"}).validate()
    base = replace_relu6(model)[0] if cfg.relu6_to_relu else model
    base = equalize_cross_layer(base)[0] if cfg.cle else base
    ranges = _shapeprop_stats(base, input_size)
    q = (fold_bn(base) if cfg.fold_bn else copy_model(base)).eval()
    for row in report.layers:
        layer = q.get_submodule(row.name)
        w = layer.weight.detach()
        codes, qp, _ = _weight_codes(w, row.w_bits, cfg)
        bias = None
        found = ranges.get(row.name)
        if cfg.bias_correction and found is not None and found.stats is not None:
            old = layer.bias.detach() if layer.bias is not None else 0.0
            bias = old + bias_correction(from_grid(codes, qp) - w, found.stats.moments()[0].float(), getattr(layer, "groups", 1))
        act = None
        if row.a_bits is not None:
            act = ActQuantizer(row.a_bits, *stats_range(found.stats, row.a_bits, cfg.act_range, cfg.n_sigma))
        kind = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        replace_module(q, row.name, kind(layer, codes, qp, act, bias=bias))
    return q


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different


CASES = [("rtn", {}), ("squant", {}), ("squant", dict(cle=True, bias_correction=True)), ("squant", dict(fold_bn=True, bias_correction=True, a_bits=None)), ("rtn", dict(fold_bn=True, cle=True))]


@pytest.mark.parametrize("method,options", CASES)
def test_quantize_equals_the_pipeline_built_by_hand_on_resnet20(resnet20, method, options):
    options = dict(dict(a_bits=4), **options)
    q, report = dfquant.quantize(resnet20, method, 4, **options)
    assert set(report.stage_times) >= {"graph", "forward", "copy", "weights", "layers"}
    _assert_same(q, _by_hand(resnet20, report, (3, 32, 32)))


class ReLU6Net(nn.Module):
    """conv -> BN -> ReLU6 chains (CLE pairs them after relu6_to_relu), a head whose reshape only the
    traced shapes can read, and a layer registered twice."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act, self.fc = nn.ReLU6(), nn.Linear(8, 10)
        self.head = self.fc  # an alias: quantized under both names

    def forward(self, x):
        x = self.act(self.b0(self.c0(x)))
        x = self.act(self.b1(self.c1(x)))
        x = self.act(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3), keepdim=True).reshape(-1, 8, 1, 1).flatten(1))


@pytest.mark.parametrize("train,options", [(False, dict()), (True, dict()), (False, dict(relu6_to_relu=True, cle=True, bias_correction=True, fold_bn=True))])
def test_one_trace_and_one_copy_give_the_same_model(train, options, monkeypatch):
    calls = {"trace": 0, "copy": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(dfquant.graph, "trace", counted("trace", dfquant.graph.trace))
    for module in (dfquant.api, dfquant.graph, dfquant.dfq, dfquant.modelcheck):
        monkeypatch.setattr(module, "copy_model", counted("copy", module.copy_model))
    torch.manual_seed(0)
    model = ReLU6Net().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2), m.bias.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q, report = dfquant.quantize(model.train(train), "squant", 4, 4, input_size=(3, 8, 8), **options)
    # one copy, quantized in place: the eval-mode copy of a training-mode model; relu6_to_relu's and CLE's
    assert calls == {"trace": 1, "copy": 2 if options else 1}
    monkeypatch.undo()
    assert model.training == train and all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the given model is untouched
    model.eval()
    assert q.head is q.fc and isinstance(q.fc, QuantLinear) and q.fc.input_quant is not None  # its range needs the shapes
    assert type(q.act) is (nn.ReLU if options else nn.ReLU6) and type(model.act) is nn.ReLU6  # relu6_to_relu: in the copy only
    _assert_same(q, _by_hand(model, report, (3, 8, 8)))


def test_the_one_forward_still_refuses_a_wrong_input_size(resnet20):
    with pytest.raises(dfquant.DfquantError, match="input_size"):
        dfquant.quantize(resnet20, "squant", 4, 4, input_size=(3, 5))
    assert analyse(resnet20).traced is not None
