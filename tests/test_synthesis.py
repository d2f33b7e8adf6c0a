"""Data synthesis (Genie-D and the ZeroQ baseline) on the embedded digits CNN, at a tiny budget."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dfquant.data import Preprocessing, digits_model
from dfquant.errors import DfquantError
from dfquant.genie import GenieGenerator, SwingConv2d, bn_statistics_loss, reflect_shift, synthesize
from dfquant.genie.distill import _apply_swing
from dfquant.io.images import (
    grid_path,
    images_metadata,
    images_path,
    load_image_files,
    load_images,
    save_image_grid,
    save_images,
)
from dfquant.models import create_model

TINY = dict(iters=60, batch_size=32, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return digits_model()


@pytest.fixture(scope="module")
def synthetic(model):
    return {m: synthesize(model, 32, method=m, seed=0, **TINY) for m in ("genie", "zeroq")}


def _noise_like(x, seed=1):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["genie", "zeroq"])
def test_bn_loss_clearly_below_noise(model, synthetic, method):
    x = synthetic[method]
    noise = _noise_like(x)
    with torch.no_grad():
        batch_x, batch_noise = bn_statistics_loss(model, x), bn_statistics_loss(model, noise)
        ps_x, ps_noise = (bn_statistics_loss(model, t, per_sample=True) for t in (x, noise))
    assert torch.isfinite(batch_x) and torch.isfinite(ps_x)
    if method == "genie":  # Genie's objective: batch statistics
        assert batch_x < 0.5 * batch_noise, (batch_x, batch_noise)
    else:  # ZeroQ's objective: per-image statistics
        assert ps_x < 0.2 * ps_noise, (ps_x, ps_noise)
        assert batch_x < batch_noise, (batch_x, batch_noise)


@pytest.mark.parametrize("method", ["genie", "zeroq"])
def test_output_shape_dtype_device(model, synthetic, method):
    x = synthetic[method]
    assert x.shape == (32, 1, 8, 8)
    assert x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
    assert torch.isfinite(x).all()


def test_uneven_batches_and_progress_bar(model):
    x = synthesize(model, 10, batch_size=4, iters=3, progress=True)  # batches of 4, 3, 3
    assert x.shape == (10, 1, 8, 8)
    x = synthesize(model, 5, method="zeroq", batch_size=4, iters=2, progress=False)
    assert x.shape == (5, 1, 8, 8)


def test_genie_output_is_batch_normalized(model, synthetic):
    # The generator ends in BN without affine parameters (training mode): per channel, over the
    # batch, the returned images have mean 0 and (biased) variance 1.
    x = synthetic["genie"]
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3


class _UnitScaled(nn.Module):
    """The digits CNN fed pixels / 16 in [0, 1] (no standardization): the same function of pixels."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.preprocessing = Preprocessing((0.0,), (1.0,), "x / 16")
        self.dataset, self.input_size = "digits", inner.input_size

    def forward(self, x):
        return self.inner((x - 0.5) / 0.5)


@pytest.mark.parametrize("method", ["genie", "zeroq"])
def test_a_model_with_another_input_scaling_gets_the_same_pixels_in_its_own_input_space(model, method):
    # Both methods make standardized images; a model taking pixels in [0, 1] is fed, and given,
    # the same pixels in its own scale (a different optimization only by float rounding).
    kw = dict(method=method, iters=10, batch_size=8, seed=0, progress=False)
    unit = synthesize(_UnitScaled(model), 8, **kw)
    standard = synthesize(model, 8, **kw)
    assert torch.allclose(unit, standard * 0.5 + 0.5, atol=1e-3), (unit - (standard * 0.5 + 0.5)).abs().max()
    if method == "genie":  # the generator's affine-free BN: the dataset's pixel mean and std exactly
        assert (unit.mean(dim=(0, 2, 3)) - 0.5).abs().max() < 1e-4
        assert (unit.std(dim=(0, 2, 3), unbiased=False) - 0.5).abs().max() < 1e-3


