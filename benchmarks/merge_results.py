"""Merge ``genie_cifar.py`` result files made by parallel commands (one process per core) into one table.

    python benchmarks/merge_results.py --out benchmarks/results/NAME [--methods KEY ...] [--note TEXT] [--label TEXT] A.json B.json ...

The budget, lr and data of every file must agree (a table mixes no budgets); rows of the same
model, setting and method in a later file replace the earlier one's (so a committed table plus a
re-run of some of its rows gives the re-run's figures). Commands are joined in the order given;
synthesis times of the same generator keep the first file's (the cached images' own time).
Writes NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from genie_cifar import METHODS, write_results

MUST_AGREE = ("budget", "lr_round", "n_images", "synthesis_shards")


def merge(results: list) -> dict:
    """One result dict from several; refuses files whose budget or data differ."""
    out = json.loads(json.dumps(results[0]))
    commands = [results[0]["command"]]
    for res in results[1:]:
        for key in MUST_AGREE:
            if res.get(key) != out.get(key):
                raise SystemExit(f"cannot merge: '{key}' differs ({out.get(key)!r} vs {res.get(key)!r})")
        commands.append(res["command"])
        for name, m in res["models"].items():
            entry = out["models"].setdefault(name, {"fp32_top1": m["fp32_top1"], "synthesis_s": {}, "rows": []})
            if abs(entry["fp32_top1"] - m["fp32_top1"]) > 1e-9:
                raise SystemExit(f"cannot merge: {name}'s FP32 top-1 differs ({entry['fp32_top1']} vs {m['fp32_top1']})")
            for gen, s in m["synthesis_s"].items():
                entry["synthesis_s"].setdefault(gen, s)
            for row in m["rows"]:
                key = (row["setting"], row["method"])
                entry["rows"] = [r for r in entry["rows"] if (r["setting"], r["method"]) != key] + [row]
    out["command"] = "` and `".join(dict.fromkeys(commands))
    return out


def read_result(path: str) -> dict:
    """A genie_cifar.py result file, or a one-line exit naming what is wrong with it."""
    try:
        res = json.loads(Path(path).read_text())
    except OSError as e:
        raise SystemExit(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(res, dict) or not {"command", "budget", "models"} <= set(res):
        raise SystemExit(f"{path} is not a genie_cifar.py result (needs 'command', 'budget' and 'models')")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True, help="path without suffix; NAME.json and NAME.md are written")
    ap.add_argument("--note", default=None, help="a sentence for the table's header (replaces the first file's note)")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="keep only these rows (genie_cifar.py's method keys)")
    ap.add_argument("--label", default=None, help="added to the learned rows' names by paired.py (e.g. '2nd CPU' for a re-run on another machine)")
    args = ap.parse_args()
    res = merge([read_result(f) for f in args.files])
    if args.methods is not None:
        keep = {METHODS[k][0] for k in args.methods}
        for m in res["models"].values():
            m["rows"] = [r for r in m["rows"] if r["method"] in keep]
    if args.note is not None:
        res["note"] = args.note
    if args.label is not None:
        res["label"] = args.label
    order = [label for label, _, _ in METHODS.values()]
    for m in res["models"].values():  # settings in the order first seen, methods in the usual column order
        m["rows"].sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
        settings = list(dict.fromkeys(r["setting"] for r in m["rows"]))
        m["rows"].sort(key=lambda r: settings.index(r["setting"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(res, out)
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
