"""ONNX QDQ export: the file carries the exact integer codes and scales, onnxruntime computes what
dfquant's model computes, low-bit inputs keep their b-bit range, and bad requests fail clearly."""
import copy
import json

import numpy as np
import pytest
import torch

import dfquant
from dfquant import DfquantError
from dfquant.cli import main
from dfquant.qmodules import QUANT_LAYERS

onnx = pytest.importorskip("onnx", reason="ONNX export is the optional extra dfquant[onnx] (installed by dfquant[test])")
ort = pytest.importorskip("onnxruntime", reason="checking an exported file needs onnxruntime (dfquant[onnx])")
from onnx import numpy_helper  # noqa: E402

from dfquant.io.export import check_onnx, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def digits_w4a4(digits):
    model, _ = digits
    qmodel, _ = dfquant.quantize(model, "squant", 4, 4)
    return qmodel


@pytest.fixture(scope="module")
def digits_onnx(digits_w4a4, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "digits_w4a4.onnx"
    return export_onnx(digits_w4a4, path)


def _initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_weights_are_stored_as_the_exact_int8_codes(digits_w4a4, digits_onnx):
    inits = _initializers(digits_onnx["path"])
    layers = {n: m for n, m in digits_w4a4.named_modules() if isinstance(m, QUANT_LAYERS)}
    assert digits_onnx["int8_weights"] == len(layers)
    for name, layer in layers.items():
        codes = inits[f"{name}.weight_int"]
        assert codes.dtype == np.int8
        np.testing.assert_array_equal(codes, layer.weight_int.numpy())
    graph = onnx.load(digits_onnx["path"]).graph
    # Each weight's DequantizeLinear carries the layer's per-channel scale and zero point.
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(".weight_int"):
            layer = layers[node.input[0][: -len(".weight_int")]]
            np.testing.assert_array_equal(inits[node.input[1]], layer.weight_scale.numpy())
            np.testing.assert_array_equal(inits[node.input[2]].astype(np.float32), layer.weight_zero_point.numpy())


def test_the_file_carries_no_exporter_notes_or_local_source_paths(digits_onnx):
    from pathlib import Path

    raw = Path(digits_onnx["path"]).read_bytes()
    assert str(Path(dfquant.__file__).parent).encode() not in raw and b"stack_trace" not in raw
    assert not any(n.metadata_props for n in onnx.load(digits_onnx["path"]).graph.node)


def test_onnxruntime_matches_the_quantized_model_on_real_images(digits, digits_w4a4, digits_onnx):
    _, (x, _) = digits
    c = check_onnx(digits_w4a4, digits_onnx["path"], x)
    assert c["n"] == len(x)
    for ref in ("file", "model"):  # the digits CNN's convs have no bias: both references agree
        assert c[ref]["argmax_agreement"] >= 0.99
        assert c[ref]["rel_max_diff"] < 1e-2, c
    # The export is not the float model: it differs from it as the quantized model does.
    with torch.no_grad():
        gap = (digits[0](x) - digits_w4a4(x)).abs().max().item()
    assert c["model"]["max_abs_diff"] < 0.05 * gap


def test_low_bit_inputs_keep_their_b_bit_range(digits_w4a4, digits_onnx):
    # Inputs 50x larger drive every 4-bit input past its top code 15; an 8-bit container without the
    # clip would saturate at 255 instead and the outputs would differ by far more than rounding.
    big = 50 * torch.randn(16, *digits_w4a4.input_size, generator=torch.Generator().manual_seed(1))
    c = check_onnx(digits_w4a4, digits_onnx["path"], big)
    assert c["model"]["rel_max_diff"] < 1e-3, c
    assert digits_onnx["quantized_inputs"] == 3  # conv1's input (the image) stays float by the protocol


@pytest.fixture(scope="module")
def folded_resnet20_w4a4():
    torch.manual_seed(0)
    model = dfquant.create_model("resnet20")
    for m in model.modules():  # non-trivial BN statistics so the ranges are not all alike
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    qmodel, _ = dfquant.quantize(model, "squant", 4, 4, fold_bn=True)
    return qmodel


@pytest.mark.slow
def test_cifar_resnet_with_option_a_shortcuts_and_folded_bn_exports_with_a_dynamic_batch(folded_resnet20_w4a4, tmp_path):
    summary = export_onnx(folded_resnet20_w4a4, tmp_path / "r20.onnx", metadata={"model_name": "resnet20"})
    assert summary["float_batchnorm"] == 0 and summary["int8_weights"] == 20
    for n in (1, 5):
        c = check_onnx(folded_resnet20_w4a4, summary["path"], torch.randn(n, 3, 32, 32))
        # A value within float rounding of a 4-bit step boundary can move one code (a whole step) in
        # one of the two runtimes; through 19 random layers that shows as a few per cent at most.
        assert c["n"] == n and c["file"]["rel_max_diff"] < 5e-2, c
    meta = json.loads({p.key: p.value for p in onnx.load(summary["path"]).metadata_props}["dfquant"])
    assert meta["model_name"] == "resnet20" and meta["input_size"] == [3, 32, 32]


@pytest.mark.slow
def test_biases_are_int32_codes_on_the_accumulator_grid_so_runtimes_agree(folded_resnet20_w4a4, tmp_path):
    path = export_onnx(folded_resnet20_w4a4, tmp_path / "r20.onnx")["path"]
    inits = _initializers(path)
    graph = onnx.load(path).graph
    checked = 0
    for name, layer in folded_resnet20_w4a4.named_modules():
        if isinstance(layer, QUANT_LAYERS) and layer.input_quant is not None:
            conv = next(n for n in graph.node if n.op_type in ("Conv", "Gemm") and f"{name}.weight_int" in _dq_sources(graph, n))
            bias_dq = next(n for n in graph.node if n.output[0] == conv.input[2])
            codes, scale = inits[bias_dq.input[0]], inits[bias_dq.input[1]]
            assert codes.dtype == np.int32
            expected_scale = (layer.input_quant.scale * layer.weight_scale).numpy()
            np.testing.assert_array_equal(scale, expected_scale)
            np.testing.assert_array_equal(codes, np.round(layer.bias.detach().double().numpy() / expected_scale.astype(np.float64)))
            checked += 1
    assert checked == 19  # every conv and the classifier but the first conv (float image input)
    # ONNX Runtime's graph optimizer no longer changes what the file computes.
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)).numpy()
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        outs.append(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-4 * np.abs(outs[0]).max())


