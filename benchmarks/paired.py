"""Paired significance of the CIFAR-10 comparisons: exact McNemar tests on the same 846 test images.

    python benchmarks/paired.py --threads 1 --results benchmarks/results/per_image/*.json

Accuracy differences of a few images on 846 are noise-sized (standard error about one point); this
says how far from significant each comparison the issues' done-means name is. For every model and
setting of ``benchmarks/squant_cifar.py`` it compares SQuant with round-to-nearest (both
deterministic and fast, so they are recomputed here); for every row of the given
``genie_cifar.py`` result files that carries per-image results (``correct``, written since that
field was added) it compares the row with SQuant, and the Genie rows with the ZeroQ row of the same
model, setting and budget where one is given. A row made at another budget (more
synthetic images, more iterations) is labelled with how its budget differs and is also compared with
the same method's CPU-budget row when one is given. Where a result file has an RTN or SQuant row, its accuracy must equal the one
recomputed here (the methods are deterministic), or the script stops.
A result file may carry a ``label`` (``merge_results.py --label``, e.g. "2nd CPU" for a re-run on another
machine), which is added to its learned rows' names so they stand beside the rows of the same budget.
The files in benchmarks/results/per_image/ are re-runs of the ``genie_cifar.py`` CPU-budget tables
(the command is inside each; same seeds and cached synthetic images), made once the rows kept
per-image results: every top-1 in them equals the committed table's.
Where both models of a pair have per-image logit errors against FP32 (RTN and SQuant, recomputed;
result rows written since they keep ``logit_sq_err``), an exact sign test also says which of the two
is closer to FP32 on more images (``dfquant.paired_error_comparison``).
Writes benchmarks/results/paired.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

import dfquant
from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
from dfquant.data import load_cifar10_npz
from dfquant.genie import CPU_BUDGET
from genie_cifar import parse_setting
from squant_cifar import SETTINGS

OUT = Path(__file__).parent / "results" / "paired"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--results", nargs="*", action="extend", default=[], help="genie_cifar.py result JSONs whose rows carry 'correct' (the flag may repeat)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_cifar10_npz()
    learned = {}  # model -> setting -> label -> row
    for f in args.results:
        res_f = json.loads(Path(f).read_text())
        seed = re.search(r"--recon-seed (\d+)", res_f["command"])
        tags = budget_tags(res_f.get("budget", {}))
        for name, m in res_f["models"].items():
            for r in m["rows"]:
                if r["method"] in ("RTN", "SQuant"):
                    label, extra = r["method"], {}
                else:
                    suffix = f", {res_f['label']}" if res_f.get("label") else ""
                    label = r["method"] + (f", recon. seed {seed.group(1)}" if seed else "") + suffix
                    # a row at another budget is also compared with the same method at the CPU budget
                    extra = {"cpu_budget_label": label} if tags else {}
                    extra["budget"] = "".join(f", {t}" for t in tags)
                    extra["group"] = extra["budget"] + suffix  # Genie is compared with the ZeroQ row of its own budget and run
                    label += extra["budget"]
                learned.setdefault(name, {}).setdefault(r["setting"], {})[label] = dict(r, source=Path(f).name, **extra)

    res = {"command": "python benchmarks/paired.py" + "".join(f" --results {f}" for f in args.results) + (f" --threads {args.threads}" if args.threads else ""), "n_images": int(data[1].numel()), "pairs": []}
    for name in args.models:
        path = asset_path(CIFAR_RESNET_WEIGHTS[name])
        if path is None:
            raise SystemExit(f"missing shared weights for {name}: set DFQUANT_ASSETS")
        model = dfquant.create_model(name, weights=str(path))
        settings = list(dict.fromkeys([f"W{w}A{a}" for w, a in SETTINGS] + list(learned.get(name, {}))))
        for setting in settings:
            w, a = parse_setting(setting)
            base = {}
            for method, label in (("rtn", "RTN"), ("squant", "SQuant")):
                ev = dfquant.evaluate(dfquant.quantize(model, method, w, a)[0], data, reference=model, predictions=True)
                base[label] = {"top1": ev["top1"], "correct": ev["correct"], "logit_sq_err": ev["logit_sq_err"]}
                stored = learned.get(name, {}).get(setting, {}).get(label)
                if stored is not None and abs(stored["top1"] - ev["top1"]) > 1e-9:
                    raise SystemExit(f"{name} {setting} {label}: {stored['source']} has {stored['top1']:.2f}, recomputed {ev['top1']:.2f}")
            pairs = [("SQuant", base["SQuant"], "RTN", base["RTN"])]
            rows = {k: dict(r, correct=[c == "1" for c in r["correct"]]) for k, r in learned.get(name, {}).get(setting, {}).items() if "correct" in r and k not in base}
            for label, row in rows.items():
                pairs.append((label, row, "SQuant", base["SQuant"]))
            zeroq = {r["group"]: (k, r) for k, r in rows.items() if k.startswith("ZeroQ")}
            # Genie vs ZeroQ data at the same budget (and from the same run where a file is labelled)
            pairs += [(label, row, *zeroq[row["group"]]) for label, row in rows.items() if label.startswith("Genie") and row["group"] in zeroq]
            pairs += [(label, row, row["cpu_budget_label"], rows[row["cpu_budget_label"]]) for label, row in rows.items() if row.get("cpu_budget_label") in rows]
            for la, ra, lb, rb in pairs:
                p = dfquant.paired_comparison(ra["correct"], rb["correct"])
                entry = {"model": name, "setting": setting, "a": la, "b": lb, "top1_a": ra["top1"], "top1_b": rb["top1"], **p}
                for side, r in (("a", ra), ("b", rb)):
                    if "logit_sq_err" in r:
                        entry[f"logit_mse_{side}"] = sum(r["logit_sq_err"]) / len(r["logit_sq_err"])
                if "logit_sq_err" in ra and "logit_sq_err" in rb:  # which is closer to FP32, image by image
                    e = dfquant.paired_error_comparison(ra["logit_sq_err"], rb["logit_sq_err"])
                    entry["closer"] = {k: e[k] for k in ("a_closer", "b_closer", "ties", "median_diff", "p_value")}
                if "source" in ra:
                    entry["source"] = ra["source"]
                res["pairs"].append(entry)
                closer = f"; closer to FP32 on {entry['closer']['a_closer']} vs {entry['closer']['b_closer']} images, p = {entry['closer']['p_value']:.2g}" if "closer" in entry else ""
                print(f"{name} {setting} {la} vs {lb}: {ra['top1']:.2f} vs {rb['top1']:.2f}, {p['a_only']} vs {p['b_only']} discordant, p = {p['p_value']:.3f}{closer}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(to_markdown(res))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def budget_tags(budget: dict) -> list:
    """How a result file's budget differs from the CPU budget, as label suffixes ("1024 images")."""
    names = {"samples": "images", "distill_iters": "synthesis iters", "recon_iters": "recon. iters"}
    return [f"{budget[k]} {v}" for k, v in names.items() if k in budget and budget[k] != CPU_BUDGET[k]]


