"""Pictures: valid PNG files, and a missing matplotlib is one clear line naming the extra."""
import builtins
import json

import pytest
from PIL import Image

import dfquant
from dfquant.cli import main
from dfquant.errors import DfquantError
from dfquant.plots import plot_drops, plot_layers, require_matplotlib


def _is_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
        return im.size


def test_layer_plot_and_drop_plot_are_valid_pngs(digits, tmp_path):
    model = digits[0]
    _, squant = dfquant.quantize(model, "squant", 3, 4)
    _, rtn = dfquant.quantize(model, "rtn", 3, 4)
    w, h = _is_png(plot_layers(squant, rtn, tmp_path / "layers.png"))
    assert w > 100 and h > 100
    panel = {"settings": ["W4A4", "W2A4"], "methods": {"RTN": [1.0, 50.0], "SQuant": [0.5, None]}}
    _is_png(plot_drops({"digits": panel}, tmp_path / "drops.png", "t"))
    with pytest.raises(DfquantError, match="give a .png file name"):
        plot_drops({"digits": panel}, tmp_path / "drops.jpg")


def test_quantize_plot_from_the_command_line(capsys, digits, tmp_path):
    code = main(["--no-progress", "quantize", "--model", "digits_cnn", "--w-bits", "3", "--eval", "none", "--plot", str(tmp_path / "q.png"), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["plot"] == str(tmp_path / "q.png")
    _is_png(tmp_path / "q.png")


def test_a_missing_matplotlib_is_one_clear_line(capsys, digits, monkeypatch, tmp_path):
    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(DfquantError, match=r'pip install -e "\.\[plot\]"'):
        require_matplotlib()
    code = main(["--no-progress", "quantize", "--model", "digits_cnn", "--eval", "none", "--plot", str(tmp_path / "q.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "[plot]" in err and not list(tmp_path.iterdir())
