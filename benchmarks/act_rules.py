"""Benchmark: dfquant's BN-statistics activation ranges against the SQuant authors' noise rule
(``act_range="squant"``, the SQuant paper's protocol), on the CIFAR ResNets.

    python benchmarks/act_rules.py      # writes benchmarks/results/act_rules.{md,json}

SQuant weights (E+K+C, per-channel min/max grid), W4A4 and W8A8, image input float, classifier
input 8 bits. The BN rule (``dfq``) needs no forward pass; the noise rule runs the quantizing model
once on 256 uniform-noise images per noise seed (seeds 0-4). Each row: top-1 and logit MSE against
FP32 on the 846 CIFAR-10 test images, and the paired tests of the noise rule against the BN rule
(exact sign test on per-image logit error, exact McNemar on correctness).
"""
from __future__ import annotations

import json
from pathlib import Path

import dfquant
from dfquant.data import load_cifar10_npz
from dfquant.devices import cpu_name
from genie_cifar import load_model

RESULTS = Path(__file__).parent / "results" / "act_rules"
SEEDS = range(5)


def run_model(name: str, data) -> list:
    model = load_model(name)
    ref = dfquant.reference_logits(model, data)
    rows = []
    for w, a in ((4, 4), (8, 8)):
        bn = dfquant.evaluate(dfquant.quantize(model, "squant", w, a)[0], data, reference=ref, predictions=True)
        rows.append(dict(model=name, setting=f"W{w}A{a}", rule="BN statistics (dfq)", seed=None, top1=bn["top1"], logit_mse=bn["logit_mse"]))
        for seed in SEEDS:
            q, _ = dfquant.quantize(model, "squant", w, a, protocol="squant", noise_seed=seed)
            ev = dfquant.evaluate(q, data, reference=ref, predictions=True)
            rows.append(dict(model=name, setting=f"W{w}A{a}", rule="noise (squant)", seed=seed, top1=ev["top1"], logit_mse=ev["logit_mse"],
                             sign_test=dfquant.paired_error_comparison(ev["logit_sq_err"], bn["logit_sq_err"]),
                             mcnemar=dfquant.paired_comparison(ev["correct"], bn["correct"])))
            print(f"{name} W{w}A{a} noise seed {seed}: {ev['top1']:.2f} % mse {ev['logit_mse']:.3f} (BN rule {bn['top1']:.2f} %, {bn['logit_mse']:.3f})", flush=True)
    return rows


def to_markdown(doc: dict) -> str:
    lines = ["# Activation ranges: BN statistics (dfquant) against the SQuant authors' noise rule", "",
             f"Command: `{doc['command']}`. Machine: {doc['machine']}. SQuant weights, image input float, classifier input 8 bits;",
             "846 CIFAR-10 test images. Paired tests: the noise rule against the BN rule at the same setting (images closer to FP32,",
             "noise : BN, exact sign test; images only one gets right, exact McNemar).", "",
             "| model | setting | rule | noise seed | top-1 % | logit MSE | closer to FP32 (sign test p) | correct only (McNemar p) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        s, m = r.get("sign_test"), r.get("mcnemar")
        tests = f"{s['a_closer']}:{s['b_closer']} (p {s['p_value']:.2g}) | {m['a_only']}:{m['b_only']} (p {m['p_value']:.2g})" if s else "- | -"
        lines.append(f"| {r['model']} | {r['setting']} | {r['rule']} | {'-' if r['seed'] is None else r['seed']} | {r['top1']:.2f} | {r['logit_mse']:.3g} | {tests} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    data = load_cifar10_npz()
    doc = dict(command="python benchmarks/act_rules.py", machine=cpu_name(), rows=[])
    for name in ("resnet20", "resnet56"):
        doc["rows"] += run_model(name, data)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    RESULTS.with_suffix(".md").write_text(to_markdown(doc))
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
