"""MINC vs SCL vs InfoNCE on digits across batch sizes: linear-probe and kNN accuracy (the paper's batch-size claim).

Every run is `minc_rl.ssl.pretraining.pretrain` (the entry point's training function) on the same recipe: ConvNet
backbone, BN-terminated 64-d head, AdamW at a fixed lr (no batch scaling), the losses' default options, and
the same number of optimizer steps at every batch size (larger batches see proportionally more images).
Runs are interleaved (seed -> batch size -> loss). Claims tested: MINC >= SCL at every batch size, and MINC
at a small batch (16 or 32) >= SCL at the largest, for MINC at ema=0.05 and at ema=0.2 (the
setting minc_ablation favours; chosen after seeing that benchmark on the same data, so read it as such).

    python benchmarks/batch_sweep.py            # 3 seeds x B in {16, 32, 128, 512} x 4 variants
    python benchmarks/batch_sweep.py --quick    # 1 seed, B in {16, 128}, 40 steps
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minc_rl.common.checks import int_at_least, positive_number
from minc_rl.common.io import atomic_write
from minc_rl.ssl.pretraining import compose_config, pretrain

# label -> overrides; ema 0.05 was MINC's first default, ema 0.2 (the default since the ablation) its best cell
VARIANTS = {
    "minc_ema0.05": ["loss=minc", "loss.ema=0.05"],
    "minc_ema0.2": ["loss=minc", "loss.ema=0.2"],
    "spectral": ["loss=spectral"],
    "infonce": ["loss=infonce"],
}
LOSSES = tuple(VARIANTS)
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int_at_least(2), nargs="+", default=[16, 32, 128, 512])
    parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int_at_least(1), default=200, help="optimizer steps per run, equal for every run")
    parser.add_argument("--lr", type=positive_number, default=3e-4)
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="1 seed, B in {16, 128}, 40 steps; no files written")
    parser.add_argument("--out", type=Path, default=RESULTS / "batch_sweep")
    return parser.parse_args()


def run_digits(overrides: list[str], steps: int, lr: float, seed: int, at_start: bool) -> dict:
    """One digits pretraining run (AdamW, fixed lr, `steps` steps, evaluated at the end); returns its summary.
    A stop signal during the run (pretrain catches it to checkpoint) ends the whole sweep, as it would outside one."""
    cfg = compose_config([
        "data=digits", *overrides, f"steps={steps}", f"seed={seed}", f"lr={lr}", "lr_scaling=none",
        "optimizer=adamw", "progress=false", "device=cpu", "eval.every=1000000", f"eval.at_start={str(at_start).lower()}",
    ])
    with tempfile.TemporaryDirectory() as out_dir:
        summary = pretrain(cfg, out_dir)
    if summary["interrupted"]:
        print(f"{Path(sys.argv[0]).name}: interrupted ({summary['interrupted']}); no results written", flush=True)
        raise SystemExit(128 + signal.Signals[summary["interrupted"]])
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    args = parse_args()
    if args.quick:
        args.batch_sizes, args.seeds, args.steps = [16, 128], [0], 40
    torch.set_num_threads(args.threads)
    runs, random_init = [], {}
    start = time.time()
    print(f"{'seed':>4} {'B':>4} {'loss':>11} {'probe':>6} {'kNN':>6} {'RankMe':>7} {'sec':>6}")
    for seed in args.seeds:
        for batch_size in args.batch_sizes:
            for loss in LOSSES:
                first = seed not in random_init
                summary = run_digits([*VARIANTS[loss], f"batch_size={batch_size}"], args.steps, args.lr, seed, first)
                if first:
                    random_init[seed] = {k: summary["initial"][k] for k in ("probe_acc", "knn_acc")}
                final = summary["final"]
                runs.append({
                    "seed": seed, "batch_size": batch_size, "loss": loss, "probe_acc": final["probe_acc"],
                    "knn_acc": final["knn_acc"], "val_rankme": final["val_rankme"], "collapsed": final["collapsed"],
                    "seconds": summary["seconds"],
                })
                print(
                    f"{seed:>4} {batch_size:>4} {loss:>11} {final['probe_acc']:6.3f} {final['knn_acc']:6.3f} "
                    f"{final['val_rankme']:7.1f} {summary['seconds']:6.1f}", flush=True,
                )

    table = {}
    for loss in LOSSES:
        for batch_size in args.batch_sizes:
            cell = [r for r in runs if r["loss"] == loss and r["batch_size"] == batch_size]
            table[f"{loss}/{batch_size}"] = {
                metric: mean_std([r[metric] for r in cell]) for metric in ("probe_acc", "knn_acc")
            }
    largest = max(args.batch_sizes)
    small = [b for b in args.batch_sizes if b <= 32]
    claims = {}
    for minc in ("minc_ema0.05", "minc_ema0.2"):
        for metric in ("probe_acc", "knn_acc"):
            claims[f"{minc}/{metric}"] = {
                "ge_scl_at_every_batch": {
                    str(b): table[f"{minc}/{b}"][metric][0] >= table[f"spectral/{b}"][metric][0] for b in args.batch_sizes
                },
                f"small_batch_ge_scl_at_{largest}": {
                    str(b): table[f"{minc}/{b}"][metric][0] >= table[f"spectral/{largest}"][metric][0] for b in small
                },
            }
    init_probe = mean_std([v["probe_acc"] for v in random_init.values()])
    init_knn = mean_std([v["knn_acc"] for v in random_init.values()])

    print(f"\nmean +- std over seeds {args.seeds}; {args.steps} AdamW steps per run at lr {args.lr}")
    print(f"random-init backbone: probe {init_probe[0]:.3f} +- {init_probe[1]:.3f}, kNN {init_knn[0]:.3f} +- {init_knn[1]:.3f}")
    for metric in ("probe_acc", "knn_acc"):
        print(f"\n{metric:>11} " + " ".join(f"{'B=' + str(b):>15}" for b in args.batch_sizes))
        for loss in LOSSES:
            cells = " ".join(
                f"{table[f'{loss}/{b}'][metric][0]:7.3f} +-{table[f'{loss}/{b}'][metric][1]:6.3f}" for b in args.batch_sizes
            )
            print(f"{loss:>11} {cells}")
    print("\nclaims:", json.dumps(claims, indent=1))
    print(f"total {time.time() - start:.0f} s")
    if args.quick:
        return

    result = {
        "setup": {
            "data": "digits (1437 train / 360 held-out)", "backbone": "convnet", "head": "64-d, final BN",
            "optimizer": "adamw", "lr": args.lr, "lr_scaling": "none", "steps_per_run": args.steps,
            "batch_sizes": args.batch_sizes, "seeds": args.seeds, "losses": list(LOSSES),
            "variants": VARIANTS,
            "loss_options": "minc lower_triangular (ema per variant), spectral mu=1, infonce temperature=0.1",
            "threads": args.threads, "total_seconds": time.time() - start,
        },
        "random_init": {"probe_acc": init_probe, "knn_acc": init_knn, "per_seed": random_init},
        "table": table,
        "claims": claims,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    plot(table, args.batch_sizes, init_probe, init_knn, args.out.with_suffix(".png"), args.steps)


def plot(table: dict, batch_sizes: list[int], init_probe, init_knn, path: Path, steps: int) -> None:
    """Probe and kNN accuracy against batch size, one line per loss (mean +- std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric, init, title in (
        (axes[0], "probe_acc", init_probe, "linear probe"), (axes[1], "knn_acc", init_knn, "kNN (k=200, T=0.1)")
    ):
        for loss in LOSSES:
            means = [table[f"{loss}/{b}"][metric][0] for b in batch_sizes]
            stds = [table[f"{loss}/{b}"][metric][1] for b in batch_sizes]
            axis.errorbar(batch_sizes, means, yerr=stds, marker="o", capsize=3, label=loss)
        axis.axhline(init[0], color="gray", linestyle="--", label="random init")
        axis.set_xscale("log", base=2)
        axis.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        axis.set_xlabel("batch size")
        axis.set_ylabel("held-out accuracy")
        axis.set_title(f"digits, {title}, {steps} steps/run")
        axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


if __name__ == "__main__":
    main()
