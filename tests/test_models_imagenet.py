"""ImageNet model definitions: torchvision's exact state-dict layout, forward, fx tracing, registry."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx

from dfquant.errors import DfquantError
from dfquant.models import create_model, input_size_of, list_models, model_spec
from dfquant.models.weights import load_weights

# name -> (state-dict keys incl. num_batches_tracked, parameter count); torchvision's numbers.
EXPECTED = {
    "resnet18": (122, 11_689_512),
    "resnet50": (320, 25_557_032),
    "mobilenet_v2": (314, 3_504_872),
}

# A few keys with their torchvision shapes, spread over stem, blocks, shortcuts and head.
KEY_SHAPES = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.bn2.num_batches_tracked": (),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "fc.weight": (1000, 2048),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.0.1.weight": (32,),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.running_mean": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.bias": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.num_batches_tracked": (),
        "classifier.1.weight": (1000, 1280),
        "classifier.1.bias": (1000,),
    },
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: create_model(name) for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registry(name):
    assert name in list_models()
    spec = model_spec(name)
    assert spec.input_size == (3, 224, 224)
    assert spec.num_classes == 1000
    assert spec.dataset == "imagenet"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_state_dict_layout(models, name):
    model = models[name]
    sd = model.state_dict()
    n_keys, n_params = EXPECTED[name]
    assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    for key, shape in KEY_SHAPES[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not model.training
    assert input_size_of(model) == (3, 224, 224)


def test_mobilenet_v2_head_and_blocks(models):
    m = models["mobilenet_v2"]
    assert len(m.features) == 19
    assert [type(x).__name__ for x in m.features[0]] == ["Conv2d", "BatchNorm2d", "ReLU6"]
    assert isinstance(m.classifier[0], torch.nn.Dropout) and m.classifier[0].p == 0.2
    assert isinstance(m.classifier[1], torch.nn.Linear)


def test_resnet50_stride_on_3x3(models):
    block = models["resnet50"].layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)


def test_custom_num_classes():
    m = create_model("resnet18", num_classes=10)
    assert m.fc.weight.shape == (10, 512)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("mobilenet_v2", 224)])
def test_forward_and_fx_trace(models, name, size):
    model = models[name]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        y = model(x)
        gm = torch.fx.symbolic_trace(model)
        y_fx = gm(x)
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y_fx)
    ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert not any("relu" in str(n.target) for n in ops), "activations must be modules"
    n_adds = sum(1 for n in ops if "add" in str(n.target))
    assert n_adds == {"resnet18": 8, "resnet50": 16, "mobilenet_v2": 10}[name]


def test_weights_round_trip(models, tmp_path: Path):
    src = models["resnet18"]
    ckpt = tmp_path / "r18.pth"
    torch.save(src.state_dict(), ckpt)
    torch.manual_seed(1)
    fresh = create_model("resnet18")
    assert not torch.equal(fresh.conv1.weight, src.conv1.weight)
    load_weights(fresh, ckpt)
    for k, v in src.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    bad = dict(src.state_dict())
    bad["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(DfquantError, match=r"layer3\.1\.conv2\.weight"):
        load_weights(create_model("resnet18"), tmp_path / "bad.pth")


def test_create_model_with_weights(models, tmp_path: Path):
    src = models["mobilenet_v2"]
    ckpt = tmp_path / "mnv2.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, ckpt)
    m = create_model("mobilenet_v2", weights=str(ckpt))
    assert torch.equal(m.classifier[1].weight, src.classifier[1].weight)


# --------------------------------------------------------------------------------------------
# The two real ImageNet models of the shared assets: MobileNetV1 (Keras layout) and Tiny Darknet.
# --------------------------------------------------------------------------------------------

import math

import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import dfquant
from dfquant.assets import asset_path
from dfquant.data import load_eval_data
from dfquant.data.preprocessing import TF_INCEPTION, UNIT_RANGE
from dfquant.graph import analyse, fold_bn
from dfquant.models import mobilenet_v1 as mnv1_module
from dfquant.models.darknet import LAYERS as DARKNET_LAYERS
from dfquant.qmodules import QUANT_LAYERS, ActQuantizer, QuantConv2d

REAL = {
    "mobilenet_v1": "models/imagenet/mobilenet_v1_075_224.safetensors",
    "tiny_darknet": "models/imagenet/tiny_darknet_224.safetensors",
}
PHOTOS = "data/imagenet-nips17dev-1000-224.npz"
# (top-1, top-5) in % on the 1000 shared photos, from the shared README
FP32_TARGETS = {"mobilenet_v1": (73.8, 92.7), "tiny_darknet": (62.3, 85.8)}
# parameter counts of the shared files (README: 2.59 M and 1.04 M)
PARAMS = {"mobilenet_v1": 2_585_560, "tiny_darknet": 1_042_104}


def _need(rel: str):
    p = asset_path(rel)
    if p is None:
        pytest.skip(f"shared asset {rel} not found (set DFQUANT_ASSETS to the shared/ folder)")
    return p


def _save(state, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("name,pre", [("mobilenet_v1", TF_INCEPTION), ("tiny_darknet", UNIT_RANGE)])
def test_real_models_are_registered_with_their_own_preprocessing(name, pre):
    spec = model_spec(name)
    assert (spec.input_size, spec.num_classes, spec.dataset) == ((3, 224, 224), 1000, "imagenet")
    assert spec.preprocessing == pre
    m = create_model(name)
    assert m.preprocessing == pre and input_size_of(m) == (3, 224, 224)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]


def test_mobilenet_v1_without_weights_has_width_075_and_keras_channel_counts():
    m = create_model("mobilenet_v1")
    assert m.channels == mnv1_module.channels_for_width(0.75)
    assert m.stem.out_channels == 24 and m.classifier.in_features == 768
    half = create_model("mobilenet_v1", width=0.5)
    assert half.stem.out_channels == 16 and [b.pw.out_channels for b in half.blocks][-1] == 512
    with pytest.raises(DfquantError, match="width"):
        create_model("mobilenet_v1", width=0)


def test_mobilenet_v1_keras_numerics():
    m = create_model("mobilenet_v1")
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert len(bns) == 27 and all(b.eps == 1e-3 for b in bns)
    assert all(isinstance(x, nn.ReLU6) for n, x in m.named_modules() if n.endswith("relu"))
    assert [i for i, b in enumerate(m.blocks) if b.dw.stride == (2, 2)] == [1, 3, 5, 11]
    assert all(b.dw.groups == b.dw.in_channels == b.dw.out_channels for b in m.blocks)
    # stride-2 convs are unpadded (the F.pad in the forward pads), stride-1 depthwise ones pad 1
    assert m.stem.padding == (0, 0)
    assert all(b.dw.padding == ((0, 0) if b.dw.stride == (2, 2) else (1, 1)) for b in m.blocks)


def test_tiny_darknet_layout():
    m = create_model("tiny_darknet")
    kernels = [getattr(m, f"conv{i}").kernel_size[0] for i in range(15)]
    assert kernels == [3, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1]
    assert all(getattr(m, f"bn{i}").eps == 1e-3 for i in range(15))
    assert all(getattr(m, f"act{i}").negative_slope == 0.1 for i in range(15))
    assert sorted(n for n, x in m.named_modules() if isinstance(x, nn.MaxPool2d)) == ["pool0", "pool1", "pool5", "pool9"]
    x = torch.randn(1, 3, 224, 224)
    feats = {}
    m.conv14.register_forward_hook(lambda mod, i, o: feats.update(last=o.shape))
    with torch.no_grad():
        assert m(x).shape == (1, 1000)
    assert feats["last"] == (1, 128, 14, 14)  # four 2x2 pools: 224 -> 14


def test_tf_same_padding_pads_bottom_right_and_equals_explicit_pad_then_conv():
    torch.manual_seed(0)
    m = create_model("mobilenet_v1", width=0.25)
    x = torch.randn(2, 3, 224, 224)
    out = {}
    m.stem.register_forward_hook(lambda mod, i, o: out.update(stem=o))
    m.blocks[0].register_forward_hook(lambda mod, i, o: out.update(block0=o))
    m.blocks[1].dw.register_forward_hook(lambda mod, i, o: out.update(dw=o))
    with torch.no_grad():
        m(x)
        explicit_stem = F.conv2d(F.pad(x, (0, 1, 0, 1)), m.stem.weight, None, 2)
        dw = m.blocks[1].dw
        explicit_dw = F.conv2d(F.pad(out["block0"], (0, 1, 0, 1)), dw.weight, None, 2, 0, 1, dw.groups)
        symmetric = F.conv2d(x, m.stem.weight, None, 2, 1)
    assert out["stem"].shape == (2, 8, 112, 112) and out["dw"].shape == (2, 16, 56, 56)
    assert torch.equal(out["stem"], explicit_stem)
    assert torch.equal(out["dw"], explicit_dw)
    # not PyTorch's symmetric padding 1: same size, but the top row reads other pixels
    assert symmetric.shape == out["stem"].shape and not torch.allclose(out["stem"][:, :, 0], symmetric[:, :, 0])


@pytest.mark.parametrize("name", ["mobilenet_v1", "tiny_darknet"])
def test_real_models_trace_with_fx_and_pair_every_conv_with_its_bn(name):
    torch.manual_seed(0)
    m = create_model(name)
    graph = analyse(m)
    assert graph.traced is not None and graph.unsupported == [] and graph.note == ""
    convs = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    assert sorted(graph.conv_bn) == sorted(convs)  # every conv -> BN pair found, through the pads
    assert [l.name for l in graph.layers] == convs + ["classifier"]
    pads = [n for n in graph.traced.graph.nodes if n.target is F.pad]
    assert len(pads) == (5 if name == "mobilenet_v1" else 0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(graph.traced(x), m(x))


@pytest.mark.parametrize("name", ["mobilenet_v1", "tiny_darknet"])
def test_bn_folding_and_the_quantized_swap_keep_the_function_and_the_padding(name, with_bn_stats):
    torch.manual_seed(0)
    m = with_bn_stats(create_model(name))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        folded = fold_bn(m)
        assert not any(isinstance(b, nn.BatchNorm2d) for b in folded.modules())
        assert torch.allclose(folded(x), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
        q, _ = dfquant.quantize(m, "rtn", 8, None, input_size=(3, 64, 64))
        assert all(isinstance(q.get_submodule(c), QuantConv2d) for c in analyse(m).conv_bn)
        if name == "mobilenet_v1":
            assert q.stem.padding == (0, 0) and q.blocks[1].dw.padding == (0, 0)
        out = q(x)  # with the pad lost the stem would give 31 x 31, and the pad-free blocks other shapes
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_mobilenet_v1_width_is_read_from_the_shapes(tmp_path: Path):
    torch.manual_seed(0)
    half = create_model("mobilenet_v1", width=0.5)
    path = _save(half.state_dict(), tmp_path / "mnv1_050.safetensors")
    loaded = create_model("mobilenet_v1", weights=str(path))
    assert loaded.channels == mnv1_module.channels_for_width(0.5) != create_model("mobilenet_v1").channels
    for k, v in half.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_tiny_darknet_kernel_sizes_are_read_from_the_shapes(tmp_path: Path):
    torch.manual_seed(0)
    layers = list(create_model("tiny_darknet").layers)
    layers[2] = (24, 3)  # a 3x3 conv where tiny.cfg has a 1x1 one, and another width
    other = create_model("tiny_darknet", layers=layers)
    loaded = create_model("tiny_darknet", weights=str(_save(other.state_dict(), tmp_path / "td.safetensors")))
    assert loaded.conv2.kernel_size == (3, 3) and loaded.conv2.padding == (1, 1) and loaded.conv3.in_channels == 24
    assert torch.equal(loaded.conv2.weight, other.conv2.weight)


@pytest.mark.parametrize("name,other", [("mobilenet_v1", "tiny_darknet"), ("tiny_darknet", "mobilenet_v1")])
def test_a_checkpoint_of_another_layout_is_one_clear_error(tmp_path: Path, name, other):
    torch.manual_seed(0)
    path = _save(create_model(other).state_dict(), tmp_path / f"{other}.safetensors")
    with pytest.raises(DfquantError) as info:
        create_model(name, weights=str(path))
    msg = str(info.value)
    assert "\n" not in msg and "does not fit" in msg and "missing keys" in msg and "unexpected keys" in msg
    assert ("stem.weight" in msg) == (name == "mobilenet_v1") and ("conv0.weight" in msg) == (name == "tiny_darknet")


def test_a_checkpoint_with_a_mismatched_block_is_refused(tmp_path: Path):
    """Widths come from the pointwise convs; a depthwise conv that does not fit them is a shape error."""
    state = create_model("mobilenet_v1").state_dict()
    state["blocks.3.dw.weight"] = torch.zeros(100, 1, 3, 3)
    with pytest.raises(DfquantError, match=r"wrong shapes: blocks\.3\.dw\.weight \(100, 1, 3, 3\)"):
        create_model("mobilenet_v1", weights=str(_save(state, tmp_path / "bad.safetensors")))
    state = create_model("mobilenet_v1").state_dict()
    state["blocks.13.dw.weight"] = torch.zeros(768, 1, 3, 3)  # a 14th block: not this layout
    with pytest.raises(DfquantError, match=r"unexpected keys: blocks\.13\.dw\.weight"):
        create_model("mobilenet_v1", weights=str(_save(state, tmp_path / "extra.safetensors")))


@pytest.mark.parametrize("name", sorted(REAL))
def test_the_shared_weights_load_strictly(name):
    from dfquant.models.weights import read_state_dict

    path = _need(REAL[name])
    state = read_state_dict(path)
    m = create_model(name, weights=str(path))
    assert sorted(m.state_dict()) == sorted(state)
    for k, v in state.items():
        assert torch.equal(m.state_dict()[k], v), k
    var = torch.cat([b.running_var for b in m.modules() if isinstance(b, nn.BatchNorm2d)])
    assert float(var.min()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_fp32_accuracy_on_the_shared_photos_reproduces_the_reference(name, one_thread):
    model = create_model(name, weights=str(_need(REAL[name])))
    data = load_eval_data("imagenet", str(_need(PHOTOS)), preprocessing=name, batch_size=100)
    r = dfquant.evaluate(model, data)
    top1, top5 = FP32_TARGETS[name]
    assert r["n"] == 1000
    assert abs(r["top1"] - top1) <= 0.1 and abs(r["top5"] - top5) <= 0.1, r


# --------------------------------------------------------------------------------------------
# Dead BN channels (running variance 1e-36 after all-but-zero weights, as in the real models):
# every method must give finite weights, codes, scales, ranges and logits.
# --------------------------------------------------------------------------------------------

SMALL = (3, 32, 32)
TINY_GENIE = dict(samples=8, distill_iters=2, distill_batch=4, recon_iters=2, batch_size=4)


def _with_dead_channels(model: nn.Module, seed: int = 0, every: int = 4) -> nn.Module:
    """BN statistics set, and every ``every``-th channel of each conv -> BN made dead: weights
    ~1e-13, running var 1e-36, mean 0, a positive beta (its constant output passes the ReLU)."""
    g = torch.Generator().manual_seed(seed)
    graph = analyse(model)
    with torch.no_grad():
        for conv_name, bn_name in graph.conv_bn.items():
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.5)
            dead = torch.arange(c) % every == 1
            conv.weight[dead] = torch.randn(conv.weight[dead].shape, generator=g) * 1e-13
            bn.running_var[dead] = 1e-36
            bn.running_mean[dead] = 0.0
            bn.bias[dead] = 0.5
    return model.eval()


def _small(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mobilenet_v1":
        m = create_model("mobilenet_v1", width=0.25)
    else:  # tiny.cfg's kernels at a quarter of its widths
        m = create_model("tiny_darknet", layers=[(max(4, c // 4), k) for c, k in DARKNET_LAYERS])
    m.input_size = SMALL
    return _with_dead_channels(m)


def _non_finite(q: nn.Module):
    bad = [k for k, v in q.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    for n, m in q.named_modules():
        if isinstance(m, ActQuantizer) and not (all(math.isfinite(v) for v in m.range) and float(m.scale) > 0):
            bad.append(f"{n} range {m.range}")
        if isinstance(m, QUANT_LAYERS) and not (torch.isfinite(m.weight).all() and (m.weight_scale > 0).all()):
            bad.append(f"{n} weight/scale")
    return bad


CASES = [
    ("rtn", {}),
    ("squant", {}),
    ("squant", dict(fold_bn=True)),
    ("squant", dict(per_channel=False)),
    ("squant", dict(act_range="mse")),
    ("squant", dict(int32_bias=True)),
    ("squant", dict(quantize_first_input=True, input_range="model")),
    ("squant", dict(cle=True, bias_correction=True)),
    ("squant", dict(cle=True, bias_correction=True, relu6_to_relu=True)),
    pytest.param(("zeroq", dict(TINY_GENIE)), marks=pytest.mark.slow),
    pytest.param(("genie", dict(TINY_GENIE)), marks=pytest.mark.slow),
    pytest.param(("genie", dict(TINY_GENIE, int32_bias=True)), marks=pytest.mark.slow),
]


def _case_id(case):
    method, opts = case
    return "-".join([method] + [k for k in opts if k not in TINY_GENIE])


@pytest.mark.parametrize("name", ["mobilenet_v1", "tiny_darknet"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_dead_bn_channels_give_finite_models_with_every_method(name, case, one_thread):
    method, opts = case
    opts = dict(opts)
    model = _small(name)
    if opts.get("input_range") == "model":
        opts["input_range"] = model.preprocessing.input_range()
    if opts.get("cle") and name == "tiny_darknet":
        pytest.skip("CLE pairs conv -> BN -> ReLU -> conv; Tiny Darknet's LeakyReLU gives no pair (a clear error, tested below)")
    if opts.get("cle") and not opts.get("relu6_to_relu"):
        with pytest.raises(DfquantError, match="ReLU6 is not scale-equivariant"):
            dfquant.quantize(model, method, 8, 8, **opts)
        return
    q, report = dfquant.quantize(model, method, 8, 8, **opts)
    assert _non_finite(q) == []
    x = model.preprocessing.normalize(torch.randint(0, 256, (4, *SMALL), generator=torch.Generator().manual_seed(1), dtype=torch.uint8))
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    if method in ("rtn", "squant") and not opts.get("relu6_to_relu"):
        assert float((out - ref).norm() / ref.norm()) < 0.2  # 8-bit rounding of a finite model stays close


def test_tiny_darknet_has_no_cle_pair_and_says_so_in_one_line():
    with pytest.raises(DfquantError) as info:
        dfquant.quantize(_small("tiny_darknet"), "squant", 8, 8, cle=True)
    assert "\n" not in str(info.value) and "no conv -> [BN] -> ReLU -> conv pair" in str(info.value)


def test_cle_leaves_dead_channels_unscaled_so_activation_ranges_stay_bounded():
    """A dead channel's folded weight range is ~0, so its equalizing scale sqrt(r1 / r2) is ~1e-7:
    dividing its BN by it would multiply its constant output (beta = 0.5) and its gamma by 1e7, and
    so the next activation range. Dead channels keep scale 1; the live ones are still equalized."""
    from dfquant.dfq import equalize_cross_layer, replace_relu6

    model, _ = replace_relu6(_small("mobilenet_v1"))
    eq, record = equalize_cross_layer(model)
    for p in record.pairs:
        bn = model.get_submodule(p.bn)
        dead = bn.running_var < 1e-30
        assert torch.all(p.scales[dead] == 1.0), p.first
        assert not torch.all(p.scales[~dead] == 1.0), p.first
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.allclose(eq(x), model(x), rtol=1e-3, atol=1e-4)
    _, plain = dfquant.quantize(model, "squant", 8, 8)
    _, equalized = dfquant.quantize(model, "squant", 8, 8, cle=True)
    widest = lambda rep: max(l.a_range[1] for l in rep.layers if l.a_range is not None)  # noqa: E731
    assert widest(equalized) < 10 * widest(plain)


def test_arch_options_rebuild_the_architecture_a_file_described(tmp_path: Path):
    import json

    torch.manual_seed(0)
    layers = [list(l) for l in DARKNET_LAYERS]
    layers[4] = [20, 3]
    for name, built in (("mobilenet_v1", create_model("mobilenet_v1", width=0.5)), ("tiny_darknet", create_model("tiny_darknet", layers=layers))):
        loaded = create_model(name, weights=str(_save(built.state_dict(), tmp_path / f"{name}.safetensors")))
        options = json.loads(json.dumps(loaded.arch_options))  # what a saved file's metadata can hold
        again = create_model(name, **options)
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    assert create_model("resnet18").arch_options == {}
    with pytest.raises(DfquantError, match="model 'resnet18' has no option width; its options: none"):
        create_model("resnet18", width=0.5)
    with pytest.raises(DfquantError, match="has no option depth; its options: width, channels"):
        create_model("mobilenet_v1", depth=3)
