"""The command line: the demo end to end, quantize/save/evaluate, and one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import dfquant
from dfquant.cli import main


def run(capsys, *argv):
    code = main(["--no-progress", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_demo_json_has_the_rows_it_promises_and_rtn_breaks(capsys, digits):
    code, out, _ = run(capsys, "demo", "--json")
    assert code == 0
    doc = json.loads(out)
    labels = {(r["setting"], r["method"]) for r in doc["rows"]}
    for s in ("W4A4", "W3A3", "W2A4", "MP2/6"):
        for m in ("RTN", "SQuant", "RTN+CLE+BC", "Genie (tiny)"):
            assert (s, m) in labels
    assert ("MP2/6", "DF-MPC (paper)") in labels and ("MP2/6", "DF-MPC, BN re-cal.") in labels
    low = [r for r in doc["rows"] if r["setting"] in ("W2A4", "MP2/6")]
    assert any(abs(r["drop"]) > 5 for r in low)  # the low settings tell the methods apart
    assert all("p_vs_rtn" in r for r in doc["rows"] if r["method"] != "RTN")
    assert doc["summary"].startswith("At ") and "round-to-nearest falls" in doc["summary"]


@pytest.mark.slow
def test_demo_table_and_plot(capsys, digits, tmp_path):
    code, out, _ = run(capsys, "demo", "--plot", str(tmp_path / "demo.png"))
    assert code == 0 and "MP2/6" in out and "p vs RTN" in out and out.strip().splitlines()[-2].startswith("At ")
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantize_save_and_evaluate_again(capsys, digits, tmp_path):
    out_file = tmp_path / "digits_w4a4"
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--method", "squant", "--w-bits", "4", "--a-bits", "4", "--out", str(out_file), "--json")
    assert code == 0
    res = json.loads(out)
    for key in ("fp32_top1", "quant_top1", "quant_time_s", "method", "w_bits", "a_bits"):
        assert key in res
    assert res["method"] == "squant" and res["w_bits"] == 4 and res["a_bits"] == 4
    assert {"graph", "forward", "copy", "weights", "layers"} <= set(res["stage_times"]) and sum(res["stage_times"].values()) <= res["quant_time_s"]
    assert 0 <= res["agree_top1"] <= 100 and res["logit_mse"] >= 0 and res["paths"]["data"].startswith("embedded")
    assert res["protocol"]["act_range"] == "dfq" and res["version"]["config"] == 2 and res["cpu"] and res["threads"] >= 1
    assert (tmp_path / "digits_w4a4.safetensors").exists() and (tmp_path / "digits_w4a4.json").exists()
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "digits_w4a4.safetensors"), "--json")
    assert code == 0
    assert json.loads(out)["top1"] == pytest.approx(res["quant_top1"])


def test_info_summarises_a_saved_model_and_refuses_a_changed_one(capsys, digits, tmp_path):
    out_file = tmp_path / "m"
    assert run(capsys, "quantize", "--model", "digits_cnn", "--method", "rtn", "--w-bits", "3", "--a-bits", "4", "--eval", "none", "--out", str(out_file))[0] == 0
    code, out, _ = run(capsys, "info", str(tmp_path / "m.safetensors"))
    assert code == 0 and "digits_cnn, rtn W3 A4" in out and "match their saved digests" in out and "act_range=dfq" in out
    code, out, _ = run(capsys, "info", str(tmp_path / "m.json"), "--json")
    assert code == 0 and json.loads(out)["layers"]["conv2"] == {"w_bits": 3, "a_bits": 4}
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    code, _, err = run(capsys, "info", str(tmp_path / "m.safetensors"))
    assert code == 2 and "does not match its saved digest" in err and len(err.strip().splitlines()) == 1


def test_quantize_report_table(capsys, digits):
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--w-bits", "6", "--a-bits", "none", "--report")
    assert code == 0 and "rel.err" in out and "W6Afp" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["quantize", "--model", "nope"], "unknown model 'nope'"),
        (["quantize", "--model", "digits_cnn", "--method", "magic"], "argument --method: invalid choice: 'magic'"),
        (["quantize", "--model", "digits_cnn", "--w-bits", "9"], "--w-bits must be an integer between 2 and 8, got 9"),
        (["quantize", "--model", "digits_cnn", "--a-bits", "1"], "--a-bits must be an integer between 2 and 8, got 1"),
        (["quantize", "--model", "resnet18"], "--weights PATH is required"),
        (["quantize", "--model", "digits_cnn", "--weights", "/no/such/file.pth"], "weights file not found"),
        (["evaluate", "/no/such/model.safetensors"], "not found"),
        (["quantize", "--model", "resnet20", "--random-init", "--eval", "cifar10", "--data", "/no/such.npz"], "not found"),
        (["quantize", "--model", "digits_cnn", "--eval", "cifar10", "--data", "/no/such.npz"], "scores a digits model on cifar10 images"),
        (["quantize", "--model", "mobilenet_v2", "--random-init", "--method", "rtn", "--cle", "--eval", "none"], "no conv -> [BN] -> ReLU -> conv pair"),
        (["quantize", "--model", "digits_cnn", "--method", "squant", "--synthetic", "a.safetensors", "--recon-iters", "5"], "--recon-iters, --synthetic apply only to the learned methods (genie and zeroq), not to 'squant'"),
        (["quantize", "--model", "digits_cnn", "--method", "rtn", "--init", "squant"], "--init squant applies to the learned methods (genie, zeroq) only, not to 'rtn'"),
        (["quantize", "--model", "digits_cnn", "--method", "squant-k", "--save-synthetic", "s.safetensors"], "--save-synthetic applies only"),
        (["quantize", "--model", "digits_cnn", "--method", "rtn", "--no-kernel"], "--no-kernel/--no-channel switch SQuant's levels of method 'squant' only, not of 'rtn'"),
        (["quantize", "--model", "digits_cnn", "--method", "genie", "--no-channel"], "not of 'genie'"),
        (["quantize", "--model", "digits_cnn", "--method", "zeroq", "--cle", "--bias-correction"], "--cle is a DFQ step for the rounding methods"),
        # contradictory or unused options are refused, not dropped
        (["quantize", "--model", "resnet20", "--weights", "w.th", "--random-init"], "--weights and --random-init contradict"),
        (["quantize", "--model", "digits_cnn", "--data", "x.npz"], "the digits data is embedded"),
        (["quantize", "--model", "digits_cnn", "--eval", "none", "--limit", "5"], "--limit chooses evaluation data, but --eval none"),
        (["quantize", "--model", "digits_cnn", "--layer-bits", "conv1=8", "--layer-bits", "conv1=2"], "gives conv1 two bit-widths (8 and 2)"),
        (["quantize", "--model", "digits_cnn", "--a-bits", "none", "--last-input-bits", "4"], "--a-bits none quantizes no input"),
        (["quantize", "--model", "digits_cnn", "--method", "genie", "--synthetic", "s.safetensors", "--distill-iters", "3"], "--synthetic uses the given images"),
        (["quantize", "--model", "digits_cnn", "--n-sigma", "0"], "--n-sigma must be a positive finite number"),
        (["quantize", "--model", "digits_cnn", "--method", "genie", "--a-bits", "none", "--act-calib", "bn"], "--a-bits none quantizes no activation"),
        (["quantize", "--model", "digits_cnn", "--method", "genie", "--n-sigma", "3", "--recon-iters", "0"], "use them with --act-calib bn"),
        (["quantize", "--model", "digits_cnn", "--method", "zeroq", "--act-range", "mse", "--recon-iters", "0"], "use them with --act-calib bn"),
        # output paths are checked before any work
        (["quantize", "--model", "digits_cnn", "--out", "/no/such/folder/m"], "output folder does not exist: /no/such/folder"),
        (["quantize", "--model", "digits_cnn", "--out", ""], "--out needs a file name"),
        (["synthesize", "--model", "digits_cnn", "-n", "2", "--out", "/no/such/folder/s"], "output folder does not exist"),
        (["synthesize", "--model", "digits_cnn", "-n", "2", "--out", "grid.png"], "give a .safetensors name"),
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
    assert code == 2 and "not a PyTorch checkpoint" in err and "KeyError" not in err
    torch.save({"conv1.weight": torch.zeros(3, 3)}, tmp_path / "small.pth")
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--weights", str(tmp_path / "small.pth"))
    assert code == 2 and "does not fit model" in err
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 3, 16, 16), np.uint8), labels=np.zeros(4, np.int64))
    code, _, err = run(capsys, "quantize", "--model", "resnet20", "--random-init", "--eval", "cifar10", "--data", str(tmp_path / "bad.npz"))
    assert code == 2 and "shape (N, 3, 32, 32)" in err


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(capsys, digits, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, message in (
        (["quantize", "--model", "digits_cnn", "--out", str(a_file / "m")], "is not a folder"),
        (["quantize", "--model", "digits_cnn", "--out", str(tmp_path)], "that is a folder"),
        (["quantize", "--model", "digits_cnn", "--method", "genie", "--save-synthetic", str(tmp_path)], "that is a folder"),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err and not out, err  # nothing was quantized or printed first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_negative_limit_is_refused(capsys, digits):
    assert main(["--no-progress", "quantize", "--model", "digits_cnn", "--limit", "-5"]) == 2
    err = capsys.readouterr().err
    assert "expected a positive integer" in err and "see dfquant quantize --help" in err and len(err.strip().splitlines()) == 1


def test_json_with_report_carries_the_per_layer_report(capsys, digits):
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--method", "squant", "--eval", "none", "--json", "--report")
    assert code == 0
    layers = json.loads(out)["report"]["layers"]
    assert [l["name"] for l in layers] == ["conv1", "conv2", "conv3", "fc"]


def test_evaluate_refuses_options_that_do_not_apply_to_a_saved_file(capsys, digits, tmp_path):
    code, _, _ = run(capsys, "quantize", "--model", "digits_cnn", "--eval", "none", "--out", str(tmp_path / "m.v1"))
    assert code == 0 and (tmp_path / "m.v1.safetensors").is_file()  # a dotted name keeps its tail
    code, _, err = run(capsys, "evaluate", str(tmp_path / "m.v1.safetensors"), "--model", "resnet20")
    assert code == 2 and "--model resnet20 does not apply" in err
    code, _, err = run(capsys, "evaluate", str(tmp_path / "m.v1.safetensors"), "--random-init")
    assert code == 2 and "--random-init loads a float model" in err
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "m.v1.safetensors"), "--json")
    assert code == 0 and json.loads(out)["model"] == "digits_cnn"


def test_synthesize_keeps_a_dotted_name(capsys, digits, tmp_path):
    code, _, _ = run(capsys, "synthesize", "--model", "digits_cnn", "-n", "2", "--iters", "1", "--out", str(tmp_path / "syn_seed0.5"))
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn_seed0.5.png", "syn_seed0.5.safetensors"]


def test_synthesize_describes_its_images_and_can_clip_them_to_the_pixel_range(capsys, digits, tmp_path):
    from dfquant.io.images import load_images
    from dfquant.models import preprocessing_of

    for clip in (False, True):
        out = tmp_path / f"s{int(clip)}"
        code, text, _ = run(capsys, "synthesize", "--model", "digits_cnn", "-n", "8", "--iters", "3", "--out", str(out), *(["--clip-to-pixels"] if clip else []))
        assert code == 0 and "pixels in [0, 1] map to" in text and "lie outside" in text
    raw, clipped = (load_images(tmp_path / f"s{i}.safetensors") for i in (0, 1))
    pre = preprocessing_of("digits_cnn")
    assert torch.equal(clipped, pre.clamp(raw)) and not torch.equal(raw, clipped)  # 3 iterations leave values outside


def test_synthesize_on_a_cpu_takes_the_cpu_budget(capsys, digits, tmp_path, monkeypatch):
    from dfquant.genie import CPU_BUDGET
    from dfquant.io.images import images_metadata

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, _ = run(capsys, "synthesize", "--model", "digits_cnn", "-n", "2", "--batch-size", "2", "--out", str(tmp_path / "s"))
    assert code == 0 and "cpu budget" in out
    meta = images_metadata(tmp_path / "s.safetensors")
    assert meta["budget"] == "cpu" and int(meta["iters"]) == CPU_BUDGET["distill_iters"] and int(meta["batch_size"]) == 2


@pytest.mark.slow
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


def test_per_tensor_weight_grid_with_cle_from_the_command_line_saves_and_reloads(capsys, digits, tmp_path):
    out_file = tmp_path / "digits_w4_per_tensor"
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--method", "rtn", "--w-bits", "4", "--a-bits", "8", "--per-tensor", "--cle", "--out", str(out_file), "--json")
    assert code == 0
    res = json.loads(out)
    saved = json.loads((tmp_path / "digits_w4_per_tensor.json").read_text())
    assert saved["config"]["per_channel"] is False and saved["config"]["cle"] is True
    code, out, _ = run(capsys, "evaluate", str(tmp_path / "digits_w4_per_tensor.safetensors"), "--json")
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(res["quant_top1"])


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_synthesize_in_parts_then_genie_on_all_parts(capsys, digits, tmp_path):
    """`dfquant synthesize` writes images + a PNG grid; `quantize --synthetic A B` uses both parts."""
    from dfquant.io.images import load_images

    parts = []
    for seed in (0, 1):
        out = tmp_path / f"part{seed}"
        code, text, _ = run(capsys, "synthesize", "--model", "digits_cnn", "-n", "8", "--iters", "2", "--seed", str(seed), "--out", str(out))
        assert code == 0 and "wrote 8 images" in text
        assert out.with_suffix(".png").is_file()
        x, meta = load_images(out.with_suffix(".safetensors"), with_metadata=True)
        assert x.shape == (8, 1, 8, 8) and meta["model"] == "digits_cnn" and meta["seed"] == str(seed) and meta["iters"] == "2"
        parts.append(str(out.with_suffix(".safetensors")))
    assert not torch.equal(load_images(parts[0]), load_images(parts[1]))

    code, text, err = run(
        capsys, "quantize", "--model", "digits_cnn", "--method", "genie", "--w-bits", "4", "--a-bits", "4",
        "--synthetic", *parts, "--recon-iters", "2", "--eval", "none", "--json",
    )
    assert code == 0, err
    data = json.loads(text)["genie"]["data"]
    assert data["n"] == 16 and data["source"] == "files" and data["files"] == parts

    # the same part twice would count its images double: refused in one line
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--method", "genie", "--synthetic", parts[0], parts[0], "--eval", "none")
    assert code == 2 and "hold the same images" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--method", "genie", "--synthetic", str(tmp_path / "nope.safetensors"), "--eval", "none")
    assert code == 2 and "synthetic images file not found" in err


@pytest.mark.usefixtures("one_thread")
def test_synthetic_parts_of_another_shape_or_model(capsys, digits, tmp_path):
    from dfquant.io.images import save_images

    ok = save_images(torch.randn(4, 1, 8, 8), tmp_path / "ok.safetensors", metadata={"model": "resnet20"})
    wide = save_images(torch.randn(4, 3, 8, 8), tmp_path / "wide.safetensors", metadata={"model": "digits_cnn"})
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--method", "genie", "--synthetic", str(ok), str(wide), "--eval", "none")
    assert code == 2 and "have shape (3, 8, 8) per image" in err
    # images made from another model are allowed (a deliberate experiment) but named in a note
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--method", "genie", "--synthetic", str(ok), "--recon-iters", "1", "--eval", "none")
    assert code == 0 and "was synthesized from resnet20, not digits_cnn" in err


@pytest.mark.slow
def test_ctrl_c_during_synthesis_leaves_no_output_file(digits, tmp_path):
    """A real SIGINT while `dfquant synthesize` runs: exit 130, one line, and no file at all."""
    import os
    import signal
    import time

    out = tmp_path / "syn.safetensors"
    argv = [sys.executable, "-m", "dfquant.cli", "--progress", "--threads", "1", "synthesize", "--model", "digits_cnn", "-n", "16", "--iters", "100000", "--out", str(out)]
    # a parent started with SIGINT ignored (nohup, `cmd &` in a script) passes that on, and Python then
    # installs no KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=restore)
    seen, deadline = b"", time.monotonic() + 120
    while b"1/100000" not in seen and proc.poll() is None and time.monotonic() < deadline:
        seen += os.read(proc.stderr.fileno(), 4096)  # the progress bar: synthesis has started
    assert b"1/100000" in seen, seen[-500:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "dfquant: interrupted" in err.decode() and "Traceback" not in err.decode()
    assert list(tmp_path.iterdir()) == []


def test_quantize_first_input_uses_the_models_input_range(capsys, digits):
    """--quantize-first-input quantizes the image at 8 bits over the digits input range [-1, 1]."""
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--quantize-first-input", "--json")
    res = json.loads(out)
    assert code == 0 and "conv1" not in res["float_inputs"]
    code, out, _ = run(capsys, "quantize", "--model", "digits_cnn", "--json")
    assert code == 0 and "conv1" in json.loads(out)["float_inputs"]


def test_random_init_follows_the_seed_and_notes_are_printed(capsys, tmp_path):
    outs = []
    for i, seed in enumerate((0, 0, 1)):
        code, out, _ = run(capsys, "quantize", "--model", "resnet20", "--random-init", "--seed", str(seed), "--method", "rtn",
                           "--cle", "--eval", "none", "--out", str(tmp_path / f"m{i}"))
        assert code == 0 and "note: cross-layer equalization:" in out and "more lines of notes: see --report" in out
        outs.append((tmp_path / f"m{i}.safetensors").read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    code, out, _ = run(capsys, "quantize", "--model", "resnet20", "--random-init", "--method", "rtn", "--cle", "--eval", "none", "--json")
    assert json.loads(out)["notes"][0].startswith("cross-layer equalization:")


def test_outputs_that_would_collide_or_be_misnamed_are_refused(capsys, digits, tmp_path):
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "give --onnx" in err
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--method", "genie", "--out", str(tmp_path / "s"),
                       "--save-synthetic", str(tmp_path / "s.safetensors"))
    assert code == 2 and "the model would overwrite the images" in err
    assert not list(tmp_path.iterdir())


def test_the_digits_cache_folder_problems_are_clear(capsys, tmp_path, monkeypatch):
    from dfquant.data import digits as digits_module

    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("DFQUANT_CACHE", str(afile))
    code, _, err = run(capsys, "evaluate", "--model", "digits_cnn")
    assert code == 2 and "cannot use" in err and "DFQUANT_CACHE" in err
    # a cache that cannot be written: the model just trained is used, with a note
    monkeypatch.setenv("DFQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digits_module, "train_digits_cnn", lambda progress=False: dfquant.create_model("digits_cnn").eval())

    def refuse(path, write):
        raise RuntimeError("open file failed with strerror: Permission denied")

    monkeypatch.setattr(digits_module, "atomic_write", refuse)
    model = digits_module.digits_model()
    assert isinstance(model, torch.nn.Module) and "could not be cached" in capsys.readouterr().err


def test_imagenet_evaluation_without_data_or_assets_names_the_way_out(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DFQUANT_ASSETS", str(tmp_path))  # an assets folder without the photos
    code, _, err = run(capsys, "quantize", "--model", "resnet18", "--random-init", "--eval", "imagenet")
    assert code == 2 and "--eval none to skip evaluation" in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_while_torch_is_still_importing_is_one_line(tmp_path):
    """The CLI imports torch only inside main(): a Ctrl-C there (simulated by an import hook that
    raises KeyboardInterrupt when torch is first imported) ends with the one line and exit 130."""
    (tmp_path / "sitecustomize.py").write_text(
        "import builtins\n"
        "_real = builtins.__import__\n"
        "def _imp(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        raise KeyboardInterrupt\n"
        "    return _real(name, *a, **k)\n"
        "builtins.__import__ = _imp\n"
    )
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    out = subprocess.run([sys.executable, "-m", "dfquant.cli", "list"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 130, out.stderr
    assert out.stderr.strip() == "dfquant: interrupted"
