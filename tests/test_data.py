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
