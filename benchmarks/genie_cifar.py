"""Benchmark: Genie (synthetic data + block-wise reconstruction) against SQuant, RTN and ZeroQ data.

    python benchmarks/genie_cifar.py                     # ResNet-20 and ResNet-56, CPU budget
    python benchmarks/genie_cifar.py --models resnet20 --settings W4A4 W2A4
    # 1024 images made by parallel processes (one per shard), then the table from them:
    python benchmarks/genie_cifar.py --samples 1024 --synthesis-shards 4 --synthetic-dir DIR --only-shard 1 &
    python benchmarks/genie_cifar.py --samples 1024 --synthesis-shards 4 --synthetic-dir DIR

Writes benchmarks/results/genie_cifar.{md,json} (the JSON after every row, so a long run that is
stopped keeps what it finished). Needs the shared assets (DFQUANT_ASSETS or ../shared). The CIFAR-10
images only measure accuracy: quantization sees none of them. Per model, synthetic images are made
once per generator (Genie-D, ZeroQ) and shared by every setting; their wall time is reported
separately from each reconstruction's.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import dfquant
from dfquant.assets import CIFAR_RESNET_WEIGHTS, asset_path
from dfquant.data import load_cifar10_npz
from dfquant.devices import cpu_name
from dfquant.genie import CPU_BUDGET, DISTILL_DEFAULTS, lr_round_for, synthesize
from dfquant.io.images import load_images, save_images

RESULTS = Path(__file__).parent / "results" / "genie_cifar"

# key -> (table label, dfquant method, options; "data" names the synthetic images used). The learned
# rows start their activation steps from BN ranges (act_calib="bn"), as every committed table was made
# (the library's default until it became the release's "data"); the "-actdata" rows use today's default.
METHODS = {
    "rtn": ("RTN", "rtn", {}),
    "squant": ("SQuant", "squant", {}),
    "zeroq": ("ZeroQ data + recon.", "zeroq", dict(data="zeroq", init="rtn", act_calib="bn")),
    "genie": ("Genie (D + M)", "genie", dict(data="genie", init="rtn", act_calib="bn")),
    "genie-squant": ("Genie, SQuant init", "genie", dict(data="genie", init="squant", act_calib="bn")),
    "genie-minmax": ("Genie, min/max grid", "genie", dict(data="genie", init="rtn", w_range="minmax", act_calib="bn")),
    "zeroq-actdata": ("ZeroQ data + recon., act. ranges from data", "zeroq", dict(data="zeroq", init="rtn", act_calib="data")),
    "genie-actdata": ("Genie, act. ranges from data", "genie", dict(data="genie", init="rtn", act_calib="data")),
    "genie-squant-actdata": ("Genie, SQuant init, act. ranges from data", "genie", dict(data="genie", init="squant", act_calib="data")),
}
DEFAULT_METHODS = ("rtn", "squant", "zeroq", "genie", "genie-squant")


def parse_setting(s: str):
    w, a = s.upper().lstrip("W").split("A")
    return int(w), int(a)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--settings", nargs="+", default=["W4A4", "W2A4", "W3A3"])
    ap.add_argument("--samples", type=int, default=CPU_BUDGET["samples"])
    ap.add_argument("--distill-iters", type=int, default=CPU_BUDGET["distill_iters"])
    ap.add_argument("--recon-iters", type=int, default=CPU_BUDGET["recon_iters"])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=list(METHODS),
        help="rows to run (default: all but the min/max-grid and activation-calibration ablations)",
    )
    ap.add_argument(
        "--lr-round",
        type=float,
        default=None,
        help="Adam lr of the rounding variables (default: dfquant.genie.lr_round_for(recon_iters), the release's lr x iterations)",
    )
    ap.add_argument(
        "--protocols",
        nargs="+",
        default=["dfquant"],
        help="run every row under each of these protocols (dfquant, genie, ...); rows of another protocol than dfquant's name it",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="seed of synthesis and (unless --recon-seed) reconstruction")
    ap.add_argument("--recon-seed", type=int, default=None, help="seed of the reconstruction only (same synthetic images)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--synthetic-dir",
        default=None,
        help="cache synthetic images here (safetensors, keyed by model, generator, budget and seed): "
        "a later run with the same settings reuses them and reports the synthesis time measured when they were made",
    )
    ap.add_argument(
        "--synthesis-shards",
        type=int,
        default=1,
        help="make the synthetic set as K independent synthesis runs of samples/K images with seeds seed, seed+1, ... "
        "(each cached on its own), so parallel processes can make them; the reported synthesis time is the sum of the shards'",
    )
    ap.add_argument(
        "--only-shard",
        type=int,
        default=None,
        help="synthesize (into --synthetic-dir) only this shard of --synthesis-shards for each model and generator, then stop",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --out's JSON (same command) and run only the missing ones",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.synthesis_shards < 1 or args.samples % args.synthesis_shards:
        raise SystemExit(f"--synthesis-shards must divide --samples ({args.samples}), got {args.synthesis_shards}")
    if args.only_shard is not None:
        if not args.synthetic_dir or not 0 <= args.only_shard < args.synthesis_shards:
            raise SystemExit("--only-shard needs --synthetic-dir and a shard index below --synthesis-shards")
        for name in args.models:
            model = load_model(name)
            for gen in dict.fromkeys(METHODS[k][2]["data"] for k in args.methods if "data" in METHODS[k][2]):
                _, dt = synthetic_shard(model, name, gen, args, args.only_shard)
                print(f"{name}: {gen} shard {args.only_shard} synthesis {dt:.0f} s", flush=True)
        return

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = load_cifar10_npz()
    budget = dict(samples=args.samples, distill_iters=args.distill_iters, recon_iters=args.recon_iters)
    res = {
        "command": "python benchmarks/genie_cifar.py "
        + " ".join([f"--models {' '.join(args.models)}", f"--settings {' '.join(args.settings)}"] + [f"--{k.replace('_', '-')} {v}" for k, v in budget.items()])
        + (f" --methods {' '.join(args.methods)}" if tuple(args.methods) != DEFAULT_METHODS else "")
        + (f" --protocols {' '.join(args.protocols)}" if args.protocols != ["dfquant"] else "")
        + (f" --lr-round {args.lr_round:g}" if args.lr_round is not None else "")
        + (f" --seed {args.seed}" if args.seed else "")
        + (f" --recon-seed {args.recon_seed}" if args.recon_seed is not None else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --synthetic-dir {args.synthetic_dir}" if args.synthetic_dir else "")
        + (f" --synthesis-shards {args.synthesis_shards}" if args.synthesis_shards != 1 else "")
        + (f" --out {args.out}" if args.out != str(RESULTS) else ""),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads, device {args.device}",
        **({"gpu": torch.cuda.get_device_name(torch.device(args.device))} if args.device.startswith("cuda") else {}),
        "torch": torch.__version__,
        "budget": budget,
        "seed": args.seed,
        "synthesis_shards": args.synthesis_shards,
        "lr_round": args.lr_round if args.lr_round is not None else lr_round_for(args.recon_iters),
        "n_images": int(data[1].numel()),
        "models": {},
    }

    done: dict = {}
    if args.resume and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        if old.get("command") != res["command"] or old.get("budget") != budget:
            raise SystemExit(f"--resume: {out.with_suffix('.json')} was made by a different command")
        done = old["models"]

    def save():
        write_results(res, out)

    for name in args.models:
        model = load_model(name)
        entry = res["models"][name] = {"fp32_top1": dfquant.evaluate(model, data)["top1"], "synthesis_s": {}, "rows": []}
        kept = {(r["setting"], r["method"]): r for r in done.get(name, {}).get("rows", [])}
        synthetic = {}
        for gen in dict.fromkeys(METHODS[k][2]["data"] for k in args.methods if "data" in METHODS[k][2]):
            synthetic[gen], entry["synthesis_s"][gen] = synthetic_images(model, name, gen, args)
            print(f"{name}: {gen} synthesis {entry['synthesis_s'][gen]:.0f} s", flush=True)
        save()
        # every setting's rounding rows (seconds) before any learned row (minutes each): a run stopped
        # early keeps whole tables of the cheap rows
        jobs = [(s, k, p) for s in args.settings for p in args.protocols for k in args.methods]
        jobs.sort(key=lambda job: "data" in METHODS[job[1]][2])
        for setting, key, protocol in jobs:
            w, a = parse_setting(setting)
            label, method, opts = METHODS[key]
            label += "" if protocol == "dfquant" else f" [{protocol} protocol]"
            if (setting, label) in kept:
                entry["rows"].append(kept[(setting, label)])
                print(f"{name} {setting} {label:<22} kept from the previous run", flush=True)
                continue
            opts = dict(opts, **({} if protocol == "dfquant" else {"protocol": protocol}))
            if "data" in opts:
                opts["synthetic"] = synthetic[opts.pop("data")]
            if "synthetic" in opts:
                seed = args.seed if args.recon_seed is None else args.recon_seed
                opts.update(recon_iters=args.recon_iters, device=args.device, seed=seed)
                if args.lr_round is not None:
                    opts["lr_round"] = args.lr_round
            t = time.perf_counter()
            q, report = dfquant.quantize(model, method, w, a, progress="synthetic" in opts, **opts)
            dt = time.perf_counter() - t
            ev = dfquant.evaluate(q, data, reference=model, predictions=True)
            row = {"setting": setting, "method": label, "top1": ev["top1"], "drop": ev["top1"] - entry["fp32_top1"], "agree_top1": ev["agree_top1"], "logit_mse": ev["logit_mse"], "quantize_s": dt}
            # per test image, 1 where the prediction is right: for paired tests (benchmarks/paired.py)
            row["correct"] = "".join("1" if c else "0" for c in ev["correct"])
            # per test image, the mean squared logit error against FP32 (6 significant digits): for sign tests
            row["logit_sq_err"] = [float(f"{v:.6g}") for v in ev["logit_sq_err"]]
            if "synthetic" in opts:
                row["reconstruction_s"] = report.config["genie"].get("reconstruction_time_s", dt)
            entry["rows"].append(row)
            print(f"{name} {setting} {label:<22} {ev['top1']:6.2f} ({row['drop']:+.2f})  {dt:7.1f} s", flush=True)
            save()
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def load_model(name: str):
    """The pretrained CIFAR model from the shared assets, or a clear stop when they are missing."""
    path = asset_path(CIFAR_RESNET_WEIGHTS[name])
    if path is None:
        raise SystemExit(f"missing shared weights for {name}: set DFQUANT_ASSETS")
    return dfquant.create_model(name, weights=str(path))


def synthetic_images(model, name: str, gen: str, args):
    """(images, synthesis wall time in s) of the whole synthetic set: its shards concatenated, times summed."""
    parts = [synthetic_shard(model, name, gen, args, j) for j in range(args.synthesis_shards)]
    return torch.cat([images for images, _ in parts]), sum(dt for _, dt in parts)


def synthetic_shard(model, name: str, gen: str, args, shard: int):
    """(images, synthesis wall time in s) of one shard (seed + shard, samples / shards images), from the
    cache directory when it holds them. One shard (the default) is the whole set with the run's seed."""
    n, seed = args.samples // args.synthesis_shards, args.seed + shard
    cache = None
    if args.synthetic_dir:
        Path(args.synthetic_dir).mkdir(parents=True, exist_ok=True)
        cache = Path(args.synthetic_dir) / f"{name}_{gen}_n{n}_it{args.distill_iters}_seed{seed}.safetensors"
        if cache.is_file():
            images, meta = load_images(cache, with_metadata=True)
            return images, float(meta["synthesis_s"])
    t = time.perf_counter()
    # the method's published batch size (ZeroQ 32), with which the committed tables were made
    bs = DISTILL_DEFAULTS[gen]["batch_size"]
    images = synthesize(model, n, method=gen, iters=args.distill_iters, batch_size=bs, device=args.device, seed=seed, progress=True)
    dt = time.perf_counter() - t
    if cache is not None:
        save_images(images, cache, metadata=dict(model=name, method=gen, seed=seed, synthesis_s=dt, threads=torch.get_num_threads()))
    return images, dt


