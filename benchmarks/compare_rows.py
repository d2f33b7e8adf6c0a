"""Paired comparison of two methods' rows across ``genie_cifar.py`` result files (same images, same seed).

    python benchmarks/compare_rows.py --a "Genie, act. ranges from data" --b "Genie (D + M)" \
        --out benchmarks/results/NAME A.json B.json ...

For every (model, setting, run seed) where the files hold a row of method A and a row of method B,
an exact McNemar test on the 846 images' correctness and an exact sign test on which row is closer to
FP32 per image (``dfquant.paired_comparison`` / ``dfquant.paired_error_comparison``). With
``--b-files`` the B rows come from those files instead (the same method at another budget, say:
``--a X --b X --a-name "2000 iterations" --b-name "500 iterations"``). A file's seed is
its ``--seed`` (the synthetic images) and its ``--recon-seed`` when given; rows of the same method and
key in two files must agree. Writes NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import dfquant


def run_seed(res: dict) -> str:
    recon = re.search(r"--recon-seed (\d+)", res["command"])
    return f"{res.get('seed', 0)}" + (f" (recon. {recon.group(1)})" if recon else "")


def collect(files: list, method: str) -> dict:
    rows: dict = {}
    for f in files:
        res = json.loads(Path(f).read_text())
        for model, m in res["models"].items():
            for r in m["rows"]:
                if r["method"] != method or "correct" not in r:
                    continue
                key = (model, r["setting"], run_seed(res))
                if key in rows and rows[key]["top1"] != r["top1"]:
                    raise SystemExit(f"{f}: {method} at {key} differs from an earlier file's row")
                rows[key] = dict(r, correct=[c == "1" for c in r["correct"]])  # stored as a string of 0/1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--a", required=True, help="method label of the first row")
    ap.add_argument("--b", required=True, help="method label of the second row")
    ap.add_argument("--b-files", nargs="+", default=None, help="take the B rows from these files instead")
    ap.add_argument("--a-name", default=None, help="how the title names A (default: its label)")
    ap.add_argument("--b-name", default=None, help="how the title names B (default: its label)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows_a, rows_b = collect(args.files, args.a), collect(args.b_files or args.files, args.b)
    if not set(rows_a) & set(rows_b):
        raise SystemExit(f"no model, setting and seed has both a {args.a!r} and a {args.b!r} row with per-image results in these files")
    table = []
    for key in sorted(set(rows_a) & set(rows_b)):
        ra, rb = rows_a[key], rows_b[key]
        entry = dict(model=key[0], setting=key[1], seed=key[2], top1_a=ra["top1"], top1_b=rb["top1"], mcnemar=dfquant.paired_comparison(ra["correct"], rb["correct"]))
        if "logit_sq_err" in ra and "logit_sq_err" in rb:
            entry.update(logit_mse_a=ra["logit_mse"], logit_mse_b=rb["logit_mse"], closer=dfquant.paired_error_comparison(ra["logit_sq_err"], rb["logit_sq_err"]))
        table.append(entry)
    command = "python benchmarks/compare_rows.py " + " ".join(
        ["--a", json.dumps(args.a), "--b", json.dumps(args.b)]
        + (["--a-name", json.dumps(args.a_name)] if args.a_name else [])
        + (["--b-name", json.dumps(args.b_name)] if args.b_name else [])
        + ["--out", args.out, *args.files]
        + (["--b-files", *args.b_files] if args.b_files else [])
    )
    Path(args.out + ".json").write_text(json.dumps(dict(command=command, a=args.a, b=args.b, rows=table), indent=1))
    lines = [
        f"# {args.a_name or args.a} against {args.b_name or args.b}, paired on the same images",
        "",
        f"Command: `{command}`",
        "",
        "McNemar: images only A / only B gets right, exact two-sided p. Sign test: images where A / B is closer to FP32 (logit squared error), exact two-sided p.",
        "",
        "| model | setting | seed | top-1 A | top-1 B | only A / only B right | McNemar p | logit MSE A | logit MSE B | A / B closer | sign p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        p, c = e["mcnemar"], e.get("closer")
        lines.append(
            f"| {e['model']} | {e['setting']} | {e['seed']} | {e['top1_a']:.2f} | {e['top1_b']:.2f} | {p['a_only']} / {p['b_only']} | {p['p_value']:.2g} | "
            + (f"{e['logit_mse_a']:.3f} | {e['logit_mse_b']:.3f} | {c['a_closer']} / {c['b_closer']} | {c['p_value']:.2g} |" if c else "– | – | – | – |")
        )
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
