"""Genie-M reconstruction on the embedded digits CNN, at a tiny budget (CPU)."""
from __future__ import annotations

import pytest
import torch

import dfquant
from dfquant.data import digits_model, load_digits_split
from dfquant.errors import DfquantError
from dfquant.evaluation import evaluate
from dfquant.genie import find_units, initial_rounding, lr_round_for, synthesize
from dfquant.qmodules import QUANT_LAYERS
from dfquant.quantizer import minmax_params, qrange, to_grid
from dfquant.squant import squant_round

TINY = dict(samples=64, batch_size=16, device="cpu", seed=0)  # with given images


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return digits_model()


@pytest.fixture(scope="module")
def images(model):
    return synthesize(model, 64, method="genie", iters=20, batch_size=32, seed=0, progress=False)


@pytest.fixture(scope="module")
def genie_run(model, images):
    return dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, synthetic=images, recon_iters=80, **TINY)


def _test_acc(q):
    _, test = load_digits_split()
    return evaluate(q, test)["top1"]


def test_units_and_loss_record(genie_run):
    q, report = genie_run
    info = report.config["genie"]
    assert [u["name"] for u in info["units"]] == ["conv1", "conv2", "conv3", "fc"]
    for u in info["units"]:
        assert u["after"] < u["before"], u  # each unit's output error drops from its start
    assert info["reconstruction_time_s"] > 0 and "synthesis_time_s" in info
    assert any("Genie-M" in n for n in report.notes)


def test_rounding_lr_keeps_the_release_lr_times_iterations(model, images, genie_run):
    assert lr_round_for(20000) == pytest.approx(1e-3)  # the release's setting
    assert lr_round_for(500) == pytest.approx(0.04)  # the CPU budget
    assert lr_round_for(200) == lr_round_for(50) == lr_round_for(1) == pytest.approx(0.1)  # the cap for short runs
    info = genie_run[1].config["genie"]
    assert info["lr_round"] == pytest.approx(0.1)  # 80 iterations: under the cap
    # the point of the rule: at the end of a short run the soft rounding has (mostly) been decided,
    # where the release's rate leaves most of it undecided
    undecided = max(u["soft_undecided"] for u in info["units"])
    assert undecided < 0.15
    _, report = dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, synthetic=images, recon_iters=80, lr_round=1e-3, **TINY)
    assert report.config["genie"]["lr_round"] == 1e-3  # an explicit rate is used as given
    assert min(u["soft_undecided"] for u in report.config["genie"]["units"]) > 5 * undecided


def test_result_is_a_valid_quantized_model(model, genie_run):
    q, report = genie_run
    layers = [m for m in q.modules() if isinstance(m, QUANT_LAYERS)]
    assert len(layers) == 4
    for lay in layers:
        lo, hi = qrange(lay.w_bits, True)
        assert lay.weight_int.dtype == torch.int8
        assert int(lay.weight_int.min()) >= lo and int(lay.weight_int.max()) <= hi
        assert torch.all(lay.weight_scale > 0)
        if lay.input_quant is not None:
            assert float(lay.input_quant.scale) > 0
    assert q.conv1.input_quant is None and q.fc.input_quant.bits == 8  # protocol kept
    x = torch.randn(5, 1, 8, 8)
    assert q(x).shape == (5, 10)
    rtn, _ = dfquant.quantize(model, "rtn", 4, 4)
    assert _test_acc(q) >= _test_acc(rtn) - 1.5
    # the per-layer report follows the new weights
    for entry in report.layers:
        lay = q.get_submodule(entry.name)
        w = model.get_submodule(entry.name).weight.detach()
        assert entry.rel_weight_error == pytest.approx(float((lay.weight - w).norm() / w.norm()), rel=1e-5)


def test_caller_model_untouched(model, images):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, synthetic=images, recon_iters=5, **TINY)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_same_seed_same_model(model, genie_run, images):
    q2, _ = dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, synthetic=images, recon_iters=80, **TINY)
    s1, s2 = genie_run[0].state_dict(), q2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_synthesis_inside_is_deterministic(model):
    opts = dict(TINY, distill_batch=32, samples=32, distill_iters=5, recon_iters=3)
    a, ra = dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, **opts)
    b, _ = dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, **opts)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert ra.config["genie"]["data"]["source"].startswith("synthesized")