def _dq_sources(graph, node):
    """Names of the initializers that DequantizeLinear nodes feed into ``node``."""
    producers = {n.output[0]: n for n in graph.node}
    return [producers[i].input[0] for i in node.input if i in producers and producers[i].op_type == "DequantizeLinear"]


@pytest.mark.slow
def test_real_resnet20_w4a4_predictions_survive_the_export(resnet20, cifar10, tmp_path):
    x, _ = cifar10
    qmodel, _ = dfquant.quantize(resnet20, "squant", 4, 4)
    summary = export_onnx(qmodel, tmp_path / "r20.onnx")
    c = check_onnx(qmodel, summary["path"], x[:256])
    assert c["file"]["argmax_agreement"] >= 0.99, c
    assert c["model"]["argmax_agreement"] >= 0.95, c  # plus the int32 bias rounding at 4 bits


@pytest.mark.slow
def test_int32_bias_makes_the_evaluated_model_the_exported_one(resnet20, cifar10, tmp_path):
    x, _ = cifar10
    qmodel, report = dfquant.quantize(resnet20, "squant", 4, 4, fold_bn=True, int32_bias=True)
    assert any(n.startswith("int32_bias: the biases of 19 layers") for n in report.notes)
    for layer in qmodel.modules():
        if isinstance(layer, QUANT_LAYERS) and layer.input_quant is not None:
            step = (layer.input_quant.scale * layer.weight_scale).double()
            codes = layer.bias.detach().double() / step
            assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the accumulator grid
    summary = export_onnx(qmodel, tmp_path / "r20.onnx")
    c = check_onnx(qmodel, summary["path"], x[:256])
    # without int32_bias 3-5 % of these predictions differ (the test above); now only float
    # summation order separates the two
    assert c["model"]["argmax_agreement"] >= 0.995, c


