import json

import pytest
import torch

import dfquant
from dfquant.errors import DfquantError
from dfquant.serialization import load_quantized, read_metadata, save_quantized


@pytest.mark.parametrize("fold,per_channel", [(False, True), (True, True), (False, False)])
def test_save_load_exact(digits, tmp_path, fold, per_channel):
    model, (x, _) = digits
    q, report = dfquant.quantize(model, "squant", 4, 4, fold_bn=fold, per_channel=per_channel)
    assert q.conv2.weight_scale.numel() == (q.conv2.weight_int.shape[0] if per_channel else 1)
    path, side = save_quantized(q, tmp_path / "digits", model_name="digits_cnn", config=report.config, report=report.to_dict())
    assert path.suffix == ".safetensors" and side.suffix == ".json"
    q2, info = load_quantized(path)
    s1, s2 = q.state_dict(), q2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert s2["conv2.weight_int"].dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    doc = json.loads(side.read_text())
    assert doc["config"]["method"] == "squant" and doc["layers"]["conv2"]["w_bits"] == 4
    assert sorted(f.name for f in tmp_path.iterdir()) == ["digits.json", "digits.safetensors"]


def test_load_with_explicit_architecture(digits, tmp_path):
    q, _ = dfquant.quantize(digits[0], "rtn", 6, 6)
    path, _ = save_quantized(q, tmp_path / "m.safetensors")
    with pytest.raises(DfquantError, match="outside the registry"):
        load_quantized(path)
    q2, _ = load_quantized(path, model=dfquant.create_model("digits_cnn"))
    assert torch.equal(q2.fc.weight_int, q.fc.weight_int)


def test_wrong_files(tmp_path):
    with pytest.raises(DfquantError, match="not found"):
        read_metadata(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DfquantError, match="not a safetensors"):
        read_metadata(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(other))
    with pytest.raises(DfquantError, match="not a dfquant"):
        read_metadata(other)


def test_architecture_mismatch(digits, tmp_path):
    q, _ = dfquant.quantize(digits[0], "rtn", 4, 4)
    path, _ = save_quantized(q, tmp_path / "m", model_name="digits_cnn")
    with pytest.raises(DfquantError):
        load_quantized(path, model=dfquant.create_model("resnet20"))
