"""Data-free facts about the datasets' inputs: the normalised image range used to quantize it."""
import numpy as np
import pytest
import torch
from PIL import Image

from dfquant.data import input_normalization, input_range, load_digits_split
from dfquant.data.cifar import normalize_cifar
from dfquant.data.imagenet import preprocess
from dfquant.errors import DfquantError


def test_cifar_range_is_exactly_what_black_and_white_pixels_become():
    extremes = torch.stack([torch.zeros(3, 2, 2, dtype=torch.uint8), torch.full((3, 2, 2), 255, dtype=torch.uint8)])
    x = normalize_cifar(extremes)
    lo, hi = input_range("cifar10")
    assert float(x.min()) == pytest.approx(lo) and float(x.max()) == pytest.approx(hi)


def test_imagenet_range_bounds_the_preprocessed_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 280, 3), dtype=np.uint8))
    x = preprocess(img)
    lo, hi = input_range("imagenet")
    assert lo - 1e-5 <= float(x.min()) and float(x.max()) <= hi + 1e-5


def test_digits_range_covers_the_embedded_images_and_is_reached():
    (xtr, _), (xte, _) = load_digits_split()
    x = torch.cat([xtr, xte])
    assert input_range("digits") == (float(x.min()), float(x.max())) == (-1.0, 1.0)
    assert input_normalization("digits") == ((0.5,), (0.5,))


def test_unknown_dataset_is_one_clear_error():
    with pytest.raises(DfquantError, match="no input normalization known for dataset 'svhn'"):
        input_range("svhn")


def _npz(tmp_path, labels, n=4):
    p = tmp_path / "c.npz"
    np.savez(p, images=np.zeros((n, 3, 32, 32), dtype=np.uint8), labels=labels)
    return p


@pytest.mark.parametrize(
    "labels,message",
    [
        (np.arange(4, dtype=np.float32) + 0.5, r"'labels' must be integer class indices, got float32"),
        (np.arange(10, 14), r"'labels' must be class indices in 0..9, found values 10..13"),
        (np.array([-1, 0, 1, 2]), r"'labels' must be class indices in 0..9, found values -1..2"),
    ],
)
def test_cifar_labels_must_be_integer_classes(tmp_path, labels, message):
    from dfquant.data import load_cifar10_npz

    p = _npz(tmp_path, labels)
    with pytest.raises(DfquantError, match=message) as info:
        load_cifar10_npz(p)
    assert "c.npz" in str(info.value)
    x, y = load_cifar10_npz(_npz(tmp_path, np.array([0, 9, 3, 3], dtype=np.uint8)))
    assert y.dtype == torch.int64 and y.tolist() == [0, 9, 3, 3]


@pytest.mark.parametrize("limit", [-3, 0, 2.5, True])
def test_a_limit_must_be_a_positive_integer_for_every_dataset(tmp_path, limit):
    from dfquant.data import load_eval_data

    p = _npz(tmp_path, np.arange(4))
    for name, path in (("cifar10", str(p)), ("digits", None)):
        with pytest.raises(DfquantError, match="limit must be a positive integer"):
            load_eval_data(name, path, limit=limit)
    assert load_eval_data("cifar10", str(p), limit=3)[1].tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Preprocessing per model: each registry entry's own input scaling and range
# --------------------------------------------------------------------------------------------

from dfquant.data import Preprocessing, dataset_preprocessing
from dfquant.models import create_model, input_range_of, list_models, model_spec, preprocessing_of

PIXELS = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)


@pytest.mark.parametrize(
    "name,rule",
    [
        ("mobilenet_v1", lambda p: p / 127.5 - 1),
        ("tiny_darknet", lambda p: p / 255),
        ("resnet18", lambda p: (p / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)),
        ("resnet20", lambda p: (p / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)),
    ],
)
def test_each_model_scales_pixels_by_its_own_rule(name, rule):
    pre = preprocessing_of(name)
    x = pre.normalize(PIXELS)
    assert torch.allclose(x, rule(PIXELS.double()).float(), atol=1e-6)
    lo, hi = input_range_of(name)
    assert (float(x.min()), float(x.max())) == pytest.approx((lo, hi), abs=1e-6)  # black and white reach it
    assert torch.allclose(pre.denormalize(x), PIXELS.float() / 255, atol=1e-6)


def test_every_registry_model_has_a_preprocessing_with_its_input_channels():
    for name in list_models():
        spec = model_spec(name)
        assert isinstance(spec.preprocessing, Preprocessing)
        assert spec.preprocessing.channels in (1, spec.input_size[0])
        assert create_model(name).preprocessing is spec.preprocessing


