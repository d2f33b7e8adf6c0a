"""Benchmark: the DFQ baselines (cross-layer equalization, bias correction) on the real CIFAR-10
ResNets, alone and with SQuant.

    python benchmarks/dfq_cifar.py --threads 1     # writes benchmarks/results/dfq_cifar.{md,json}
    python benchmarks/dfq_cifar.py --threads 1 --per-tensor --out benchmarks/results/dfq_cifar_per_tensor

Rows: RTN, RTN + CLE, RTN + bias correction, RTN + CLE + bias correction (DFQ as the paper applies
it), SQuant, SQuant + bias correction, SQuant + CLE + bias correction. Same protocol as
``squant_cifar.py`` (per-channel min/max weight grid, BN-statistics activation ranges, image input
float, classifier input 8 bit); ``--per-tensor`` gives every layer one weight scale instead (the
DFQ paper's protocol, the one equalization is for). For every row with bias correction, an exact
sign test of which is closer to the FP32 logits image by image: the row or the same row without
bias correction (``dfquant.paired_error_comparison``); likewise for every RTN row with CLE against
the same row without it. No data is used to quantize; the 846 images only measure.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import dfquant
from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
from dfquant.data import load_cifar10_npz
from dfquant.devices import cpu_name

SETTINGS = [(8, 8), (6, 6), (4, 8), (4, 4), (3, 8)]
# (label, method, cle, bias_correction, the row the bias-corrected one is compared with)
ROWS = [
    ("RTN", "rtn", False, False, None),
    ("RTN+CLE", "rtn", True, False, None),
    ("RTN+BC", "rtn", False, True, "RTN"),
    ("RTN+CLE+BC", "rtn", True, True, "RTN+CLE"),
    ("SQuant", "squant", False, False, None),
    ("SQuant+BC", "squant", False, True, "SQuant"),
    ("SQuant+CLE+BC", "squant", True, True, None),
]
# (row with CLE, the same row without it): image-by-image sign tests of equalization
CLE_PAIRS = [("RTN+CLE", "RTN"), ("RTN+CLE+BC", "RTN+BC")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--settings", nargs="+", default=[f"W{w}A{a}" for w, a in SETTINGS])
    ap.add_argument("--per-tensor", action="store_true", help="one weight scale per layer (DFQ's protocol)")
    ap.add_argument("--out", default="benchmarks/results/dfq_cifar")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [tuple(int(v) for v in s[1:].split("A")) for s in args.settings]
    data = load_cifar10_npz()
    command = "python benchmarks/dfq_cifar.py" + (f" --threads {args.threads}" if args.threads else "") + (
        f" --models {' '.join(args.models)}" if args.models != ap.get_default("models") else ""
    ) + (f" --settings {' '.join(args.settings)}" if args.settings != ap.get_default("settings") else "") + (
        " --per-tensor" if args.per_tensor else ""
    ) + (f" --out {args.out}" if args.out != ap.get_default("out") else "")
    doc = {
        "command": command,
        "machine": cpu_name(),
        "torch": torch.__version__,
        "n_images": int(data[1].numel()),
        "per_channel": not args.per_tensor,
        "models": {},
    }
    for name in args.models:
        model = dfquant.create_model(name, weights=str(asset_path(CIFAR_RESNET_WEIGHTS[name])))
        fp = dfquant.evaluate(model, data)["top1"]
        rows = []
        for w, a in settings:
            errors = {}
            for label, method, cle, bc, versus in ROWS:
                q, report = dfquant.quantize(model, method, w, a, cle=cle, bias_correction=bc, per_channel=not args.per_tensor)
                ev = dfquant.evaluate(q, data, reference=model, predictions=True)
                errors[label] = ev["logit_sq_err"]
                row = {"setting": f"W{w}A{a}", "method": label, "top1": ev["top1"], "agree_top1": ev["agree_top1"], "logit_mse": ev["logit_mse"], "quantize_s": report.total_time_s}
                if versus is not None:
                    row["versus"] = versus
                    row["sign_test"] = dfquant.paired_error_comparison(ev["logit_sq_err"], errors[versus])
                cle_versus = dict(CLE_PAIRS).get(label)
                if cle_versus is not None:
                    row["cle_versus"] = cle_versus
                    row["cle_sign_test"] = dfquant.paired_error_comparison(ev["logit_sq_err"], errors[cle_versus])
                rows.append(row)
                extra = f"  closer than {versus} on {row['sign_test']['a_closer']} vs {row['sign_test']['b_closer']} (p {row['sign_test']['p_value']:.2g})" if versus else ""
                print(f"{name} W{w}A{a} {label:<14} {ev['top1']:6.2f} logit-mse {ev['logit_mse']:.4f}{extra}", flush=True)
        doc["models"][name] = {"fp32_top1": fp, "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(to_markdown(doc))
    print(out.with_suffix(".md").read_text())


def to_markdown(doc: dict) -> str:
    labels = [r[0] for r in ROWS]
    lines = [
        "# DFQ baselines on CIFAR-10 ResNets: cross-layer equalization (CLE) and bias correction (BC)",
        "",
        f"Command: `{doc['command']}`. Machine: {doc['machine']}, torch {doc['torch']}. Top-1 on the first {doc['n_images']} "
        "CIFAR-10 test images in ../shared (about ±1 point standard error: compare rows, not absolute figures).",
        "Protocol of `squant_cifar.md`: "
        + ("per-channel min/max weight grid" if doc.get("per_channel", True) else "**per-tensor** min/max weight grid (one scale per layer, the DFQ paper's protocol)")
        + " at the given bits for every layer, activation ranges "
        "from BN statistics, image input float, classifier input 8 bit; BN not folded. CLE and BC as in `dfquant.dfq`.",
        "",
    ]
    for name, m in doc["models"].items():
        settings = list(dict.fromkeys(r["setting"] for r in m["rows"]))
        lines += [f"## {name} (FP32 top-1 {m['fp32_top1']:.2f} %)", "", "Top-1 % / logit MSE against FP32:", ""]
        lines += ["| setting | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for s in settings:
            cells = {r["method"]: r for r in m["rows"] if r["setting"] == s}
            lines.append(f"| {s} | " + " | ".join(f"{cells[l]['top1']:.2f} / {cells[l]['logit_mse']:.3f}" for l in labels) + " |")
        tested = [l for l, *_, versus in ROWS if versus]
        lines += ["", "Bias correction, image by image: images closer to FP32 with BC vs without (exact sign test p):", ""]
        lines += ["| setting | " + " | ".join(f"{l} vs {v}" for l, *_, v in ROWS if v) + " |", "|---|" + "---|" * len(tested)]
        for s in settings:
            cells = {r["method"]: r for r in m["rows"] if r["setting"] == s}
            lines.append(
                f"| {s} | "
                + " | ".join(f"{cells[l]['sign_test']['a_closer']} vs {cells[l]['sign_test']['b_closer']} (p {cells[l]['sign_test']['p_value']:.2g})" for l in tested)
                + " |"
            )
        lines += ["", "Cross-layer equalization, image by image: images closer to FP32 with CLE vs without (exact sign test p):", ""]
        lines += ["| setting | " + " | ".join(f"{l} vs {v}" for l, v in CLE_PAIRS) + " |", "|---|" + "---|" * len(CLE_PAIRS)]
        for s in settings:
            cells = {r["method"]: r for r in m["rows"] if r["setting"] == s}
            lines.append(
                f"| {s} | "
                + " | ".join(
                    f"{cells[l]['cle_sign_test']['a_closer']} vs {cells[l]['cle_sign_test']['b_closer']} (p {cells[l]['cle_sign_test']['p_value']:.2g})"
                    for l, _ in CLE_PAIRS
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
