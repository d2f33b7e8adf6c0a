import json
from pathlib import Path

import pytest
import torch

import dfquant
from dfquant.errors import DfquantError, DfquantNote
from dfquant.io.serialization import file_info, load_quantized, read_metadata, save_quantized

# the hand-edited files below carry no digests (see _write): their "no digests" note is expected
pytestmark = pytest.mark.filterwarnings("ignore::dfquant.errors.DfquantNote")


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


# --- file names, modes, and what a load refuses ------------------------------------------------

import os  # noqa: E402

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dfquant.io.serialization import model_paths  # noqa: E402


@pytest.fixture(scope="module")
def saved(digits, tmp_path_factory):
    """A W4A4 rtn digits model saved once: (qmodel, path, its metadata dict, its tensors)."""
    q, report = dfquant.quantize(digits[0], "rtn", 4, 4)
    path, _ = save_quantized(q, tmp_path_factory.mktemp("saved") / "good", model_name="digits_cnn", config=report.config)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dfquant"])
    return q, path, meta, load_file(str(path))


def _write(tmp_path, name, meta, tensors, raw=None, digests=False):
    """A hand-edited file; without its digests (as an edit that also removed them would leave it),
    so that the checks behind the digests are the ones tested."""
    p = tmp_path / name
    if meta is not None and not digests:
        meta = {k: v for k, v in meta.items() if k not in ("digests", "config_digest")}
    save_file(tensors, str(p), metadata={"dfquant": raw if raw is not None else json.dumps(meta)})
    return p


def test_a_changed_tensor_or_config_is_refused_by_its_digest(saved, tmp_path):
    _, _, meta, tensors = saved
    assert set(meta["digests"]) == set(tensors)
    flipped = _set(tensors, "conv2.weight_int", tensors["conv2.weight_int"].clone())
    flipped["conv2.weight_int"].view(-1)[0] ^= 1  # one bit
    for name, m, t in (("tensor", meta, flipped), ("config", json.loads(json.dumps(meta)), tensors)):
        if name == "config":
            m["config"]["w_bits"] = 3
        bad = _write(tmp_path, f"{name}.safetensors", m, t, digests=True)
        match = "tensor 'conv2.weight_int' does not match its saved digest" if name == "tensor" else "the config does not match its saved digest"
        with pytest.raises(DfquantError, match=match):
            load_quantized(bad)
        with pytest.raises(DfquantError, match=match):
            file_info(bad)


def test_a_file_without_digests_loads_with_a_note_and_info_says_so(saved, tmp_path):
    q, _, meta, tensors = saved
    old = _write(tmp_path, "old.safetensors", meta, tensors)
    with pytest.warns(DfquantNote, match="carries no tensor digests"):
        loaded, _ = load_quantized(old)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), q.state_dict().values()))
    assert file_info(old)["digests"] == "absent"


def test_info_summarises_a_file_without_building_it(saved):
    _, path, _, tensors = saved
    info = file_info(path)
    assert (info["model_name"], info["method"], info["w_bits"], info["a_bits"], info["digests"]) == ("digits_cnn", "rtn", 4, 4, "ok")
    assert info["layers"]["conv2"] == dict(w_bits=4, a_bits=4) and info["layers"]["conv1"]["a_bits"] is None
    codes = sum(t.numel() for k, t in tensors.items() if k.endswith("weight_int"))
    assert info["weight_codes"] == codes and info["packed_weight_bytes"] == codes * 4 // 8
    assert info["protocol"]["act_range"] == "dfq" and info["file_bytes"] == path.stat().st_size


def test_names_with_dots_keep_their_tail(digits, tmp_path):
    assert model_paths("a/model.v1") == (Path("a/model.v1.safetensors"), Path("a/model.v1.json"))
    assert model_paths("lr0.04.safetensors") == (Path("lr0.04.safetensors"), Path("lr0.04.json"))
    assert model_paths("m.v2.json") == (Path("m.v2.safetensors"), Path("m.v2.json"))
    q, _ = dfquant.quantize(digits[0], "rtn", 8, 8)
    p1, s1 = save_quantized(q, tmp_path / "model.v1", model_name="digits_cnn")
    p2, s2 = save_quantized(q, tmp_path / "model.v2.json", model_name="digits_cnn")
    assert (p1.name, s1.name, p2.name, s2.name) == ("model.v1.safetensors", "model.v1.json", "model.v2.safetensors", "model.v2.json")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model.v1.json", "model.v1.safetensors", "model.v2.json", "model.v2.safetensors"]
    assert torch.equal(load_quantized(p1)[0].fc.weight_int, q.fc.weight_int)


