"""Benchmark: Genie on ResNet-20 W4A4 in one process and in a torch.distributed job of two (gloo, CPU).

    python benchmarks/distributed.py                      # the CPU budget: 256 images, 150 + 500 iterations; seeds 0 1 2
    python benchmarks/distributed.py --recon-iters 100 --seeds 0    # a reduced budget (the table states it)

Each run is a fresh job, one torch thread per process: ``python benchmarks/distributed.py --worker``
for one process, ``torchrun --standalone --nproc-per-node 2 benchmarks/distributed.py --worker`` for
two. A worker synthesizes the Genie-D images once (``dfquant.synthesize``: the batches split over the
processes), then runs Genie-M on them for each reconstruction seed (``dfquant.quantize(...,
synthetic=images)``: each batch split over the processes, gradients summed); rank 0 measures each
model on the 846 CIFAR-10 test images (top-1, logit MSE and top-1 agreement against FP32). The settings are those of
the committed "Genie (D + M)" rows (``benchmarks/genie_cifar.py``: RTN start, activation steps from
BN ranges, synthesis batches of 128, seed 0). Writes (overwrites) benchmarks/results/distributed.{md,json}.
Needs the shared assets (DFQUANT_ASSETS or ../shared).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "distributed"
SRC = Path(__file__).resolve().parents[1] / "src"


def worker(args) -> None:
    """One process of a run: synthesis, then reconstruction for each seed; rank 0 writes ``args.record``."""
    torch.set_num_threads(1)
    import dfquant
    from dfquant import distributed
    from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
    from dfquant.data import load_cifar10_npz

    distributed.init("cpu")
    model = dfquant.create_model("resnet20", weights=str(asset_path(CIFAR_RESNET_WEIGHTS["resnet20"])))
    t0 = time.perf_counter()
    images = dfquant.synthesize(model, args.samples, method="genie", iters=args.distill_iters, batch_size=128, device="cpu", seed=0, progress=False)
    record = dict(processes=distributed.world_size(), synthesis_s=time.perf_counter() - t0, images_sha256=hashlib.sha256(images.numpy().tobytes()).hexdigest(), seeds={})
    data = load_cifar10_npz() if distributed.is_main() else None
    for seed in args.seeds:
        qmodel, report = dfquant.quantize(model, "genie", 4, 4, synthetic=images, init="rtn", act_calib="bn", recon_iters=args.recon_iters, device="cpu", seed=seed)
        if distributed.is_main():
            ev = dfquant.evaluate(qmodel, data, reference=model)
            codes = {n: t for n, t in qmodel.state_dict().items() if n.endswith("weight_int")}
            torch.save(codes, args.record.with_suffix(f".seed{seed}.pt"))
            units = report.config["genie"]["units"]
            record["seeds"][str(seed)] = dict(
                reconstruction_s=report.config["genie"]["reconstruction_time_s"],
                top1=ev["top1"],
                logit_mse=ev["logit_mse"],
                agree_top1=ev["agree_top1"],
                unit_after=[u["after"] for u in units],
            )
    if distributed.is_main():
        args.record.write_text(json.dumps(record))
    distributed.shutdown()


def run(procs: int, args, record: Path) -> dict:
    """One fresh run on ``procs`` processes; its record plus the command's wall time and the load around it."""
    budget = ["--samples", str(args.samples), "--distill-iters", str(args.distill_iters), "--recon-iters", str(args.recon_iters), "--seeds", *map(str, args.seeds)]
    me = [str(Path(__file__).resolve()), "--worker", "--record", str(record), *budget]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] if procs > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    subprocess.run(launcher + me, check=True, env=env)
    wall = time.perf_counter() - t
    out = json.loads(record.read_text())
    out.update(command_wall_s=wall, load_before=load_before, load_after=os.getloadavg()[0])
    return out


def _codes_equal(a: dict, b: dict) -> float:
    return sum(int((a[n] == b[n]).sum()) for n in a) / sum(t.numel() for t in a.values())