@pytest.mark.parametrize("method", ["genie", "zeroq"])
def test_deterministic_for_a_seed(model, method):
    kw = dict(method=method, iters=8, batch_size=8, progress=False)
    a = synthesize(model, 8, seed=3, **kw)
    b = synthesize(model, 8, seed=3, **kw)
    c = synthesize(model, 8, seed=4, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_global_rng_untouched(model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    synthesize(model, 4, iters=2, batch_size=4, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_callers_model_unchanged():
    model = create_model("resnet20")  # random init is enough; it has two strided convs
    strided = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)}
    assert len(strided) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # the copy is put in eval mode, the caller's stays as it was
    x = synthesize(model, 4, iters=2, batch_size=4, swing=True, progress=False)
    assert x.shape == (4, 3, 32, 32)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, SwingConv2d) for m in model.modules())
    for name, conv in strided.items():
        assert model.get_submodule(name) is conv and type(conv) is nn.Conv2d
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_swing_conv_shifts_strided_convs_only():
    model = create_model("resnet20")
    n = _apply_swing(model, torch.Generator().manual_seed(0))
    swings = [m for m in model.modules() if isinstance(m, SwingConv2d)]
    assert n == len(swings) == 2
    assert all(s.conv.stride == (2, 2) for s in swings)

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    swing = SwingConv2d(conv, torch.Generator().manual_seed(0))
    x = torch.randn(1, 2, 8, 8)
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    candidates = [conv(padded[:, :, dy : dy + 8, dx : dx + 8]) for dy in range(3) for dx in range(3)]
    seen = set()
    with torch.no_grad():
        for _ in range(60):
            y = swing(x)
            assert y.shape == conv(x).shape
            hits = [i for i, c in enumerate(candidates) if torch.allclose(y, c)]
            assert hits, "output is not the conv of a reflect-padded, shifted input"
            seen.add(hits[0])
    assert len(seen) > 3  # the shift really is random
    one = torch.randn(1, 2, 1, 1)  # too small to reflect-pad: passed through unshifted
    assert torch.equal(swing(one), conv(one))


@pytest.mark.parametrize("jitter", [1, 2])
def test_reflect_shift_equals_reflect_pad_and_crop(jitter):
    # the GPU path of SwingConv2d: the same values as F.pad(mode="reflect") + crop, on both axes
    x = torch.randn(2, 3, 7, 5, requires_grad=True)
    for dy in range(2 * jitter + 1):
        for dx in range(2 * jitter + 1):
            ref = nn.functional.pad(x, (jitter,) * 4, mode="reflect")[:, :, dy : dy + 7, dx : dx + 5]
            out = reflect_shift(reflect_shift(x, dy - jitter, -2), dx - jitter, -1)
            assert torch.equal(out, ref)
            g = torch.randn_like(out)
            (gr,) = torch.autograd.grad(ref, x, g)
            (go,) = torch.autograd.grad(out, x, g)
            assert torch.allclose(go, gr, atol=1e-6)
    assert reflect_shift(x, 0, -1) is x
    with pytest.raises(ValueError, match="smaller than the size"):
        reflect_shift(x, 5, -1)


@pytest.mark.parametrize("size", [(1, 8, 8), (3, 32, 32), (3, 224, 224), (3, 30, 30)])
def test_generator_sizes(size):
    gen = GenieGenerator(size, latent_dim=8)  # small latent keeps the 224 linear layer light
    with torch.no_grad():
        y = gen(torch.randn(2, 8))
    assert y.shape == (2, *size)


def test_bn_loss_has_gradient_and_restores_mode(model):
    model.train()
    try:
        running = [b.running_mean.clone() for b in model.modules() if isinstance(b, nn.BatchNorm2d)]
        x = torch.randn(4, 1, 8, 8, requires_grad=True)
        bn_statistics_loss(model, x).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert model.training
        now = [b.running_mean for b in model.modules() if isinstance(b, nn.BatchNorm2d)]
        assert all(torch.equal(a, b) for a, b in zip(running, now))
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def test_errors(model):
    no_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(DfquantError, match="has no BatchNorm2d layer with running statistics: Genie/ZeroQ synthesis needs BN statistics"):
        synthesize(no_bn, 4, input_size=(1, 8, 8), progress=False)
    with pytest.raises(DfquantError, match="has no BatchNorm2d layer"):
        bn_statistics_loss(no_bn, torch.randn(2, 1, 8, 8))
    for bad_n in (0, -1, 2.5):
        with pytest.raises(DfquantError, match="positive integer"):
            synthesize(model, bad_n, progress=False)
    with pytest.raises(DfquantError, match="unknown synthesis method"):
        synthesize(model, 4, method="dream", progress=False)
    with pytest.raises(DfquantError, match="unknown device"):
        synthesize(model, 4, device="tpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(DfquantError, match="CUDA is not available"):
            synthesize(model, 4, device="cuda", progress=False)
    with pytest.raises(DfquantError, match="input size"):
        synthesize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), 4, progress=False)
    with pytest.raises(DfquantError, match="only to method='genie'"):
        synthesize(model, 4, method="zeroq", lr_g=0.1, progress=False)
    with pytest.raises(DfquantError, match="at least 2 images"):
        synthesize(model, 1, progress=False)


