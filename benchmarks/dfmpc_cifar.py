"""Benchmark: DF-MPC (Chen et al., Pattern Recognition 2023) and its data-free variants on the real
CIFAR-10 ResNets, against no compensation, DFQ bias correction and SQuant at the same bits.

    python benchmarks/dfmpc_cifar.py --threads 1 --synthetic-dir DIR   # writes benchmarks/results/dfmpc_cifar.{md,json}

Settings: MP2/6 and MP3/6 (each pair's low layer at 2 / 3 bits, every other layer, stem and
classifier included, at 6) and MP6/6 (uniform 6 bits, pairs compensated), weight-only (the paper's
protocol) and with 8-bit activations (ranges from the compensated BN statistics). Rows on the
paper's per-tensor grids (``method="dfmpc"``: TWN at 2 bits, DoReFa above): no compensation, the
literal DF-MPC (Eq. 27, bn_recal none), Eq. 27 after BN re-calibration (moments / synthetic), c
fitted on synthetic images (with and without synthetic re-calibration), and re-calibration without
c. Rows on the project's per-channel min/max grid at the same bits per layer: RTN, RTN + DFQ bias
correction, SQuant, SQuant + Eq. 27, SQuant + re-calibration (moments / synthetic). Each row: top-1, logit MSE
against FP32, and paired tests against "no compensation" on the paper grids (and against its own
uncompensated rounding for the RTN/SQuant variants, and head to head: c on top of re-calibration
against the re-calibration alone, fitted against Eq. 27's c, synthetic against moments): the exact McNemar test of accuracy
(``dfquant.paired_comparison``) and the exact sign test of which model is closer to FP32 image by
image (``dfquant.paired_error_comparison``). The time of the DF-MPC step is the ``compensate`` call
(images given; synthesis timed apart), and the literal step is timed ``--repeats`` times.

Synthetic images (Genie-D, CPU budget: 256 images, 150 iterations, seed 0) are made once per model
and cached in ``--synthetic-dir`` (the cache of ``genie_cifar.py``, same names and settings). The
846 CIFAR-10 images only measure: quantization sees none of them.

MobileNetV1-0.75 (ImageNet, 1000 held-out photos of ../shared) at MP6/6 (the paper's MobileNetV2
row) and MP4/8 (depthwise or pointwise low layer of each pair at 4, the rest at 8), weight-only
(from benchmarks/: ``python dfmpc_cifar.py --models mobilenet_v1 --threads 1 --repeats 3 --out results/dfmpc_mobilenet``). Its ReLU6 is not
positively homogeneous, so every MobileNet row runs with ``relu6_to_relu=True`` (DFQ's change; the
float model's own top-1 with ReLU is reported beside the ReLU6 one). Only ``IMAGENET_ROWS`` run
there: Genie-D at 224x224 costs about 0.34 s per image and iteration on this CPU (256 images x 150
iterations = 3.6 h), and each row is minutes of 224x224 evaluation.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import types
from pathlib import Path

import torch

import dfquant
from dfquant.assets import MODEL_WEIGHTS, asset_path
from dfquant.data import load_cifar10_npz, load_eval_data
from dfquant.devices import cpu_name
from dfquant.dfmpc import plan_pairs
from dfquant.dfq import replace_relu6
from dfquant.genie import CPU_BUDGET
from dfquant.graph import analyse
from genie_cifar import load_model, synthetic_images

RESULTS = Path(__file__).parent / "results" / "dfmpc_cifar"
SETTINGS = {"MP2/6": (6, 2), "MP3/6": (6, 3), "MP6/6": (6, None), "MP4/8": (8, 4)}
IMAGENET = {"mobilenet_v1": ("MP6/6", "MP4/8")}  # ImageNet models and their settings (CIFAR: --settings)
# the rows run on an ImageNet model (weight-only): no synthetic images at 224x224 on a CPU
IMAGENET_ROWS = ("none", "literal", "moments", "squant", "squant_eq27", "squant_moments")
# key -> (label, method, options, the rows it is compared with head to head besides "no compensation")
ROWS = {
    "none": ("no compensation", "dfmpc", dict(compensation="none"), ()),
    "literal": ("DF-MPC, Eq. 27 (literal)", "dfmpc", dict(compensation="dfmpc"), ()),
    "eq27_moments": ("Eq. 27 + recal moments", "dfmpc", dict(compensation="dfmpc", bn_recal="moments"), ("moments",)),
    "eq27_synthetic": ("Eq. 27 + recal synthetic", "dfmpc", dict(compensation="dfmpc", bn_recal="synthetic"), ("synthetic",)),
    "fitted": ("fitted c", "dfmpc", dict(compensation="fitted"), ("literal",)),
    "fitted_synthetic": ("fitted c + recal synthetic", "dfmpc", dict(compensation="fitted", bn_recal="synthetic"), ("synthetic",)),
    "moments": ("recal moments, no c", "dfmpc", dict(compensation="none", bn_recal="moments"), ()),
    "synthetic": ("recal synthetic, no c", "dfmpc", dict(compensation="none", bn_recal="synthetic"), ("moments",)),
    "rtn": ("RTN (min/max)", "rtn", dict(compensation="none"), ()),
    "rtn_bc": ("RTN + DFQ bias corr.", "rtn", dict(compensation="none", bias_correction=True), ("rtn",)),
    "squant": ("SQuant (min/max)", "squant", dict(compensation="none"), ()),
    "squant_eq27": ("SQuant + Eq. 27", "squant", dict(compensation="dfmpc"), ("squant",)),
    "squant_moments": ("SQuant + recal moments", "squant", dict(compensation="none", bn_recal="moments"), ("squant",)),
    "squant_synthetic": ("SQuant + recal synthetic", "squant", dict(compensation="none", bn_recal="synthetic"), ("squant",)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"], choices=["resnet20", "resnet56", *IMAGENET])
    ap.add_argument("--settings", nargs="+", default=["MP2/6", "MP3/6", "MP6/6"], choices=list(SETTINGS), help="CIFAR models' settings")
    ap.add_argument("--a-bits", nargs="+", default=["none", "8"], help="activation bits of the runs (none: weight-only)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=7, help="calls of the literal step timed per model")
    ap.add_argument("--synthetic-dir", default=None, help="cache of the Genie-D images (one synthesis per model)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_cifar10_npz()
    doc = dict(command=_command(ap, args), machine=cpu_name(), torch=torch.__version__, n_images=int(data[1].numel()),
               synthetic=dict(samples=CPU_BUDGET["samples"], distill_iters=CPU_BUDGET["distill_iters"], seed=0), models={})
    for name in args.models:
        doc["models"][name] = run_imagenet_model(name, args) if name in IMAGENET else run_model(name, args, data)
        write(doc, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())


def _command(ap: argparse.ArgumentParser, args) -> str:
    parts = ["python benchmarks/dfmpc_cifar.py"]
    for key in ("models", "settings", "a_bits", "rows"):
        if getattr(args, key) != ap.get_default(key):
            parts.append(f"--{key.replace('_', '-')} {' '.join(getattr(args, key))}")
    for key in ("threads", "repeats", "synthetic_dir"):
        if getattr(args, key) != ap.get_default(key):
            parts.append(f"--{key.replace('_', '-')} {getattr(args, key)}")
    if args.out != ap.get_default("out"):
        parts.append(f"--out {args.out}")
    return " ".join(parts)


def run_model(name: str, args, data) -> dict:
    model = load_model(name)
    fp = dfquant.evaluate(model, data)["top1"]
    needs = any(ROWS[k][2].get("compensation") == "fitted" or ROWS[k][2].get("bn_recal") == "synthetic" for k in args.rows)
    images, synth_s = None, None
    if needs:
        cache = types.SimpleNamespace(samples=CPU_BUDGET["samples"], distill_iters=CPU_BUDGET["distill_iters"], seed=0,
                                      synthetic_dir=args.synthetic_dir, synthesis_shards=1, device="cpu")
        images, synth_s = synthetic_images(model, name, "genie", cache)
    out = dict(dataset="cifar10", fp32_top1=fp, synthesis_s=synth_s, rows=[], timing=literal_timing(model, args.repeats))
    for setting in args.settings:
        for a in args.a_bits:
            out["rows"] += run_setting(model, name, setting, None if a == "none" else int(a), args.rows, images, data)
    return out


def run_imagenet_model(name: str, args) -> dict:
    """An ImageNet model on the shared photos, ReLU6 replaced by ReLU in every row, no synthetic rows."""
    path = asset_path(MODEL_WEIGHTS[name])
    if path is None:
        raise SystemExit(f"missing shared weights for {name}: set DFQUANT_ASSETS")
    model = dfquant.create_model(name, weights=str(path))
    data = load_eval_data("imagenet", preprocessing=model)
    relu, _ = replace_relu6(model)
    keys = [k for k in args.rows if k in IMAGENET_ROWS]
    ref = dfquant.reference_logits(model, data)  # the float (ReLU6) model once, for every comparison
    out = dict(dataset="imagenet", n_images=len(data.dataset), fp32_top1=dfquant.evaluate(model, data)["top1"], fp32_relu_top1=dfquant.evaluate(relu, data)["top1"],
               rows=[], timing=literal_timing(model, args.repeats, relu6_to_relu=True), not_run=[k for k in args.rows if k not in keys])
    for setting in IMAGENET[name]:
        out["rows"] += run_setting(ref, name, setting, None, keys, None, data, relu6_to_relu=True, float_model=model)
    return out


def run_setting(model, name: str, setting: str, a_bits, keys, images, data, float_model=None, **common) -> list:
    """The rows of one setting; ``model`` is the float model or its logits on ``data`` (then
    ``float_model`` is the model itself)."""
    w_bits, low_bits = SETTINGS[setting]
    reference, model = model, float_model if float_model is not None else model
    rows, evals = [], {}
    for key in keys:
        label, method, opts, _ = ROWS[key]
        opts = dict(opts, low_bits=low_bits, **common)
        if opts.get("compensation") == "fitted" or opts.get("bn_recal") == "synthetic":
            opts["synthetic"] = images
        q, report = dfquant.quantize(model, method, w_bits, a_bits, **opts)
        ev = dfquant.evaluate(q, data, reference=reference, predictions=True)
        evals[key] = ev
        row = dict(setting=setting, a_bits=a_bits, key=key, method=label, top1=ev["top1"], agree_top1=ev["agree_top1"], logit_mse=ev["logit_mse"],
                   step_ms=1000 * report.config["dfmpc"]["time_s"], quantize_s=report.total_time_s, correct="".join("1" if c else "0" for c in ev["correct"]))
        pairs = report.config["dfmpc"]["pairs"]
        row["c_range"] = [min(p["c_min"] for p in pairs), max(p["c_max"] for p in pairs)]
        rows.append(row)
        print(f"{name} {setting} A{a_bits or 'fp'} {label:<28} {ev['top1']:6.2f} mse {ev['logit_mse']:8.3f} step {row['step_ms']:8.1f} ms", flush=True)
    for row in rows:  # paired tests, once every row of the setting is in
        for base in dict.fromkeys(b for b in ("none",) + ROWS[row["key"]][3] if b != row["key"] and b in evals):
            a, b = evals[row["key"]], evals[base]
            row.setdefault("versus", {})[base] = dict(
                mcnemar=dfquant.paired_comparison(a["correct"], b["correct"]), sign_test=dfquant.paired_error_comparison(a["logit_sq_err"], b["logit_sq_err"])
            )
    return rows


def literal_timing(model, repeats: int, **common) -> dict:
    """The literal step (Eq. 27, no re-calibration) at MP2/6, weight-only: ``repeats`` calls; and the
    pairing walk on the model's fx graph (the graph itself is traced once for the whole pipeline)."""
    times, pairing = [], []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        _, report = dfquant.quantize(model, "dfmpc", 6, low_bits=2, **common)
        total = time.perf_counter() - t
        times.append((1000 * report.config["dfmpc"]["time_s"], total))
        graph = analyse(model)
        t = time.perf_counter()
        plan_pairs(model, graph)
        pairing.append(1000 * (time.perf_counter() - t))
    steps = [s for s, _ in times]
    return dict(literal_step_ms=steps, literal_step_median_ms=statistics.median(steps), quantize_median_s=statistics.median(t for _, t in times),
                pairing_median_ms=statistics.median(pairing), threads=torch.get_num_threads())


