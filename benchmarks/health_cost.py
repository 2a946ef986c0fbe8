"""What minc_rl.rl.health.EncoderHealth costs (a probe of 512 observations, the default, every 5,000 env steps: the
health.every a 50,000-step run with 10 evaluations gets, since health.every defaults to eval.every), side by side in
one run: two copies of one agent with the same seed, one with the callback, trained in alternating rounds (the
order swapping every round, so the load of other processes falls on both alike).

    python benchmarks/health_cost.py --threads 1              # MinAtar breakout DQN and procgen coinrun PPO (~20 min)
    python benchmarks/health_cost.py --setups dqn --rounds 2 --threads 1
    python benchmarks/health_cost.py --quick                  # smoke run, a minute

Setups: "dqn" is MinAtar breakout MincDQN(aux="none") at the MinAtar protocol (MinAtar CNN, batch 32, one gradient
step per env step, the replay ratio of the study in README_representation_study.md); its step is the cheapest of
the study's arms, so the probe's share is the largest. "ppo" is procgen coinrun MincPPO(aux="none") with the IMPALA
CNN (the largest probe forward) on 16 envs x 64 steps, 3 epochs of minibatches of 256. A round is `every` env steps
rounded up to whole rollouts, so each round ends with exactly one probe (the first round's also draws the batch);
the first round starts from step 0 for both copies (DQN: its 1,000 steps before learning starts included).

Reported per setup: the probe's measured share of the training time (the callback's own timer over the rounds'
wall time), the same share for one probe per 5,000 steps from the median probe and step times, the time per env
step with the callback over without (median over rounds: noisy on a shared machine), the seconds per probe, and
whether both copies ended with identical parameters (the callback must not change training). Also the seconds of
one probe alone for each encoder. Writes benchmarks/results/health_cost.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path

from minc_rl.common.checks import int_at_least, output_file
from minc_rl.envs import make_vec_env  # first: it mutes legacy gym's notice before SB3 imports gym
import numpy as np  # noqa: I001
import torch
from stable_baselines3.common.base_class import BaseAlgorithm

from minc_rl.agents import MincDQN, MincPPO
from minc_rl.rl.health import EncoderHealth, agent_encoder, encoder_health
from minc_rl.common.io import atomic_write

RESULTS = Path(__file__).parent / "results"
PROBE = 512  # configs/train/config.yaml's health.probe
# setup -> (env spec, n_envs, agent class, its keyword arguments, env steps per rollout)
SETUPS = {
    "dqn": ("minatar:breakout", 1, MincDQN, dict(batch_size=32, learning_starts=1000, train_freq=1, gradient_steps=1,
                                                 buffer_size=100_000, target_update_interval=1000), 1),
    "ppo": ("procgen:coinrun", 16, MincPPO, dict(n_steps=64, batch_size=256, n_epochs=3, encoder="impala"), 16 * 64),
}  # fmt: skip
# the observations an encoder's buffer stores (SB3 transposes channel-last images to channel-first)
PROBE_SHAPES = {"minatar": (4, 10, 10), "impala": (3, 64, 64), "nature": (4, 84, 84)}


def build(setup: str, env_kwargs: dict) -> BaseAlgorithm:
    """The setup's agent (aux="none", seed 0) on its own envs."""
    spec, n_envs, agent, kwargs, _ = SETUPS[setup]
    env = make_vec_env(spec, n_envs, seed=0, **env_kwargs)
    return agent("CnnPolicy", env, aux="none", seed=0, device="cpu", **kwargs)