@pytest.mark.slow
def test_int4_weights_store_the_exact_codes_of_low_bit_layers_packed(digits, digits_onnx, tmp_path):
    _, (x, _) = digits
    # Mixed precision: conv2 at 8 bits keeps its int8 container, the 4- and 2-bit layers are packed.
    qmodel, _ = dfquant.quantize(digits[0], "squant", 4, 4, layer_w_bits={"conv2": 8, "conv3": 2})
    out = export_onnx(qmodel, tmp_path / "int4.onnx", int4_weights=True)
    assert out["opset"] >= 21 and out["int4_weights"] == 3 and out["int8_weights"] == 1
    model = onnx.load(out["path"])
    onnx.checker.check_model(model, full_check=True)
    by_type = {t.name: t.data_type for t in model.graph.initializer}
    inits = _initializers(out["path"])
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)}
    for node in (n for n in model.graph.node if n.op_type == "DequantizeLinear" and ".weight_int" in n.input[0]):
        name = node.input[0].split(".weight_int")[0]
        want = onnx.TensorProto.INT8 if name == "conv2" else onnx.TensorProto.INT4
        assert by_type[node.input[0]] == want and by_type[node.input[2]] == want, name
        np.testing.assert_array_equal(inits[node.input[0]].astype(np.int8), layers[name].weight_int.numpy())
        np.testing.assert_array_equal(inits[node.input[2]].astype(np.float32), layers[name].weight_zero_point.numpy())
    # The same model with int8 containers: onnxruntime computes the same outputs from both files.
    ref = export_onnx(qmodel, tmp_path / "int8.onnx")
    assert ref["int4_weights"] == 0 and out["bytes"] < ref["bytes"]
    from dfquant.io.export import OnnxRuntimeModel

    a, b = OnnxRuntimeModel(out["path"])(x), OnnxRuntimeModel(ref["path"])(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.99
    assert check_onnx(qmodel, out["path"], x)["file"]["rel_max_diff"] < 1e-2
    # Packing the all-4-bit model halves its weight bytes (~2 KiB of the 8-bit file is not weights).
    all_4_bit, _ = dfquant.quantize(digits[0], "squant", 4, 4)
    packed = export_onnx(all_4_bit, tmp_path / "all4.onnx", int4_weights=True)
    n_weights = sum(m.weight.numel() for m in all_4_bit.modules() if isinstance(m, QUANT_LAYERS))
    assert digits_onnx["bytes"] - packed["bytes"] >= 0.45 * n_weights


def test_bad_requests_are_clear_errors(digits, digits_w4a4, tmp_path):
    with pytest.raises(DfquantError, match="quantize it"):
        export_onnx(digits[0], tmp_path / "float.onnx")
    with pytest.raises(DfquantError, match="must end in .onnx"):
        export_onnx(digits_w4a4, tmp_path / "model.bin")
    with pytest.raises(DfquantError, match="output folder does not exist"):
        export_onnx(digits_w4a4, tmp_path / "no" / "model.onnx")
    with pytest.raises(DfquantError, match="input size"):
        export_onnx(torch.nn.Sequential(*digits_w4a4.children()), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written


def run(capsys, *argv):
    code = main(["--no-progress", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_cli_quantize_save_then_export_and_check(capsys, digits, tmp_path):
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--fold-bn", "--out", str(tmp_path / "q"), "--onnx", str(tmp_path / "q.onnx"), "--json")
    assert code == 0
    res = json.loads(out)
    assert res["onnx"]["float_batchnorm"] == 0 and res["onnx"]["check"]["file"]["argmax_agreement"] >= 0.9
    assert abs(res["onnx_top1"] - res["quant_top1"]) <= 2.0  # the deployed file, on the digits test images
    code, out, err = run(capsys, "export", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "again.onnx"))
    assert code == 0 and "int8 weight tensors" in out and "arg-max agreement" in out and err == ""
    assert "verdict: the file computes the model" in out and res["onnx"]["check"]["verdict"] == "ok"
    meta = json.loads({p.key: p.value for p in onnx.load(tmp_path / "again.onnx").metadata_props}["dfquant"])
    assert meta["input"]["size"] == [1, 8, 8] and meta["labels"] == [str(d) for d in range(10)] and len(meta["input"]["mean"]) == 1
    code, out, err = run(capsys, "export", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "packed.onnx"), "--int4-weights", "--json")
    assert code == 0 and json.loads(out)["int4_weights"] == 4 and json.loads(out)["check"]["file"]["argmax_agreement"] >= 0.9
    assert err == ""
    # An 8-bit model has nothing to pack: the command says so rather than staying silent.
    code, out, err = run(capsys, "quantize", "--model", "digits_cnn", "--w-bits", "8", "--a-bits", "8", "--onnx", str(tmp_path / "w8.onnx"), "--int4-weights", "--json")
    assert code == 0 and json.loads(out)["onnx"]["int4_weights"] == 0 and "packed nothing" in err
    # The file exported from the saved model holds the same codes as the one exported right away.
    a, b = _initializers(tmp_path / "q.onnx"), _initializers(tmp_path / "again.onnx")
    for name in (n for n in a if n.endswith(".weight_int")):
        np.testing.assert_array_equal(a[name], b[name])
    # ... and `dfquant evaluate` runs the file with onnxruntime, finding the model from its metadata.
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "again.onnx"), "--json")
    assert code == 0 and json.loads(out)["top1"] == res["onnx_top1"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "/no/such/model.safetensors", "--out", "m.onnx"], "not found"),
        (["evaluate", "/no/such/model.onnx"], "ONNX file not found"),
        (["evaluate", "{tmp}/junk.onnx"], "not an ONNX model onnxruntime can run"),
        (["quantize", "--model", "digits_cnn", "--onnx", "model.bin"], "must end in .onnx"),
        (["quantize", "--model", "digits_cnn", "--onnx", "/no/such/dir/m.onnx"], "output folder does not exist"),
        (["quantize", "--model", "digits_cnn", "--int4-weights"], "give --onnx FILE"),
    ],
)
def test_cli_errors_are_one_line(capsys, digits, tmp_path, argv, message):
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run(capsys, *argv)
    lines = [l for l in err.strip().splitlines() if l]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "quantized in" not in out  # refused before quantizing


