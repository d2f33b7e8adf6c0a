"""Speed benchmarks, one named section each.

    python benchmarks/speed.py --threads 1                  # every section
    python benchmarks/speed.py --only squant --threads 1    # one section (repeat --only for more)
    python benchmarks/speed.py --only squant --profile      # also print where the time goes

Writes benchmarks/results/speed.json and speed.md. A run replaces the entries of the sections it
ran and keeps the others; each entry records its own command, CPU model, torch version and threads.
Times are medians over interleaved repeats (each repeat runs every variant once, in turn), so the
ratios between variants are measured side by side even on a shared, noisy machine.

Sections (add yours to SECTIONS, with a function returning a result dict and one rendering it):

* ``squant``: ``dfquant.squant.squant_round`` over every conv/linear weight of ImageNet models
  (random init, seed 0: the rounding's speed does not depend on training) on 4-bit per-channel
  min/max grids, at each level (E, K, C, K+C), against one round-to-nearest pass over the same
  grid tensors, for the current implementation and the former one (tests/squant_reference.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dfquant
from dfquant.quantizer import to_grid, weight_params
from dfquant.squant import squant_round

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "speed"
sys.path.insert(0, str(HERE.parent / "tests"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved(variants: dict, repeat: int) -> dict:
    """Median wall-clock and process-CPU seconds of each variant, repeats interleaved."""
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for f in variants.values():  # warm-up
        f()
    for _ in range(repeat):
        for k, f in variants.items():
            w, c = time.perf_counter(), time.process_time()
            f()
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - w)
    return {k: {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu[k])} for k in variants}


# --- section: squant -------------------------------------------------------------------------

LEVELS = {"E": (False, False), "K": (True, False), "C": (False, True), "K+C": (True, True)}


def squant_models() -> tuple[list[str], str]:
    names = dfquant.list_models()
    v1 = [n for n in names if n.startswith("mobilenet_v1")]
    if v1:
        return ["resnet50", v1[0]], ""
    return ["resnet50", "resnet18", "mobilenet_v2"], "MobileNetV1-0.75 is not in the model registry here: ResNet-18 and MobileNetV2 instead."


def grid_tensors(name: str):
    torch.manual_seed(0)
    model = dfquant.create_model(name)
    grids = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.detach()
            qp = weight_params(w, 4)
            grids.append((to_grid(w, qp), qp.qmin, qp.qmax))
    return grids


def run_all(fn, grids, **kw):
    for x, lo, hi in grids:
        fn(x, lo, hi, **kw)


def section_squant(args) -> dict:
    from squant_reference import squant_round as former

    names, note = squant_models()
    models = {}
    for name in names:
        grids = grid_tensors(name)
        same = all(
            torch.equal(squant_round(x, lo, hi, kernel=k, channel=c), former(x, lo, hi, kernel=k, channel=c))
            for x, lo, hi in grids
            for k, c in LEVELS.values()
        )
        variants = {"RTN": lambda grids=grids: run_all(lambda w, a, b: torch.clamp(torch.round(w), a, b), grids)}
        for impl, fn in (("new", squant_round), ("former", former)):
            for level, (k, c) in LEVELS.items():
                variants[f"{impl} {level}"] = lambda fn=fn, k=k, c=c, grids=grids: run_all(fn, grids, kernel=k, channel=c)
        times = interleaved(variants, args.repeat)
        models[name] = {"layers": len(grids), "weights": sum(x.numel() for x, _, _ in grids), "same_codes": same, "times": times}
        rtn = times["RTN"]
        print(f"{name}: {len(grids)} layers, {models[name]['weights'] / 1e6:.1f} M weights, codes identical to the former: {same}")
        for level in LEVELS:
            n, f = times[f"new {level}"], times[f"former {level}"]
            print(f"  {level:4s} new {n['wall_s'] * 1e3:8.1f} ms ({n['wall_s'] / rtn['wall_s']:5.1f}x RTN)   former {f['wall_s'] * 1e3:8.1f} ms ({f['wall_s'] / rtn['wall_s']:5.1f}x RTN)   speed-up {f['wall_s'] / n['wall_s']:5.1f}x")
        print(f"  RTN  {rtn['wall_s'] * 1e3:8.1f} ms")
        if args.profile:
            print_profile(name, grids, former)
    return {"models": models, "note": note, "repeat": args.repeat}


def print_profile(name, grids, former, top=12):
    from torch.profiler import ProfilerActivity, profile

    for label, fn in (("new", squant_round), ("former", former)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_all(fn, grids)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"  where the time goes, {label} K+C on {name} (self CPU by op, {total / 1e3:.0f} ms under the profiler):")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"    {e.key:28s} {e.self_cpu_time_total / 1e3:8.1f} ms {100 * e.self_cpu_time_total / total:5.1f} %  {e.count:6d} calls")


def render_squant(res: dict) -> list[str]:
    lines = [
        "Weights of ImageNet models from `dfquant.create_model` (random init, seed 0), 4-bit per-channel min/max grids (`weight_params` + `to_grid`).",
        "RTN: one `torch.clamp(torch.round(x), qmin, qmax)` per layer over the same grid tensors. `new`: `dfquant.squant.squant_round`; `former`: the",
        "implementation it replaced (`tests/squant_reference.py`), which gives the same codes. E: `kernel=False, channel=False`; K: kernel only; C: channel only; K+C: both (the default).",
        f"Medians of {res['repeat']} interleaved repeats; ratios from wall-clock time (process CPU time in brackets). On a shared machine the",
        "RTN pass (two fresh tensors per layer) varies more between runs than the rounding does, and the ratios to it with it; former / new is steadier.",
    ]
    if res["note"]:
        lines.append(res["note"])
    for name, m in res["models"].items():
        t = res["models"][name]["times"]
        rtn = t["RTN"]
        lines += ["", f"### {name}: {m['layers']} layers, {m['weights'] / 1e6:.1f} M weights; codes identical to the former: {'yes' if m['same_codes'] else 'NO'}", "",
                  f"RTN pass: {rtn['wall_s'] * 1e3:.1f} ms ({rtn['cpu_s'] * 1e3:.1f} ms CPU).", "",
                  "| level | new ms | new / RTN | former ms | former / RTN | former / new |", "|---|---|---|---|---|---|"]
        for level in LEVELS:
            n, f = t[f"new {level}"], t[f"former {level}"]
            lines.append(
                f"| {level} | {n['wall_s'] * 1e3:.1f} | {n['wall_s'] / rtn['wall_s']:.1f} ({n['cpu_s'] / rtn['cpu_s']:.1f}) | {f['wall_s'] * 1e3:.1f} | "
                f"{f['wall_s'] / rtn['wall_s']:.1f} ({f['cpu_s'] / rtn['cpu_s']:.1f}) | {f['wall_s'] / n['wall_s']:.1f} ({f['cpu_s'] / n['cpu_s']:.1f}) |"
            )
    return lines


SECTIONS = {"squant": ("SQuant rounding against one round-to-nearest pass", section_squant, render_squant)}


def to_markdown(results: dict) -> str:
    lines = ["# Speed", "", "Written by `benchmarks/speed.py`; each section gives the command that produced it.", ""]
    for name, entry in results.items():
        title, _, render = SECTIONS.get(name, (name, None, None))
        load = f", load average {entry['load']} when it ended (shared machine)" if entry.get("load") else ""
        lines += [f"## {name}: {title}", "", f"Command: `{entry['command']}`", "",
                  f"Machine: {entry['machine']}, {entry.get('cores', '?')} cores{load}; torch {entry['torch']}, {entry['threads']} thread(s).", ""]
        lines += (render(entry["result"]) if render else ["(no renderer for this section)"]) + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run only this section (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=7, help="interleaved repeats per section")
    ap.add_argument("--profile", action="store_true", help="print a short profile of where the time goes")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/speed.py" + "".join(f" --only {s}" for s in args.only or []) + (f" --threads {args.threads}" if args.threads else "")
    command += f" --repeat {args.repeat}" if args.repeat != 7 else ""
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        result = SECTIONS[name][1](args)
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        results[name] = {"command": command, "machine": cpu_model(), "cores": os.cpu_count(), "load": load, "torch": torch.__version__, "threads": torch.get_num_threads(), "result": result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(results))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
