"""The share of occupied cells in each channel of MinAtar games under uniform random actions: where the distractor
channels' default p = 0.08 comes from (the games' mean per-channel density; docs/environments.md).

    python benchmarks/minatar_density.py                  # breakout and space_invaders, 20,000 steps each (~10 s)
    python benchmarks/minatar_density.py --games asterix freeway seaquest

Writes benchmarks/results/minatar_density.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from minatar.gym import BaseEnv

from minc_rl.common.checks import int_at_least, output_file
from minc_rl.envs import MINATAR_GAMES
from minc_rl.common.io import atomic_write

RESULTS = Path(__file__).parent / "results"


def densities(game: str, steps: int, seed: int) -> list[float]:
    """Per channel, the mean share of its 100 cells that are set, over `steps` steps of uniform random actions."""
    env = BaseEnv(game)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    total = np.zeros(env.observation_space.shape[-1])
    for _ in range(steps):
        state, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        total += state.mean(axis=(0, 1))
        if terminated or truncated:
            env.reset()
    return (total / steps).tolist()


def main() -> None:
    """Measure each game, print and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", nargs="+", choices=MINATAR_GAMES, default=["breakout", "space_invaders"])
    parser.add_argument("--steps", type=int_at_least(1), default=20_000)
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--out", type=output_file, default=RESULTS / "minatar_density.json")
    args = parser.parse_args()
    results = {"steps": args.steps, "seed": args.seed, "games": {}}
    for game in args.games:
        per_channel = densities(game, args.steps, args.seed)
        results["games"][game] = {"per_channel": per_channel, "mean": float(np.mean(per_channel))}
        print(f"{game}: per channel {np.round(per_channel, 4).tolist()}, mean {np.mean(per_channel):.4f}")
    atomic_write(args.out, lambda path: Path(path).write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
