"""How much of the encoder's update comes from the aux loss in joint mode, against the share set at its output.

Joint mode rescales the aux gradient at the encoder's output to `aux.share` of the gradient norms. The RL
optimizer is Adam, whose first moment adds up gradients over ~10 steps: a gradient that keeps its direction (the
aux loss's) adds up, a noisy one (the TD loss's) partly cancels. This benchmark measures the result. For each
(loss, share) it trains MinAtar breakout DQN through `minc_rl.train` (the rl_evidence protocol,
`family_agent/minatar_dqn.yaml`) with `aux.log_update_share=true` and reads each run's progress.csv over the
second half of training:
- update share: ||u_aux|| / (||u_aux|| + ||u_rl||) of Adam's step on the encoder (`train/aux_update_share`);
- update cosine: the cosine of those two parts (`train/aux_update_cos`; < 0: the aux loss pulls against RL);
- gradient share: the share at the encoder's output (`train/aux_grad_share`, the setting by construction).
Prints a table, writes results/aux_update_share.json and .png. Finished runs (summary.json) are read, not rerun.

    python benchmarks/aux_update_share.py                                   # minc and spectral, 4 shares, 10k steps
    python benchmarks/aux_update_share.py --losses minc --shares 0.1 0.3 --pairs state_action \
        --out benchmarks/results/aux_update_share_state_action.json      # phi(o_t, a_t) against mu(o_t+1)
    python benchmarks/aux_update_share.py --losses minc --shares 0.1 --steps 6000   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rl_evidence import ROOT, run_finished, run_training  # noqa: E402  (benchmarks/ is the script's folder)

from minc_rl.common.checks import int_at_least, output_file  # noqa: E402
from minc_rl.envs import MINATAR_GAMES  # noqa: E402
from minc_rl.common.io import atomic_write  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KEYS = {"update_share": "train/aux_update_share", "update_cos": "train/aux_update_cos",
        "grad_share": "train/aux_grad_share"}


def train(loss: str, share: float, run_dir: Path, args: argparse.Namespace) -> None:
    """One MinAtar breakout DQN run with the update share logged (skipped when run_dir holds a finished run)."""
    if run_finished(run_dir, args.steps):
        return
    command = [sys.executable, "-m", "minc_rl.train", f"env=minatar:{args.game}", "agent=dqn", f"aux={loss}",
               "aux.mode=joint", f"aux.share={share}", f"aux.pairs={args.pairs}", "aux.log_update_share=true",
               f"seed={args.seed}",
               f"total_steps={args.steps}", f"eval.every={args.steps}", f"checkpoint.every={args.steps}",
               f"torch_threads={args.threads}", "progress_bar=false", f"hydra.run.dir={run_dir}"]
    print(" ".join(command[2:]), flush=True)
    if run_training(command) != 0:
        raise SystemExit(f"{loss} share {share}: the run failed; its log is in {run_dir}")


def second_half_means(progress: Path) -> dict[str, float]:
    """KEYS' means over the rows logged in the second half of the run's steps."""
    with progress.open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get(KEYS["update_share"]) not in (None, "")]
    if not rows:
        raise ValueError(f"{progress} has no {KEYS['update_share']} rows: was aux.log_update_share on?")
    last = max(float(row["time/total_timesteps"]) for row in rows)
    late = [row for row in rows if float(row["time/total_timesteps"]) > last / 2]
    return {name: float(np.mean([float(row[key]) for row in late])) for name, key in KEYS.items()} | {
        "rows": len(late)}


def plot(results: dict, path: Path) -> None:
    """Update share against the set share, per loss, with the diagonal where the two would agree."""
    figure, axis = plt.subplots(figsize=(5, 4))
    for loss, by_share in results.items():
        shares = sorted(by_share, key=float)
        axis.plot([float(s) for s in shares], [by_share[s]["update_share"] for s in shares], "o-", label=loss)
    top = max(float(s) for by_share in results.values() for s in by_share)
    axis.plot([0, top], [0, top], "k--", linewidth=0.8, label="update share = set share")
    axis.set_xlabel("aux.share (gradient share at the encoder's output)")
    axis.set_ylabel("aux share of Adam's encoder step")
    axis.legend()
    axis.grid(alpha=0.3)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=["minc", "spectral"], choices=["minc", "spectral", "infonce"])
    parser.add_argument("--shares", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--pairs", default="state", choices=["state", "state_action"], help="aux.pairs")
    parser.add_argument("--game", default="breakout", choices=MINATAR_GAMES, help="MinAtar game")
    parser.add_argument("--steps", type=int_at_least(1), default=10_000, help="env steps per run (DQN learns after 5,000)")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads per run")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "aux_update_share", help="run directories")
    parser.add_argument("--out", type=output_file, default=RESULTS / "aux_update_share.json")
    args = parser.parse_args()
    bad = [share for share in args.shares if not 0.0 < share < 1.0]
    if bad or args.steps <= 5_000:
        raise SystemExit(f"--shares must be in (0, 1) and --steps > 5,000 (learning starts there); got {bad or ''} "
                         f"{args.steps}")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for loss in args.losses:
        for share in args.shares:
            variant = f"{loss}{'-state-action' if args.pairs == 'state_action' else ''}-s{share}"
            run_dir = (args.runs / args.game / variant / f"seed{args.seed}").resolve()
            train(loss, share, run_dir, args)
            results.setdefault(loss, {})[str(share)] = second_half_means(run_dir / "progress.csv")
    print(f"\nMinAtar {args.game} DQN, joint mode, {args.pairs} pairs, seed {args.seed}, {args.steps:,} steps; "
          "means over the second half")
    print("| loss | set share | gradient share at the output | update share (Adam's step) | update / set | "
          "cosine of the parts |\n|---|---|---|---|---|---|")
    for loss, by_share in results.items():
        for share, row in by_share.items():
            print(f"| {loss} | {share} | {row['grad_share']:.3f} | {row['update_share']:.3f} | "
                  f"{row['update_share'] / float(share):.1f}x | {row['update_cos']:+.2f} |")
    data = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results}
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