@pytest.mark.slow
def test_an_8_bit_grid_without_zero_is_exported_exactly_as_int16_codes(digits, tmp_path):
    from dfquant.io.runtime import runtime_kernels

    model = copy.deepcopy(digits[0])
    with torch.no_grad():  # one output channel whose weights all lie far above 0
        model.conv2.weight[0] = model.conv2.weight[0].abs() + 1.0
    qmodel, _ = dfquant.quantize(model, "squant", 8, 8, fold_bn=True)
    assert qmodel.conv2.weight_zero_point.min() < -128  # no int8 zero point fits this grid
    summary = export_onnx(qmodel, tmp_path / "m.onnx")
    assert summary["int16_weights"] == ["conv2"] and summary["float_weights"] == [] and summary["int8_weights"] == 3
    assert summary["opset"] == 21  # DequantizeLinear of int16 codes
    assert onnx.TensorProto.INT16 in {t.data_type for t in onnx.load(summary["path"]).graph.initializer}
    c = check_onnx(qmodel, summary["path"], digits[1][0][:64])
    assert c["file"]["rel_max_diff"] < 1e-5, c  # the int16 codes hold the grid's exact values
    why = {r["layer"]: r["why"] for r in runtime_kernels(summary["path"])["float_layers"]}
    assert "int16 weight codes" in why["conv2"]


