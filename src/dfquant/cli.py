"""Command-line interface: maps flags to the configs' fields, calls the library, prints.

The quantization flags are built from :class:`dfquant.config.QuantConfig`,
:class:`dfquant.dfmpc.DfmpcConfig` and :class:`dfquant.genie.GenieConfig` (their help, choices and defaults); only the flags a user gives
reach the library, which checks them and names the API parameter in its errors. :func:`main`
translates those names into flags (``w_bits`` -> ``--w-bits``), so every error is one line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import re
import sys
import time
from typing import Any, Dict, List, Optional

from .errors import DfquantError, Stopped


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line that names the flag and points to --help."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"dfquant: error: {message} (see {self.prog} --help)\n")


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


class _LayerBits(argparse.Action):
    """``--layer-bits NAME=BITS`` (repeatable) into one {name: bits} mapping."""

    def __call__(self, parser, namespace, value, option_string=None):
        name, sep, bits = value.rpartition("=")
        if not sep or not name:
            raise argparse.ArgumentError(self, f"expected NAME=BITS (e.g. layer1.0.conv1=8), got {value!r}")
        try:
            b = int(bits)
        except ValueError:
            raise argparse.ArgumentError(self, f"expected an integer bit-width after '=', got {value!r}") from None
        mapping = dict(getattr(namespace, self.dest, None) or {})
        if mapping.get(name, b) != b:
            raise argparse.ArgumentError(self, f"gives {name} two bit-widths ({mapping[name]} and {b}): give one")
        mapping[name] = b
        setattr(namespace, self.dest, mapping)


#: Config fields whose flag takes a special parser.
_BITS_OR_NONE = ("a_bits", "last_input_bits", "second_input_bits", "low_bits")
#: Defaults the help states in words (they depend on the method).
_SHOWN_DEFAULTS = {"a_bits": "4; none for --method dfmpc", "w_grid": "none: the --w-range grid; paper for --method dfmpc"}


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _add_config_flags(group, config_cls, exclude=()) -> None:
    """One flag per field of ``config_cls`` offered on the command line (``option(cli=True)``)."""
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        if not meta.get("cli", True) or f.name in exclude:
            continue
        meta["help"] = cli_message(meta["help"])  # the flags' names, not the API's
        kw: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)
        shown = _SHOWN_DEFAULTS.get(f.name, "none" if f.default is None else f.default)
        if f.name == "layer_w_bits":
            kw.update(action=_LayerBits, metavar="NAME=BITS", help=f"{meta['help']} (repeatable; names as in --report)")
        elif f.name == "skip":
            kw.update(action="append", metavar="LAYER", help=f"{meta['help']} (repeatable)")
        elif isinstance(f.default, bool):
            kw.update(action="store_false" if f.default else "store_true", help=meta["help"])
        else:
            default = "" if "default" in meta["help"] else f" (default {shown})"
            kw.update(type=_bits_or_none if f.name in _BITS_OR_NONE else _field_type(f), help=meta["help"] + default)
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        group.add_argument(flag_of(f), **kw)


def _field_type(f: dataclasses.Field):
    text = str(f.type)
    return int if "int" in text else float if "float" in text else str


def _quantize_parser(sub) -> None:
    from .config import QuantConfig
    from .dfmpc import DfmpcConfig
    from .genie import GenieConfig

    q = sub.add_parser("quantize", help="quantize a model, evaluate it, optionally save or export it")
    _add_model_options(q)
    _add_config_flags(q, QuantConfig)
    d = q.add_argument_group("DF-MPC (--method dfmpc; with rtn/squant any of these flags adds its compensation step)")
    _add_config_flags(d, DfmpcConfig)
    g = q.add_argument_group("learned methods (genie, zeroq); the synthesis flags also for DF-MPC's --compensate fitted / --bn-recal synthetic")
    _add_config_flags(g, GenieConfig, exclude=("seed",))
    g.add_argument("--save-synthetic", default=None, help="write the synthetic images to this file")
    g.add_argument("--synthetic", nargs="+", default=None, metavar="FILE", help="use the images in these files (concatenated, e.g. parts from parallel `dfquant synthesize --seed i` runs) instead of synthesizing")
    _add_eval_options(q)
    q.add_argument("--out", default=None, help="save the quantized model to FILE.safetensors (+ FILE.json)")
    q.add_argument("--onnx", default=None, metavar="FILE", help="also export the quantized model to FILE.onnx (QDQ; see `dfquant export`)")
    _add_int4_option(q)
    q.add_argument("--json", action="store_true", help="print one JSON object with the results")
    q.add_argument("--report", action="store_true", help="print the per-layer report table")
    q.add_argument("--plot", default=None, metavar="FILE.png", help="draw the per-layer weight error and error sums against RTN, bits per layer, float inputs (needs matplotlib)")


def _add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="registered model name (see `dfquant list`)")
    p.add_argument("--weights", default=None, help="checkpoint file (.pth/.th/.safetensors)")
    p.add_argument("--random-init", action="store_true", help="use random weights drawn from --seed (timing only)")
    p.add_argument("--seed", type=int, default=0, help="seed of all randomness: synthesis, reconstruction, --random-init (default 0)")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", default=None, choices=["digits", "cifar10", "imagenet", "none"], help="evaluation data (default: the model's own dataset)")
    p.add_argument("--data", default=None, help="evaluation data path (.npz for cifar10, a folder for imagenet)")
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate on the first N images only (default: all)")


def _add_int4_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--int4-weights",
        action="store_true",
        help="store the ONNX weights of 2-4 bit layers packed as INT4 (opset 21, half the size); onnxruntime then "
        "runs those layers in float on the dequantized weights instead of its int8 kernels",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dfquant", description="Data-free quantization of trained PyTorch CNNs.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (1 is often fastest on a busy machine)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="the embedded default: digits CNN, every method where they differ (W4A4, W3A3, W2A4, MP2/6), in under a minute")
    d.add_argument("--json", action="store_true", help="print the results as one JSON object")
    d.add_argument("--retrain", action="store_true", help="retrain the digits CNN instead of using the cached one")
    d.add_argument("--plot", default=None, metavar="FILE.png", help="draw the table: top-1 drop against the setting, per method (needs matplotlib)")

    _quantize_parser(sub)

    e = sub.add_parser("evaluate", help="load a saved quantized model (or a float one) and evaluate it")
    e.add_argument("file", nargs="?", help="a .safetensors file written by `dfquant quantize --out`, or an .onnx file (run by onnxruntime)")
    _add_model_options(e, required=False)
    _add_eval_options(e)
    e.add_argument("--json", action="store_true")

    s = sub.add_parser("synthesize", help="distil synthetic images from a model's BN statistics (Genie-D or ZeroQ)")
    _add_model_options(s)
    s.add_argument("-n", type=int, default=256, help="number of images (default 256)")
    s.add_argument("--method", default="genie", choices=["genie", "zeroq"], help="Genie-D or ZeroQ's pixels (default genie)")
    s.add_argument("--iters", type=int, default=None, help="iterations per batch (default: the budget's)")
    s.add_argument("--batch-size", type=int, default=None, help="images per optimized batch (default: the budget's)")
    s.add_argument("--budget", default="auto", choices=["auto", "gpu", "cpu"], help="defaults for --iters/--batch-size: gpu = the method's published ones, cpu = ours for a CPU, auto = by the device (default auto)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default auto)")
    s.add_argument("--out", required=True, help="output file (.safetensors); a PNG grid is written beside it")
    s.add_argument("--clip-to-pixels", action="store_true", help="clip the saved images, per channel, to what pixels in [0, 1] map to (for tools that calibrate an input quantizer on them)")

    x = sub.add_parser("export", help="export a saved quantized model to ONNX with QuantizeLinear/DequantizeLinear nodes (int8 or packed int4 weight codes)")
    x.add_argument("file", help="a .safetensors file written by `dfquant quantize --out`")
    x.add_argument("--out", required=True, help="output file (.onnx)")
    x.add_argument("--check", type=int, default=16, metavar="N", help="run the file with onnxruntime on N random inputs and compare with dfquant's model (default 16; 0: no check)")
    _add_int4_option(x)
    x.add_argument("--fold-bn", action="store_true", help="fold each float BatchNorm that follows a quantized conv into its weight scales and int32 bias, so onnxruntime can fuse integer QLinearConv kernels")
    x.add_argument("--integer-adds", action="store_true", help="also quantize residual sums at 8 bits (conv output range from its BN statistics; implies --fold-bn): the residual convs and sums can then run as QLinearConv/QLinearAdd; changes the file from dfquant's model, which --check measures")
    x.add_argument("--bench", action="store_true", help="time the file in onnxruntime (latency at batch 1, throughput at batch 64) against the float model exported the same way and torch FP32")
    x.add_argument("--threads", type=int, default=1, help="intra-op threads for --bench, onnxruntime and torch alike (default 1)")
    x.add_argument("--json", action="store_true", help="print one JSON object with the export summary")

    i = sub.add_parser("inspect", help="what quantize will do with a model, before doing it: every layer, its BN, input range, CLE/DF-MPC partner, Genie unit")
    _add_model_options(i)
    from .config import QuantConfig

    _add_config_flags(i, QuantConfig, exclude=("method", "init"))
    i.add_argument("--json", action="store_true", help="print one JSON object")

    f = sub.add_parser("info", help="what a saved quantized model is (method, bits per layer, protocol, digests, sizes); no data needed")
    f.add_argument("file", help="a .safetensors file written by dfquant quantize --out (or its .json sidecar)")
    f.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("list", help="list models and methods")
    return parser


# --------------------------------------------------------------------------------------------
# Errors: the library names API parameters, the command line its flags
# --------------------------------------------------------------------------------------------


def _param_flags() -> Dict[str, str]:
    from .config import QuantConfig
    from .dfmpc import DfmpcConfig
    from .genie import GenieConfig

    flags = {f.name: flag_of(f) for cls in (QuantConfig, DfmpcConfig, GenieConfig) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    flags.update(synthetic="--synthetic", save_synthetic="--save-synthetic", seed="--seed", iters="--iters", n="-n")
    return flags


def cli_message(message: str, param: Any = None) -> str:
    """A library message with its API parameter names replaced by the flags that set them.

    ``name=value`` is always a parameter, and so is a name with an underscore; a plain word
    (``skip``, ``seed``) only where the error says it is about that parameter (``param``)."""
    flags = _param_flags()
    about = {param} if isinstance(param, str) else set(param or ())
    for name, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"\b{name}=None\b", f"{flag} none", message)
        message = re.sub(rf"(?<![\w-]){name}='?([\w.-]+)'?", rf"{flag} \1", message)
        if "_" in name or name in about:
            message = re.sub(rf"(?<![\w-]){name}\b", flag, message)
    return message


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _check_output(path: Optional[str], flag: str) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    import os

    from .io.files import check_writable

    if path is None:
        return
    if not path.strip():
        raise DfquantError(f"{flag} needs a file name, got an empty one")
    if path.endswith(("/", os.sep)):
        raise DfquantError(f"{flag} {path}: that is a folder; give a file name (in it, if you like)")
    check_writable(path, flag)


def _load_model(args) -> Any:
    import torch

    from .assets import MODEL_WEIGHTS, asset_path
    from .data import digits_model
    from .models import create_model, model_spec

    spec = model_spec(args.model)
    if args.weights is not None and args.random_init:
        raise DfquantError("--weights and --random-init contradict each other: give one")
    if args.model == "digits_cnn" and args.weights is None and not args.random_init:
        return digits_model(progress=args.progress_on)
    if args.random_init:  # drawn from the command's seed: the same command, the same model
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            return create_model(args.model)
    weights = args.weights
    if weights is None and args.model in MODEL_WEIGHTS:
        found = asset_path(MODEL_WEIGHTS[args.model])
        weights = str(found) if found else None
    if weights is None:
        raise DfquantError(f"--weights PATH is required for {spec.name} (dfquant ships no pretrained weights; --random-init for timing)")
    args.weights_used = weights  # what --json reports
    return create_model(args.model, weights=weights)


def _eval_data(args, dataset: str, num_classes: "int | None" = None, model_name: "str | None" = None):
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
    data = load_eval_data(name, args.data, limit=args.limit, preprocessing=model_name)  # the model's input scaling
    classes = getattr(getattr(data, "dataset", None), "classes", None)
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        print(
            f"dfquant: note: {args.data} has {len(classes)} class folders and the model {num_classes} classes: "
            f"label i is the i-th folder in sorted order, which is the model's class i only for the full, complete set of folders",
            file=sys.stderr,
        )
    return data


def _quantize_options(args, spec) -> Dict[str, Any]:
    """The flags given, as ``dfquant.quantize`` keyword options (config fields and data)."""
    from .config import LEARNED_METHODS, QUANT_FIELDS
    from .dfmpc import DFMPC_FIELDS
    from .genie.config import GENIE_FIELDS
    from .models import input_range_of

    options = {k: getattr(args, k) for k in QUANT_FIELDS + DFMPC_FIELDS + GENIE_FIELDS if hasattr(args, k) and k != "seed"}
    if options.get("skip") is not None:
        options["skip"] = tuple(options["skip"])
    if options.get("quantize_first_input"):
        options["input_range"] = input_range_of(spec.name)  # the model's own scaling of valid pixels
    synthesizes = options.get("compensation") == "fitted" or options.get("bn_recal") == "synthetic"  # DF-MPC's images
    if options.get("method", "squant") in LEARNED_METHODS or synthesizes:
        options["seed"] = args.seed
    if args.synthetic:
        from .distributed import is_main

        options["synthetic"] = list(args.synthetic)
        if is_main():
            _note_foreign_images(args.synthetic, args.model)
    if args.save_synthetic is not None:
        options["save_synthetic"] = args.save_synthetic
    return options


def _note_foreign_images(paths, model_name: str) -> None:
    """A note for image files made from another model (allowed: a deliberate experiment)."""
    from .io.images import images_metadata

    for path in paths:
        try:
            made_for = images_metadata(path).get("model")
        except DfquantError:
            return  # the library names what is wrong with the file (or with the options) first
        if made_for and made_for != model_name:
            print(f"dfquant: note: {path} was synthesized from {made_for}, not {model_name}", file=sys.stderr)


def _check_quantize_outputs(args) -> None:
    """Outputs are checked before any work (a typo must not cost minutes of synthesis)."""
    if args.onnx:
        from .io.export import check_output_path, require_onnx

        require_onnx()
        check_output_path(args.onnx)
    elif args.int4_weights:
        raise DfquantError("--int4-weights sets how the ONNX export stores weights: give --onnx FILE too")
    _check_output(args.out, "--out")
    _check_output(args.save_synthetic, "--save-synthetic")
    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
        _check_output(args.plot, "--plot")
    if args.out and args.out.lower().endswith(".onnx"):
        raise DfquantError(f"--out {args.out} writes a .safetensors model and its .json; for an ONNX file give --onnx {args.out}")
    if args.out and args.save_synthetic:
        from .io.images import images_path
        from .io.serialization import model_paths

        if model_paths(args.out)[0].resolve() == images_path(args.save_synthetic).resolve():
            raise DfquantError(f"--out and --save-synthetic both name {model_paths(args.out)[0]}: the model would overwrite the images")


def cmd_quantize(args) -> int:
    import dfquant

    from . import distributed
    from .config import LEARNED_METHODS
    from .models import model_spec

    if distributed.is_main():  # the files are rank 0's (on its machine)
        _check_quantize_outputs(args)
    spec = model_spec(args.model)
    options = _quantize_options(args, spec)
    model = _load_model(args)
    data = _eval_data(args, spec.dataset, spec.num_classes, spec.name) if distributed.is_main() else None  # rank 0 evaluates
    method = options.pop("method", "squant")
    if distributed.active() and method not in LEARNED_METHODS:
        raise DfquantError(f"--method {method} has nothing to share between processes: run it without torchrun (torchrun runs --method {' or '.join(LEARNED_METHODS)})")
    result: Dict[str, Any] = {"model": args.model, "method": method, "w_bits": options.get("w_bits", 4), "a_bits": options.get("a_bits", 4)}
    t = time.perf_counter()
    qmodel, report = dfquant.quantize(model, method, progress=args.progress_on, **options)
    result.update(w_bits=report.w_bits, a_bits=report.a_bits, quant_time_s=time.perf_counter() - t, weight_time_s=report.weight_time_s, stage_times=report.stage_times)
    if not distributed.is_main():
        return 0
    if data is not None:  # after quantizing: in a job the other processes do not wait for it
        fp = dfquant.evaluate(model, data, progress=args.progress_on)
        result.update(fp32_top1=fp["top1"], fp32_top5=fp["top5"], n_eval=fp["n"])
        qa = dfquant.evaluate(qmodel, data, reference=model, progress=args.progress_on)
        result.update(quant_top1=qa["top1"], quant_top5=qa["top5"], agree_top1=qa["agree_top1"], logit_mse=qa["logit_mse"])
    result.update(float_inputs=[n for n, _ in report.float_inputs], unsupported_layers=report.unsupported, notes=report.notes)
    result.update(_run_facts(args, spec.dataset, report.config))
    if "genie" in report.config:
        result["genie"] = {k: v for k, v in report.config["genie"].items() if k != "units"}
    if args.plot:
        result["plot"] = str(_plot_layers(model, report, args.plot))
    if "dfmpc" in report.config:
        result["dfmpc"] = report.config["dfmpc"]
    if args.out:
        paths = dfquant.save_quantized(qmodel, args.out, model_name=args.model, config=report.config, report=report.to_dict())
        result["out"] = str(paths[0])
    if args.onnx:
        result["onnx"] = _export(qmodel, args.onnx, 16, _onnx_metadata(args.model, report.config), args.int4_weights)
        if data is not None:  # what the deployed file scores, beside the fake-quant figure
            result["onnx_top1"] = dfquant.evaluate(dfquant.OnnxRuntimeModel(args.onnx, threads=args.threads), data, progress=args.progress_on)["top1"]
    if args.json:
        if args.report:  # the per-layer report, in the one JSON object
            result["report"] = report.to_dict()
        print(json.dumps(result, default=str))
        return 0
    _print_quantize(args, result, report)
    return 0


def _run_facts(args, dataset: str, config: Dict[str, Any]) -> Dict[str, Any]:
    """What --json records of a run besides its figures: the files read, the protocol settings,
    and the software and CPU that made it."""
    import torch

    import dfquant

    from .assets import CIFAR10_TEST_NPZ, IMAGENET_NPZ, asset_path
    from .devices import cpu_name
    from .io.serialization import PROTOCOL_KEYS

    if getattr(args, "eval", None) == "none":
        data = None
    elif args.data is not None:
        data = args.data
    elif dataset == "digits":
        data = "embedded (scikit-learn load_digits)"
    else:
        found = asset_path(CIFAR10_TEST_NPZ if dataset == "cifar10" else IMAGENET_NPZ)
        data = str(found) if found else None
    weights = getattr(args, "weights_used", None) or ("random init" if args.random_init else "trained on first use (cached)")
    return dict(
        paths=dict(weights=weights, data=data),
        protocol={k: config[k] for k in PROTOCOL_KEYS if k in config},
        version=dict(dfquant=dfquant.__version__, torch=torch.__version__, config=config.get("config_version")),
        cpu=cpu_name(),
        threads=torch.get_num_threads(),
    )


def _plot_layers(model, report, path: str):
    """The --plot picture: this run's per-layer errors beside round-to-nearest's at the same bits."""
    import dfquant

    from .plots import plot_layers

    cfg = report.config
    keep = ("layer_w_bits", "skip", "per_channel", "fold_bn", "first_last_w_bits", "last_input_bits", "second_input_bits", "quantize_shortcuts")
    baseline = report if cfg["method"] == "rtn" else dfquant.quantize(model, "rtn", cfg["w_bits"], cfg["a_bits"], **{k: cfg[k] for k in keep})[1]
    return plot_layers(report, baseline, path)


def _print_quantize(args, result: Dict[str, Any], report) -> None:
    if args.report:
        print(report.format_table())
        print()
    print(f"{args.model} {result['method']} {_bits_label(result)} ({report.config.get('protocol', 'dfquant')}'s protocol): quantized in {result['quant_time_s']:.2f} s (weight rounding {report.weight_time_s * 1000:.1f} ms)")
    if "quant_top1" in result:
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
        print(f"  saved {result['out']} and its .json")
    if args.plot:
        print(f"  drew {result['plot']}")
    if args.onnx:
        _print_export(result["onnx"], indent="  ")
        if "onnx_top1" in result:
            print(f"  the ONNX file run by onnxruntime: top-1 {result['onnx_top1']:.2f} %")


def _bits_label(cfg: Dict[str, Any]) -> str:
    """W4A4, or W4Afp for weight-only, as `quantize` prints it."""
    a = cfg.get("a_bits")
    return f"W{cfg.get('w_bits')}A{a if a is not None else 'fp'}"


def cmd_evaluate(args) -> int:
    import dfquant

    from .models import model_spec

    if args.file:
        given = [flag for flag, on in (("--weights", args.weights is not None), ("--random-init", args.random_init)) if on]
        if given:
            raise DfquantError(f"{' and '.join(given)} {'load' if len(given) > 1 else 'loads'} a float model; {args.file} is evaluated as saved")
    if args.file and args.file.lower().endswith(".onnx"):
        qmodel = dfquant.OnnxRuntimeModel(args.file, threads=args.threads)
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
        qmodel, info = dfquant.load_quantized(args.file)
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
    data = _eval_data(args, dataset, model_spec(name).num_classes if name else None, name)
    if data is None:
        raise DfquantError("nothing to evaluate on: choose --eval")
    res = dfquant.evaluate(qmodel, data, progress=args.progress_on)
    if args.json:
        print(json.dumps(dict(res, file=args.file, model=name if args.file else args.model)))
    else:
        print(f"{what}: top-1 {res['top1']:.2f} %, top-5 {res['top5']:.2f} % on {res['n']} images")
    return 0


def cmd_synthesize(args) -> int:
    from . import distributed
    from .devices import resolve_device
    from .genie import GenieConfig, synthesize
    from .io.images import grid_path, images_path, save_image_grid, save_images
    from .models import preprocessing_of

    if distributed.is_main():  # the files are rank 0's (on its machine)
        _check_output(args.out, "--out")
    out, png = images_path(args.out), grid_path(args.out)  # names with dots (seed0.5) keep their tail
    model = _load_model(args)
    dev = resolve_device(args.device)
    cfg = GenieConfig(budget=args.budget, device=args.device, seed=args.seed, distill_iters=args.iters, distill_batch=args.batch_size)
    resolved = cfg.resolve(dev.type, args.method)
    t = time.perf_counter()
    images = synthesize(model, args.n, cfg, method=args.method, progress=args.progress_on)
    dt = time.perf_counter() - t
    if not distributed.is_main():  # in a job, rank 0 writes the files
        return 0
    pre = preprocessing_of(args.model)
    print(_describe_images(images, pre))
    if args.clip_to_pixels:
        images = pre.clamp(images)
    # no wall time in the file: the same seed gives the same bytes
    meta = {"model": args.model, "method": args.method, "seed": args.seed, "budget": resolved.budget, "iters": resolved.distill_iters, "batch_size": resolved.distill_batch,
            "clip_to_pixels": bool(args.clip_to_pixels)}
    save_images(images, out, metadata=meta)
    save_image_grid(images, png, mean=pre.mean, std=pre.std)
    procs = f" on {distributed.world_size()} processes" if distributed.active() else ""
    print(f"wrote {len(images)} images to {out} and a grid of the first {min(64, len(images))} to {png} ({dt:.1f} s{procs}; {resolved.budget} budget, {resolved.distill_iters} iterations per batch)")
    return 0


def _onnx_metadata(model_name: Optional[str], config: Dict[str, Any]) -> Dict[str, Any]:
    """What an ONNX file says of itself: the model and config, and, for a registry model, how to
    feed it (pixel scaling, layout, size) and what its outputs mean (the label order)."""
    from .data import LABEL_ORDER
    from .models import list_models, model_spec, preprocessing_of

    meta: Dict[str, Any] = {"model_name": model_name, "config": config}
    if model_name in list_models():
        spec, pre = model_spec(model_name), preprocessing_of(model_name)
        meta["input"] = dict(layout="NCHW", size=list(spec.input_size), pixels=("RGB" if spec.input_size[0] == 3 else f"{spec.input_size[0]} channel(s)") + " in [0, 1] (uint8 / 255)", mean=list(pre.mean), std=list(pre.std),
                             rule=pre.description or "(pixel - mean) / std, per channel")
        meta["labels"] = LABEL_ORDER.get(spec.dataset)
    return meta


def _describe_images(images, pre) -> str:
    """One line on what synthetic images look like against the model's real input range."""
    outside = float((pre.clamp(images) != images).float().mean())
    lo, hi = pre.input_range()
    return (f"images: {tuple(images.shape)}, values in [{float(images.min()):.2f}, {float(images.max()):.2f}] (mean {float(images.mean()):.2f}, "
            f"std {float(images.std()):.2f}); pixels in [0, 1] map to [{lo:.2f}, {hi:.2f}]; {100 * outside:.1f} % of values lie outside their channel's pixel range"
            + ("" if outside == 0 else " (--clip-to-pixels clips them)"))


