"""Benchmark: SQuant vs round-to-nearest on the real CIFAR-10 ResNets, and SQuant's speed.

    python benchmarks/squant_cifar.py            # writes benchmarks/results/squant_cifar.{md,json}

Needs the shared assets (DFQUANT_ASSETS or ../shared): ResNet-20/56 checkpoints and the first 846
CIFAR-10 test images. No data is used to quantize; the images only measure accuracy.
Timing: best of several runs of the whole ``dfquant.quantize`` call and of the weight rounding
alone, with torch's default threads on this machine; plus SQuant over every conv/linear weight of
a randomly initialised ResNet-50 (25.5 M weights).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import dfquant
from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
from dfquant.data import load_cifar10_npz
from dfquant.quantizer import minmax_params, to_grid
from dfquant.squant import squant_round

SETTINGS = [(8, 8), (6, 6), (4, 4), (4, 8), (3, 8)]
METHODS = [("rtn", "RTN"), ("squant-e", "SQuant-E"), ("squant-k", "SQuant-K"), ("squant-c", "SQuant-C"), ("squant", "SQuant")]


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def resnet50_squant_time(repeat: int) -> dict:
    torch.manual_seed(0)
    model = dfquant.create_model("resnet50")
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    grids = []
    for w in weights:
        qp = minmax_params(w, 4)
        grids.append((to_grid(w, qp), qp.qmin, qp.qmax))

    def run():
        for g, lo, hi in grids:
            squant_round(g, lo, hi)

    run()  # warm-up
    return {"layers": len(weights), "weights": sum(w.numel() for w in weights), "squant_s": best_time(run, repeat)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "squant_cifar"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_cifar10_npz()
    results = {"command": "python benchmarks/squant_cifar.py" + (f" --threads {args.threads}" if args.threads else ""), "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__, "n_images": int(data[1].numel()), "models": {}}
    for name in args.models:
        path = asset_path(CIFAR_RESNET_WEIGHTS[name])
        if path is None:
            raise SystemExit(f"missing shared weights for {name}: set DFQUANT_ASSETS")
        model = dfquant.create_model(name, weights=str(path))
        fp = dfquant.evaluate(model, data)["top1"]
        rows = []
        for w, a in SETTINGS:
            for method, label in METHODS:
                q, report = dfquant.quantize(model, method, w, a)
                ev = dfquant.evaluate(q, data, reference=model)
                acc, agree, lmse = ev["top1"], ev["agree_top1"], ev["logit_mse"]
                total = best_time(lambda m=model, k=method, wb=w, ab=a: dfquant.quantize(m, k, wb, ab), args.repeat)
                weight = min(dfquant.quantize(model, method, w, a)[1].weight_time_s for _ in range(args.repeat))
                rows.append({"setting": f"W{w}A{a}", "method": label, "top1": acc, "drop": acc - fp, "agree_top1": agree, "logit_mse": lmse, "quantize_s": total, "rounding_s": weight})
                print(f"{name} W{w}A{a} {label:<9} {acc:6.2f} ({acc - fp:+.2f}) agree {agree:6.2f} logit-mse {lmse:.4f}  quantize {total:.3f}s rounding {weight * 1000:.1f}ms", flush=True)
        results["models"][name] = {"fp32_top1": fp, "rows": rows}
    results["resnet50_squant"] = resnet50_squant_time(max(args.repeat, 3))
    print("ResNet-50 SQuant:", results["resnet50_squant"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(to_markdown(results))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def to_markdown(res: dict) -> str:
    lines = [
        "# SQuant vs round-to-nearest on CIFAR-10 ResNets",
        "",
        f"Command: `{res['command']}` (assets from `../shared`).",
        f"Data: the first {res['n_images']} CIFAR-10 test images (standard error about ±1 point: compare methods, not absolute figures).",
        f"Machine: {res['machine']}, torch {res['torch']}. Activations from BN statistics (dfq rule), image input float,",
        "classifier input 8 bit, all weights (first and last layer included) at the given bits, per-channel min/max grid.",
        "Times: best of 3; `quantize` = the whole `dfquant.quantize` call, `rounding` = choosing the integer weights.",
        "",
    ]
    for name, m in res["models"].items():
        methods = [label for _, label in METHODS]
        lines += [f"## {name} (FP32 top-1 {m['fp32_top1']:.2f} %)", "", "Top-1 accuracy % (change from FP32):", "", "| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for setting in dict.fromkeys(r["setting"] for r in m["rows"]):
            cells = [r for r in m["rows"] if r["setting"] == setting]
            lines.append(f"| {setting} | " + " | ".join(f"{r['top1']:.2f} ({r['drop']:+.2f})" for r in cells) + " |")
        lines += ["", "Top-1 agreement with the FP32 model (% of images whose predicted class is unchanged; less noisy than accuracy):", "", "| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for setting in dict.fromkeys(r["setting"] for r in m["rows"]):
            cells = [r for r in m["rows"] if r["setting"] == setting]
            lines.append(f"| {setting} | " + " | ".join(f"{r['agree_top1']:.2f}" for r in cells) + " |")
        lines += ["", "Mean squared error of the logits against the FP32 model (lower is better):", "", "| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for setting in dict.fromkeys(r["setting"] for r in m["rows"]):
            cells = [r for r in m["rows"] if r["setting"] == setting]
            lines.append(f"| {setting} | " + " | ".join(f"{r['logit_mse']:.4f}" for r in cells) + " |")
        sq = [r for r in m["rows"] if r["method"] == "SQuant"]
        lines += ["", "SQuant quantize time per setting: " + ", ".join(f"{r['setting']} {r['quantize_s']:.2f} s (rounding {r['rounding_s'] * 1000:.0f} ms)" for r in sq), ""]
    r50 = res["resnet50_squant"]
    lines += ["## SQuant speed on ResNet-50 weights", "", f"SQuant (E+K+C, 4 bit) over all {r50['layers']} conv/linear layers ({r50['weights'] / 1e6:.1f} M weights, random init): **{r50['squant_s']:.2f} s** (best of 3).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