def main() -> None:
    from dfquant.genie import CPU_BUDGET

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=CPU_BUDGET["samples"])
    ap.add_argument("--distill-iters", type=int, default=CPU_BUDGET["distill_iters"])
    ap.add_argument("--recon-iters", type=int, default=CPU_BUDGET["recon_iters"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="reconstruction seeds (the images: seed 0)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from dfquant.devices import cpu_name

    out = Path(args.out)
    budget = dict(samples=args.samples, distill_iters=args.distill_iters, recon_iters=args.recon_iters)
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in budget.items() if v != CPU_BUDGET[k])
    flags += f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else ""
    flags += f" --out {args.out}" if args.out != str(RESULTS) else ""
    res = dict(command="python benchmarks/distributed.py" + flags, machine=f"{cpu_name()}, {os.cpu_count()} cores", torch=torch.__version__, budget=budget, seeds=args.seeds, runs=[])
    for procs in (1, 2):
        res["runs"].append(run(procs, args, out.parent / f".{out.name}.{procs}.json"))
        print(json.dumps(res["runs"][-1]), flush=True)
    res["images_identical"] = res["runs"][0]["images_sha256"] == res["runs"][1]["images_sha256"]
    codes = {(p, s): torch.load(out.parent / f".{out.name}.{p}.seed{s}.pt") for p in (1, 2) for s in args.seeds}
    res["codes_equal_1_vs_2_processes"] = {str(s): _codes_equal(codes[1, s], codes[2, s]) for s in args.seeds}
    res["codes_equal_between_seeds_1_process"] = {f"{a}-{b}": _codes_equal(codes[1, a], codes[1, b]) for a, b in zip(args.seeds, args.seeds[1:])}
    for p in (1, 2):
        (out.parent / f".{out.name}.{p}.json").unlink()
        for s in args.seeds:
            (out.parent / f".{out.name}.{p}.seed{s}.pt").unlink()
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(to_markdown(res))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def _mean_sd(values) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{float(t.mean()):.2f} ± {float(t.std()):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def to_markdown(res: dict) -> str:
    b, (one, two), seeds = res["budget"], res["runs"], [str(s) for s in res["seeds"]]

    def per_seed(run, key, fmt):
        return " / ".join(fmt.format(run["seeds"][s][key]) for s in seeds)

    def recon_s(run):
        return sum(run["seeds"][s]["reconstruction_s"] for s in seeds) / len(seeds)

    lines = [
        "# Genie on one CPU process vs a torch.distributed job of two (gloo)",
        "",
        f"Command: `{res['command']}` (assets from `../shared`).",
        f"Machine: {res['machine']}, torch {res['torch']}; one torch thread per process. The machine was shared "
        "with other work while this ran (see the load averages), so the times are noisy.",
        f"Model: ResNet-20 (CIFAR-10), Genie W4A4 (RTN start, activation steps from BN ranges). Budget: "
        f"{b['samples']} synthetic images (seed 0) in batches of 128, {b['distill_iters']} synthesis iterations per batch, "
        f"{b['recon_iters']} reconstruction iterations per unit on batches of 32" + (" (the CPU budget)" if b == _cpu_budget() else " (a reduced budget)")
        + f"; reconstruction seeds {', '.join(seeds)}. Top-1 on the first 846 CIFAR-10 test images (standard error about ±1 point).",
        "",
        "| | 1 process | 2 processes | ratio |",
        "|---|---|---|---|",
        f"| synthesis wall time, s | {one['synthesis_s']:.0f} | {two['synthesis_s']:.0f} | {one['synthesis_s'] / two['synthesis_s']:.2f}x |",
        f"| reconstruction wall time, s (mean over seeds) | {recon_s(one):.0f} | {recon_s(two):.0f} | {recon_s(one) / recon_s(two):.2f}x |",
        f"| whole run wall time, s (start-up, synthesis, all seeds, evaluation) | {one['command_wall_s']:.0f} | {two['command_wall_s']:.0f} | {one['command_wall_s'] / two['command_wall_s']:.2f}x |",
        f"| 1-minute load average before / after | {one['load_before']:.1f} / {one['load_after']:.1f} | {two['load_before']:.1f} / {two['load_after']:.1f} | |",
        f"| top-1 %, seed {' / '.join(seeds)} | {per_seed(one, 'top1', '{:.2f}')} | {per_seed(two, 'top1', '{:.2f}')} | |",
        f"| top-1 %, mean ± sd over seeds | {_mean_sd([one['seeds'][s]['top1'] for s in seeds])} | {_mean_sd([two['seeds'][s]['top1'] for s in seeds])} | |",
        f"| logit MSE vs FP32, seed {' / '.join(seeds)} | {per_seed(one, 'logit_mse', '{:.3f}')} | {per_seed(two, 'logit_mse', '{:.3f}')} | |",
        f"| top-1 agreement with FP32 %, seed {' / '.join(seeds)} | {per_seed(one, 'agree_top1', '{:.1f}')} | {per_seed(two, 'agree_top1', '{:.1f}')} | |",
        "",
        f"Synthetic images bit-identical between the runs: {'yes' if res['images_identical'] else 'NO'}.",
        "Weight codes equal, 1 vs 2 processes at the same seed: "
        + ", ".join(f"seed {s} {100 * v:.1f} %" for s, v in res["codes_equal_1_vs_2_processes"].items())
        + "; for scale, one process at two seeds: "
        + ", ".join(f"seeds {k} {100 * v:.1f} %" for k, v in res["codes_equal_between_seeds_1_process"].items())
        + ". The two runs differ only in the order in which each batch's gradients are summed; Genie-M carries such float "
        "differences from unit to unit (see docs/distributed.md).",
        "",
    ]
    return "\n".join(lines)


def _cpu_budget() -> dict:
    from dfquant.genie import CPU_BUDGET

    return {k: CPU_BUDGET[k] for k in ("samples", "distill_iters", "recon_iters")}


if __name__ == "__main__":
    main()