def _export(qmodel, out: str, check: int, metadata: Dict[str, Any], int4_weights: bool = False, fold_bn: bool = False, integer_adds: bool = False) -> Dict[str, Any]:
    """Export to ONNX, say which layers onnxruntime runs as integer kernels, and (check > 0) compare
    onnxruntime's outputs with the model's on random inputs."""
    import torch

    from .io.export import check_onnx, export_onnx
    from .io.runtime import runtime_kernels

    summary = export_onnx(qmodel, out, metadata=metadata, int4_weights=int4_weights, fold_bn=fold_bn, integer_adds=integer_adds)
    if importlib.util.find_spec("onnxruntime") is not None:  # what it runs as integer kernels
        summary["kernels"] = runtime_kernels(summary["path"])
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
    if summary.get("int16_weights"):
        print(f"{indent}  weights stored as int16 codes (an 8-bit grid without 0: no int8 zero point fits; opset 21): {', '.join(summary['int16_weights'])}")
    if summary["float_weights"]:
        print(f"{indent}  weights stored as their exact float values (an 8-bit grid without 0: no int8 zero point fits): {', '.join(summary['float_weights'])}")
    if summary["float_batchnorm"]:
        print(f"{indent}  {summary['float_batchnorm']} BatchNormalization ops stay float in the file (export with --fold-bn, or quantize with --fold-bn, for integer deployment)")
    if summary.get("folded_bn"):
        print(f"{indent}  {summary['folded_bn']} BatchNorm ops folded into their quantized convs")
    if summary.get("coarsened_channels"):
        print(f"{indent}  weight grids coarsened so the bias fits int32 (dead channels, see docs/export.md): "
              + ", ".join(f"{name} {len(ch)} channel(s)" for name, ch in summary["coarsened_channels"].items()))
    adds = summary.get("residual_adds") or []
    if adds:
        print(f"{indent}  {sum(a['quantized'] for a in adds)} of {len(adds)} residual sums quantized at 8 bits (--integer-adds)"
              + "".join(f"; {a['add']}: {a['why']}" for a in adds if not a["quantized"]))
    if "kernels" in summary:
        _print_kernels(summary["kernels"], indent)
    if "check" in summary:
        c = summary["check"]
        for key, what in (("file", "the export's graph in torch"), ("model", "dfquant's model")):
            print(
                f"{indent}  onnxruntime vs {what} on {c['n']} random inputs: max |diff| {c[key]['max_abs_diff']:.3g} "
                f"({c[key]['rel_max_diff']:.2g} of the largest output), arg-max agreement {100 * c[key]['argmax_agreement']:.1f} %"
            )
        t = c["tolerance"]
        verdict = "the file computes the model" if c["verdict"] == "ok" else "THE FILE DIFFERS from the model"
        print(f"{indent}  verdict: {verdict} (tolerance against the export's graph: at most {t['rel_max_diff']:g} of the largest output, "
              f"arg-max agreement at least {100 * t['argmax_agreement']:g} %)")