def test_onnxruntime_runs_a_grid_without_zero_before_a_float_bn_exactly(digits, tmp_path):
    """Stored as float values, such weights (a conv between DQ and Q once onnxruntime folds the float
    BN into it) were quantized to int8 by onnxruntime on its own; int16 codes keep them exact."""
    from dfquant.io.runtime import runtime_kernels

    model, (x, _) = digits
    model = copy.deepcopy(model)
    with torch.no_grad():  # half of conv2's channels get weights of one sign: grids without 0
        model.conv2.weight[::2] = model.conv2.weight[::2].abs() + 0.5
    qmodel, _ = dfquant.quantize(model, "squant", 8, 8)  # BN stays float
    summary = export_onnx(qmodel, tmp_path / "m.onnx")
    assert summary["int16_weights"] == ["conv2"] and summary["float_batchnorm"] == 3
    assert runtime_kernels(summary["path"])["requantized_by_onnxruntime"] == []
    with torch.no_grad():
        want = qmodel(x[:64])
    got = dfquant.OnnxRuntimeModel(summary["path"])(x[:64])
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


@pytest.mark.slow
def test_a_per_tensor_grid_is_written_per_channel_with_its_one_scale(digits, tmp_path):
    model, (x, _) = digits
    qmodel, _ = dfquant.quantize(model, "squant", 4, 8, per_channel=False)
    info = export_onnx(qmodel, tmp_path / "per_tensor.onnx")
    inits = _initializers(info["path"])
    graph = onnx.load(info["path"]).graph
    checked = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(".weight_int"):
            layer = qmodel.get_submodule(node.input[0][: -len(".weight_int")])
            out = layer.weight_int.shape[0]
            np.testing.assert_array_equal(inits[node.input[1]], np.full(out, layer.weight_scale.item(), np.float32))
            np.testing.assert_array_equal(inits[node.input[2]], np.full(out, int(layer.weight_zero_point.item())))
            checked += 1
    assert checked == len([m for m in qmodel.modules() if isinstance(m, QUANT_LAYERS)])
    c = check_onnx(qmodel, info["path"], x)
    assert c["model"]["argmax_agreement"] >= 0.99 and c["model"]["rel_max_diff"] < 1e-2, c


def test_onnx_model_on_inputs_of_the_wrong_shape_is_one_clear_error(digits, digits_onnx):
    from dfquant.io.export import OnnxRuntimeModel

    runner = OnnxRuntimeModel(digits_onnx["path"])
    with pytest.raises(DfquantError, match=r"the ONNX model cannot run on these inputs of shape \(2, 3, 8, 8\): \[ONNXRuntimeError\].*INVALID_ARGUMENT"):
        runner(torch.zeros(2, 3, 8, 8))
    with pytest.raises(DfquantError, match=r"cannot run on these inputs of shape \(4, 1, 4, 4\)"):
        dfquant.evaluate(runner, (torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)))


