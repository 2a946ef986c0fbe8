"""Which MINC knobs matter: ema x final BatchNorm x lower_triangular, plus an EMA target encoder, on digits at B=128.

Every run is `minc_rl.ssl.pretraining.pretrain` with the batch-sweep recipe (ConvNet, 64-d head, AdamW at a fixed lr,
the same number of steps per run); cells are interleaved within each seed. Per cell: linear-probe and kNN
accuracy, RankMe of the held-out embeddings, and how many seeds collapsed (held-out RankMe < 2).
The target-encoder cells send the b view through an EMA copy (momentum 0.99) of backbone + head and use the
one-directional loss (loss.symmetric=false), so Lambda is estimated from the online embeddings only.

    python benchmarks/minc_ablation.py           # 3 seeds, 18 cells
    python benchmarks/minc_ablation.py --quick   # 1 seed, 4 cells, 40 steps
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from batch_sweep import RESULTS, mean_std, run_digits

from minc_rl.common.checks import int_at_least, positive_number
from minc_rl.common.io import atomic_write

EMAS = (0.01, 0.05, 0.2, 1.0)


def cells() -> list[dict]:
    """The 16 factorial cells and the two target-encoder cells."""
    grid = [
        {"ema": ema, "final_bn": bn, "lower_triangular": lt, "target": False}
        for ema in EMAS for bn in (True, False) for lt in (True, False)
    ]
    return grid + [{"ema": 0.05, "final_bn": bn, "lower_triangular": True, "target": True} for bn in (True, False)]


def overrides(cell: dict, batch_size: int) -> list[str]:
    """Hydra overrides of one cell."""
    result = [
        "loss=minc", f"batch_size={batch_size}", f"loss.ema={cell['ema']}",
        f"head.final_bn={str(cell['final_bn']).lower()}", f"loss.lower_triangular={str(cell['lower_triangular']).lower()}",
    ]
    if cell["target"]:
        result += ["target_momentum=0.99", "loss.symmetric=false"]
    return result


def name(cell: dict) -> str:
    return (
        f"ema={cell['ema']} bn={'on' if cell['final_bn'] else 'off'} "
        f"tril={'on' if cell['lower_triangular'] else 'off'}{' +target' if cell['target'] else ''}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int_at_least(1), default=150, help="optimizer steps per run, equal for every run")
    parser.add_argument("--batch-size", type=int_at_least(2), default=128)
    parser.add_argument("--lr", type=positive_number, default=3e-4)
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 cells, 40 steps; no files written")
    parser.add_argument("--out", type=Path, default=RESULTS / "minc_ablation")
    args = parser.parse_args()
    grid = cells()
    if args.quick:
        args.seeds, args.steps = [0], 40
        grid = [grid[0], grid[3], grid[-4], grid[-2]]
    torch.set_num_threads(args.threads)
    start = time.time()
    runs, random_init = [], {}
    for seed in args.seeds:
        for cell in grid:
            first = seed not in random_init
            summary = run_digits(overrides(cell, args.batch_size), args.steps, args.lr, seed, first)
            if first:
                random_init[seed] = summary["initial"]["probe_acc"]
            final = summary["final"]
            runs.append({**cell, "seed": seed, **{k: final[k] for k in ("probe_acc", "knn_acc", "val_rankme", "collapsed")},
                         "skipped_batches": summary["skipped_batches"], "seconds": summary["seconds"]})
            print(f"seed {seed} {name(cell):<36} probe {final['probe_acc']:.3f} kNN {final['knn_acc']:.3f} "
                  f"RankMe {final['val_rankme']:5.1f} collapsed {final['collapsed']} ({summary['seconds']:.0f} s)", flush=True)

    table = []
    for cell in grid:
        cell_runs = [r for r in runs if all(r[k] == cell[k] for k in cell)]
        table.append({
            **cell, "name": name(cell),
            **{metric: mean_std([r[metric] for r in cell_runs]) for metric in ("probe_acc", "knn_acc", "val_rankme")},
            "collapsed_seeds": sum(r["collapsed"] for r in cell_runs), "seeds": len(cell_runs),
        })
    init = mean_std(list(random_init.values()))
    print(f"\nB={args.batch_size}, {args.steps} AdamW steps at lr {args.lr}, seeds {args.seeds}; "
          f"random-init probe {init[0]:.3f} +- {init[1]:.3f}")
    print(f"{'cell':<36} {'probe':>15} {'kNN':>15} {'RankMe':>13} collapsed")
    for row in table:
        print(f"{row['name']:<36} {row['probe_acc'][0]:7.3f} +-{row['probe_acc'][1]:6.3f} "
              f"{row['knn_acc'][0]:7.3f} +-{row['knn_acc'][1]:6.3f} {row['val_rankme'][0]:6.1f} +-{row['val_rankme'][1]:5.1f} "
              f"{row['collapsed_seeds']}/{row['seeds']}")
    print(f"total {time.time() - start:.0f} s")
    if args.quick:
        return
    result = {
        "setup": {
            "data": "digits (1437 train / 360 held-out)", "backbone": "convnet", "head": "64-d",
            "batch_size": args.batch_size, "optimizer": "adamw", "lr": args.lr, "lr_scaling": "none",
            "steps_per_run": args.steps, "seeds": args.seeds, "target_momentum": 0.99,
            "collapsed": "held-out embedding RankMe < 2", "threads": args.threads, "total_seconds": time.time() - start,
        },
        "random_init_probe_acc": init,
        "table": table,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    plot(table, init, args.out.with_suffix(".png"), args.batch_size, args.steps)


def plot(table: list[dict], init: tuple[float, float], path: Path, batch_size: int, steps: int) -> None:
    """Probe and kNN accuracy per cell (mean +- std over seeds), collapsed cells marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=True)
    rows = list(range(len(table)))
    for axis, metric, title in ((axes[0], "probe_acc", "linear probe"), (axes[1], "knn_acc", "kNN")):
        means = [row[metric][0] for row in table]
        axis.barh(rows, means, xerr=[row[metric][1] for row in table], capsize=2,
                  color=["tab:red" if row["collapsed_seeds"] else "tab:blue" for row in table])
        if metric == "probe_acc":
            axis.axvline(init[0], color="gray", linestyle="--", label="random-init probe")
            axis.legend(loc="lower left")
        axis.set_xlim(min(means) - 0.05, 1.0)
        axis.set_title(title)
        axis.set_xlabel("held-out accuracy")
    figure.suptitle(f"MINC ablation on digits, B={batch_size}, {steps} steps per run, mean +- std over seeds (red: collapsed)")
    axes[0].set_yticks(rows, [row["name"] for row in table])
    axes[0].invert_yaxis()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


if __name__ == "__main__":
    main()