def test_saved_files_get_the_umask_mode_not_0600(saved, tmp_path):
    old = os.umask(0o022)
    try:
        path, side = save_quantized(saved[0], tmp_path / "m", model_name="digits_cnn")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777, side.stat().st_mode & 0o777) == (0o644, 0o644)


def _drop(d, key):
    d.pop(key)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: _drop(m, "layers"), "lacks 'layers'"),
        (lambda m: _drop(m, "config"), "lacks 'config'"),
        (lambda m: _drop(m["layers"]["conv2"], "w_bits"), r"layers\['conv2'\] lacks 'w_bits'"),
        (lambda m: m["layers"]["conv2"].update(w_bits="4"), r"layers\['conv2'\] 'w_bits' must be an integer 2..8, found '4'"),
        (lambda m: m["layers"]["conv2"].update(kind="linear"), r"layers\['conv2'\] is a quantized linear, but this architecture has a Conv2d"),
        (lambda m: m["layers"].update(bn2=dict(m["layers"]["fc"])), r"layers\['bn2'\] is a quantized linear, but this architecture has a BatchNorm2d"),
        (lambda m: m["layers"].update(nope=dict(m["layers"]["fc"])), "layers names a layer 'nope' that this architecture"),
        (lambda m: m.update(folded_bn=["nope.bn"]), "folded_bn names a layer 'nope.bn'"),
        (lambda m: m.update(folded_bn=["relu2"]), "folded_bn names 'relu2', which is a ReLU"),
    ],
)
def test_edited_metadata_is_one_clear_error(saved, tmp_path, edit, message):
    _, _, meta, tensors = saved
    m = json.loads(json.dumps(meta))
    edit(m)
    bad = _write(tmp_path, "bad.safetensors", m, tensors)
    with pytest.raises(DfquantError, match=message) as info:
        load_quantized(bad)
    assert "bad.safetensors" in str(info.value)


