"""Env steps/s of MincPPO / MincDQN (aux none, minc in every mode, spectral) and stock SB3 with the same encoder,
interleaved.

    python benchmarks/aux_overhead.py                        # PPO: Nature and IMPALA CNN, 3 rounds (long on a CPU)
    python benchmarks/aux_overhead.py --rounds 5 --impala-rounds 1 --impala-warmup 0 --threads 1   # docs' run
    python benchmarks/aux_overhead.py --train-only --encoders nature --rounds 8 --threads 1   # the update alone
    python benchmarks/aux_overhead.py --agent dqn --rounds 5 --threads 1   # DQN on MinAtar breakout
    python benchmarks/aux_overhead.py --agent dqn --variants none minc minc-state-action --rounds 6 --threads 1 \
        --out benchmarks/results/aux_overhead_pairs_dqn.json                 # state against state-action pairs
    python benchmarks/aux_overhead.py --agent dqn --variants none minc minc-every4 minc-every16 --rounds 6 --threads 1 \
        --out benchmarks/results/aux_overhead_every_dqn.json                  # aux.every: the aux loss on every k-th TD step
    python benchmarks/aux_overhead.py --agent dqn --variants none minc-replay minc-td minc-td-state-action --train-freq 4 \
        --rounds 6 --threads 1 --out benchmarks/results/aux_overhead_td_dqn_tf4.json   # TD pairs (aux.source=td)

    python benchmarks/aux_overhead.py --agent dqn --variants none minc selfpred selfpred-minc --rounds 4 --threads 1 \
        --out benchmarks/results/aux_overhead_selfpred_dqn.json              # latent self-prediction, K = 5
    python benchmarks/aux_overhead.py --agent dqn --variants none minc minc-head64 minc-head16 --rounds 6 --threads 1 \
        --out benchmarks/results/aux_overhead_head_dqn.json                  # a narrower projection head

For DQN, `minc` (and the variants that do not name a source) is MincDQN's default: TD pairs since issue 24. The
results measured before it, where `minc` is replay pairs, name the code version they ran (docs/benchmarks.md);
`minc-replay` measures replay pairs today.
    python benchmarks/aux_overhead.py --quick                # smoke run, a few seconds

DQN (--agent dqn): MinAtar breakout with the MinAtar CNN, Young and Tian's batch 32 and one update per step
(--train-freq 4: SB3's default, one update per 4 steps); each round times --dqn-steps env steps per variant, after
1,000 warm-up steps that fill the replay buffer (learning_starts) and a first update; --out defaults to
results/aux_overhead_dqn.json.

procgen coinrun, 64 envs. Each PPO iteration is one rollout of n_steps x 64 env steps and n_epochs passes over
it in minibatches of --batch-size (2048, 3 epochs: the per-sample work of Cobbe et al. 2020's PPO, whose
256-step rollouts make 8 such minibatches). Only the number of minibatches per rollout is smaller, so each
variant's cost per env step is that of the full configuration. The variants take turns iteration by iteration
(the order rotating every round), so the load other processes put on the machine falls on all alike.
"stock" is stable_baselines3.PPO with MincExtractor(aux="none"): the same encoder, SB3's own train().
With --train-only only PPO's update is timed (steps/s = rollout samples trained per second): the aux loss's
own cost, without the env and rollout noise. Writes benchmarks/results/aux_overhead[_train_only].json and .png
and prints a table of steps/s and ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from minc_rl.common.checks import int_at_least, output_file  # noqa: E402
from minc_rl.envs import make_vec_env  # noqa: E402  (first: it mutes legacy gym's notice before SB3 imports gym)
import torch  # noqa: E402
from minc_rl.agents import MincDQN, MincPPO  # noqa: E402
from stable_baselines3 import DQN, PPO  # noqa: E402
from tqdm import tqdm  # noqa: E402

from minc_rl import MincExtractor  # noqa: E402
from minc_rl.common.io import atomic_write  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# name -> the aux settings (minc_rl.agents.AuxConfig); None marks stock SB3 PPO / DQN
VARIANTS = {
    "stock": None,
    "none": dict(name="none"),
    "minc": dict(name="minc"),
    "minc-separate": dict(name="minc", mode="separate"),
    "minc-decoupled": dict(name="minc", mode="decoupled"),
    "spectral": dict(name="spectral"),
    "minc-head64": dict(name="minc", head_hidden=64),  # a narrower projection head (issue 40, item 4: its cost)
    "minc-head16": dict(name="minc", head_hidden=16),
    "minc-state-action": dict(name="minc", pairs="state_action"),  # phi(o_t, a_t) against mu(o_t+1)
    "minc-every4": dict(name="minc", every=4),  # DQN only: the aux loss on every 4th TD step
    "minc-every16": dict(name="minc", every=16),
    "minc-replay": dict(name="minc", source="replay"),  # DQN only: aux.batch pairs of their own (before issue 24)
    "minc-td": dict(name="minc", source="td"),  # DQN only: the aux pairs are the TD batch's own (DQN's default)
    "minc-td-state-action": dict(name="minc", source="td", pairs="state_action"),
    "spectral-td": dict(name="spectral", source="td"),
    "selfpred": dict(name="selfpred"),  # latent self-prediction, K = 5, reward prediction (issue 39)
    "selfpred-q-target": dict(name="selfpred", target="q_target"),  # DQN only: the target Q-network's encoder embeds
    "selfpred-minc": dict(name="selfpred", latent_loss="minc"),  # MINC as the self-prediction loss
    "minc@2048": dict(name="minc", batch=2048),
    "spectral@2048": dict(name="spectral", batch=2048),
}


def build(variant: str, encoder: str, args: argparse.Namespace):
    """The model of `variant` on its own envs (same seed for all): PPO on 64 coinrun envs or DQN on MinAtar."""
    policy_kwargs = dict(features_extractor_class=MincExtractor, features_extractor_kwargs=dict(encoder=encoder),
                         net_arch=[])
    if args.agent == "dqn":
        env = make_vec_env("minatar:breakout", 1, seed=0)
        dqn = dict(batch_size=32, learning_starts=1000, train_freq=args.train_freq, buffer_size=100_000, seed=0, device=args.device)
        if VARIANTS[variant] is None:
            return DQN("CnnPolicy", env, policy_kwargs=policy_kwargs, **dqn)
        return MincDQN("CnnPolicy", env, aux=VARIANTS[variant], encoder=encoder, **dqn)
    env = make_vec_env("procgen:coinrun", args.n_envs, seed=0, num_threads=0)
    ppo = dict(n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs, seed=0, device=args.device)
    if VARIANTS[variant] is None:
        return PPO("CnnPolicy", env, policy_kwargs=policy_kwargs, **ppo)
    return MincPPO("CnnPolicy", env, aux=VARIANTS[variant], encoder=encoder, **ppo)


def measure(encoder: str, rounds: int, warmup: int, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Env steps per wall-clock and per CPU second of every variant, `iterations` PPO iterations per variant per
    round, after `warmup` untimed iterations (the first one also resets the envs)."""
    models = {name: build(name, encoder, args) for name in args.variants}
    steps = args.dqn_steps if args.agent == "dqn" else args.n_steps * args.n_envs
    for model in models.values():
        model.learn(1001 if args.agent == "dqn" else warmup * steps)
    names = list(models)
    sps = {name: {"wall": [], "cpu": []} for name in names}
    for round_ in tqdm(range(rounds), desc=encoder):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            if args.train_only:  # the update alone, on the rollout the warm-up left in the buffer
                for _ in range(args.iterations):
                    models[name].train()
            else:
                models[name].learn(args.iterations * steps, reset_num_timesteps=False)
            sps[name]["wall"].append(args.iterations * steps / (time.perf_counter() - start_wall))
            sps[name]["cpu"].append(args.iterations * steps / (time.process_time() - start_cpu))
    return sps