def test_a_standardized_image_maps_to_the_same_pixels_in_another_input_scaling():
    tv, unit, keras = dataset_preprocessing("imagenet"), create_model("tiny_darknet").preprocessing, create_model("mobilenet_v1").preprocessing
    assert create_model("tiny_darknet").dataset == "imagenet"
    assert tv.from_standardized(tv, 3) is None and dataset_preprocessing("cifar10").from_standardized(tv, 3) is None
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for pre in (unit, keras):
        scale, shift = pre.from_standardized(tv, 3)
        assert scale.shape == shift.shape == (3, 1, 1)
        assert torch.allclose(pre.denormalize(z * scale + shift), tv.denormalize(z), atol=1e-6)  # the same pixels
    scale, shift = unit.from_standardized(tv, 3)
    assert scale.flatten().tolist() == pytest.approx(list(tv.std)) and shift.flatten().tolist() == pytest.approx(list(tv.mean))


def test_imagenet_models_of_the_same_dataset_differ_in_input_range():
    assert input_range_of("mobilenet_v1") == (-1.0, 1.0)
    assert input_range_of("tiny_darknet") == (0.0, 1.0)
    assert input_range_of("resnet18") == input_range_of("mobilenet_v2") == input_range("imagenet")
    assert input_range_of("resnet20") == input_range("cifar10")
    assert input_range_of("digits_cnn") == input_range("digits") == (-1.0, 1.0)
    m = create_model("tiny_darknet")
    assert input_range_of(m) == (0.0, 1.0)
    with pytest.raises(DfquantError, match="cannot tell the model's input preprocessing"):
        preprocessing_of(torch.nn.Linear(2, 2))


def test_the_dataset_level_functions_keep_their_values():
    assert input_normalization("imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_normalization("cifar10") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    lo, hi = input_range("imagenet")
    assert lo == pytest.approx(-0.485 / 0.229) and hi == pytest.approx((1 - 0.406) / 0.225)


def test_digits_can_be_loaded_with_another_scaling():
    from dfquant.data import load_eval_data

    x, _ = load_eval_data("digits", preprocessing=Preprocessing((0.0,), (1.0,)))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    with pytest.raises(DfquantError, match="grayscale"):
        load_eval_data("digits", preprocessing="resnet18")


@pytest.mark.parametrize(
    "mean,std,message",
    [((0.5,), (0.0,), "std positive"), ((0.5, 0.5), (0.5,), "one mean and one std per channel"), ((float("nan"),), (1.0,), "finite")],
)
def test_a_bad_preprocessing_is_refused(mean, std, message):
    with pytest.raises(DfquantError, match=message):
        Preprocessing(mean, std)


def test_normalize_refuses_other_pixel_types_and_channel_counts():
    pre = preprocessing_of("mobilenet_v1")
    with pytest.raises(DfquantError, match="uint8 pixels .* or floats in \\[0, 1\\], got int16"):
        pre.normalize(torch.zeros(1, 3, 2, 2, dtype=torch.int16))
    with pytest.raises(DfquantError, match="images have 4 channels"):
        pre.normalize(torch.zeros(1, 4, 2, 2, dtype=torch.uint8))
    assert torch.equal(pre.normalize(np.full((3, 2, 2), 255, np.uint8)), torch.ones(3, 2, 2))


def test_clamp_keeps_valid_inputs_and_moves_others_to_the_nearest_valid_image():
    pre = preprocessing_of("resnet18")
    valid = pre.normalize(torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8))
    assert torch.equal(pre.clamp(valid), valid)
    wild = torch.randn(2, 3, 4, 4) * 10
    clipped = pre.clamp(wild)
    pixels = pre.denormalize(clipped)
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
    inside = (pre.denormalize(wild) >= 0) & (pre.denormalize(wild) <= 1)
    assert torch.equal(clipped[inside], wild[inside])


def test_a_channel_last_cifar_npz_is_read_with_a_note(tmp_path, capsys):
    """(N, 32, 32, 3) uint8 images are unambiguous: read as such, with a note (issue 25)."""
    import numpy as np
    import pytest

    from dfquant.cli import main
    from dfquant.data import load_cifar10_npz
    from dfquant.errors import DfquantNote

    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(6, dtype=np.int64)
    np.savez(tmp_path / "chw.npz", images=chw, labels=labels)
    np.savez(tmp_path / "hwc.npz", images=chw.transpose(0, 2, 3, 1), labels=labels)
    with pytest.warns(DfquantNote, match="channel-last"):
        x_hwc, _ = load_cifar10_npz(tmp_path / "hwc.npz")
    x_chw, _ = load_cifar10_npz(tmp_path / "chw.npz")
    assert torch.equal(x_hwc, x_chw)
    code = main(["--no-progress", "evaluate", "--model", "resnet20", "--random-init", "--eval", "cifar10", "--data", str(tmp_path / "hwc.npz")])
    err = capsys.readouterr().err
    assert code == 0 and "dfquant: note:" in err and "channel-last" in err and "Warning" not in err
