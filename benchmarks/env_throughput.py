"""Steps/s of minc_rl's vector envs; procgen against the raw ProcgenGym3Env loop, interleaved in one run.

    python benchmarks/env_throughput.py            # full run (about a minute on 2 cores)
    python benchmarks/env_throughput.py --quick    # smoke run

Writes benchmarks/results/env_throughput.json and prints a table. Env steps/s counts one step of one
environment (an Atari step is 4 emulator frames).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from minc_rl.common.checks import int_at_least, output_file
from minc_rl.envs import ProcgenVecEnv, make_vec_env
from minc_rl.envs.spec import PROCGEN_DEFAULTS
from tqdm import tqdm

from minc_rl.common.io import atomic_write

RESULTS = Path(__file__).parent / "results" / "env_throughput.json"


def raw_procgen_stepper(n_envs: int, seed: int, num_threads: int) -> Callable[[np.ndarray], None]:
    """The baseline: procgen's own batched env, act + observe, nothing else."""
    from procgen import ProcgenGym3Env

    env = ProcgenGym3Env(num=n_envs, env_name="coinrun", rand_seed=seed, num_threads=num_threads, **PROCGEN_DEFAULTS)

    def step(actions: np.ndarray) -> None:
        env.act(actions)
        env.observe()

    return step


def vec_env_stepper(env) -> Callable[[np.ndarray], None]:
    env.reset()
    return env.step


def interleaved(
    variants: dict[str, Callable], actions: np.ndarray, blocks: int, desc: str
) -> dict[str, dict[str, list[float]]]:
    """Env steps per wall-clock second and per CPU second (all threads of this process) of each variant, per block
    of `actions` (steps, n_envs).

    The variants take turns step by step (the order rotating every step), so the load that other processes put
    on the machine falls on all of them alike; each step is timed on its own. CPU time is what a step costs
    whatever the contention; wall-clock time is what a user waits.
    """
    names = list(variants)
    for name in names:  # warm-up, not recorded
        for action in actions[: max(1, len(actions) // 10)]:
            variants[name](action)
    wall = {name: np.zeros(blocks) for name in names}
    cpu = {name: np.zeros(blocks) for name in names}
    for block in tqdm(range(blocks), desc=desc, leave=False):
        for t, action in enumerate(actions):
            for name in names[t % len(names) :] + names[: t % len(names)]:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                variants[name](action)
                wall[name][block] += time.perf_counter() - start_wall
                cpu[name][block] += time.process_time() - start_cpu
    return {
        name: {"wall": (actions.size / wall[name]).tolist(), "cpu": (actions.size / cpu[name]).tolist()}
        for name in names
    }


def summary(sps: dict[str, list[float]]) -> dict[str, float]:
    return {clock: statistics.median(values) for clock, values in sps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few short blocks, to check the script runs")
    parser.add_argument("--procgen-envs", type=int_at_least(1), default=64)
    parser.add_argument(
        "--procgen-threads",
        type=int_at_least(0),
        default=0,
        help="procgen num_threads for all variants; 0 steps in the calling thread, so CPU time is exact and the "
        "comparison is free of thread-pool wake-up noise (the wrapper's own cost does not depend on it)",
    )
    parser.add_argument("--atari-envs", type=int_at_least(1), default=8)
    parser.add_argument("--minatar-envs", type=int_at_least(1), default=64)
    parser.add_argument("--steps", type=int_at_least(1), default=200, help="vector steps per timed block")
    parser.add_argument(
        "--blocks", type=int_at_least(3), default=10, help="timed blocks per variant (procgen; a third for the rest)"
    )
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--out", type=output_file, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.blocks = 30, 3

    rng = np.random.default_rng(args.seed)
    n, threads = args.procgen_envs, args.procgen_threads
    raw = "raw ProcgenGym3Env"
    procgen = interleaved(
        {
            raw: raw_procgen_stepper(n, args.seed, threads),
            "make_vec_env": vec_env_stepper(make_vec_env("procgen:coinrun", n, seed=args.seed, num_threads=threads)),
            "ProcgenVecEnv (no VecMonitor)": vec_env_stepper(
                ProcgenVecEnv("coinrun", n, seed=args.seed, num_threads=threads, **PROCGEN_DEFAULTS)
            ),
        },
        rng.integers(0, 15, size=(args.steps, n)),
        args.blocks,
        "procgen:coinrun",
    )
    ratios = {
        name: {clock: [v / b for v, b in zip(values, procgen[raw][clock])] for clock, values in sps.items()}
        for name, sps in procgen.items()
        if name != raw
    }
    others = {}
    for spec, n_envs in (("atari:Pong", args.atari_envs), ("minatar:breakout", args.minatar_envs)):
        env = make_vec_env(spec, n_envs, seed=args.seed)
        actions = rng.integers(0, env.action_space.n, size=(args.steps, n_envs))
        others[spec] = {
            "n_envs": n_envs,
            **interleaved({spec: vec_env_stepper(env)}, actions, max(3, args.blocks // 3), spec)[spec],
        }

    rows = [(f"procgen:coinrun {name}", n, summary(sps)) for name, sps in procgen.items()]
    rows += [
        (spec, result["n_envs"], summary({"wall": result["wall"], "cpu": result["cpu"]}))
        for spec, result in others.items()
    ]
    print(f"\n{'variant':<46} {'n_envs':>6} {'env steps/s (wall)':>19} {'env steps/CPU-s':>16}")
    for name, n_envs, medians in rows:
        print(f"{name:<46} {n_envs:>6} {medians['wall']:>19,.0f} {medians['cpu']:>16,.0f}")
    for name, by_clock in ratios.items():
        text = ", ".join(
            f"{clock} {statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]" for clock, r in by_clock.items()
        )
        print(f"procgen {name} / raw, median [min, max] over {args.blocks} blocks: {text} (goal >= 0.9)")

    result = {
        "command": "python benchmarks/env_throughput.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "procgen_coinrun": {
            "n_envs": n,
            "env_steps_per_s_per_block": procgen,
            "median_env_steps_per_s": {name: summary(sps) for name, sps in procgen.items()},
            "ratio_to_raw_per_block": ratios,
            "median_ratio_to_raw": {name: summary(by_clock) for name, by_clock in ratios.items()},
            "goal": "make_vec_env / raw >= 0.9",
        },
        "others": {
            spec: {**result, "median_env_steps_per_s": summary({"wall": result["wall"], "cpu": result["cpu"]})}
            for spec, result in others.items()
        },
    }
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