def ratios(sps: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Steps/s per clock (median over rounds, and the best wall-clock round: other processes only ever slow a
    round down), the speed of each variant relative to stock, and its time per env step relative to `none`."""
    rates = {
        name: {"wall": statistics.median(c["wall"]), "wall_best": max(c["wall"]), "cpu": statistics.median(c["cpu"])}
        for name, c in sps.items()
    }
    out: dict[str, dict[str, float]] = {}
    for name, rate in rates.items():
        row = {f"steps_per_s_{clock}": value for clock, value in rate.items()}
        for clock in rate:
            if "stock" in rates:
                row[f"speed_vs_stock_{clock}"] = rate[clock] / rates["stock"][clock]
            if "none" in rates:
                row[f"time_vs_none_{clock}"] = rates["none"][clock] / rate[clock]
        out[name] = row
    return out


def plot(results: dict, path: Path) -> None:
    encoders = list(results["encoders"])
    fig, axes = plt.subplots(1, len(encoders), figsize=(5 * len(encoders), 3.5), squeeze=False)
    for ax, encoder in zip(axes[0], encoders):
        rows = results["encoders"][encoder]["summary"]
        names = list(rows)
        width = 0.4
        for offset, clock, color in ((-width / 2, "wall_best", "tab:blue"), (width / 2, "cpu", "tab:orange")):
            ax.bar([i + offset for i in range(len(names))], [rows[n][f"time_vs_none_{clock}"] for n in names],
                   width, color=color, label=f"{clock.replace('_', ' ')} clock")
        ax.set_xticks(range(len(names)), names)
        ax.axhline(1.0, color="black", lw=0.8)
        config = results["config"]
        goal = 1.2 if config["agent"] == "dqn" else 1.25  # issue 24's aim for DQN (TD pairs), issue 12's for PPO
        ax.axhline(goal, color="tab:red", lw=0.8, ls="--", label=f"aim for the aux loss: {goal}x")
        ax.set_title(f"{encoder} CNN, " + (f"MinAtar breakout DQN, train_freq {config.get('train_freq', 1)}"
                                          if config["agent"] == "dqn"
                                          else f"procgen coinrun x{config['n_envs']}"))
        ax.set_ylabel("time per env step / aux=none")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", choices=["ppo", "dqn"], default="ppo")
    parser.add_argument("--encoders", nargs="+", default=None, choices=["nature", "impala", "minatar"],
                        help="default: nature and impala (PPO), minatar (DQN)")
    parser.add_argument("--dqn-steps", type=int_at_least(1), default=1000, help="DQN: env steps per variant per timed round")
    parser.add_argument("--train-freq", type=int_at_least(1), default=1, help="DQN: env steps per gradient step (MinAtar: 1)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="default: all (PPO: all but the DQN-only minc-every*)")
    parser.add_argument("--rounds", type=int_at_least(1), default=3, help="timed iterations per variant (median reported)")
    parser.add_argument("--impala-rounds", type=int_at_least(1), default=None, help="rounds for IMPALA (default: --rounds)")
    parser.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed PPO iterations per variant first")
    parser.add_argument("--impala-warmup", type=int_at_least(0), default=None,
                        help="warm-up iterations for IMPALA (default: --warmup); 0 saves ~1 min per variant on a CPU, "
                        "where one iteration takes ~1 min and the first-call overhead is under 1%% of it")
    parser.add_argument("--iterations", type=int_at_least(1), default=1, help="PPO iterations per timed turn")
    parser.add_argument("--n-envs", type=int_at_least(1), default=64)
    parser.add_argument("--n-steps", type=int_at_least(1), default=32)
    parser.add_argument("--batch-size", type=int_at_least(2), default=2048)
    parser.add_argument("--n-epochs", type=int_at_least(1), default=3)
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-only", action="store_true",
                        help="time PPO's update alone (train() on a filled buffer), without collecting rollouts")
    parser.add_argument("--quick", action="store_true", help="smoke run: Nature CNN, 8 envs, tiny rollouts")
    parser.add_argument("--out", type=output_file, default=None, help="default: results/aux_overhead[_train_only].json")
    args = parser.parse_args()
    suffix = "_dqn" if args.agent == "dqn" else "_train_only" if args.train_only else ""
    args.out = args.out or RESULTS / f"aux_overhead{suffix}.json"
    args.encoders = args.encoders or (["minatar"] if args.agent == "dqn" else ["nature", "impala"])
    dqn_only = [v for v, aux in VARIANTS.items() if aux is not None and (aux.get("every", 1) > 1 or "source" in aux)]
    if args.variants is None:
        args.variants = [v for v in VARIANTS if args.agent == "dqn" or v not in dqn_only]
    elif args.agent == "ppo" and set(args.variants) & set(dqn_only):
        parser.error(f"{sorted(set(args.variants) & set(dqn_only))} set MincDQN's aux.every or aux.source; use --agent dqn")
    if args.agent == "dqn" and args.train_only:
        parser.error("--train-only times PPO's update; DQN's rounds are one gradient step per env step already")
    if args.quick:
        args.n_envs, args.n_steps, args.batch_size, args.n_epochs, args.rounds, args.dqn_steps = 8, 16, 64, 1, 1, 50
        args.encoders = ["minatar"] if args.agent == "dqn" else ["nature"]
        args.variants = [v for v in args.variants if "2048" not in v]
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "torch_threads": torch.get_num_threads(),
                   "machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
        "encoders": {},
    }
    for encoder in args.encoders:
        impala = encoder == "impala"
        rounds = args.impala_rounds if impala and args.impala_rounds is not None else args.rounds
        warmup = args.impala_warmup if impala and args.impala_warmup is not None else args.warmup
        warmup = max(warmup, 1) if args.train_only else warmup  # train() needs a full rollout buffer
        sps = measure(encoder, rounds, warmup, args)
        results["encoders"][encoder] = {"rounds": rounds, "warmup": warmup, "steps_per_s": sps, "summary": ratios(sps)}

    if args.agent == "dqn":
        print(f"\nMinAtar breakout DQN, batch 32, one update per {args.train_freq} step(s), {args.dqn_steps} steps per round, "
              f"torch threads={torch.get_num_threads()}, device={args.device}")
    else:
        print(f"\nprocgen coinrun x{args.n_envs}, n_steps={args.n_steps}, batch_size={args.batch_size}, "
              f"n_epochs={args.n_epochs}, torch threads={torch.get_num_threads()}, device={args.device}")
    print("steps/s: median over rounds (wall clock, CPU time of this process) and the best wall-clock round;")
    agent = args.agent.upper()
    print(f"vs stock: speed relative to stock SB3 {agent}; vs none: time per env step relative to Minc{agent}(aux='none')")
    header = ["encoder", "variant", "wall", "wall best", "cpu", "vs stock wall", "vs stock cpu",
              "vs none wall", "vs none best", "vs none cpu"]
    print(f"{header[0]:8} {header[1]:14}" + "".join(f"{h:>14}" for h in header[2:]))
    for encoder, result in results["encoders"].items():
        for name, row in result["summary"].items():
            keys = ["steps_per_s_wall", "steps_per_s_wall_best", "steps_per_s_cpu", "speed_vs_stock_wall",
                    "speed_vs_stock_cpu", "time_vs_none_wall", "time_vs_none_wall_best", "time_vs_none_cpu"]
            cells = [row.get(key, float("nan")) for key in keys]
            print(f"{encoder:8} {name:14}" + "".join(f"{c:14.1f}" for c in cells[:3])
                  + "".join(f"{c:14.3f}" for c in cells[3:]))
    atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(results, indent=2)))
    if not args.quick:
        plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
