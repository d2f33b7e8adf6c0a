"""How well cached synthetic sets match the model's BN statistics (no real data involved).

    python benchmarks/synthetic_stats.py --synthetic-dir out/syn

For each CIFAR ResNet and generator, the first cached 256-image set (seed 0, made by
``genie_cifar.py``) is scored with both losses of :func:`dfquant.genie.bn_statistics_loss`:
Genie's batch-statistics form and ZeroQ's per-image form (batches of 128), plus the model's mean
prediction entropy and predicted-class counts; Gaussian noise gives the scale.
Writes benchmarks/results/synthetic_stats.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import dfquant
from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
from dfquant.genie import bn_statistics_loss
from dfquant.io.images import load_images


def score(model, x):
    with torch.no_grad():
        batch = torch.stack([bn_statistics_loss(model, xb) for xb in x.split(128)]).mean()
        per_image = torch.stack([bn_statistics_loss(model, xb, per_sample=True) for xb in x.split(128)]).mean()
        p = model(x).softmax(1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1).mean()
        counts = torch.bincount(p.argmax(1), minlength=p.shape[1])
    return float(batch), float(per_image), float(entropy), counts.tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic-dir", default="out/syn")
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = ["# BN-statistics match of the cached synthetic sets", "",
             f"Command: `python benchmarks/synthetic_stats.py --synthetic-dir {args.synthetic_dir}` (weights from `../shared`; no real images used).",
             "256 images per set (seed 0, 150 synthesis iterations, the CPU budget's sets); losses averaged over batches of 128.", "",
             "| model | images | Genie batch BN loss | ZeroQ per-image BN loss | prediction entropy | predicted-class counts |", "|---|---|---|---|---|---|"]
    for name in args.models:
        model = dfquant.create_model(name, weights=str(asset_path(CIFAR_RESNET_WEIGHTS[name]))).eval()
        sets = {g: load_images(Path(args.synthetic_dir) / f"{name}_{g}_n256_it150_seed0.safetensors") for g in ("genie", "zeroq")}
        sets["N(0,1) noise"] = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        for g, x in sets.items():
            b, pi, ent, counts = score(model, x)
            lines.append(f"| {name} | {g} | {b:.3f} | {pi:.2f} | {ent:.3f} | {counts} |")
    out = Path(__file__).parent / "results" / "synthetic_stats.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