def write(doc: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"\[\n\s+([-0-9.eE+,\s]+?)\n\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", json.dumps(doc, indent=1))
    out.with_suffix(".json").write_text(text)
    out.with_suffix(".md").write_text(to_markdown(doc))


def _cell(r: dict) -> str:
    return f"{r['top1']:.2f} / {r['logit_mse']:.3g}"


def _test(r: dict, base: str) -> str:
    v = r.get("versus", {}).get(base)
    if v is None:
        return "-"
    s, m = v["sign_test"], v["mcnemar"]
    return f"{s['a_closer']}:{s['b_closer']} (p {s['p_value']:.1g}); acc. {m['a_only']}:{m['b_only']} (p {m['p_value']:.2g})"


def to_markdown(doc: dict) -> str:
    lines = [
        "# DF-MPC on the CIFAR-10 ResNets and MobileNetV1-0.75: the literal method, data-free BN re-calibration, fitted c, and baselines",
        "",
        f"Command: `{doc['command']}`. Machine: {doc['machine']}, torch {doc['torch']}. Top-1 on the first {doc['n_images']} CIFAR-10 test",
        "images in ../shared (about ±1 point standard error: compare rows with the paired tests, not absolute figures).",
        "MP*l*/6: the low layer of every DF-MPC pair (conv1 of each basic block) at *l* bits, every other layer (stem and",
        "classifier included) at 6; MP6/6: all at 6. Rows above the line: the paper's per-tensor grids (TWN at 2 bits, DoReFa",
        "above; `method=\"dfmpc\"`); below: the per-channel min/max grid at the same bits per layer. \"recal\": the low layer's BN",
        "statistics re-estimated (moments: from the BN statistics carried to its input; synthetic: on Genie-D images); \"fitted",
        f"c\": NNLS of the next layer's output on the synthetic images. Synthetic images: Genie-D, {doc['synthetic']['samples']} images,",
        f"{doc['synthetic']['distill_iters']} iterations, seed {doc['synthetic']['seed']}, made once per model. A8: 8-bit activations, ranges from the",
        "compensated BN statistics, image input float, classifier input 8 bit. BN not folded. MobileNetV1-0.75: the 1000",
        "ImageNet photos of ../shared; MP*l*/8: low layers at *l*, the rest at 8; ReLU6 replaced by ReLU in every row (DFQ's",
        "`relu6_to_relu`; DF-MPC's c needs a positively homogeneous activation); no synthetic rows (Genie-D at 224x224 on this CPU: hours).",
        "",
    ]
    for name, m in doc["models"].items():
        cols = list(dict.fromkeys((r["setting"], r["a_bits"]) for r in m["rows"]))
        by = {(r["setting"], r["a_bits"], r["key"]): r for r in m["rows"]}
        keys = list(dict.fromkeys(r["key"] for r in m["rows"]))
        heads = [f"{s} {'W-only' if a is None else f'A{a}'}" for s, a in cols]
        syn = f", synthesis {m['synthesis_s']:.0f} s (when the images were made)" if m.get("synthesis_s") else ""
        fp = f"FP32 top-1 {m['fp32_top1']:.2f} %"
        if m.get("dataset") == "imagenet":
            fp += f" on {m['n_images']} ImageNet photos; with ReLU instead of ReLU6 {m['fp32_relu_top1']:.2f} %"
        against = " (the ReLU6 model)" if m.get("dataset") == "imagenet" else ""
        lines += [f"## {name} ({fp}{syn})", "", f"Top-1 % / logit MSE against FP32{against}:", ""]
        if m.get("not_run"):
            lines[-2:-2] = [f"Not run here: {', '.join(ROWS[k][0] for k in m['not_run'])} (the synthetic ones need 224x224 Genie-D images, hours on this CPU; "
                            "the others to keep the run short: each row is minutes of 224x224 evaluation).", ""]
        lines += ["| row | " + " | ".join(heads) + " |", "|---|" + "---|" * len(cols)]
        for k in keys:
            if k == "rtn":
                lines.append("| *per-channel min/max grid* |" + " |" * len(cols))
            lines.append(f"| {ROWS[k][0]} | " + " | ".join(_cell(by[(s, a, k)]) if (s, a, k) in by else "-" for s, a in cols) + " |")
        lines += ["", "Paired tests against no compensation (paper grids): images closer to FP32 row : none (exact sign test p); "
                  "accuracy, images only the row : only none gets right (exact McNemar p):", ""]
        lines += ["| row | " + " | ".join(heads) + " |", "|---|" + "---|" * len(cols)]
        for k in keys:
            if k != "none":
                lines.append(f"| {ROWS[k][0]} | " + " | ".join(_test(by[(s, a, k)], "none") if (s, a, k) in by else "-" for s, a in cols) + " |")
        own = [(k, b) for k in keys for b in ROWS[k][3] if b in keys]
        if own:
            lines += ["", "Head to head (same format, row : versus): c on top of re-calibration, fitted against Eq. 27's c, synthetic "
                      "against moments, and the min/max-grid variants against their own uncompensated rounding:", ""]
            lines += ["| row | versus | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(cols)]
            for k, b in own:
                lines.append(f"| {ROWS[k][0]} | {ROWS[b][0]} | " + " | ".join(_test(by[(s, a, k)], b) if (s, a, k) in by else "-" for s, a in cols) + " |")
        t = m["timing"]
        lines += ["", f"Time of the DF-MPC step (the `compensate` call; images given, BN-statistics propagation and synthesis not included), "
                  f"ms, {t['threads']} thread(s):", ""]
        lines += ["| row | " + " | ".join(heads) + " |", "|---|" + "---|" * len(cols)]
        for k in keys:
            if ROWS[k][1] == "dfmpc" and k != "none":
                lines.append(f"| {ROWS[k][0]} | " + " | ".join(f"{by[(s, a, k)]['step_ms']:.0f}" if (s, a, k) in by else "-" for s, a in cols) + " |")
        lines += ["", f"Literal step at MP2/6, weight-only, {len(t['literal_step_ms'])} calls: median {t['literal_step_median_ms']:.1f} ms "
                  f"(min {min(t['literal_step_ms']):.1f}, max {max(t['literal_step_ms']):.1f}); pairing on the traced graph median {t.get('pairing_median_ms', float('nan')):.1f} ms; "
                  f"whole `quantize` call median {t['quantize_median_s']:.2f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