def global_rng_state() -> tuple:
    """The states of the global RNGs SB3 draws from: Python's, numpy's and torch's."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_global_rng_state(state: tuple) -> None:
    """Restore a global_rng_state()."""
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def measure(setup: str, rounds: int, every: int, probe: int) -> dict:
    """Alternating timed rounds of the setup with and without the callback; see the module docstring."""
    rollout = SETUPS[setup][4]
    env_kwargs = {"num_threads": 0} if setup == "ppo" else {}
    round_steps = math.ceil(every / rollout) * rollout
    models, rng_states = {}, {}
    for name in ("plain", "health"):
        models[name] = build(setup, env_kwargs)
        rng_states[name] = global_rng_state()  # SB3 draws from the global RNGs: each copy keeps its own stream
    callback = EncoderHealth(every=round_steps, probe=probe, seed=0)
    seconds = {"plain": [], "health": []}
    probe_seconds = []
    for round_ in range(rounds):
        for name in list(models)[:: 1 if round_ % 2 == 0 else -1]:
            set_global_rng_state(rng_states[name])
            before, started = callback.seconds, time.perf_counter()
            models[name].learn(round_steps, callback=callback if name == "health" else None, reset_num_timesteps=False)
            seconds[name].append(time.perf_counter() - started)
            rng_states[name] = global_rng_state()
            if name == "health":
                probe_seconds.append(callback.seconds - before)
    plain, health = (models[name].policy.state_dict() for name in ("plain", "health"))
    step_s = statistics.median(seconds["plain"]) / round_steps
    return {
        "round_steps": round_steps,
        "rounds": rounds,
        "seconds_plain": seconds["plain"],
        "seconds_health": seconds["health"],
        "probe_seconds": probe_seconds,
        "probe_share_measured": sum(probe_seconds) / sum(seconds["health"]),
        "time_ratio_median": statistics.median(h / p for h, p in zip(seconds["health"], seconds["plain"])),
        "seconds_per_env_step": step_s,
        "probe_share_per_5000_steps": statistics.median(probe_seconds) / (5_000 * step_s),
        "identical_parameters": all(torch.equal(value, health[key]) for key, value in plain.items()),
        "last_health": callback.latest,
    }


def probe_alone(encoder: str, probe: int, repeats: int) -> float:
    """Median seconds of encoder_health on `probe` random observations through `encoder` (MincPPO, fresh weights)."""
    shape = PROBE_SHAPES[encoder]
    spec = {"minatar": "minatar:breakout", "impala": "procgen:coinrun", "nature": "atari:Pong"}[encoder]
    model = MincPPO("CnnPolicy", make_vec_env(spec, 1, seed=0), aux="none", encoder=encoder, n_steps=8, batch_size=8,
                    seed=0, device="cpu")  # fmt: skip
    observations = np.random.default_rng(0).integers(0, 256, (probe, *shape), dtype=np.uint8)  # as a buffer holds them
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encoder_health(*agent_encoder(model), observations)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    """Parse the command line, measure, print a table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--rounds", type=int_at_least(1), default=3, help="timed rounds per copy (one probe each)")
    parser.add_argument("--every", type=int_at_least(1), default=5_000, help="env steps per round (rounded up to whole rollouts)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 500 steps, DQN only")
    parser.add_argument("--out", type=output_file, default=RESULTS / "health_cost.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    every = 500 if args.quick else args.every
    setups = ["dqn"] if args.quick else args.setups
    rounds = 2 if args.quick else args.rounds
    results = {
        "config": {"setups": setups, "rounds": rounds, "every": every, "probe": PROBE, "quick": args.quick,
                   "torch_threads": torch.get_num_threads(), "machine": platform.platform(), "torch": torch.__version__},
        "probe_alone_s": {encoder: probe_alone(encoder, PROBE, 5) for encoder in PROBE_SHAPES},
        "setups": {},
    }  # fmt: skip
    for setup in setups:
        results["setups"][setup] = measure(setup, rounds, every, PROBE)
        print(f"{setup}: {json.dumps({k: v for k, v in results['setups'][setup].items() if k != 'last_health'})}",
              flush=True)  # fmt: skip

    print(f"\nEncoderHealth: probe {PROBE}, every {every} env steps; torch threads {torch.get_num_threads()}")
    header = ("probe s", "s/step", "share measured", "share per 5000", "time ratio", "same params")
    print(f"{'setup':6} " + " ".join(f"{h:>15}" for h in header))
    for setup, row in results["setups"].items():
        print(f"{setup:6} {statistics.median(row['probe_seconds']):15.3f} {row['seconds_per_env_step']:15.4f} "
              f"{row['probe_share_measured']:15.4%} {row['probe_share_per_5000_steps']:15.4%} "
              f"{row['time_ratio_median']:15.3f} {str(row['identical_parameters']):>15}")  # fmt: skip
    print("one probe alone: " + ", ".join(f"{k} {v:.3f} s" for k, v in results["probe_alone_s"].items()))
    atomic_write(args.out, lambda path: Path(path).write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
