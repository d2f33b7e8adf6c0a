"""Benchmark: the rounding methods on the two ImageNet-1k models of ../shared (MobileNetV1-0.75 and
Tiny Darknet), on the 1000 labelled held-out photos (224x224).

    python benchmarks/imagenet.py --threads 2     # writes benchmarks/results/imagenet.{md,json}

Settings W8A8, W4A8 and W4A4 under dfquant's protocol (per-channel min/max weights, BN kept,
image input float, classifier input 8 bits, activation ranges from BN statistics: ``act_range``
dfq); rows: RTN, SQuant (E+K+C), and SQuant with the SQuant authors' activation rule
(``act_range="squant"``: one pass of uniform noise, alpha = s * std). Each row: top-1, top-5, top-1
agreement and logit MSE against FP32, and paired tests on the same photos (exact sign test on the
per-image logit error, exact McNemar on correctness): SQuant against RTN, and the noise rule against
the BN rule. The photos only measure: quantization sees none of them. The learned methods (Genie,
ZeroQ) are not run here: their images cost about 0.34 s per image and iteration at 224x224 on this
CPU (the CPU budget's 256 images x 150 iterations: 3.6 h per model).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dfquant
from dfquant.assets import MODEL_WEIGHTS, asset_path
from dfquant.data import load_eval_data
from dfquant.devices import cpu_name

RESULTS = Path(__file__).parent / "results" / "imagenet"
MODELS = ("mobilenet_v1", "tiny_darknet")
SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
# key -> (label, method, options, the row it is tested against)
ROWS = {
    "rtn": ("RTN", "rtn", {}, None),
    "squant": ("SQuant", "squant", {}, "rtn"),
    "squant_noise": ("SQuant, authors' noise rule", "squant", dict(act_range="squant"), "squant"),
}


def run_model(name: str, limit=None) -> dict:
    path = asset_path(MODEL_WEIGHTS[name])
    if path is None:
        raise SystemExit(f"missing shared weights for {name}: set DFQUANT_ASSETS")
    model = dfquant.create_model(name, weights=str(path))
    data = load_eval_data("imagenet", preprocessing=model, limit=limit)
    fp = dfquant.evaluate(model, data)
    ref = dfquant.reference_logits(model, data)  # the float model once, for every comparison
    out = dict(fp32_top1=fp["top1"], fp32_top5=fp["top5"], n_images=fp["n"], rows=[])
    for setting, (w, a) in SETTINGS.items():
        evals = {}
        for key, (label, method, opts, _) in ROWS.items():
            t = time.perf_counter()
            q, report = dfquant.quantize(model, method, w, a, **opts)
            dt = time.perf_counter() - t
            ev = dfquant.evaluate(q, data, reference=ref, predictions=True)
            evals[key] = ev
            out["rows"].append(dict(setting=setting, key=key, method=label, top1=ev["top1"], top5=ev["top5"], agree_top1=ev["agree_top1"],
                                    logit_mse=ev["logit_mse"], quantize_s=dt, float_inputs=[n for n, _ in report.float_inputs]))
            print(f"{name} {setting} {label:<28} top-1 {ev['top1']:6.2f}  mse {ev['logit_mse']:8.4f}  {dt:5.1f} s", flush=True)
        for row in out["rows"][-len(ROWS):]:
            base = ROWS[row["key"]][3]
            if base is not None:
                a_, b_ = evals[row["key"]], evals[base]
                row["versus"] = dict(row=base, mcnemar=dfquant.paired_comparison(a_["correct"], b_["correct"]),
                                     sign_test=dfquant.paired_error_comparison(a_["logit_sq_err"], b_["logit_sq_err"]))
    return out


def to_markdown(doc: dict) -> str:
    lines = [
        "# The rounding methods on ImageNet-1k: MobileNetV1-0.75 and Tiny Darknet",
        "",
        f"Command: `{doc['command']}`. Machine: {doc['machine']}, torch {doc['torch']}, {doc['threads']} thread(s).",
        "dfquant's protocol: per-channel min/max weight grid, BN kept, image input float, classifier input 8 bits; activation",
        "ranges from BN statistics (dfq rule) unless the row says the authors' noise rule (`act_range=\"squant\"`, noise seed 0).",
        "Photos: the 1000 labelled held-out ImageNet photos of ../shared (one photo = 0.1 point; compare rows with the paired",
        "tests). Learned methods not run: Genie-D at 224x224 costs hours on this CPU.",
        "",
    ]
    for name, m in doc["models"].items():
        lines += [f"## {name} (FP32 top-1 {m['fp32_top1']:.2f} %, top-5 {m['fp32_top5']:.2f} %, {m['n_images']} photos)", "",
                  "| setting | row | top-1 % | top-5 % | top-1 agreement % | logit MSE | paired tests: row against | closer to FP32 (sign test p) | correct only (McNemar p) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            v = r.get("versus")
            tests = (f"{ROWS[v['row']][0]} | {v['sign_test']['a_closer']}:{v['sign_test']['b_closer']} (p {v['sign_test']['p_value']:.2g}) | "
                     f"{v['mcnemar']['a_only']}:{v['mcnemar']['b_only']} (p {v['mcnemar']['p_value']:.2g})") if v else "- | - | -"
            lines.append(f"| {r['setting']} | {r['method']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['agree_top1']:.1f} | {r['logit_mse']:.4g} | {tests} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="the first N photos only (a quick check)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = "".join(f" --{k} {v}" for k, v in (("threads", args.threads), ("limit", args.limit), ("out", args.out)) if v not in (None, str(RESULTS)))
    flags = (f" --models {' '.join(args.models)}" if list(args.models) != list(MODELS) else "") + flags
    doc = dict(command="python benchmarks/imagenet.py" + flags, machine=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(), models={})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        doc["models"][name] = run_model(name, args.limit)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        out.with_suffix(".md").write_text(to_markdown(doc))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