@pytest.mark.parametrize("raw,message", [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object, found a list")])
def test_unreadable_metadata_is_one_clear_error(saved, tmp_path, raw, message):
    bad = _write(tmp_path, "bad.safetensors", None, saved[3], raw=raw)
    with pytest.raises(DfquantError, match=message):
        read_metadata(bad)


def _set(tensors, key, value):
    t = dict(tensors)
    t[key] = value
    return t


@pytest.mark.parametrize(
    "change,message",
    [
        # w_bits edited 4 -> 2 with the 4-bit codes left in place
        (lambda m, t: (m["layers"]["conv2"].update(w_bits=2), t)[1], r"layers\['conv2'\] 'w_bits' 2 is not what the config gives it \(\[4\]\)"),
        # ... and with the config edited to match, the codes give it away
        (lambda m, t: (m["layers"]["conv2"].update(w_bits=2), m["config"].update(layer_w_bits={"conv2": 2}), t)[2], r"layer 'conv2': weight codes span -?\d+..\d+, outside the 2-bit range -2..1"),
        (lambda m, t: (m["layers"]["fc"].update(a_bits=2), t)[1], r"layers\['fc'\] 'a_bits' 2 is none of the config's activation bits \(\[4, 8\]\)"),
        (lambda m, t: _set(t, "conv2.weight_int", torch.full_like(t["conv2.weight_int"], 100)), "weight codes span 100..100, outside the 4-bit range -8..7"),
        (lambda m, t: _set(t, "conv2.weight_scale", torch.full_like(t["conv2.weight_scale"], float("nan"))), "NaN or inf values in conv2.weight_scale"),
        (lambda m, t: _set(t, "conv2.weight_scale", torch.zeros_like(t["conv2.weight_scale"])), "layer 'conv2': weight scales must be finite and > 0, found 0"),
        (lambda m, t: _set(t, "bn2.bias", torch.full_like(t["bn2.bias"], float("inf"))), "NaN or inf values in bn2.bias"),
        (lambda m, t: _set(t, "conv2.weight_zero_point", t["conv2.weight_zero_point"] + 0.5), "weight zero points must be finite whole numbers"),
        (lambda m, t: (m.update(num_classes=10**9), t)[1], "'num_classes' 1000000000 is the output count of no layer"),
        (lambda m, t: _set(t, "conv3.input_quant.scale", torch.tensor(-1.0)), "layer 'conv3': activation scale must be finite and > 0, found -1"),
        (lambda m, t: _set(t, "conv3.input_quant.zero_point", torch.tensor(2.5)), "activation zero point must be a finite whole number, found 2.5"),
    ],
)
def test_values_no_quantizer_makes_are_refused(saved, tmp_path, change, message):
    _, _, meta, tensors = saved
    m = json.loads(json.dumps(meta))
    t = change(m, dict(tensors))
    bad = _write(tmp_path, "bad.safetensors", m, t)
    with pytest.raises(DfquantError, match=message) as info:
        load_quantized(bad)
    assert "damaged or was edited" in str(info.value)


def test_a_state_mismatch_lists_the_keys(saved, tmp_path):
    _, _, meta, tensors = saved
    t = dict(tensors)
    del t["conv2.weight_int"]
    t["extra"] = torch.zeros(1)
    t["conv3.weight_scale"] = t["conv3.weight_scale"][:3].clone()
    t["fc.weight_int"] = t["fc.weight_int"].float()
    bad = _write(tmp_path, "bad.safetensors", meta, t)
    with pytest.raises(DfquantError) as info:
        load_quantized(bad)
    msg = str(info.value)
    assert "missing keys: conv2.weight_int" in msg and "unexpected keys: extra" in msg
    assert "wrong shapes: conv3.weight_scale (3,) (the model needs (64,))" in msg
    assert "weight codes of the wrong type: fc.weight_int (float32, expected int8)" in msg


def test_a_zero_point_outside_the_grid_is_legitimate(digits, tmp_path):
    # an input range above zero puts the zero point below 0 (params_from_range allows it)
    q, _ = dfquant.quantize(digits[0], "rtn", 4, 4, quantize_first_input=True, input_range=(0.5, 1.0))
    assert float(q.conv1.input_quant.zero_point) < 0
    path, _ = save_quantized(q, tmp_path / "m", model_name="digits_cnn")
    assert torch.equal(load_quantized(path)[0].conv1.input_quant.zero_point, q.conv1.input_quant.zero_point)


def test_save_refuses_a_float_model_and_a_wrong_registry_name(digits, saved, tmp_path):
    with pytest.raises(DfquantError, match="no quantized layer: quantize it first"):
        save_quantized(digits[0], tmp_path / "float", model_name="digits_cnn")
    with pytest.raises(DfquantError, match=r"model_name='resnet20': layer 'conv1' has weight shape \(16, 3, 3, 3\) in the registry model, but \(16, 1, 3, 3\) here"):
        save_quantized(saved[0], tmp_path / "r20", model_name="resnet20")
    with pytest.raises(DfquantError, match="unknown model"):
        save_quantized(saved[0], tmp_path / "nope", model_name="nope")
    assert not list(tmp_path.iterdir())  # nothing written


def test_save_refuses_a_missing_folder_and_a_directory_target(saved, tmp_path):
    with pytest.raises(DfquantError, match="output folder does not exist"):
        save_quantized(saved[0], tmp_path / "no" / "m")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(DfquantError, match="that is a folder"):
        save_quantized(saved[0], tmp_path / "d")
    with pytest.raises(DfquantError, match="names a folder"):
        save_quantized(saved[0], str(tmp_path) + "/")
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_the_same_seed_gives_a_byte_identical_model_file(digits, tmp_path):
    model, _ = digits
    opts = dict(samples=16, distill_iters=2, distill_batch=16, recon_iters=3, batch_size=8, device="cpu", seed=3)
    files = []
    for run in ("a", "b"):
        q, report = dfquant.quantize(model, "genie", 4, 4, **opts)
        path, side = save_quantized(q, tmp_path / run, model_name="digits_cnn", config=report.config, report=report.to_dict())
        files.append(path.read_bytes())
        assert "synthesis_time_s" in json.loads(side.read_text())["config"]["genie"]  # the timings stay in the sidecar
    assert files[0] == files[1]
    assert "time_s" not in read_metadata(tmp_path / "a.safetensors")["config"]["genie"]["units"][0]


def test_a_skipped_conv_with_a_folded_bn_saves_and_reloads(digits, tmp_path):
    model, (x, _) = digits
    q, report = dfquant.quantize(model, "squant", 4, 4, fold_bn=True, skip=("conv2",))
    assert isinstance(q.conv2, torch.nn.Conv2d) and q.conv2.bias is not None  # float, with its BN folded in
    path, _ = save_quantized(q, tmp_path / "m", model_name="digits_cnn", config=report.config)
    q2, _ = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_the_names_saving_takes_load_back_and_any_float_dtype_is_loaded_into(saved, tmp_path):
    q, path, _, _ = saved
    stem = str(path)[: -len(".safetensors")]
    x = torch.randn(3, 1, 8, 8)
    for name in (stem, stem + ".json", path):
        r, _ = load_quantized(name)
        assert torch.equal(r(x), q(x))
    r, _ = load_quantized(path, model=dfquant.create_model("digits_cnn").half())
    assert r.fc.bias.dtype == torch.float32 and torch.equal(r(x), q(x))
    torch.save({}, tmp_path / "float.pth")
    with pytest.raises(DfquantError, match="float checkpoint: load it with --model NAME --weights FILE"):
        load_quantized(tmp_path / "float.pth")


def test_a_file_saved_before_configs_carried_a_version_still_loads(digits, tmp_path):
    """Files written before the config's format version (version 1: no ``config_version``) load as saved."""
    q, report = dfquant.quantize(digits[0], "squant", 4, 4)
    assert report.config["config_version"] == 2
    old = {k: v for k, v in report.config.items() if k != "config_version"}
    save_quantized(q, tmp_path / "v1", model_name="digits_cnn", config=old)
    loaded, info = load_quantized(tmp_path / "v1.safetensors")
    assert "config_version" not in info["config"]
    x = digits[1][0][:16]
    assert torch.equal(loaded(x), q(x))


# --- DF-MPC results: per-tensor grids, DoReFa's half-integer zero point, low-bit layers --------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="dfmpc", w_bits=6, low_bits=2),  # c folded into the low layer's BN
        dict(method="dfmpc", w_bits=6, low_bits=2, fold_bn=True),  # ... into the folded conv's per-channel scale
        dict(method="dfmpc", w_bits=4, a_bits=8, low_bits=3, bn_recal="moments", fold_bn=True, int32_bias=True),
        dict(method="rtn", w_bits=4, a_bits=4, w_grid="dorefa"),
        dict(method="squant", w_bits=6, a_bits=None, low_bits=2, compensation="none", bn_recal="moments"),
    ],
)
def test_dfmpc_results_save_and_load_to_the_same_logits(digits, tmp_path, kwargs):
    model, (x, _) = digits
    q, report = dfquant.quantize(model, **kwargs)
    if kwargs.get("fold_bn"):  # the folded compensation turned conv3's one scale into one per channel
        assert q.conv3.weight_scale.numel() == q.conv3.out_channels and q.conv2.weight_scale.numel() == 1
    path, _ = save_quantized(q, tmp_path / "m", model_name="digits_cnn", config=report.config, report=report.to_dict())
    q2, info = load_quantized(path)
    s1, s2 = q.state_dict(), q2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert info["layers"]["conv3"]["w_bits"] == kwargs.get("low_bits", kwargs["w_bits"])


