"""Choose the DFQ rule's ``n`` (activation range ``beta + n * gamma``) per bit-width without real data.

    python benchmarks/act_nsigma.py --synthetic-dir out/syn --threads 1

For each model and activation bit-width, every ``n`` on a grid is scored by the mean squared error
of the quantized model's logits against the float model's, on **synthetic** images (Genie-D, made
from the model's BatchNorm statistics: ``benchmarks/genie_cifar.py --synthetic-dir`` caches them).
No real image is seen, so the table this prints can set ``dfquant.activation_ranges.DFQ_N_SIGMA``
without peeking at evaluation data. Weights are 8-bit round-to-nearest so that the activation
quantizers dominate the error. Writes benchmarks/results/act_nsigma.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import dfquant
from dfquant.activation_ranges import DFQ_N_SIGMA
from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
from dfquant.io.images import load_images

RESULTS = Path(__file__).parent / "results" / "act_nsigma"
GRID = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0)


@torch.no_grad()
def logit_mse(qmodel, model, images: torch.Tensor) -> float:
    return float((qmodel(images) - model(images)).pow(2).sum(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 5, 6, 8])
    ap.add_argument("--synthetic-dir", default="out/syn", help="where genie_cifar.py cached the Genie-D images")
    ap.add_argument("--images", default="genie_n256_it150_seed0", help="cached file name after '<model>_'")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {
        "command": f"python benchmarks/act_nsigma.py --models {' '.join(args.models)} --bits {' '.join(map(str, args.bits))}"
        + (f" --threads {args.threads}" if args.threads else ""),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "grid": list(GRID),
        "current": {str(b): DFQ_N_SIGMA[b] for b in args.bits},
        "models": {},
    }
    for name in args.models:
        weights = asset_path(CIFAR_RESNET_WEIGHTS[name])
        if weights is None:
            raise SystemExit(f"missing shared weights for {name}: set DFQUANT_ASSETS")
        model = dfquant.create_model(name, weights=str(weights))
        cached = Path(args.synthetic_dir) / f"{name}_{args.images}.safetensors"
        if not cached.is_file():
            raise SystemExit(f"no synthetic images at {cached}: run benchmarks/genie_cifar.py --synthetic-dir {args.synthetic_dir} first")
        images = load_images(cached)
        table = res["models"][name] = {}
        for bits in args.bits:
            row = {}
            for n in GRID:
                q, _ = dfquant.quantize(model, "rtn", 8, bits, n_sigma=n)
                row[str(n)] = logit_mse(q, model, images)
            table[str(bits)] = row
            best = min(row, key=row.get)
            print(f"{name} A{bits}: best n = {best}  ({row[best]:.4g}; current n = {DFQ_N_SIGMA[bits]}: {row[str(float(DFQ_N_SIGMA[bits]))] if str(float(DFQ_N_SIGMA[bits])) in row else 'off grid'})", flush=True)
    # the choice: lowest error relative to each model's best, summed over models
    res["chosen"] = {}
    for bits in args.bits:
        score = {n: sum(m[str(bits)][n] / min(m[str(bits)].values()) for m in res["models"].values()) for n in map(str, GRID)}
        res["chosen"][str(bits)] = float(min(score, key=score.get))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(res, indent=2))
    RESULTS.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))


def to_markdown(res: dict) -> str:
    lines = [
        "# Activation range rule: n in beta + n*gamma per bit-width, chosen on synthetic images",
        "",
        f"Command: `{res['command']}` (after `benchmarks/genie_cifar.py --synthetic-dir out/syn` made the Genie-D images).",
        f"Machine: {res['machine']}. Score: MSE of the logits against the float model on 256 Genie-D synthetic images "
        "(no real image involved); weights 8-bit RTN, activations at the given bits, image input float, classifier input 8 bit.",
        "",
    ]
    for name, table in res["models"].items():
        lines += [f"## {name}", "", "| a_bits | " + " | ".join(f"n={n:g}" for n in res["grid"]) + " |", "|---|" + "---|" * len(res["grid"])]
        for bits, row in table.items():
            best = min(row, key=row.get)
            lines.append(f"| A{bits} | " + " | ".join((f"**{v:.3g}**" if n == best else f"{v:.3g}") for n, v in row.items()) + " |")
        lines.append("")
    lines += [
        "## Chosen n (lowest error relative to each model's best, summed over the models)",
        "",
        "| a_bits | " + " | ".join(res["chosen"]) + " |",
        "|---|" + "---|" * len(res["chosen"]),
        "| n before | " + " | ".join(f"{res['current'][b]:g}" for b in res["chosen"]) + " |",
        "| n chosen | " + " | ".join(f"{v:g}" for v in res["chosen"].values()) + " |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