def _print_kernels(k: Dict[str, Any], indent: str = "") -> None:
    """Which layers onnxruntime runs as integer kernels, and why the others stay float (grouped by reason)."""
    integer_ops = ", ".join(f"{op} {n}" for op, n in k["ops"].items() if op.startswith("Q") and op != "QuantizeLinear")
    print(f"{indent}  onnxruntime ({k['level']} optimizations) runs {k['integer_layers']} of {k['layers']} conv/gemm layers as integer kernels"
          f" ({k['integer_convs']} of {k['convs']} convs){': ' + integer_ops if integer_ops else ''}")
    reasons: Dict[str, list] = {}
    for row in k["float_layers"]:
        reasons.setdefault(row["why"], []).append(row["layer"])
    for why, layers in reasons.items():
        print(f"{indent}    float: {', '.join(layers)}: {why}")
    if k.get("requantized_by_onnxruntime"):
        print(f"{indent}  WARNING: onnxruntime quantized the float weights of {', '.join(k['requantized_by_onnxruntime'])} on its own "
              "(its WeightBiasQuantization transformer), so it does not run the file's exact weights; see the check below")


def _bench(qmodel, path: str, threads: int) -> Dict[str, Any]:
    """onnxruntime latency/throughput of the file against the float model exported the same way and torch FP32."""
    import tempfile
    from pathlib import Path

    from .io.export import export_float_onnx, float_twin
    from .io.runtime import BenchConfig, bench

    config = BenchConfig(threads=threads)
    twin = float_twin(qmodel)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_float_onnx(twin, Path(tmp) / "float.onnx", qmodel.input_size)["path"]
        times = bench({"exported file": path, "float ONNX": float_path, "torch FP32": twin}, qmodel.input_size, config)
    return {"config": dataclasses.asdict(config), "times": times}


