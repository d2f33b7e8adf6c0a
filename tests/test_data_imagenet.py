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


# --------------------------------------------------------------------------------------------
# .npz files of preprocessed images (the shared imagenet-nips17dev-1000-224.npz layout)
# --------------------------------------------------------------------------------------------

from dfquant.assets import asset_path
from dfquant.data.imagenet import image_layout, load_imagenet_npz
from dfquant.data.preprocessing import TF_INCEPTION, TORCHVISION_IMAGENET, UNIT_RANGE


def _npz(path: Path, n: int = 5, hw=(8, 6), layout: str = "CHW", seed: int = 0, **override) -> Path:
    rng = np.random.default_rng(seed)
    chw = rng.integers(0, 256, (n, 3, *hw), dtype=np.uint8)
    arrays = {
        "images": chw if layout == "CHW" else chw.transpose(0, 2, 3, 1).copy(),
        "labels": rng.integers(0, 1000, n).astype(np.int64),
        "files": np.array([f"img{i}.jpg" for i in range(n)]),
    }
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez_compressed(path, **arrays)
    return path


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_npz_channel_first_and_channel_last_give_the_same_batches(tmp_path: Path):
    chw = _all(load_imagenet_npz(_npz(tmp_path / "chw.npz"), batch_size=2))
    from dfquant.errors import DfquantNote

    with pytest.warns(DfquantNote, match="channel-last"):
        hwc = _all(load_imagenet_npz(_npz(tmp_path / "hwc.npz", layout="HWC"), batch_size=2))
    assert chw[0].shape == (5, 3, 8, 6) and chw[0].dtype == torch.float32 and chw[1].dtype == torch.int64
    assert torch.equal(chw[0], hwc[0]) and torch.equal(chw[1], hwc[1])
    raw = np.load(tmp_path / "chw.npz")
    assert torch.equal(chw[0], TORCHVISION_IMAGENET.normalize(raw["images"]))  # default: torchvision's scaling
    assert chw[1].tolist() == raw["labels"].tolist()


def test_npz_batches_limit_and_names(tmp_path: Path):
    loader = load_imagenet_npz(_npz(tmp_path / "a.npz", n=7), batch_size=3, limit=5)
    assert [tuple(x.shape) for x, _ in loader] == [(3, 3, 8, 6), (2, 3, 8, 6)]
    assert len(loader.dataset) == 5 and loader.dataset.files == [f"img{i}.jpg" for i in range(5)]
    full = _all(load_imagenet_npz(tmp_path / "a.npz"))
    assert torch.equal(_all(loader)[0], full[0][:5])


@pytest.mark.parametrize("pre,lo,hi", [(TF_INCEPTION, -1.0, 1.0), (UNIT_RANGE, 0.0, 1.0)])
def test_npz_is_scaled_with_the_models_preprocessing(tmp_path: Path, pre, lo, hi):
    images = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    images[1] = 255
    images[0, 1, 0, 0] = 51
    p = _npz(tmp_path / "bw.npz", images=images, labels=np.array([0, 1]), files=None)
    name = {TF_INCEPTION: "mobilenet_v1", UNIT_RANGE: "tiny_darknet"}[pre]
    x, _ = _all(load_eval_data("imagenet", str(p), preprocessing=name))
    assert float(x[0].min()) == lo and float(x[1].max()) == hi
    expect = 51 / 127.5 - 1 if pre is TF_INCEPTION else 51 / 255
    assert float(x[0, 1, 0, 0]) == pytest.approx(expect, abs=1e-6)
    assert (lo, hi) == pre.input_range()


def test_load_eval_data_reads_an_npz_or_a_folder(tmp_path: Path, folder: Path):
    p = _npz(tmp_path / "e.npz", n=4)
    assert len(load_eval_data("imagenet", str(p), limit=3).dataset) == 3
    assert len(load_eval_data("imagenet", str(folder), limit=3, preprocessing="tiny_darknet").dataset) == 3
    x, _ = next(iter(load_eval_data("imagenet", str(folder), preprocessing="tiny_darknet")))
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0  # x / 255 for Tiny Darknet, not mean/std
    with pytest.raises(DfquantError, match="limit must be a positive integer"):
        load_eval_data("imagenet", str(p), limit=0)


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(images=np.zeros((2, 3, 4), np.uint8)), r"'images' must be 4-D"),
        (dict(images=np.zeros((2, 3, 8, 3), np.uint8)), r"could be channel-first or channel-last"),
        (dict(images=np.zeros((2, 4, 8, 8), np.uint8)), r"must be \(N, 3, H, W\) or \(N, H, W, 3\)"),
        (dict(images=np.zeros((2, 3, 8, 8), np.float32)), r"'images' must be uint8 pixels \(0..255\), got float32"),
        (dict(labels=np.arange(3)), r"'labels' must have shape \(5,\)"),
        (dict(labels=np.arange(5) + 0.5), r"'labels' must be integer class indices, got float64"),
        (dict(labels=np.array([0, 1, 2, 3, 1000])), r"class indices in 0..999, found values 0..1000"),
        (dict(labels=None), r"must hold arrays 'images' and 'labels', found \['files', 'images'\]"),
        (dict(files=np.array(["a"])), r"'files' must hold one name per image"),
    ],
)
def test_npz_with_a_wrong_layout_is_one_clear_error(tmp_path: Path, override, message):
    p = _npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DfquantError, match=message) as info:
        load_imagenet_npz(p)
    assert "\n" not in str(info.value) and "bad.npz" in str(info.value)


def test_npz_unreadable_or_missing_file(tmp_path: Path):
    (tmp_path / "x.npz").write_bytes(b"not a zip file")
    with pytest.raises(DfquantError, match="cannot read .*x.npz as an .npz file"):
        load_imagenet_npz(tmp_path / "x.npz")
    with pytest.raises(DfquantError, match="not found"):
        load_eval_data("imagenet", str(tmp_path / "missing.npz"))


def test_image_layout_rules():
    assert image_layout((10, 3, 224, 224)) == "CHW"
    assert image_layout((10, 224, 224, 3)) == "HWC"
    assert image_layout((10, 3, 5, 4)) == "CHW"
    with pytest.raises(DfquantError, match="could be channel-first or channel-last"):
        image_layout((10, 3, 3, 3))


def test_folder_images_are_scaled_with_the_given_preprocessing():
    img = Image.new("RGB", (300, 500), (255, 51, 0))
    x = preprocess(img, TF_INCEPTION)
    for c, v in enumerate((255, 51, 0)):
        assert torch.allclose(x[c], torch.full((224, 224), v / 127.5 - 1), atol=1e-6)


def test_the_shared_photos_file_has_the_documented_layout():
    p = asset_path("data/imagenet-nips17dev-1000-224.npz")
    if p is None:
        pytest.skip("shared asset data/imagenet-nips17dev-1000-224.npz not found (set DFQUANT_ASSETS to the shared/ folder)")
    loader = load_imagenet_npz(p, limit=8, batch_size=8, preprocessing=TF_INCEPTION)
    (x, y), = list(loader)
    assert x.shape == (8, 3, 224, 224) and y.dtype == torch.int64
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(loader.dataset.files) == 8
