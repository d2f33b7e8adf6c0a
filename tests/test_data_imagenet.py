"""ImageNet-style folder loader: ImageFolder order and labels, 256/224 eval preprocessing, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfquant.data import load_eval_data
from dfquant.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_folder_loader, preprocess
from dfquant.errors import DfquantError


def _save(path: Path, w: int, h: int, rng: np.random.Generator, mode: str = "RGB") -> None:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """2 classes x 3 images of random sizes, mixed extensions and one grayscale image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "val"
    for cls, names in {"n02": ["a.JPEG", "b.jpg", "c.png"], "n01": ["x.jpeg", "y.JPG", "z.jpg"]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            w, h = (int(v) for v in rng.integers(40, 400, 2))
            mode = "L" if name == "z.jpg" else "RGB"
            _save(root / cls / name, w, h, rng, mode)
        (root / cls / "notes.txt").write_text("not an image")
    (root / "README").write_text("a file beside the class folders is ignored")
    return root


def test_loader_shapes_and_labels(folder: Path):
    loader = imagenet_folder_loader(folder, batch_size=4)
    assert loader.dataset.classes == ["n01", "n02"]
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.isfinite(x).all()
    names = [p.name for p, _ in loader.dataset.samples]
    assert names == ["x.jpeg", "y.JPG", "z.jpg", "a.JPEG", "b.jpg", "c.png"]


def test_limit_takes_first_files(folder: Path):
    loader = imagenet_folder_loader(folder, limit=4, batch_size=64)
    (x, y), = list(loader)
    assert x.shape == (4, 3, 224, 224)
    assert y.tolist() == [0, 0, 0, 1]
    assert len(imagenet_folder_loader(folder, limit=100).dataset) == 6


def test_load_eval_data_imagenet(folder: Path):
    loader = load_eval_data("imagenet", str(folder), limit=2)
    assert len(loader.dataset) == 2


def test_preprocess_constant_image():
    """A flat color maps exactly to (value/255 - mean)/std after resize + crop."""
    img = Image.new("RGB", (300, 500), (255, 128, 0))
    x = preprocess(img)
    assert x.shape == (3, 224, 224)
    for c, v in enumerate((255, 128, 0)):
        expect = (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(x[c], torch.full((224, 224), expect), atol=1e-5)


def test_preprocess_center_crop_geometry():
    """Shorter side goes to 256, then the central 224 square is kept (checked with a marked center)."""
    arr = np.zeros((512, 1024, 3), dtype=np.uint8)  # -> 256 x 512 after resize
    arr[:, 512 - 448 : 512 + 448] = 255  # white band is 896 px wide -> 448 px -> covers the 224 crop
    x = preprocess(Image.fromarray(arr))
    assert torch.allclose(x[0], torch.full((224, 224), (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]), atol=1e-5)
    arr[:, 512 - 100 : 512 + 100] = 0  # a black band 200 px -> 100 px in the center of the crop
    x = preprocess(Image.fromarray(arr))
    assert x[0, :, 112].max() < 0  # center column is black
    assert x[0, :, 0].min() > 0  # crop edges stay white


def test_error_missing(tmp_path: Path):
    with pytest.raises(DfquantError, match="not found"):
        imagenet_folder_loader(tmp_path / "nope")


def test_error_not_a_directory(tmp_path: Path):
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(DfquantError, match="not a folder"):
        imagenet_folder_loader(f)


def test_error_no_class_folders(tmp_path: Path):
    _save(tmp_path / "loose.jpg", 32, 32, np.random.default_rng(0))
    with pytest.raises(DfquantError, match="no class sub-folders"):
        imagenet_folder_loader(tmp_path)


def test_error_no_images(tmp_path: Path):
    (tmp_path / "cls_a").mkdir()
    (tmp_path / "cls_b").mkdir()
    (tmp_path / "cls_b" / "x.txt").write_text("text")
    with pytest.raises(DfquantError, match="no images found"):
        imagenet_folder_loader(tmp_path)


def test_error_unreadable_image(tmp_path: Path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.jpg").write_bytes(b"not a jpeg")
    loader = imagenet_folder_loader(tmp_path)
    with pytest.raises(DfquantError, match="broken.jpg"):
        next(iter(loader))


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_error_bad_limit(folder: Path, limit):
    with pytest.raises(DfquantError, match="limit"):
        imagenet_folder_loader(folder, limit=limit)


def test_messages_are_one_line(tmp_path: Path):
    for bad in (tmp_path / "nope", tmp_path):
        with pytest.raises(DfquantError) as info:
            imagenet_folder_loader(bad)
        assert "\n" not in str(info.value)


def test_an_image_too_large_to_decode_is_a_clear_error(tmp_path: Path, monkeypatch):
    (tmp_path / "cls").mkdir()
    _save(tmp_path / "cls" / "big.png", 64, 64, np.random.default_rng(0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: PIL's decompression-bomb refusal
    with pytest.raises(DfquantError, match="cannot read image .*big.png"):
        next(iter(imagenet_folder_loader(tmp_path)))


def test_torchvisions_image_extensions_are_read(tmp_path: Path):
    rng = np.random.default_rng(0)
    (tmp_path / "cls").mkdir()
    for ext in (".bmp", ".ppm", ".tif", ".webp", ".png"):
        _save(tmp_path / "cls" / f"img{ext}", 40, 30, rng)
    assert len(imagenet_folder_loader(tmp_path).dataset) == 5