@pytest.mark.parametrize("init", ["rtn", "squant"])
def test_zero_iterations_keeps_the_initial_codes(model, images, init):
    ref, _ = dfquant.quantize(model, init, 4, 4, w_range="lp")  # the learned methods' default grid
    for act_calib in ("bn", "data"):  # "data" (the default) only re-sets the activation ranges
        q, report = dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, init=init, synthetic=images, recon_iters=0, act_calib=act_calib, **TINY)
        assert report.config["w_range"] == "lp"
        for name, lay in q.named_modules():
            if isinstance(lay, QUANT_LAYERS):
                other = ref.get_submodule(name)
                assert torch.equal(lay.weight_int, other.weight_int), name
                assert torch.equal(lay.weight_scale, other.weight_scale)
                if lay.input_quant is not None and act_calib == "bn":
                    assert torch.equal(lay.input_quant.scale, other.input_quant.scale)
        for u in report.config["genie"]["units"]:
            assert u["codes_changed"] == 0
            if act_calib == "bn":
                assert u["before"] == u["after"]


def test_keep_best_never_ends_above_the_start(model, images):
    _, report = dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, init="squant", synthetic=images, recon_iters=40, keep_best=True, **TINY)
    for u in report.config["genie"]["units"]:
        assert u["after"] <= u["before"], u
        if u.get("kept_start"):
            assert u["after"] == u["before"] and u["codes_changed"] == 0


def test_squant_start_differs_from_rtn_start(model, images):
    a, _ = dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, init="squant", synthetic=images, recon_iters=0, **TINY)
    b, _ = dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, init="rtn", synthetic=images, recon_iters=0, **TINY)
    assert not torch.equal(a.conv3.weight_int, b.conv3.weight_int)


def test_initial_rounding_reproduces_codes_exactly():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 8, 3, 3, generator=g)
    qp = minmax_params(w, 3)
    grid = to_grid(w, qp)
    for codes in (torch.clamp(torch.round(grid), qp.qmin, qp.qmax), squant_round(grid, qp.qmin, qp.qmax)):
        base, v = initial_rounding(w, codes, qp.scale, qp.zero_point, 3)
        assert torch.equal(torch.clamp(base + (v >= 0).float(), qp.qmin, qp.qmax), codes)
        assert torch.isfinite(v).all()
        # the soft value starts at the float weight wherever the code is round-to-nearest
        frac = grid - base
        same = (codes == torch.round(grid)) & ((frac - 0.5).abs() > 0.02) & (grid > qp.qmin) & (grid < qp.qmax)
        h = torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1)
        assert torch.allclose(h[same], frac[same], atol=1e-5)


def test_act_calib_data_and_zeroq(model, images, tmp_path):
    path = tmp_path / "imgs.safetensors"
    q, report = dfquant.quantize(
        model, method="zeroq", w_bits=4, a_bits=4, act_calib="data", recon_iters=10, save_synthetic=str(path), **dict(TINY, distill_batch=32, samples=32, distill_iters=5)
    )
    info = report.config["genie"]
    assert info["data"]["source"] == "synthesized (zeroq)" and path.exists()
    assert all("after_act_calib" in u for u in info["units"] if u["name"] != "conv1")
    # a saved file can be given back as the synthetic data
    q2, r2 = dfquant.quantize(model, method="zeroq", w_bits=4, a_bits=4, act_calib="data", recon_iters=10, synthetic=str(path), **TINY | dict(samples=32))
    assert r2.config["genie"]["data"]["source"] == "files" and r2.config["genie"]["data"]["files"] == [str(path)]
    assert all(torch.equal(q.state_dict()[k], q2.state_dict()[k]) for k in q.state_dict())


def test_find_units_blocks():
    from dfquant.models import create_model

    qr, _ = dfquant.quantize(create_model("resnet20"), "rtn", 4, 4)
    units = find_units(qr)
    names = [u for u, _ in units]
    assert names[0] == "conv1" and names[-1] == "linear"
    assert "layer1.0" in names and "layer3.2" in names and len(names) == 11
    assert dict(units)["layer2.0"] == ["layer2.0.conv1", "layer2.0.conv2"]


@pytest.mark.parametrize(
    "opts",
    [
        dict(recon_iter=5),  # misspelt
        dict(act_calib="mse"),
        dict(budget="tpu"),
        dict(device="tpu"),
        dict(recon_iters=-1),
        dict(drop_prob=1.5),
        dict(beta=(20.0,)),
        dict(beta=5),
        dict(seed="x"),
        dict(synthetic=torch.zeros(4, 3, 8, 8)),  # wrong image shape
        dict(samples=1000),  # more than the given images
        dict(keep_best="yes"),
        dict(lr_round=-0.1),
    ],
)
def test_bad_options_raise(model, images, opts):
    with pytest.raises(DfquantError):
        dfquant.quantize(model, method="genie", w_bits=4, a_bits=4, **{**TINY, "synthetic": images, "recon_iters": 2, **opts})


def test_options_rejected_for_rounding_methods(model):
    with pytest.raises(DfquantError):
        dfquant.quantize(model, "rtn", 4, 4, recon_iters=3)


