"""Choose Genie-M's rounding learning rate for a short (CPU) budget without real data.

    python benchmarks/genie_lr_round.py --models resnet20 --settings W4A4 --threads 1 --out benchmarks/results/genie_lr_round_w4a4
    python benchmarks/genie_lr_round.py --merge benchmarks/results/genie_lr_round_w4a4.json ... --out benchmarks/results/genie_lr_round
    # short budgets (the cap of lr_round_for):
    python benchmarks/genie_lr_round.py --models resnet20 --settings W4A4 W2A4 --lr-rounds 0.01 0.04 0.1 1.0 --recon-iters 20 --threads 1 --out out/bench/lr_short_it20

The release trains AdaRound's rounding variables ``V`` with Adam at lr 1e-3 for 20000 iterations
per unit. At the CPU budget's 500 iterations that lr lets each ``V`` travel at most about 0.5, so
most soft rounding values are still undecided when the hard rounding is taken. This script runs
Genie-M (Genie-D images, RTN start) with several rounding learning rates and scores each on
**synthetic data only**:

* ``unit error``: the sum over units of the hard-quantized unit's output error on the Genie-D images
  it was trained on (what reconstruction minimises);
* ``held-out logit MSE``: the quantized model's logit error against the float model on the ZeroQ
  images, which reconstruction never saw;
* ``undecided``: the fraction of soft rounding values not within 0.01 of 0 or 1 at the end.

The choice is the rate with the lowest held-out logit MSE; the CIFAR-10 test top-1 is printed
beside it for information only and plays no part in the choice.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import dfquant
from act_nsigma import logit_mse  # sibling benchmark scripts (benchmarks/ is on sys.path when run)
from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
from dfquant.data import load_cifar10_npz
from dfquant.genie import CPU_BUDGET
from dfquant.io.images import load_images
from genie_cifar import parse_setting

RESULTS = Path(__file__).parent / "results" / "genie_lr_round"


def run(args) -> dict:
    data = load_cifar10_npz()
    res = {
        "command": f"python benchmarks/genie_lr_round.py --models {' '.join(args.models)} --settings {' '.join(args.settings)} "
        f"--lr-rounds {' '.join(map(str, args.lr_rounds))} --recon-iters {args.recon_iters}" + (f" --threads {args.threads}" if args.threads else ""),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "recon_iters": args.recon_iters,
        "rows": [],
    }
    for name in args.models:
        weights = asset_path(CIFAR_RESNET_WEIGHTS[name])
        if weights is None:
            raise SystemExit(f"missing shared weights for {name}: set DFQUANT_ASSETS")
        model = dfquant.create_model(name, weights=str(weights))
        files = {g: Path(args.synthetic_dir) / f"{name}_{g}_n256_it150_seed0.safetensors" for g in ("genie", "zeroq")}
        for g, f in files.items():
            if not f.is_file():
                raise SystemExit(f"no {g} images at {f}: run benchmarks/genie_cifar.py --synthetic-dir {args.synthetic_dir} first")
        train, held_out = load_images(files["genie"]), load_images(files["zeroq"])
        for setting in args.settings:
            w, a = parse_setting(setting)
            for lr in args.lr_rounds:
                t = time.perf_counter()
                q, report = dfquant.quantize(
                    model, "genie", w, a, synthetic=train, init="rtn", recon_iters=args.recon_iters, lr_round=lr, seed=0, device="cpu", progress=True
                )
                dt = time.perf_counter() - t
                units = report.config["genie"]["units"]
                nweights = sum(u["weights"] for u in units)
                row = dict(
                    model=name,
                    setting=setting,
                    lr_round=lr,
                    unit_error=sum(u["after"] for u in units),
                    undecided=sum(u.get("soft_undecided", 0.0) * u["weights"] for u in units) / nweights,
                    codes_changed=sum(u["codes_changed"] for u in units) / nweights,
                    held_out_logit_mse=logit_mse(q, model, held_out),
                    test_top1=dfquant.evaluate(q, data)["top1"],
                    quantize_s=dt,
                )
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=2))
    return res


def to_markdown(parts: list) -> str:
    lines = [
        "# Genie-M rounding learning rate for short budgets, chosen on synthetic data",
        "",
        "Commands:",
        "",
        *[f"- `{p['command']}` ({p['machine']})" for p in parts],
        "",
        "Genie-D images (256, cached by `benchmarks/genie_cifar.py --synthetic-dir out/syn`) train the reconstruction; "
        "ZeroQ images (256) are held out. `unit error`: sum over units of the hard-quantized unit output error on the "
        "training images. `held-out MSE`: logit squared error against FP32 on the ZeroQ images. `undecided`: soft rounding "
        "values not within 0.01 of 0 or 1 when hard rounding is taken. `codes changed`: weight codes that differ from the start. "
        "Test top-1 (846 CIFAR-10 images) is shown for information only; the choices below use synthetic images only.",
        "",
        "| model | setting | iterations | lr_round | unit error | held-out MSE | undecided | codes changed | test top-1 | time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [dict(r, recon_iters=p["recon_iters"]) for p in parts for r in p["rows"]]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['recon_iters']} | {r['lr_round']:g} | {r['unit_error']:.4g} | {r['held_out_logit_mse']:.4g} | "
            f"{100 * r['undecided']:.1f} % | {100 * r['codes_changed']:.1f} % | {r['test_top1']:.2f} | {r['quantize_s']:.0f} s |"
        )
    for title, key in (("Lowest held-out MSE", "held_out_logit_mse"), ("Lowest unit error", "unit_error")):
        lines += ["", f"{title} per model, setting and iteration count:", ""]
        for group_key in dict.fromkeys((r["model"], r["setting"], r["recon_iters"]) for r in rows):
            group = [r for r in rows if (r["model"], r["setting"], r["recon_iters"]) == group_key]
            best = min(group, key=lambda r: r[key])
            lines.append(f"- {group_key[0]} {group_key[1]}, {group_key[2]} iterations: lr_round {best['lr_round']:g}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20"])
    ap.add_argument("--settings", nargs="+", default=["W4A4", "W2A4"])
    ap.add_argument("--lr-rounds", nargs="+", type=float, default=[1e-3, 1e-2, 4e-2])
    ap.add_argument("--recon-iters", type=int, default=CPU_BUDGET["recon_iters"])
    ap.add_argument("--synthetic-dir", default="out/syn")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--merge", nargs="+", default=None, help="combine these JSON results into --out (.md and .json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = []
        for p in args.merge:  # a run's file, or an earlier merge's list of them
            d = json.loads(Path(p).read_text())
            parts += d if isinstance(d, list) else [d]
        out.with_suffix(".json").write_text(json.dumps(parts, indent=2))
    else:
        parts = [run(args)]
    out.with_suffix(".md").write_text(to_markdown(parts))
    print(to_markdown(parts))


if __name__ == "__main__":
    main()
