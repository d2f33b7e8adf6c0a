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