def _print_bench(b: Dict[str, Any]) -> None:
    c, t = b["config"], b["times"]
    base = t["float ONNX"]
    print(f"speed on this CPU ({c['threads']} intra-op thread(s); medians of {c['repeat']} interleaved repeats; float: the quantized model's "
          "dequantized weights in nn.Conv2d/nn.Linear, exported by the same exporter without Q/DQ):")
    print(f"  {'':14s} {'latency b=' + str(c['latency_batch']):>14s} {'throughput b=' + str(c['throughput_batch']):>18s} {'file':>9s}")
    for name, r in t.items():
        size = f"{r['bytes'] / 1024:.0f} KiB" if "bytes" in r else "-"
        print(f"  {name:14s} {r['latency_ms']:9.3f} ms {base['latency_ms'] / r['latency_ms']:4.2f}x {r['throughput_ips']:10.0f} img/s "
              f"{r['throughput_ips'] / base['throughput_ips']:4.2f}x {size:>9s}")
    print("  (x: speed relative to the float ONNX file)")


def cmd_export(args) -> int:
    import dfquant

    from .io.export import check_output_path

    if args.check < 0:
        raise DfquantError(f"--check must be 0 or more, got {args.check}")
    if args.threads < 1:
        raise DfquantError(f"--threads must be 1 or more, got {args.threads}")
    check_output_path(args.out)  # before loading and exporting
    qmodel, info = dfquant.load_quantized(args.file)
    summary = _export(qmodel, args.out, args.check, _onnx_metadata(info.get("model_name"), info.get("config", {})), args.int4_weights,
                      fold_bn=args.fold_bn or args.integer_adds, integer_adds=args.integer_adds)
    if args.bench:
        summary["bench"] = _bench(qmodel, summary["path"], args.threads)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_export(summary)
        if args.bench:
            _print_bench(summary["bench"])
    return 0 if summary.get("check", {}).get("verdict", "ok") == "ok" else 1  # a script sees a file that differs