def test_save_images_round_trip(tmp_path, synthetic):
    x = synthetic["genie"]
    (tmp_path / "sub").mkdir()
    path = save_images(x, tmp_path / "sub" / "synthetic.safetensors", metadata={"method": "genie", "seed": 0})
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["synthetic.safetensors"]  # no temp file left
    y, meta = load_images(path, with_metadata=True)
    assert torch.equal(x, y)
    assert meta["method"] == "genie" and meta["seed"] == "0" and meta["shape"] == "32x1x8x8"
    save_images(x[:4], path)  # overwrite in place
    assert load_images(path).shape == (4, 1, 8, 8)
    with pytest.raises(DfquantError, match="not found"):
        load_images(tmp_path / "missing.safetensors")



def test_load_image_files_concatenates_parts_in_order(tmp_path, synthetic):
    a = save_images(synthetic["genie"][:5], tmp_path / "a.safetensors", metadata={"seed": 0})
    b = save_images(synthetic["zeroq"][:3], tmp_path / "b.safetensors", metadata={"seed": 1})
    x, metas = load_image_files([b, a])
    assert torch.equal(x, torch.cat([synthetic["zeroq"][:3], synthetic["genie"][:5]]))
    assert [m["seed"] for m in metas] == ["1", "0"]
    assert torch.equal(load_image_files(str(a))[0], synthetic["genie"][:5])
    assert images_metadata(b)["shape"] == "3x1x8x8"
    with pytest.raises(DfquantError, match="hold the same images"):
        load_image_files([a, b, a])
    with pytest.raises(DfquantError, match="not found"):
        images_metadata(tmp_path / "missing.safetensors")

def test_png_grid(tmp_path, synthetic):
    from PIL import Image

    grey = save_image_grid(synthetic["zeroq"], tmp_path / "grey.png", nrow=8)
    with Image.open(grey) as img:
        img.load()
        assert img.mode == "L" and img.size[0] > 8 * 8 and img.size[1] > 4 * 8
    rgb = save_image_grid(
        torch.randn(70, 3, 32, 32), tmp_path / "rgb.png", mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26)
    )
    with Image.open(rgb) as img:
        img.load()
        assert img.mode == "RGB"
        # at most 64 images: 8 x 8 cells of 64 px (32 px enlarged x2) with 2 px gutters
        assert img.size == (8 * 66 + 2, 8 * 66 + 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "rgb.png"]


def test_image_file_names_keep_their_dots(tmp_path):
    assert images_path("a/syn_seed0.5") == Path("a/syn_seed0.5.safetensors")
    assert images_path("a/s.safetensors") == Path("a/s.safetensors")
    assert grid_path("a/syn_seed0.5") == grid_path("a/syn_seed0.5.safetensors") == Path("a/syn_seed0.5.png")
    x = torch.randn(3, 1, 8, 8)
    a = save_images(x, tmp_path / "syn_seed0.5", metadata={"seed": 0})
    b = save_images(x, tmp_path / "syn_seed0.7", metadata={"seed": 1})
    assert (a.name, b.name) == ("syn_seed0.5.safetensors", "syn_seed0.7.safetensors")
    assert load_images(a, with_metadata=True)[1]["seed"] == "0" and load_images(b, with_metadata=True)[1]["seed"] == "1"
    png = save_image_grid(x, grid_path(a))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn_seed0.5.png", "syn_seed0.5.safetensors", "syn_seed0.7.safetensors"]
    assert png.name == "syn_seed0.5.png"


def test_saving_creates_no_folders_and_refuses_bad_targets(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(DfquantError, match="output folder does not exist: .*no"):
        save_images(x, tmp_path / "no" / "sub" / "s.safetensors")
    with pytest.raises(DfquantError, match="output folder does not exist"):
        save_image_grid(x, tmp_path / "no" / "s.png")
    with pytest.raises(DfquantError, match="give a .safetensors name .*the .png grid is written beside it"):
        save_images(x, tmp_path / "syn.png")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(DfquantError, match="that is a folder"):
        save_images(x, tmp_path / "d")
    with pytest.raises(DfquantError, match="names a folder"):
        save_images(x, str(tmp_path) + "/")
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_images_files_are_byte_identical_with_sorted_metadata_and_umask_mode(tmp_path):
    import json
    import os

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    meta = {"model": "digits_cnn", "method": "genie", "seed": 7, "iters": 3, "batch_size": 2}
    old = os.umask(0o022)
    try:
        files = [save_images(x, tmp_path / f"s{i}", metadata=meta) for i in range(4)]
    finally:
        os.umask(old)
    data = [f.read_bytes() for f in files]
    assert all(d == data[0] for d in data[1:])  # the writer's hash-map order would differ between calls
    n = int.from_bytes(data[0][:8], "little")
    stored = json.loads(data[0][8 : 8 + n])["__metadata__"]
    assert list(stored) == sorted(stored) and stored["seed"] == "7"
    assert torch.equal(load_images(files[0]), x)
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)


