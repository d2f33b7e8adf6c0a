"""Benchmark: the ONNX QDQ export on the real CIFAR-10 ResNets, run by ONNX Runtime.

    python benchmarks/onnx_export.py --threads 1   # writes benchmarks/results/onnx_export.{md,json}
    python benchmarks/onnx_export.py --threads 1 --int32-bias --out benchmarks/results/onnx_export_int32_bias

``--int32-bias`` quantizes with ``int32_bias=True``: dfquant's model then adds each bias on the
int32 accumulator grid as the file does, so the two differ only in float summation order.

For each model and setting (SQuant, BN folded into the convs so the file has no float BatchNorm;
4-bit weights exported twice, as int8 containers and packed as INT4):
top-1 of dfquant's (fake-quant) model and of the exported file run by onnxruntime on the 846
shared CIFAR-10 test images, how many images get a different prediction, the largest logit
difference, export time and file size, and which ops ONNX Runtime's optimizer turns the QDQ
patterns into (``QLinearConv`` = a real integer convolution kernel; ``Conv`` after
``DequantizeLinear`` = float arithmetic on the exact dequantized values), with the inference time
of both runtimes on the same images (batch 64, the given threads).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

import dfquant
from dfquant.assets import CIFAR10_TEST_NPZ, CIFAR_RESNET_WEIGHTS, asset_path
from dfquant.data import load_cifar10_npz
from dfquant.devices import cpu_name
from dfquant.io.export import export_onnx, qdq_model
from squant_cifar import best_time

SETTINGS = [(8, 8), (6, 6), (4, 4)]


def run_batches(fn, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def _torch_reference(qmodel, x: torch.Tensor) -> dict:
    """dfquant's model and the export's own graph run in torch (once per model, for every container)."""
    with torch.no_grad():
        return {
            "logits": run_batches(qmodel, x),
            "file_logits": run_batches(qdq_model(qmodel), x),
            "seconds": best_time(lambda: run_batches(qmodel, x), 3),
        }


def _run_file(qmodel, ref: dict, name: str, w_bits: int, a_bits: int, container: str, x, y, tmp: Path, threads: int) -> dict:
    """Export ``qmodel`` with ``container`` weight codes, run it with ONNX Runtime, compare with torch (``ref``)."""
    path = tmp / f"{name}_w{w_bits}a{a_bits}_{container}.onnx"
    t = time.perf_counter()
    summary = export_onnx(qmodel, path, int4_weights=container == "int4")
    export_s = time.perf_counter() - t
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    torch_logits, file_logits, torch_s = ref["logits"], ref["file_logits"], ref["seconds"]
    ort_run = lambda b: torch.from_numpy(sess.run(None, {"x": b.numpy()})[0])  # noqa: E731
    ort_logits = run_batches(ort_run, x)
    ort_s = best_time(lambda: run_batches(ort_run, x), 3)
    return {
        "model": name,
        "setting": f"W{w_bits}A{a_bits}",
        "weights": container,
        "torch_top1": 100 * float((torch_logits.argmax(1) == y).float().mean()),
        "onnx_top1": 100 * float((ort_logits.argmax(1) == y).float().mean()),
        "prediction_changes": int((torch_logits.argmax(1) != ort_logits.argmax(1)).sum()),
        "max_logit_diff": float((torch_logits - ort_logits).abs().max()),
        "file_prediction_changes": int((file_logits.argmax(1) != ort_logits.argmax(1)).sum()),
        "file_max_logit_diff": float((file_logits - ort_logits).abs().max()),
        "export_s": export_s,
        "kib": summary["bytes"] / 1024,
        "convs": summary["ops"].get("Conv", 0),
        "qlinearconv": fused.get("QLinearConv", 0),
        "torch_ms_per_image": 1000 * torch_s / len(x),
        "onnx_ms_per_image": 1000 * ort_s / len(x),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--int32-bias", action="store_true", help="quantize with int32_bias=True (the model adds the file's int32 biases)")
    ap.add_argument("--out", default="benchmarks/results/onnx_export")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = load_cifar10_npz(asset_path(CIFAR10_TEST_NPZ))
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for name in args.models:
        model = dfquant.create_model(name, weights=str(asset_path(CIFAR_RESNET_WEIGHTS[name])))
        for w_bits, a_bits in SETTINGS:
            qmodel, _ = dfquant.quantize(model, "squant", w_bits, a_bits, fold_bn=True, int32_bias=args.int32_bias)
            ref = _torch_reference(qmodel, x)
            for container in ["int8", "int4"] if w_bits <= 4 else ["int8"]:
                rows.append(_run_file(qmodel, ref, name, w_bits, a_bits, container, x, y, tmp, args.threads))
                print(json.dumps(rows[-1]))
    command = "python benchmarks/onnx_export.py " + " ".join(
        [f"--models {' '.join(args.models)}", f"--threads {args.threads}"]
        + (["--int32-bias"] if args.int32_bias else [])
        + ([f"--out {args.out}"] if args.out != ap.get_default("out") else [])
    )
    doc = {
        "command": command,
        "machine": f"{cpu_name()}, torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}",
        "threads": args.threads,
        "n_images": len(x),
        "rows": rows,
    }
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# ONNX QDQ export run by ONNX Runtime (CIFAR-10 ResNets, SQuant, BN folded"
        + (", int32_bias=True: dfquant's model adds the file's int32 biases)" if args.int32_bias else ")"),
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {doc['machine']}; {args.threads} thread(s). Top-1 on the {len(x)} CIFAR-10 test images in ../shared; "
        "inference time is the best of 3 passes over them in batches of 64.",
        "",
        "Predictions changed / max logit difference of ONNX Runtime against dfquant's model ("
        + ("biases rounded to the int32 accumulator grid, as in the file" if args.int32_bias else "float biases")
        + ") and against the "
        "file's own graph run in torch (biases on the int32 accumulator grid; what differs there is float summation order and, in the "
        "convs ONNX Runtime runs as QLinearConv, the integer kernel's rounding of its output to the next layer's codes). The exported "
        "file and dfquant's model are two equally valid quantizations of the same codes; at 4 bits a one-code change early on "
        "moves the prediction of an image near a class boundary, which is why the first pair of columns counts more changes.",
        "",
        "Weight codes: int8 containers (the default) or, for 4-bit weights, packed INT4 tensors (`--int4-weights`, opset 21): "
        "the same codes in half the bytes, which ONNX Runtime dequantizes and runs in float (no int4 convolution kernel), so "
        "no conv is a QLinearConv there.",
        "",
        "| model | setting | weight codes | dfquant top-1 | ONNX Runtime top-1 | changed vs model | max diff vs model | changed vs file graph | max diff vs file graph | convs run as QLinearConv | export s | file KiB | torch ms/img | ORT ms/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['weights']} | {r['torch_top1']:.2f} | {r['onnx_top1']:.2f} | {r['prediction_changes']} | {r['max_logit_diff']:.3g} | "
            f"{r['file_prediction_changes']} | {r['file_max_logit_diff']:.3g} | "
            f"{r['qlinearconv']} / {r['convs']} | {r['export_s']:.1f} | {r['kib']:.0f} | {r['torch_ms_per_image']:.2f} | {r['onnx_ms_per_image']:.2f} |"
        )
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