def test_a_data_dependent_forward_is_refused_with_its_reason_not_the_exporters_advice(tmp_path, capfd):
    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc((self.a(x) if x.sum() > 0 else self.b(x)).mean((2, 3)))

    q, _ = dfquant.quantize(Branches().eval(), "rtn", 8, None, input_size=(3, 8, 8))
    with pytest.raises(DfquantError, match="data-dependent.*branches on tensor values"):
        export_onnx(q, tmp_path / "b.onnx")
    assert "GraphModule" not in capfd.readouterr().err  # no pages of graph dumps
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("raw, message", [("{oops", "not valid JSON"), ("[1]", "must be a JSON object"), ('{"config": [1]}', "'config' must be a dict")])
def test_damaged_metadata_in_an_onnx_file_is_one_clear_error(capsys, digits_onnx, tmp_path, raw, message):
    model = onnx.load(str(digits_onnx["path"]))
    for prop in model.metadata_props:
        if prop.key == "dfquant":
            prop.value = raw
    onnx.save(model, str(tmp_path / "t.ONNX"))
    with pytest.raises(DfquantError, match=message):
        dfquant.OnnxRuntimeModel(tmp_path / "t.ONNX")
    code, _, err = run(capsys, "evaluate", str(tmp_path / "t.ONNX"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# --- DF-MPC's DoReFa grid: a half-integer zero point ONNX cannot hold ----------------------------


def _weight_initializers(path, qmodel):
    """Per quantized layer: (codes, scale, zero point) of its weight DequantizeLinear in the file."""
    inits, out = _initializers(path), {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(".weight_int"):
            out[node.input[0][: -len(".weight_int")]] = tuple(inits[i] for i in node.input[:3])
    return out


@pytest.mark.parametrize("fold_bn", [False, True])
def test_dorefa_weights_are_exported_as_doubled_codes_at_half_the_scale_exactly(digits, tmp_path, fold_bn):
    model, (x, _) = digits
    qmodel, _ = dfquant.quantize(model, "dfmpc", 4, 8, low_bits=2, fold_bn=fold_bn, int32_bias=True)
    assert float(qmodel.conv2.weight_zero_point[0]) == -0.5  # rounding it to 0 would move every weight by half a step
    info = export_onnx(qmodel, tmp_path / "dorefa.onnx")
    assert info["float_weights"] == [] and info["int8_weights"] == 4
    stored = _weight_initializers(info["path"], qmodel)
    for name in ("conv1", "conv2", "fc"):  # DoReFa-4
        layer, (codes, scale, zp) = qmodel.get_submodule(name), stored[name]
        out = layer.weight_int.shape[0]
        np.testing.assert_array_equal(codes, 2 * layer.weight_int.numpy().astype(np.int64) + 1)
        np.testing.assert_array_equal(scale, (layer.weight_scale / 2).expand(out).numpy())
        np.testing.assert_array_equal(zp, np.zeros(out))
    np.testing.assert_array_equal(stored["conv3"][0], qmodel.conv3.weight_int.numpy())  # TWN: the codes as they are
    c = check_onnx(qmodel, info["path"], x)
    assert c["model"]["rel_max_diff"] < 1e-5 and c["model"]["argmax_agreement"] == 1.0, c


def test_a_weight_only_dorefa_model_runs_in_onnxruntime_as_in_torch(digits, tmp_path):
    model, (x, _) = digits
    qmodel, _ = dfquant.quantize(model, "rtn", 6, None, w_grid="dorefa")
    info = export_onnx(qmodel, tmp_path / "w6.onnx")
    with torch.no_grad():
        want = qmodel(x)
    got = dfquant.OnnxRuntimeModel(info["path"])(x)
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_dorefa_8_needs_nine_bits_and_is_stored_as_int16_codes(digits, tmp_path):
    model, (x, _) = digits
    qmodel, _ = dfquant.quantize(model, "dfmpc", 8, None, low_bits=2)
    info = export_onnx(qmodel, tmp_path / "w8.onnx")
    assert info["int16_weights"] == ["conv1", "conv2", "fc"] and info["int8_weights"] == 1  # conv3 is ternary
    c = check_onnx(qmodel, info["path"], x[:64])
    assert c["model"]["rel_max_diff"] < 1e-5, c


def test_the_check_says_differs_when_the_file_is_not_the_model(digits, digits_onnx):
    """A wrong model against the file (another bit-width: other scales) fails the stated tolerance."""
    other, _ = dfquant.quantize(digits[0], "rtn", 2, 2)
    c = check_onnx(other, digits_onnx["path"], digits[1][0][:64])
    assert c["verdict"] == "differs" and c["tolerance"]["argmax_agreement"] == 0.95


# --- deployment: BN folded at export, what onnxruntime runs as integer kernels, --bench -----------


@pytest.fixture(scope="module")
def digits_w8a8_negative_gamma(digits):
    """SQuant W8A8 (BN kept unfolded, as its protocol says) with four negative-gamma channels in
    bn2, one of whose conv2 codes is -128: negated, that code leaves int8."""
    model = copy.deepcopy(digits[0])
    with torch.no_grad():
        model.bn2.weight[:4] *= -1
    qmodel, _ = dfquant.quantize(model, "squant", 8, 8)
    assert isinstance(qmodel.bn2, torch.nn.BatchNorm2d)
    with torch.no_grad():
        qmodel.conv2.weight_int[0, 0, 0, 0] = -128
    return qmodel


def test_fold_bn_at_export_is_exact_on_the_grid_with_negative_gamma(digits_w8a8_negative_gamma):
    from dfquant.io.export import fold_bn_into_quant_convs

    q = digits_w8a8_negative_gamma
    folded = copy.deepcopy(q)
    assert fold_bn_into_quant_convs(folded) == {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"}
    assert all(isinstance(getattr(folded, f"bn{i}"), torch.nn.Identity) for i in (1, 2, 3))
    bn = q.bn2
    a = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(folded.conv2.weight.double().numpy(), (a * q.conv2.weight.double()).numpy(), rtol=1e-6, atol=1e-9)
    assert (folded.conv2.weight_scale > 0).all()  # negative gamma: negated codes, not negative scales
    codes, old = folded.conv2.weight_int.to(torch.int64), q.conv2.weight_int.to(torch.int64)
    for c in range(4):  # negated; shifted down by one where a code was -128 (channel 0 at least)
        shift = int(old[c].min() == -128)
        assert torch.equal(codes[c], -old[c] - shift) and folded.conv2.weight_zero_point[c] == -q.conv2.weight_zero_point[c] - shift
        assert shift or c
    assert torch.equal(codes[4:], old[4:])
    assert codes.min() >= -128 and codes.max() <= 127
    expected_bias = bn.bias.detach().double() - bn.running_mean.double() * a.flatten()
    np.testing.assert_allclose(folded.conv2.bias.double().numpy(), expected_bias.numpy(), rtol=1e-6, atol=1e-7)


def test_fold_bn_export_passes_the_check_and_leaves_no_batchnorm_for_onnxruntime(digits, digits_w8a8_negative_gamma, tmp_path):
    from dfquant.io.export import OnnxRuntimeModel
    from dfquant.io.runtime import runtime_kernels

    q, (x, _) = digits_w8a8_negative_gamma, digits[1]
    plain = export_onnx(q, tmp_path / "plain.onnx")
    folded = export_onnx(q, tmp_path / "folded.onnx", fold_bn=True)
    assert plain["float_batchnorm"] == 3 and folded["float_batchnorm"] == 0 and folded["folded_bn"] == 3
    assert folded["int8_weights"] == 4 and folded["float_weights"] == []  # the shifted channel fits int8
    c = check_onnx(q, folded["path"], x)  # the file's metadata tells the check it was folded
    assert c["verdict"] == "ok" and c["file"]["rel_max_diff"] < 1e-2 and c["model"]["argmax_agreement"] >= 0.98, c
    a, b = OnnxRuntimeModel(plain["path"])(x), OnnxRuntimeModel(folded["path"])(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.98
    before, after = runtime_kernels(plain["path"]), runtime_kernels(folded["path"])
    assert "BatchNormalization" in before["ops"] and "BatchNormalization" not in after["ops"]
    why = {r["layer"]: r["why"] for r in before["float_layers"]}
    assert "BatchNormalization" in why["conv2"] and "not quantized" in why["conv1"]  # conv1 reads the float image
    why = {r["layer"]: r["why"] for r in after["float_layers"]}
    assert set(why) == {"conv1", "conv3"} and "ReduceMean" in why["conv3"]  # conv3 feeds the float average pool
    assert after["integer_convs"] == 1 and after["ops"].get("QLinearConv") == 1 and after["integer_layers"] == 2  # conv2 and the QGemm


class _PadNet(torch.nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, TensorFlow-style zero padding, a stride-2 conv (as in MobileNetV1)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.conv1, self.bn1 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, stride=2, bias=False), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 3)
        self.input_size = (1, 8, 8)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(torch.nn.functional.pad(x, (0, 1, 0, 1)))))
        return self.fc(x.mean((2, 3)))


def test_a_zero_pad_before_a_quantized_conv_gets_its_quantizer_in_front_exactly(tmp_path):
    from dfquant.io.export import fold_bn_into_quant_convs, qdq_model, rewrite_for_integer_kernels
    from dfquant.io.runtime import runtime_kernels

    torch.manual_seed(0)
    qmodel, _ = dfquant.quantize(_PadNet().eval(), "squant", 8, 8)
    folded = copy.deepcopy(qmodel)
    fold_bn_into_quant_convs(folded)
    before = qdq_model(folded)
    after = rewrite_for_integer_kernels(before)
    assert after.requantized_pads == 1
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(before(x), after(x))  # the pad's zeros are on the grid
    summary = export_onnx(qmodel, tmp_path / "pad.onnx", fold_bn=True)
    assert summary["requantized_pads"] == 1
    kernels = runtime_kernels(summary["path"])
    assert "conv1" not in {r["layer"] for r in kernels["float_layers"]}  # its output's quantizer now directly follows it


def test_cli_export_fold_bn_bench_prints_the_speed_table(capsys, digits_w8a8_negative_gamma, tmp_path):
    dfquant.save_quantized(digits_w8a8_negative_gamma, tmp_path / "q.safetensors", model_name="digits_cnn")
    code, out, err = run(capsys, "export", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "q.onnx"), "--fold-bn", "--bench", "--check", "4")
    assert code == 0 and err == "", err
    assert "3 BatchNorm ops folded" in out and "runs 2 of 4 conv/gemm layers as integer kernels" in out
    assert "float: conv1:" in out and "1 intra-op thread(s)" in out
    rows = [line.split()[0] for line in out.splitlines() if " ms " in line and "img/s" in line]
    assert rows == ["exported", "float", "torch"], out
    code, out, _ = run(capsys, "export", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "j.onnx"), "--fold-bn", "--bench", "--threads", "1", "--json")
    res = json.loads(out)
    assert code == 0 and set(res["bench"]["times"]) == {"exported file", "float ONNX", "torch FP32"} and res["bench"]["config"]["threads"] == 1
    assert all(t["latency_ms"] > 0 and t["throughput_ips"] > 0 for t in res["bench"]["times"].values())
    assert res["kernels"]["integer_convs"] == 1 and res["folded_bn"] == 3