def test_per_layer_bits_are_kept_through_reconstruction(model, images):
    qmodel, report = dfquant.quantize(model, method="genie", w_bits=2, a_bits=4, synthetic=images, recon_iters=5, layer_w_bits={"conv2": 8}, **TINY)
    assert {l.name: l.w_bits for l in report.layers}["conv2"] == 8
    assert qmodel.conv2.w_bits == 8 and qmodel.conv1.w_bits == 2
    assert int(qmodel.conv2.weight_int.max()) > 1 or int(qmodel.conv2.weight_int.min()) < -2  # an 8-bit grid, not a 2-bit one
    assert -2 <= int(qmodel.conv1.weight_int.min()) and int(qmodel.conv1.weight_int.max()) <= 1


def test_a_given_image_input_range_is_kept_by_the_data_search(digits):
    from dfquant.data import input_range

    model, _ = digits
    given = input_range("digits")
    q, report = dfquant.quantize(
        model, "genie", 4, 4, quantize_first_input=True, input_range=given, act_calib="data", recon_iters=0, **dict(TINY, distill_batch=32, samples=32, distill_iters=5)
    )
    lo, hi = q.conv1.input_quant.range
    assert lo == pytest.approx(given[0], abs=2 * float(q.conv1.input_quant.scale)) and hi == pytest.approx(given[1], abs=2 * float(q.conv1.input_quant.scale))
    assert q.conv2.input_quant.range != dfquant.quantize(model, "rtn", 4, 4)[0].conv2.input_quant.range  # the others were searched


class _PreActNet(torch.nn.Module):
    """Pre-activation residual blocks whose sum is written in place (``x += branch``) or not."""

    def __init__(self, in_place: bool):
        super().__init__()
        nn = torch.nn
        self.in_place = in_place
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)) for _ in range(2))
        self.bn, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            if self.in_place:
                x += block(x)
            else:
                x = x + block(x)
        return self.fc(torch.relu(self.bn(x)).mean((2, 3)))


def test_a_model_that_adds_in_place_gets_the_same_reconstruction(with_bn_stats):
    torch.manual_seed(0)
    ref = with_bn_stats(_PreActNet(False))
    same = with_bn_stats(_PreActNet(True))
    same.load_state_dict(ref.state_dict())
    images = torch.randn(8, 1, 8, 8)
    runs = [dfquant.quantize(m, "genie", 4, 4, synthetic=images, recon_iters=5, batch_size=4, device="cpu", seed=0) for m in (ref, same)]
    untimed = [[n.split("; synthesis")[0] for n in r.notes] for _, r in runs]
    assert untimed[0] == untimed[1]  # the unit errors before -> after, among others
    with torch.no_grad():
        assert torch.equal(runs[0][0](images), runs[1][0](images))


def test_calibration_images_must_be_finite(model, images):
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DfquantError, match="NaN or inf"):
        dfquant.quantize(model, "genie", 4, 4, synthetic=bad, recon_iters=1, device="cpu")


@pytest.mark.parametrize("with_keep", [False, True])
def test_lsq_qdrop_equals_fake_quant_and_where_with_their_gradients(with_keep):
    from dfquant.genie.quantizer import lsq_qdrop, qdrop_mask
    from dfquant.quantizer import fake_quant

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g) * 2
    keep = qdrop_mask(x0.shape, 0.5, g, "cpu") if with_keep else None
    w = torch.randn(x0.shape, generator=g)
    results = []
    for fn in ("plain", "fused"):
        x, s, z = x0.clone().requires_grad_(True), torch.tensor(0.3, requires_grad=True), torch.tensor(3.0)
        if fn == "plain":
            out = fake_quant(x, s, z, 0, 15, ste=True)
            out = torch.where(keep.bool(), x, out) if with_keep else out
        else:
            out = lsq_qdrop(x, s, z, 0, 15, keep)
        results.append((out.detach(),) + torch.autograd.grad((out * w).sum(), [x, s]))
    (o1, gx1, gs1), (o2, gx2, gs2) = results
    assert torch.equal(o1, o2)
    assert torch.allclose(gx1, gx2, atol=1e-6) and torch.allclose(gs1, gs2, rtol=1e-5)
    assert (o1 != x0).any() and (gx1 == 0).any()  # both clipped and kept values are exercised


def test_qdrop_mask_is_the_rand_draw_as_0_or_1():
    from dfquant.genie.quantizer import keep_where, qdrop_mask

    mask = qdrop_mask((1000,), 0.3, torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(mask, (torch.rand(1000, generator=torch.Generator().manual_seed(5)) < 0.3).float())
    a, b = torch.randn(1000), torch.randn(1000)
    assert torch.equal(keep_where(mask, a, b), torch.where(mask.bool(), a, b))
