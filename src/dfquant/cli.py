"""Command-line interface: wiring only (argument parsing, loading, printing)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional

from .errors import DfquantError


def _bits_or_none(s: str) -> Optional[int]:
    if s.lower() in ("none", "fp", "float", "fp32"):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer 2..8 or 'none', got {s!r}") from None


def _positive_int(s: str) -> int:
    try:
        value = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return value


# --last-input-bits when not given: 8 (the paper's protocol); told apart from an explicit value
_LAST_INPUT_DEFAULT = 8


class _Default(int):
    """An int that remembers it was not given on the command line."""


def _check_output(path: Optional[str], flag: str) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    import os

    from .files import check_writable

    if path is None:
        return
    if not path.strip():
        raise DfquantError(f"{flag} needs a file name, got an empty one")
    if path.endswith(("/", os.sep)):
        raise DfquantError(f"{flag} {path}: that is a folder; give a file name (in it, if you like)")
    check_writable(path, flag)


def _layer_bits(s: str):
    name, sep, bits = s.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=BITS (e.g. layer1.0.conv1=8), got {s!r}")
    try:
        return name, int(bits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer bit-width after '=', got {s!r}") from None


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="squant", help="rtn, squant, squant-e, squant-k, squant-c, genie, zeroq (default squant)")
    p.add_argument("--w-bits", type=int, default=4, help="weight bit-width, 2..8 (default 4)")
    p.add_argument("--a-bits", type=_bits_or_none, default=4, help="activation bit-width 2..8, or 'none' for weight-only (default 4)")
    p.add_argument("--no-kernel", action="store_true", help="SQuant: disable the kernel (K) level")
    p.add_argument("--no-channel", action="store_true", help="SQuant: disable the output-channel (C) level")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding conv before quantizing")
    p.add_argument(
        "--w-range",
        default=None,
        choices=["minmax", "lp"],
        help="weight grid: per-channel min/max (SQuant's protocol) or the Lp clipping search (default: minmax, lp for genie/zeroq)",
    )
    p.add_argument(
        "--per-tensor",
        action="store_true",
        help="one weight scale per layer instead of one per output channel (DFQ's protocol; coarser, what --cle is for)",
    )
    p.add_argument("--cle", action="store_true", help="DFQ cross-layer range equalization of the float model first (rounding methods)")
    p.add_argument(
        "--int32-bias",
        action="store_true",
        help="round biases to the int32 accumulator grid integer kernels use, so the evaluated model is the deployed (ONNX) one",
    )
    p.add_argument(
        "--relu6-to-relu",
        action="store_true",
        help="replace ReLU6 by ReLU first, as DFQ does for MobileNetV2 so --cle can equalize through them (changes the float model)",
    )
    p.add_argument(
        "--bias-correction",
        action="store_true",
        help="DFQ analytic bias correction: cancel each layer's expected output shift from its BN-implied input mean (rounding methods)",
    )
    p.add_argument("--act-range", default="dfq", choices=["dfq", "mse"], help="BN-statistics range rule (default dfq)")
    p.add_argument("--n-sigma", type=float, default=None, help="dfq rule: n in beta + n*gamma (default per bit-width)")
    p.add_argument(
        "--quantize-first-input",
        action="store_true",
        help="also quantize the image input (8 bits; its range from the model's input normalization of pixels in [0, 1], no data)",
    )
    p.add_argument(
        "--last-input-bits",
        type=_bits_or_none,
        default=_Default(_LAST_INPUT_DEFAULT),
        help="bits of the classifier's input (default 8; 'none': same as --a-bits)",
    )
    p.add_argument("--skip", action="append", default=[], help="leave this layer in float (repeatable)")
    p.add_argument(
        "--layer-bits",
        action="append",
        default=[],
        type=_layer_bits,
        metavar="NAME=BITS",
        help="weight bit-width of one layer, overriding --w-bits (repeatable; layer names as in --report)",
    )
    g = p.add_argument_group("learned methods (genie, zeroq)")
    g.add_argument("--init", default=None, choices=["rtn", "squant"], help="rounding that reconstruction starts from (default rtn)")
    g.add_argument("--samples", type=int, default=None, help="number of synthetic images")
    g.add_argument("--distill-iters", type=int, default=None, help="synthesis iterations per batch")
    g.add_argument("--recon-iters", type=int, default=None, help="reconstruction iterations per block")
    g.add_argument(
        "--lr-round",
        type=float,
        default=None,
        help="Adam lr of the learned rounding (default: 1e-3 x 20000 / recon-iters, the release's lr x iterations, at most 0.1)",
    )
    g.add_argument(
        "--act-calib",
        default=None,
        choices=["bn", "data"],
        help="where the learned activation steps start: a search on the synthetic data (default, as the Genie release; "
        "measured closer to FP32 with Genie's images) or the BN-statistics ranges (measured closer with --method zeroq's images)",
    )
    g.add_argument("--save-synthetic", default=None, help="write the synthetic images to this file")
    g.add_argument(
        "--synthetic",
        nargs="+",
        default=None,
        metavar="FILE",
        help="use the synthetic images in these files (concatenated, e.g. parts made by parallel "
        "`dfquant synthesize --seed i` runs) instead of synthesizing",
    )
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run synthesis and reconstruction")
    g.add_argument("--seed", type=int, default=0, help="random seed (same seed, same quantized model)")


def _add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="registered model name (see `dfquant list`)")
    p.add_argument("--weights", default=None, help="checkpoint file (.pth/.th/.safetensors)")
    p.add_argument("--random-init", action="store_true", help="use random weights (timing only)")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", default=None, choices=["digits", "cifar10", "imagenet", "none"], help="evaluation data (default: the model's own dataset)")
    p.add_argument("--data", default=None, help="evaluation data path (.npz for cifar10, a folder for imagenet)")
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate on the first N images only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfquant", description="Data-free quantization of trained PyTorch CNNs.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is often fastest on a busy machine)")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the embedded default: digits CNN, FP32 vs RTN vs SQuant-E/K/C at W8A8/W6A6/W4A4")
    d.add_argument("--json", action="store_true", help="print the results as one JSON object")
    d.add_argument("--retrain", action="store_true", help="retrain the digits CNN instead of using the cached one")

    q = sub.add_parser("quantize", help="quantize a model, evaluate it, optionally save it")
    _add_model_options(q)
    _add_quant_options(q)
    _add_eval_options(q)
    q.add_argument("--out", default=None, help="save the quantized model to FILE.safetensors (+ FILE.json)")
    q.add_argument("--onnx", default=None, metavar="FILE", help="also export the quantized model to FILE.onnx (QDQ; see `dfquant export`)")
    _add_int4_option(q)
    q.add_argument("--json", action="store_true", help="print one JSON object with the results")
    q.add_argument("--report", action="store_true", help="print the per-layer report table")

    e = sub.add_parser("evaluate", help="load a saved quantized model (or a float one) and evaluate it")
    e.add_argument("file", nargs="?", help="a .safetensors file written by `dfquant quantize --out`, or an .onnx file (run by onnxruntime)")
    _add_model_options(e, required=False)
    _add_eval_options(e)
    e.add_argument("--json", action="store_true")

    s = sub.add_parser("synthesize", help="distil synthetic images from a model's BN statistics (Genie-D or ZeroQ)")
    _add_model_options(s)
    s.add_argument("-n", type=int, default=256, help="number of images")
    s.add_argument("--method", default="genie", choices=["genie", "zeroq"])
    s.add_argument("--iters", type=int, default=None, help="iterations per batch (default: the budget's)")
    s.add_argument("--batch-size", type=int, default=None, help="images per optimized batch (default: the budget's)")
    s.add_argument(
        "--budget",
        default="auto",
        choices=["auto", "gpu", "cpu"],
        help="defaults for --iters/--batch-size: gpu = the method's published ones (Genie 4000 iterations, "
        "ZeroQ 500), cpu = 150 iterations per batch of 128; auto (default): by the device, as quantize does",
    )
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output file (.safetensors); a PNG grid is written beside it")

    x = sub.add_parser("export", help="export a saved quantized model to ONNX with QuantizeLinear/DequantizeLinear nodes (int8 or packed int4 weight codes)")
    x.add_argument("file", help="a .safetensors file written by `dfquant quantize --out`")
    x.add_argument("--out", required=True, help="output file (.onnx)")
    x.add_argument(
        "--check",
        type=int,
        default=16,
        metavar="N",
        help="run the file with onnxruntime on N random inputs and compare with dfquant's model (default 16; 0: no check)",
    )
    _add_int4_option(x)
    x.add_argument("--json", action="store_true", help="print one JSON object with the export summary")

    sub.add_parser("list", help="list models and methods")
    return parser


def _load_model(args) -> Any:
    import torch

    from .assets import CIFAR_RESNET_WEIGHTS, asset_path
    from .data import digits_model
    from .models import create_model, model_spec

    spec = model_spec(args.model)
    if args.weights is not None and args.random_init:
        raise DfquantError("--weights and --random-init contradict each other: give one")
    if args.model == "digits_cnn" and args.weights is None and not args.random_init:
        return digits_model(progress=args.progress_on)
    if args.random_init:  # drawn from the command's seed: the same command, the same model
        with torch.random.fork_rng():
            torch.manual_seed(getattr(args, "seed", 0))
            return create_model(args.model)
    weights = args.weights
    if weights is None and args.model in CIFAR_RESNET_WEIGHTS:
        found = asset_path(CIFAR_RESNET_WEIGHTS[args.model])
        weights = str(found) if found else None
    if weights is None:
        raise DfquantError(f"--weights PATH is required for {spec.name} (dfquant ships no pretrained weights; --random-init for timing)")
    return create_model(args.model, weights=weights)


def _eval_data(args, dataset: str, num_classes: "int | None" = None):
    from .data import load_eval_data

    name = args.eval or dataset
    if name == "none":
        given = [flag for flag, value in (("--data", args.data), ("--limit", args.limit)) if value is not None]
        if given:
            raise DfquantError(f"{' and '.join(given)} choose{'s' if len(given) == 1 else ''} evaluation data, but --eval none evaluates nothing")
        return None
    if name == "digits" and args.data is not None:
        raise DfquantError("the digits data is embedded (scikit-learn's load_digits); --data is for cifar10 (an .npz) or imagenet (a folder)")
    if name != dataset:
        raise DfquantError(f"--eval {name} scores a {dataset} model on {name} images: its labels would not mean the model's classes (--eval {dataset} or --eval none)")
    data = load_eval_data(name, args.data, limit=args.limit)
    classes = getattr(getattr(data, "dataset", None), "classes", None)
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        print(
            f"dfquant: note: {args.data} has {len(classes)} class folders and the model {num_classes} classes: "
            f"label i is the i-th folder in sorted order, which is the model's class i only for the full, complete set of folders",
            file=sys.stderr,
        )
    return data


# quantize flags that only the learned methods use (dest -> flag, value when not given); --device
# and --seed are left out: they do not change what a rounding method (deterministic, instant) makes
LEARNED_FLAGS = {
    "init": ("--init", None),
    "samples": ("--samples", None),
    "distill_iters": ("--distill-iters", None),
    "recon_iters": ("--recon-iters", None),
    "lr_round": ("--lr-round", None),
    "act_calib": ("--act-calib", None),
    "save_synthetic": ("--save-synthetic", None),
    "synthetic": ("--synthetic", None),
}


def _refuse_learned_flags(args) -> None:
    """A rounding method would ignore these flags: refuse them rather than quietly drop them."""
    from .api import LEARNED_METHODS

    given = [flag for dest, (flag, unset) in LEARNED_FLAGS.items() if getattr(args, dest) != unset]
    if given:
        verb = "apply" if len(given) > 1 else "applies"
        raise DfquantError(f"{', '.join(given)} {verb} only to --method {' or '.join(LEARNED_METHODS)}, not to {args.method} (it uses no data and no training)")


def _genie_options(args) -> Dict[str, Any]:
    opts: Dict[str, Any] = {}
    if args.init is not None:
        opts["init"] = args.init
    for key in ("samples", "distill_iters", "recon_iters", "lr_round", "act_calib", "save_synthetic"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.synthetic:
        from .synthesis import images_metadata

        for path in args.synthetic:
            made_for = images_metadata(path).get("model")
            if made_for and made_for != args.model:
                print(f"dfquant: note: {path} was synthesized from {made_for}, not {args.model}", file=sys.stderr)
        opts["synthetic"] = list(args.synthetic)
    opts["device"] = args.device
    opts["seed"] = args.seed
    return opts


def cmd_quantize(args) -> int:
    import dfquant
    from .api import LEARNED_METHODS
    from .data import input_range
    from .models import model_spec
    from .serialization import save_quantized

    if (args.no_kernel or args.no_channel) and args.method != "squant":
        raise DfquantError(f"--no-kernel/--no-channel switch the levels of --method squant only, not of {args.method} (squant-e, squant-k and squant-c are methods of their own)")
    if args.method not in LEARNED_METHODS:
        _refuse_learned_flags(args)
    else:
        given = [flag for flag, on in (("--cle", args.cle), ("--bias-correction", args.bias_correction)) if on]
        if given:
            raise DfquantError(f"{', '.join(given)} {'are DFQ steps' if len(given) > 1 else 'is a DFQ step'} for the rounding methods, not for --method {args.method}")
    if args.onnx:  # refused before any work is done
        from .export import require_onnx, check_output_path

        require_onnx()
        check_output_path(args.onnx)
    elif args.int4_weights:
        raise DfquantError("--int4-weights sets how the ONNX export stores weights: give --onnx FILE too")
    _check_output(args.out, "--out")
    _check_output(args.save_synthetic, "--save-synthetic")
    if args.out and args.out.lower().endswith(".onnx"):
        raise DfquantError(f"--out {args.out} writes a .safetensors model and its .json; for an ONNX file give --onnx {args.out}")
    if args.out and args.save_synthetic:
        from .serialization import model_paths
        from .synthesis import images_path

        if model_paths(args.out)[0].resolve() == images_path(args.save_synthetic).resolve():
            raise DfquantError(f"--out and --save-synthetic both name {model_paths(args.out)[0]}: the model would overwrite the images")
    seen: Dict[str, int] = {}
    for layer, bits in args.layer_bits:
        if layer in seen and seen[layer] != bits:
            raise DfquantError(f"--layer-bits gives {layer} two bit-widths ({seen[layer]} and {bits}): give one")
        seen[layer] = bits
    if args.a_bits is None and not isinstance(args.last_input_bits, _Default):
        raise DfquantError("--last-input-bits sets the classifier input's bits, but --a-bits none quantizes no input")
    if args.a_bits is None and getattr(args, "act_calib", None) is not None:
        raise DfquantError("--act-calib sets where the activation steps start, but --a-bits none quantizes no activation")
    if args.synthetic and (args.distill_iters is not None):
        raise DfquantError("--distill-iters sets the synthesis, but --synthetic uses the given images and synthesizes none")
    if args.method not in LEARNED_METHODS and args.device == "cuda":
        print(f"dfquant: note: --device applies to genie and zeroq; {args.method} runs on the CPU (it takes well under a second)", file=sys.stderr)
    spec = model_spec(args.model)
    model = _load_model(args)
    data = _eval_data(args, spec.dataset, spec.num_classes)
    options: Dict[str, Any] = dict(
        squant_kernel=not args.no_kernel,
        squant_channel=not args.no_channel,
        fold_bn=args.fold_bn,
        cle=args.cle,
        relu6_to_relu=args.relu6_to_relu,
        int32_bias=args.int32_bias,
        bias_correction=args.bias_correction,
        w_range=args.w_range,
        per_channel=not args.per_tensor,
        act_range=args.act_range,
        n_sigma=args.n_sigma,
        quantize_first_input=args.quantize_first_input,
        input_range=input_range(spec.dataset) if args.quantize_first_input else None,
        last_input_bits=int(args.last_input_bits) if args.last_input_bits is not None else None,
        skip=tuple(args.skip),
        layer_w_bits=dict(args.layer_bits),
    )
    if args.method in LEARNED_METHODS:
        options.update(_genie_options(args))
    result: Dict[str, Any] = {"model": args.model, "method": args.method, "w_bits": args.w_bits, "a_bits": args.a_bits}
    if data is not None:
        fp = dfquant.evaluate(model, data, progress=args.progress_on)
        result.update(fp32_top1=fp["top1"], fp32_top5=fp["top5"], n_eval=fp["n"])
    t = time.perf_counter()
    qmodel, report = dfquant.quantize(model, args.method, args.w_bits, args.a_bits, progress=args.progress_on, **options)
    result["quant_time_s"] = time.perf_counter() - t
    result["weight_time_s"] = report.weight_time_s
    if data is not None:
        qa = dfquant.evaluate(qmodel, data, progress=args.progress_on)
        result.update(quant_top1=qa["top1"], quant_top5=qa["top5"])
    result["float_inputs"] = [n for n, _ in report.float_inputs]
    result["unsupported_layers"] = report.unsupported
    result["notes"] = report.notes
    if "genie" in report.config:
        result["genie"] = {k: v for k, v in report.config["genie"].items() if k != "units"}
    if args.out:
        paths = save_quantized(qmodel, args.out, model_name=args.model, config=report.config, report=report.to_dict())
        result["out"] = str(paths[0])
    if args.onnx:
        result["onnx"] = _export(qmodel, args.onnx, 16, {"model_name": args.model, "config": report.config}, args.int4_weights)
        if data is not None:  # what the deployed file scores, beside the fake-quant figure
            from .export import OnnxRuntimeModel

            result["onnx_top1"] = dfquant.evaluate(OnnxRuntimeModel(args.onnx, threads=args.threads), data, progress=args.progress_on)["top1"]
    if args.json:
        if args.report:  # the per-layer report, in the one JSON object
            result["report"] = report.to_dict()
        print(json.dumps(result, default=str))
        return 0
    if args.report:
        print(report.format_table())
        print()
    bits = f"W{args.w_bits}A{args.a_bits if args.a_bits else 'fp'}"
    print(f"{args.model} {args.method} {bits}: quantized in {result['quant_time_s']:.2f} s (weight rounding {report.weight_time_s * 1000:.1f} ms)")
    if data is not None:
        print(f"  FP32 top-1 {result['fp32_top1']:.2f} %   quantized top-1 {result['quant_top1']:.2f} %   ({result['n_eval']} images)")
    if report.float_inputs:
        print(f"  inputs left in float: {', '.join(n for n, _ in report.float_inputs)} (see --report)")
    if report.unsupported:
        print(f"  unsupported layers left in float: {', '.join(report.unsupported)}")
    if not args.report:  # what the run changed or could not do (the per-layer detail is --report's)
        detail = [n for n in report.notes if n.startswith("  ")]
        for note in report.notes:
            if not note.startswith("  "):
                print(f"  note: {note}")
        if detail:
            print(f"  ({len(detail)} more lines of notes: see --report)")
    if args.out:
        print(f"  saved {paths[0]} and {paths[1]}")
    if args.onnx:
        _print_export(result["onnx"], indent="  ")
        if "onnx_top1" in result:
            print(f"  the ONNX file run by onnxruntime: top-1 {result['onnx_top1']:.2f} %")
    return 0


def _bits_label(cfg: Dict[str, Any]) -> str:
    """W4A4, or W4Afp for weight-only, as `quantize` prints it."""
    a = cfg.get("a_bits")
    return f"W{cfg.get('w_bits')}A{a if a is not None else 'fp'}"


def cmd_evaluate(args) -> int:
    import dfquant
    from .models import model_spec
    from .serialization import load_quantized

    if args.file:
        given = [flag for flag, on in (("--weights", args.weights is not None), ("--random-init", args.random_init)) if on]
        if given:
            raise DfquantError(f"{' and '.join(given)} {'load' if len(given) > 1 else 'loads'} a float model; {args.file} is evaluated as saved")
    if args.file and args.file.lower().endswith(".onnx"):
        from .export import OnnxRuntimeModel

        qmodel = OnnxRuntimeModel(args.file, threads=args.threads)
        info = qmodel.metadata
        saved_name = info.get("model_name")
        if saved_name and args.model and args.model != saved_name:
            raise DfquantError(f"{args.file} was exported from {saved_name}, not {args.model}")
        name = saved_name or args.model
        if name is None and args.eval is None:
            raise DfquantError(f"{args.file} has no dfquant metadata naming its model: give --model NAME or --eval DATASET")
        dataset = model_spec(name).dataset if name else args.eval
        cfg = info.get("config") or {}
        how = f"{cfg.get('method')} {_bits_label(cfg)}, " if cfg.get("method") else ""
        what = f"{args.file} ({name or 'no model name'}, {how}run by onnxruntime)"
    elif args.file:
        qmodel, info = load_quantized(args.file)
        name = info.get("model_name")
        if args.model and args.model != name:
            raise DfquantError(f"{args.file} holds {name or 'a model outside the registry'}; --model {args.model} does not apply to it")
        dataset = model_spec(name).dataset if name else "digits"
        what = f"{args.file} ({name}, {info['config'].get('method')} {_bits_label(info['config'])})"
    elif args.model:
        qmodel = _load_model(args)
        name = args.model
        dataset = model_spec(args.model).dataset
        what = f"{args.model} (float)"
    else:
        raise DfquantError("give a quantized model file or --model NAME")
    data = _eval_data(args, dataset, model_spec(name).num_classes if name else None)
    if data is None:
        raise DfquantError("nothing to evaluate on: choose --eval")
    res = dfquant.evaluate(qmodel, data, progress=args.progress_on)
    if args.json:
        print(json.dumps(dict(res, file=args.file, model=name if args.file else args.model)))
    else:
        print(f"{what}: top-1 {res['top1']:.2f} %, top-5 {res['top5']:.2f} % on {res['n']} images")
    return 0


def cmd_synthesize(args) -> int:
    from .data import input_normalization
    from .models import model_spec
    from .synthesis import grid_path, images_path, save_image_grid, save_images, synthesize

    _check_output(args.out, "--out")
    out, png = images_path(args.out), grid_path(args.out)  # names with dots (seed0.5) keep their tail
    from .devices import resolve_device
    from .synthesis import CPU_BUDGET

    model = _load_model(args)
    budget = args.budget if args.budget != "auto" else ("gpu" if resolve_device(args.device).type == "cuda" else "cpu")
    kw: Dict[str, Any] = dict(CPU_BUDGET) if budget == "cpu" else {}
    if args.iters is not None:
        kw["iters"] = args.iters
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    t = time.perf_counter()
    images = synthesize(model, args.n, method=args.method, device=args.device, seed=args.seed, progress=args.progress_on, **kw)
    dt = time.perf_counter() - t
    # no wall time in the file: the same seed gives the same bytes
    meta = {"model": args.model, "method": args.method, "seed": args.seed, "budget": budget}
    meta.update(kw)
    save_images(images, out, metadata=meta)
    mean, std = input_normalization(model_spec(args.model).dataset)  # so the grid shows the images' colours
    save_image_grid(images, png, mean=mean, std=std)
    steps = f"{kw['iters']} iterations per batch" if "iters" in kw else f"the {args.method} default iterations"
    print(f"wrote {len(images)} images to {out} and a grid of the first {min(64, len(images))} to {png} ({dt:.1f} s; {budget} budget, {steps})")
    return 0


def _add_int4_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--int4-weights",
        action="store_true",
        help="store the ONNX weights of 2-4 bit layers packed as INT4 (opset 21, half the size); onnxruntime then "
        "runs those layers in float on the dequantized weights instead of its int8 kernels",
    )


def _export(qmodel, out: str, check: int, metadata: Dict[str, Any], int4_weights: bool = False) -> Dict[str, Any]:
    """Export to ONNX and (check > 0) compare onnxruntime's outputs with the model's on random inputs."""
    import torch

    from .export import check_onnx, export_onnx

    summary = export_onnx(qmodel, out, metadata=metadata, int4_weights=int4_weights)
    if int4_weights and not summary["int4_weights"]:
        print("note: --int4-weights packed nothing: no layer has 2-4 bit weight codes whose zero points fit int4", file=sys.stderr)
    if check > 0:
        gen = torch.Generator().manual_seed(0)
        inputs = torch.randn(check, *qmodel.input_size, generator=gen)
        summary["check"] = check_onnx(qmodel, summary["path"], inputs)
    return summary


def _print_export(summary: Dict[str, Any], indent: str = "") -> None:
    print(
        f"{indent}exported {summary['path']} ({summary['bytes'] / 1024:.0f} KiB, opset {summary['opset']}): "
        f"{summary['int8_weights']} int8 weight tensors, "
        + (f"{summary['int4_weights']} packed int4 weight tensors, " if summary.get("int4_weights") else "")
        + f"{summary['quantized_inputs']} quantized activation tensors"
    )
    if summary["float_weights"]:
        print(f"{indent}  weights stored as their exact float values (an 8-bit grid without 0: no int8 zero point fits): {', '.join(summary['float_weights'])}")
    if summary["float_batchnorm"]:
        print(f"{indent}  {summary['float_batchnorm']} BatchNormalization ops stay float in the file (quantize with --fold-bn for integer deployment)")
    if "check" in summary:
        c = summary["check"]
        for key, what in (("file", "the export's graph in torch"), ("model", "dfquant's model")):
            print(
                f"{indent}  onnxruntime vs {what} on {c['n']} random inputs: max |diff| {c[key]['max_abs_diff']:.3g} "
                f"({c[key]['rel_max_diff']:.2g} of the largest output), arg-max agreement {100 * c[key]['argmax_agreement']:.1f} %"
            )


def cmd_export(args) -> int:
    from .serialization import load_quantized

    if args.check < 0:
        raise DfquantError(f"--check must be 0 or more, got {args.check}")
    from .export import check_output_path

    check_output_path(args.out)  # before loading and exporting
    qmodel, info = load_quantized(args.file)
    summary = _export(qmodel, args.out, args.check, {"model_name": info.get("model_name"), "config": info.get("config", {})}, args.int4_weights)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_export(summary)
    return 0


def cmd_list(args) -> int:
    from .api import METHODS
    from .models import list_models, model_spec

    print("models:")
    for name in list_models():
        s = model_spec(name)
        print(f"  {name:<14} {s.dataset:<9} input {s.input_size}")
    print("methods: " + ", ".join(METHODS))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(json_out=args.json, progress=args.progress_on, retrain=args.retrain)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.progress_on = (args.progress or sys.stderr.isatty()) and not args.no_progress
    if args.threads is not None:
        if args.threads < 1:
            print("dfquant: error: --threads must be at least 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    handlers = {"quantize": cmd_quantize, "evaluate": cmd_evaluate, "synthesize": cmd_synthesize, "list": cmd_list, "demo": cmd_demo, "export": cmd_export}
    try:
        return handlers[args.command](args)
    except DfquantError as exc:
        print(f"dfquant: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write that failed after the checks (disk full, permissions changed)
        print(f"dfquant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