def cmd_inspect(args) -> int:
    import dfquant

    from .config import QUANT_FIELDS
    from .models import input_range_of

    options = {k: getattr(args, k) for k in QUANT_FIELDS if hasattr(args, k)}
    if options.get("quantize_first_input"):
        options["input_range"] = input_range_of(args.model)
    result = dfquant.inspect(_load_model(args), **options)
    print(json.dumps(result.to_dict(), default=str) if args.json else result.format_table())
    return 0


def cmd_info(args) -> int:
    from .io.serialization import file_info

    info = file_info(args.file)
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    a_bits = info["a_bits"] if info["a_bits"] is not None else "float"
    print(f"{info['path']}: {info['model_name'] or 'a model outside the registry'}, {info['method']} W{info['w_bits']} A{a_bits} (config version {info['config_version']})")
    print("  protocol: " + ", ".join(f"{k}={v}" for k, v in info["protocol"].items()))
    bits = {}
    for name, layer in info["layers"].items():
        bits.setdefault((layer["w_bits"], layer["a_bits"]), []).append(name)
    for (w, a), names in sorted(bits.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        print(f"  {len(names):3d} layers W{w} A{a if a is not None else 'float'}: {shown}")
    if info["float_layers"]:
        print(f"  left in float: {', '.join(info['float_layers'])}")
    status = {"ok": "every tensor and the config match their saved digests", "absent": "none saved (a file from before dfquant checked digests)"}
    print(f"  digests: {status[info['digests']]}")
    print(f"  size: {info['file_bytes'] / 1e6:.2f} MB file, {info['tensors']} tensors, {info['weight_codes'] / 1e6:.2f} M weight codes "
          f"({info['packed_weight_bytes'] / 1e6:.2f} MB packed at their bits, {info['other_tensor_bytes'] / 1e6:.2f} MB of scales, biases and buffers)")
    return 0


def cmd_list(args) -> int:
    from .config import METHODS
    from .models import list_models, model_spec

    print("models:")
    for name in list_models():
        s = model_spec(name)
        print(f"  {name:<14} {s.dataset:<9} input {s.input_size}")
    print("methods: " + ", ".join(METHODS))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
        _check_output(args.plot, "--plot")
    run_demo(json_out=args.json, progress=args.progress_on, retrain=args.retrain, plot=args.plot)
    return 0


def _show_notes() -> None:
    """Library notes (:class:`dfquant.errors.DfquantNote`) as one ``dfquant: note:`` line each."""
    import warnings

    from .errors import DfquantNote

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DfquantNote):
            print(f"dfquant: note: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", DfquantNote)