def _give_bn_statistics(model):
    """Random but plausible BN statistics and affine parameters (a fresh model's are the identity)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.slow
def test_integer_adds_let_onnxruntime_run_every_residual_conv_and_sum_in_integers(tmp_path):
    from dfquant.io.runtime import runtime_kernels

    torch.manual_seed(0)
    model = dfquant.create_model("resnet20")
    _give_bn_statistics(model)
    qmodel, _ = dfquant.quantize(model, "squant", 8, 8)
    folded = export_onnx(qmodel, tmp_path / "fold.onnx", fold_bn=True)
    why = {r["layer"]: r["why"] for r in runtime_kernels(folded["path"])["float_layers"]}
    assert "feeds a float Add" in why["layer1.0.conv2"]
    summary = export_onnx(qmodel, tmp_path / "adds.onnx", fold_bn=True, integer_adds=True)
    assert len(summary["residual_adds"]) == 9 and all(a["quantized"] for a in summary["residual_adds"])
    kernels = runtime_kernels(summary["path"])
    assert kernels["integer_convs"] == 18 and [r["layer"] for r in kernels["float_layers"]] == ["conv1"]
    assert kernels["ops"].get("QLinearAdd", 0) >= 6  # the three sums after a stride-2 block keep a float Add
    c = check_onnx(qmodel, summary["path"], torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert c["verdict"] == "ok", c
    with pytest.raises(DfquantError, match="integer_adds needs fold_bn"):
        export_onnx(qmodel, tmp_path / "bad.onnx", integer_adds=True)


@pytest.mark.slow
def test_symmetric_weight_grids_let_onnxruntime_run_every_depthwise_conv_in_integers(tmp_path):
    from dfquant.io.runtime import runtime_kernels

    torch.manual_seed(0)
    model = dfquant.create_model("mobilenet_v1", width=0.25, num_classes=10)
    _give_bn_statistics(model)
    depthwise = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    integer = {}
    for w_range in ("minmax", "symmetric"):
        qmodel, _ = dfquant.quantize(model, "squant", 8, 8, w_range=w_range)
        summary = export_onnx(qmodel, tmp_path / f"{w_range}.onnx", fold_bn=True)
        assert check_onnx(qmodel, summary["path"], x)["verdict"] == "ok"
        kernels = runtime_kernels(summary["path"])
        integer[w_range] = depthwise - {r["layer"] for r in kernels["float_layers"]}
    assert integer["symmetric"] == depthwise  # zero point 0: every depthwise conv is a QLinearConv
    assert integer["minmax"] < depthwise  # min/max grids without 0 in int8 keep some in float