def write_results(res: dict, out: Path) -> None:
    """OUT.json (indented, but each per-image list of numbers on one line) and OUT.md."""
    text = re.sub(r"\[\n\s+([-0-9.eE+,\s]+?)\n\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", json.dumps(res, indent=2))
    out.with_suffix(".json").write_text(text)
    out.with_suffix(".md").write_text(to_markdown(res))


def to_markdown(res: dict) -> str:
    b = res["budget"]
    lines = [
        "# Genie vs SQuant, RTN and ZeroQ data on CIFAR-10 ResNets",
        "",
        f"Command: `{res['command']}` (assets from `../shared`).",
        f"Machine: {res['machine']}, torch {res['torch']}. Budget (CPU): {b['samples']} synthetic images, "
        f"{b['distill_iters']} synthesis iterations per batch, {b['recon_iters']} reconstruction iterations per block "
        "(the paper: 1024 images, 4000 and 20000).",
        f"Rounding learning rate of the reconstructed rows: {res['lr_round']:g}"
        + (" (`lr_round_for`: the release's 1e-3 x 20000 iterations / iterations)." if res.get("lr_round_rule", True) else "."),
        *(
            [
                f"Synthetic set: {res['synthesis_shards']} independent synthesis runs of {b['samples'] // res['synthesis_shards']} images "
                f"(seeds {res.get('seed', 0)} to {res.get('seed', 0) + res['synthesis_shards'] - 1}), concatenated; the synthesis time is the sum of theirs."
            ]
            if res.get("synthesis_shards", 1) > 1
            else []
        ),
        *([res["note"]] if res.get("note") else []),
        f"Data: the first {res['n_images']} CIFAR-10 test images, used only to measure (standard error about ±1 point).",
        "Protocol: image input float, classifier input 8 bit, all weights at the given bits; activation ranges from BN statistics "
        "(RTN, SQuant), and the reconstructed rows' activation steps start from them too unless the row says "
        "'act. ranges from data' (the release's clipping search on the synthetic images, the library's default). "
        "Weight grids: per-channel min/max for RTN and SQuant (SQuant's protocol); the Lp clipping search (Genie's release) for the "
        "reconstructed rows unless the row says min/max grid. Rows marked [genie protocol] follow the Genie release's instead "
        "(`protocol='genie'`: first conv and classifier at 8-bit weights, the second layer's input at 8 bits, residual shortcuts "
        "quantized with the block input's quantizer; docs/methods.md).",
        (
            f"Times are wall-clock with synthesis and reconstruction on the GPU ({res['gpu']}), one process on the machine."
            if res.get("gpu")
            else "Times are wall-clock on a 2-core machine shared with a second benchmark process (one torch thread each); "
            "synthesis times were measured when the cached images were made, under the same kind of load."
        ),
        "",
    ]
    for name, m in res["models"].items():
        syn = ", ".join(f"{k} {v:.0f} s" for k, v in m["synthesis_s"].items())
        lines += [f"## {name} (FP32 top-1 {m['fp32_top1']:.2f} %)", ""]
        if syn:  # no row synthesised (rounding rows only): no line
            lines += [f"Synthesis wall time ({b['samples']} images): {syn}.", ""]
        methods = list(dict.fromkeys(r["method"] for r in m["rows"]))
        if not methods:
            continue
        lines += ["Top-1 % (change from FP32) / wall time of the quantize call:", "", "| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for setting in dict.fromkeys(r["setting"] for r in m["rows"]):
            cells = {r["method"]: r for r in m["rows"] if r["setting"] == setting}
            lines.append(
                f"| {setting} | "
                + " | ".join(
                    (f"{cells[k]['top1']:.2f} ({cells[k]['drop']:+.2f}) / {cells[k]['quantize_s']:.0f} s" if k in cells else "-") for k in methods
                )
                + " |"
            )
        lines += ["", "Top-1 agreement with FP32 % / logit MSE against FP32:", "", "| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for setting in dict.fromkeys(r["setting"] for r in m["rows"]):
            cells = {r["method"]: r for r in m["rows"] if r["setting"] == setting}
            lines.append(f"| {setting} | " + " | ".join((f"{cells[k]['agree_top1']:.1f} / {cells[k]['logit_mse']:.3f}" if k in cells else "-") for k in methods) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