def test_a_bn_on_a_1x1_map_gives_finite_zeroq_images():
    """A BN after global pooling sees one value per image and channel: ZeroQ's per-image std is 0 there."""
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4)
    ).eval()
    for method in ("zeroq", "genie"):
        x = synthesize(m, 4, method=method, input_size=(3, 8, 8), iters=3, batch_size=4, progress=False)
        assert torch.isfinite(x).all()


class _ReadsItsConv(nn.Module):
    """A forward that reads a strided conv's attribute and a BN called by keyword."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        k = self.conv.stride[0]
        return self.fc(torch.relu(self.bn(input=self.conv(x[:, :, ::k, ::k]))).mean((2, 3)))


def test_swing_conv_keeps_the_wrapped_convs_attributes_and_bn_keyword_calls_are_tapped():
    m = _ReadsItsConv().eval()
    x = synthesize(m, 4, input_size=(3, 16, 16), iters=2, batch_size=4, progress=False)
    assert x.shape == (4, 3, 16, 16) and torch.isfinite(x).all()
    s = SwingConv2d(nn.Conv2d(3, 4, 3, stride=2), torch.Generator().manual_seed(0))
    assert s.stride == (2, 2) and s.weight is s.conv.weight


def test_half_precision_models_and_wrong_input_sizes(model):
    x = synthesize(copy.deepcopy(model).half(), 4, iters=2, batch_size=4, progress=False)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    with pytest.raises(DfquantError, match=r"cannot run on an input of size \(3, 8, 8\)"):
        synthesize(model, 4, input_size=(3, 8, 8), progress=False)
    with pytest.raises(DfquantError, match=r"split into \[2, 1\]"):
        synthesize(model, 3, batch_size=2, progress=False)


def test_synthesize_is_part_of_the_top_level_api():
    import dfquant

    assert dfquant.synthesize is synthesize


def test_a_bn_input_written_in_place_is_a_clear_error():
    class InPlace(nn.Module):  # pre-activation block: bn reads x, then x += f(x) rewrites it
        def __init__(self):
            super().__init__()
            self.stem, self.bn, self.conv = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
            self.bn_out, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            x = self.stem(x)
            x += self.conv(torch.relu(self.bn(x)))
            return self.fc(torch.relu(self.bn_out(x)).mean((2, 3)))

    with pytest.raises(DfquantError, match="in place after the BN has read it"):
        synthesize(InPlace().eval(), 4, input_size=(3, 8, 8), iters=2, batch_size=4, progress=False)


def _grads(fn, x, weights):
    """Values of ``fn(x)`` (a tensor or tuple) and the gradient of a fixed random projection of them."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return [o.detach() for o in outs], torch.autograd.grad(loss, [x])


def test_batch_std_mean_equals_std_mean_with_its_gradient():
    from dfquant.genie.bns_loss import batch_std_mean

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 4, 3, generator=g) * 3 + 2
    x[:, 2] = 1.5  # a constant channel: std 0, where autograd's std gives the mean's gradient alone
    w = (torch.randn(5, generator=g), torch.randn(5, generator=g))
    (s1, m1), g1 = _grads(lambda t: torch.std_mean(t, dim=(0, 2, 3)), x, w)
    (s2, m2), g2 = _grads(batch_std_mean, x, w)
    assert torch.allclose(s1, s2, atol=1e-5) and torch.allclose(m1, m2, atol=1e-5) and s2[2] == 0
    assert torch.allclose(g1[0], g2[0], atol=1e-6)
    xd = torch.randn(3, 2, 2, 2, dtype=torch.double, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(batch_std_mean, (xd,))


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 2, 1, 1), (1, 4, 2, 5)])
def test_upsample_conv3x3_equals_upsampling_then_the_conv(shape):
    from dfquant.genie.distill import upsample_conv3x3

    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 3, 3, padding=1)
    x = torch.randn(shape, requires_grad=True)
    plain = conv(torch.nn.functional.interpolate(x, scale_factor=2))
    fused = upsample_conv3x3(x, conv)
    assert fused.shape == plain.shape and torch.allclose(fused, plain, atol=1e-5)
    w = torch.randn(plain.shape)
    g_plain = torch.autograd.grad((plain * w).sum(), [x, conv.weight, conv.bias])
    g_fused = torch.autograd.grad((fused * w).sum(), [x, conv.weight, conv.bias])
    for a, b in zip(g_plain, g_fused):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)


def test_generator_output_unchanged_by_the_fused_upsampling(monkeypatch):
    import dfquant.genie.distill as distill

    torch.manual_seed(1)
    gen = GenieGenerator((3, 14, 10)).train()
    z = torch.randn(5, 256)
    fused = gen(z)
    monkeypatch.setattr(distill, "_fusable", lambda up, conv: False)
    assert torch.allclose(fused, gen(z), atol=1e-5)
