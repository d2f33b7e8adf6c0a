"""Summarise ``genie_cifar.py`` runs that differ only in the reconstruction seed: top-1 per seed,
mean and standard deviation per learned method, beside the deterministic SQuant row.

    python benchmarks/seed_summary.py --settings W4A4 --seeds 0 1 2 --out benchmarks/results/NAME A.json B.json C.json

File i holds the rows of reconstruction seed ``--seeds[i]``. The budget, lr, data, synthesis seed
of every file must agree (only the reconstruction seed may differ); each file's machine is listed
(compare seeds run on the same CPU: learned rows differ across CPUs). With ``--whole-run`` file i
is instead a whole run with ``--seed`` ``--seeds[i]``: its own synthetic images and reconstruction,
so the spread includes synthesis. Writes NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dfquant.evaluation import sign_test_p

MUST_AGREE = ("budget", "lr_round", "n_images", "seed")
DETERMINISTIC = ("RTN", "SQuant")


def summarise(files: list, seeds: list, settings: list, whole_run: bool = False) -> dict:
    results = [json.loads(Path(f).read_text()) for f in files]
    if whole_run:
        for f, seed, res in zip(files, seeds, results):
            if res.get("seed") != seed or "--recon-seed" in res["command"]:
                raise SystemExit(f"{f} was made with seed {res.get('seed')}, not {seed}")
    for key in MUST_AGREE if not whole_run else [k for k in MUST_AGREE if k != "seed"]:
        values = {json.dumps(r.get(key), sort_keys=True) for r in results}
        if len(values) > 1:
            raise SystemExit(f"cannot summarise: '{key}' differs between the files ({', '.join(sorted(values))})")
    unique = sorted(set(seeds))  # a seed may come from one file per model
    table = []
    for model in dict.fromkeys(m for r in results for m in r["models"]):
        for setting in settings:
            runs: dict = {}
            reference, reference_mse = {}, {}
            for seed, res in zip(seeds, results):
                for row in res["models"].get(model, {}).get("rows", []):
                    if row["setting"] != setting:
                        continue
                    if row["method"] in DETERMINISTIC:
                        reference_mse.setdefault(row["method"], row["logit_mse"])
                        if reference.setdefault(row["method"], row["top1"]) != row["top1"]:
                            raise SystemExit(f"{model} {setting} {row['method']} is deterministic but differs between files")
                        continue
                    runs.setdefault(row["method"], {})[seed] = {"top1": row["top1"], "logit_mse": row["logit_mse"]}
            for method, by_seed in runs.items():
                top1 = [by_seed[s]["top1"] for s in unique if s in by_seed]
                table.append(
                    {
                        "model": model,
                        "setting": setting,
                        "method": method,
                        "fp32_top1": next(r["models"][model]["fp32_top1"] for r in results if model in r["models"]),
                        "squant_top1": reference.get("SQuant"),
                        "by_seed": {str(s): by_seed[s] for s in unique if s in by_seed},
                        "mean_top1": statistics.mean(top1),
                        "sd_top1": statistics.stdev(top1) if len(top1) > 1 else None,
                        "mean_logit_mse": statistics.mean(by_seed[s]["logit_mse"] for s in unique if s in by_seed),
                        "seeds_above_squant": None if "SQuant" not in reference else sum(t > reference["SQuant"] for t in top1),
                        "seeds_below_squant": None if "SQuant" not in reference else sum(t < reference["SQuant"] for t in top1),
                        "squant_logit_mse": reference_mse.get("SQuant"),
                        "seeds_lower_mse_than_squant": None
                        if "SQuant" not in reference_mse
                        else sum(by_seed[s]["logit_mse"] < reference_mse["SQuant"] for s in unique if s in by_seed),
                    }
                )
    return {
        "budget": results[0]["budget"],
        "whole_run": whole_run,
        "seeds": seeds,
        "commands": [r["command"] for r in results],
        "machines": [r["machine"] for r in results],
        "rows": table,
    }


def to_markdown(doc: dict, title: str, command: str) -> str:
    seeds = doc["seeds"]
    columns = sorted(set(seeds))
    b = doc["budget"]
    lines = [
        f"# {title}",
        "",
        f"Budget: {b['samples']} synthetic images, {b['distill_iters']} synthesis iterations, {b['recon_iters']} reconstruction "
        "iterations per block; "
        + (
            "each seed is a whole run: its own Genie-D synthesis and reconstruction. "
            if doc.get("whole_run")
            else "the same synthetic images (synthesis seed 0, cached) for every reconstruction seed. "
        )
        + 
        "Top-1 on the 846 CIFAR-10 test images in ../shared.",
        "",
        f"Summary: `{command}`",
        "",
        "Runs:",
        "",
    ]
    lines += [f"- seed {s} ({m}): `{c}`" for s, m, c in zip(seeds, doc["machines"], doc["commands"])]
    lines += [
        "",
        "| model | setting | method | " + " | ".join(f"seed {s}" for s in columns) + " | mean ± sd | mean logit MSE | SQuant | seeds above SQuant | SQuant logit MSE | seeds with lower logit MSE |",
        "|---|---|---|" + "---|" * len(columns) + "---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        cells = [f"{r['by_seed'][str(s)]['top1']:.2f}" if str(s) in r["by_seed"] else "–" for s in columns]
        sd = f" ± {r['sd_top1']:.2f}" if r["sd_top1"] is not None else ""
        sq = "–" if r["squant_top1"] is None else f"{r['squant_top1']:.2f}"
        above = "–" if r["seeds_above_squant"] is None else f"{r['seeds_above_squant']} of {len(r['by_seed'])}"
        if r.get("seeds_below_squant") is not None and len(r["by_seed"]) > 1:
            above += f" (below: {r['seeds_below_squant']}; sign test p = {sign_test_p(r['seeds_above_squant'], r['seeds_below_squant']):.2g})"
        lines.append(
            f"| {r['model']} (FP32 {r['fp32_top1']:.2f}) | {r['setting']} | {r['method']} | " + " | ".join(cells) + f" | {r['mean_top1']:.2f}{sd} | {r['mean_logit_mse']:.3f} | {sq} | {above} | "
            + ("–" if r.get("squant_logit_mse") is None else f"{r['squant_logit_mse']:.3f}")
            + " | "
            + ("–" if r.get("seeds_lower_mse_than_squant") is None else f"{r['seeds_lower_mse_than_squant']} of {len(r['by_seed'])}")
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="the reconstruction seed of each file, in order")
    ap.add_argument("--whole-run", action="store_true", help="the files differ in the run's seed (synthesis and reconstruction)")
    ap.add_argument("--settings", nargs="+", default=["W4A4"])
    ap.add_argument("--title", default="Genie and ZeroQ over reconstruction seeds")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if len(args.seeds) != len(args.files):
        raise SystemExit("give one --seeds value per file")
    doc = summarise(args.files, args.seeds, args.settings, args.whole_run)
    command = "python benchmarks/seed_summary.py " + " ".join(
        ["--settings", *args.settings, "--seeds", *map(str, args.seeds), *(["--whole-run"] if args.whole_run else []), "--title", json.dumps(args.title), "--out", args.out, *args.files]
    )
    doc["command"] = command
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1))
    Path(args.out + ".md").write_text(to_markdown(doc, args.title, command))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
