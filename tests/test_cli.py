"""The command line: the demo end to end, quantize/save/evaluate, and one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from dfquant.cli import main


def run(capsys, *argv):
    code = main(["--no-progress", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_json(capsys, digits):
    code, out, _ = run(capsys, "demo", "--json")
    assert code == 0
    doc = json.loads(out)
    labels = {(r["bits"], r["method"]) for r in doc["rows"]}
    for bits in ("W8A8", "W6A6", "W4A4"):
        for m in ("RTN", "SQuant-E", "SQuant-K", "SQuant-C", "SQuant (E+K+C)"):
            assert (bits, m) in labels
    w8 = [r for r in doc["rows"] if r["bits"] == "W8A8"]
    assert all(r["top1"] >= doc["fp32_top1"] - 1.0 for r in w8)


def test_demo_table(capsys, digits):
    code, out, _ = run(capsys, "demo")
    assert code == 0 and "SQuant-K" in out and "W4A4" in out and "FP32" in out


def test_quantize_save_and_evaluate_again(capsys, digits, tmp_path):
    out_file = tmp_path / "digits_w4a4"
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--method", "squant", "--w-bits", "4", "--a-bits", "4", "--out", str(out_file), "--json")
    assert code == 0
    res = json.loads(out)
    for key in ("fp32_top1", "quant_top1", "quant_time_s", "method", "w_bits", "a_bits"):
        assert key in res
    assert res["method"] == "squant" and res["w_bits"] == 4 and res["a_bits"] == 4
    assert (tmp_path / "digits_w4a4.safetensors").exists() and (tmp_path / "digits_w4a4.json").exists()
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "digits_w4a4.safetensors"), "--json")
    assert code == 0
    assert json.loads(out)["top1"] == pytest.approx(res["quant_top1"])


def test_quantize_report_table(capsys, digits):
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--w-bits", "6", "--a-bits", "none", "--report")
    assert code == 0 and "rel.err" in out and "W6Afp" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["quantize", "--model", "nope"], "unknown model 'nope'"),
        (["quantize", "--model", "digits_cnn", "--method", "magic"], "unknown method 'magic'"),
        (["quantize", "--model", "digits_cnn", "--w-bits", "9"], "w_bits must be between 2 and 8"),
        (["quantize", "--model", "digits_cnn", "--a-bits", "1"], "a_bits must be between 2 and 8"),
        (["quantize", "--model", "resnet18"], "--weights PATH is required"),
        (["quantize", "--model", "digits_cnn", "--weights", "/no/such/file.pth"], "weights file not found"),
        (["evaluate", "/no/such/model.safetensors"], "not found"),
        (["quantize", "--model", "digits_cnn", "--eval", "cifar10", "--data", "/no/such.npz"], "not found"),
    ],
)
def test_errors_are_one_line(capsys, digits, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("dfquant: error:") and message in lines[0], err


def test_wrong_weights_and_wrong_data(capsys, digits, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--weights", str(junk))
    assert code == 2 and "not a PyTorch checkpoint" in err
    import torch

    torch.save({"conv1.weight": torch.zeros(3, 3)}, tmp_path / "small.pth")
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--weights", str(tmp_path / "small.pth"))
    assert code == 2 and "does not fit model" in err
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 3, 16, 16), np.uint8), labels=np.zeros(4, np.int64))
    code, _, err = run(capsys, "quantize", "--model", "resnet20", "--random-init", "--eval", "cifar10", "--data", str(tmp_path / "bad.npz"))
    assert code == 2 and "shape (N, 3, 32, 32)" in err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "dfquant.cli", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "resnet20" in out.stdout and "squant" in out.stdout


def test_lp_weight_grid_from_the_command_line_saves_and_reloads(capsys, digits, tmp_path):
    out_file = tmp_path / "digits_w3_lp"
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--method", "squant", "--w-bits", "3", "--a-bits", "none", "--w-range", "lp", "--out", str(out_file), "--json")
    assert code == 0
    res = json.loads(out)
    assert json.loads((tmp_path / "digits_w3_lp.json").read_text())["config"]["w_range"] == "lp"
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "digits_w3_lp.safetensors"), "--json")
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(res["quant_top1"])