@pytest.fixture(scope="module")
def saved_dfmpc(digits, tmp_path_factory):
    """A dfmpc MP2/6 digits model saved once (conv3 ternary, the rest DoReFa-6)."""
    q, report = dfquant.quantize(digits[0], "dfmpc", 6, low_bits=2)
    path, _ = save_quantized(q, tmp_path_factory.mktemp("saved_dfmpc") / "m", model_name="digits_cnn", config=report.config)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dfquant"])
    return path, meta, load_file(str(path))


@pytest.mark.parametrize(
    "change, message",
    [
        # the half-integer zero point is DoReFa's: without the config's DoReFa grid it is refused
        (lambda m, t: (m["config"].update(w_grid=None), t)[1], r"layer 'conv1': weight zero points must be finite whole numbers, found -0.5"),
        (lambda m, t: _set(t, "conv2.weight_zero_point", torch.full((1,), -1.5)), r"layer 'conv2': the config's DoReFa grid \(w_grid\) has zero point -0.5, found -1.5"),
        (lambda m, t: _set(t, "conv3.weight_int", t["conv3.weight_int"].clamp(-2, 1).index_fill(0, torch.tensor([0]), -2)), r"layer 'conv3': the config's ternary grid"),
        (lambda m, t: (m["config"].update(w_grid="ternary"), t)[1], r"config 'w_grid' must be null or one of twn, dorefa, paper"),
        # the low layer's bits are in the config's layer_w_bits: dropping them gives it away
        (lambda m, t: (m["config"].update(layer_w_bits={}), t)[1], r"layers\['conv3'\] 'w_bits' 2 is not what the config gives it \(\[6\]\)"),
    ],
)
def test_a_dfmpc_file_is_checked_against_its_grid(saved_dfmpc, tmp_path, change, message):
    path, meta, tensors = saved_dfmpc
    assert load_quantized(path)[0].conv2.weight_zero_point.item() == -0.5
    m = json.loads(json.dumps(meta))
    bad = _write(tmp_path, "bad.safetensors", m, change(m, dict(tensors)))
    with pytest.raises(DfquantError, match=message):
        load_quantized(bad)