def to_markdown(res: dict) -> str:
    lines = [
        "# Paired significance of the CIFAR-10 comparisons (exact McNemar test of accuracy, sign test of fidelity)",
        "",
        f"Command: `{res['command']}` (assets from `../shared`).",
        f"Data: the first {res['n_images']} CIFAR-10 test images; both models of a pair are scored on the same images.",
        "`A only` = images A classifies correctly and B does not; `B only` the reverse. Only these discordant images carry",
        "information: if A and B were equally accurate each would be a fair coin, and p is the two-sided exact binomial",
        "probability of a split at least this uneven. p above 0.05 means the test set cannot tell the two apart.",
        "Genie rows come from the named result file (same settings, seeds and budget as stated there); RTN and SQuant are recomputed.",
        "",
        "| model | setting | A | B | top-1 A | top-1 B | A only | B only | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res["pairs"]:
        src = f" ({p['source']})" if "source" in p else ""
        lines.append(f"| {p['model']} | {p['setting']} | {p['a']}{src} | {p['b']} | {p['top1_a']:.2f} | {p['top1_b']:.2f} | {p['a_only']} | {p['b_only']} | {p['p_value']:.3f} |")
    lines.append("")
    closer = [p for p in res["pairs"] if "closer" in p]
    if closer:
        lines += [
            "## Which model is closer to FP32, image by image (exact sign test)",
            "",
            "For the pairs where both models' per-image logit errors are known (RTN and SQuant, recomputed here, and result rows",
            "made since the rows keep `logit_sq_err`): `A closer` = images on which A's mean squared logit difference from",
            "the FP32 model is the smaller, `B closer` the reverse, ties dropped; p is the two-sided exact binomial (sign test)",
            "probability of a split at least this uneven if neither model were closer more often. Every image counts here, not",
            "only the few whose top-1 changes, so this resolves differences in fidelity that the accuracy test above cannot;",
            "it says which model stays nearer the original, not which is more accurate.",
            "",
            "| model | setting | A | B | logit MSE A | logit MSE B | A closer | B closer | p |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in closer:
            c = p["closer"]
            mse = lambda key, p=p: f"{p[key]:.3f}" if key in p else "-"  # noqa: E731
            lines.append(f"| {p['model']} | {p['setting']} | {p['a']} | {p['b']} | {mse('logit_mse_a')} | {mse('logit_mse_b')} | {c['a_closer']} | {c['b_closer']} | {c['p_value']:.2g} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