def _launched() -> bool:
    """:func:`dfquant.distributed.launched` without importing torch."""
    import os

    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _parse(argv: Optional[List[str]]):
    """The parsed arguments; under torchrun only rank 0 prints --help or a parse error (all get the same argv)."""
    import os

    if not _launched() or os.environ.get("RANK", "0") == "0":
        return build_parser().parse_args(argv)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        return build_parser().parse_args(argv)


@contextlib.contextmanager
def _job(args):
    """Under torchrun (several processes): join the job; rank 0 alone prints and shows progress (the
    others print only errors); SIGTERM, which torchrun sends when another process failed, stops
    the command like Ctrl-C, so that no temporary file is left."""
    import os

    if not _launched():  # torch stays unimported until a command needs it
        yield
        return
    from . import distributed

    with distributed.sigterm_stops():
        distributed.init(getattr(args, "device", "auto"))
        if args.command not in ("synthesize", "quantize"):
            raise DfquantError(f"`dfquant {args.command}` runs in one process: start it without torchrun (torchrun runs `synthesize` and `quantize --method genie|zeroq`)")
        quiet = not distributed.is_main()
        args.progress_on = args.progress_on and not quiet
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stdout):
            yield
    distributed.shutdown()  # after a failure: _failed


def _failed(kind: str, message: str, code: int) -> int:
    """Print ``dfquant: KIND: MESSAGE`` and return ``code``; in a job only the first process to fail
    prints (naming its rank), so that a failed job says what went wrong in one line, then each
    process leaves the job."""
    distributed = sys.modules.get(f"{__package__}.distributed")
    if distributed is None:  # never loaded (nor, maybe, torch): one process
        print(f"dfquant: {kind}{': ' + message if message else ''}", file=sys.stderr)
        return code
    if distributed.claim_failure():
        rank = f"rank {distributed.rank()}" if distributed.active() else ""
        if message:
            print(f"dfquant: {kind}: {rank + ': ' if rank else ''}{message}", file=sys.stderr)
        else:
            print(f"dfquant: {kind}{f' ({rank})' if rank else ''}", file=sys.stderr)
    distributed.shutdown(failed=True)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    _show_notes()

    try:
        try:
            args = _parse(argv)
        except SystemExit as exc:  # --help, or a parse error already printed in one line
            return int(exc.code or 0)
        args.progress_on = (args.progress or sys.stderr.isatty()) and not args.no_progress
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        handlers = {"quantize": cmd_quantize, "evaluate": cmd_evaluate, "synthesize": cmd_synthesize, "list": cmd_list, "demo": cmd_demo, "export": cmd_export, "inspect": cmd_inspect, "info": cmd_info}
        with _job(args):
            return handlers[args.command](args)
    except DfquantError as exc:
        return _failed("error", cli_message(str(exc), exc.param), 2)
    except OSError as exc:  # a write that failed after the checks (disk full, permissions changed)
        return _failed("error", str(exc), 2)
    except KeyboardInterrupt:
        return _failed("interrupted", "", 130)
    except Stopped:
        return _failed("stopped by SIGTERM", "", 143)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
