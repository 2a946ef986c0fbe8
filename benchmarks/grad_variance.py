"""Variance of the encoder's gradient across independent minibatches: MINC (warmed-up Lambda) vs SCL vs InfoNCE.

Real procgen frame pairs (o_t, o_t+1) from a uniformly random policy (ProcgenGym3Env, unlimited levels; pairs
that straddle an episode boundary are dropped) are split at random into a Lambda warm-up pool (one third) and a
measurement pool. The network is fixed: a randomly initialised NatureCNN with the project's BN-terminated
projection head (64-d), in training mode. For each batch size B:

- MINC's Lambda is warmed up with ceil(3 / ema) EMA steps on minibatches of size B from the warm-up pool,
  and every measured minibatch starts from that warmed-up state (folding its own batch in, as in training);
- K minibatches are drawn independently from the measurement pool (without replacement inside a minibatch);
  one forward pass is shared by all losses and each loss's gradient w.r.t. the CNN's parameters is taken.

Per loss and B the JSON holds tr Cov(g) = sum_k ||g_k - mean||^2 / (K - 1), the squared norm of the expected
gradient (debiased: ||mean||^2 - tr Cov / K), and their ratio, the noise-to-signal ratio. The losses produce
gradients of different scale (SCL clips rows to the unit sphere, MINC does not), so the noise-to-signal ratio
is the comparison that does not depend on scale; the raw variance ratio is reported too. `spectral_unclipped`
is SCL without the row clipping: its expected gradient is that of MINC with a full Lambda (the equivalence the
loss tests check), so its raw variance compares with MINC's like for like.

    python benchmarks/grad_variance.py                 # B in {128, 512, 2048}, K = 16
    python benchmarks/grad_variance.py --quick         # B in {32, 64}, K = 4, a few env steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from procgen import ProcgenGym3Env  # noqa: E402
from tqdm import tqdm  # noqa: E402

from minc_rl.common.checks import int_at_least, output_file  # noqa: E402
from minc_rl.ssl.encoders import ProjectionHead, build_encoder  # noqa: E402
from minc_rl.envs.spec import PROCGEN_GAMES  # noqa: E402
from minc_rl.common.io import atomic_write  # noqa: E402
from minc_rl.losses import (  # noqa: E402
    InfoNCELoss,
    MINCLoss,
    SpectralContrastiveLoss,
    spectral_contrastive_loss,
)

RESULTS = Path(__file__).resolve().parent / "results"
UNCLIPPED_MU = 1e6  # no 64-d BN embedding reaches norm 1000, so mu * SCL(mu) is the formula without clipping
LOSSES = {  # MINC on raw embeddings, as results/grad_variance.json was measured (its unit-row default came later)
    "minc": lambda: MINCLoss(64, normalize=False),
    "minc_full_lambda": lambda: MINCLoss(64, lower_triangular=False, normalize=False),
    "spectral": lambda: SpectralContrastiveLoss(),  # the official loss: rows clipped to the unit sphere
    "spectral_unclipped": lambda: lambda a, b: UNCLIPPED_MU * spectral_contrastive_loss(a, b, mu=UNCLIPPED_MU),
    "infonce": lambda: InfoNCELoss(),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--game", default="coinrun", choices=PROCGEN_GAMES, metavar="GAME",
                        help="procgen game (default: coinrun)")
    parser.add_argument("--batch-sizes", type=int_at_least(2), nargs="+", default=[128, 512, 2048])
    parser.add_argument("--minibatches", type=int_at_least(2), default=16, help="K independent minibatches per batch size")
    parser.add_argument("--envs", type=int_at_least(1), default=64, help="parallel procgen environments")
    parser.add_argument("--steps", type=int_at_least(1), default=384, help="random-policy steps per environment")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="B in {32, 64}, K = 4, 16 envs x 24 steps")
    parser.add_argument("--out", type=output_file, default=None, help="JSON path (default results/grad_variance[_quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.minibatches, args.envs, args.steps = [32, 64], 4, 16, 24
    if args.minibatches < 2:
        parser.error(f"--minibatches must be >= 2 to estimate a variance; got {args.minibatches}")
    if args.out is None:
        args.out = RESULTS / ("grad_variance_quick.json" if args.quick else "grad_variance.json")
    return args


def collect_pairs(game: str, n_envs: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (steps + 1, n_envs, 3, 64, 64) uint8 of a random policy and the (t, env) index of every valid pair."""
    env = ProcgenGym3Env(
        num=n_envs, env_name=game, num_levels=0, start_level=0, distribution_mode="easy", rand_seed=seed
    )
    rng = np.random.default_rng(seed)
    frames, firsts = [], []
    for _ in tqdm(range(steps + 1), desc=f"procgen {game}", unit="step", leave=False):
        _, observation, first = env.observe()
        frames.append(observation["rgb"].copy())
        firsts.append(first.copy())
        env.act(rng.integers(env.ac_space.eltype.n, size=n_envs))
    frames_t = torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3).contiguous()
    starts_episode = torch.from_numpy(np.stack(firsts)[1:])  # o_t+1 opens a new episode: not a pair
    pairs = (~starts_episode).nonzero()
    return frames_t, pairs


def images(frames: torch.Tensor, pairs: torch.Tensor, offset: int) -> torch.Tensor:
    """Float images in [0, 1] of o_t+offset for each (t, env) pair."""
    return frames[pairs[:, 0] + offset, pairs[:, 1]].float() / 255.0


def warm_lambda(loss_fn: MINCLoss, embed, frames, pairs: torch.Tensor, batch: int, rng: np.random.Generator) -> dict:
    """Lambda after ceil(3 / ema) training steps on size-`batch` minibatches of the warm-up pool; returns its state."""
    with torch.no_grad():
        order = torch.from_numpy(rng.permutation(len(pairs)))
        embedded = [
            embed(images(frames, chunk, 0), images(frames, chunk, 1)) for chunk in pairs[order].split(batch)
        ]
        a_all = torch.cat([a for a, _ in embedded])
        b_all = torch.cat([b for _, b in embedded])
        for _ in range(math.ceil(3 / loss_fn.ema)):
            index = torch.from_numpy(rng.choice(len(a_all), size=batch, replace=False))
            loss_fn(a_all[index], b_all[index])
    return {key: value.clone() for key, value in loss_fn.state_dict().items()}


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    frames, pairs = collect_pairs(args.game, args.envs, args.steps, args.seed)
    shuffled = pairs[torch.from_numpy(rng.permutation(len(pairs)))]
    warmup_pairs, measure_pairs = shuffled[: len(shuffled) // 3], shuffled[len(shuffled) // 3 :]
    if max(args.batch_sizes) > min(len(warmup_pairs), len(measure_pairs)):
        raise ValueError(
            f"batch sizes {args.batch_sizes} exceed the pools ({len(warmup_pairs)} warm-up, "
            f"{len(measure_pairs)} measurement pairs); raise --envs or --steps"
        )
    encoder = build_encoder("nature", (3, 64, 64))
    head = ProjectionHead(encoder.features_dim)
    encoder.train()
    head.train()
    params = list(encoder.parameters())

    def embed(x: torch.Tensor, x_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return head(encoder(torch.cat([x, x_next]))).chunk(2)

    results: dict[str, dict] = {}
    for batch in args.batch_sizes:
        loss_fns = {name: LOSSES[name]() for name in args.losses}
        warm_states = {
            name: warm_lambda(loss_fn, embed, frames, warmup_pairs, batch, rng)
            for name, loss_fn in loss_fns.items()
            if isinstance(loss_fn, MINCLoss)
        }
        grad_sum = {name: torch.zeros(sum(p.numel() for p in params), dtype=torch.float64) for name in loss_fns}
        grad_sq_sum = dict.fromkeys(loss_fns, 0.0)
        for _ in tqdm(range(args.minibatches), desc=f"B={batch}", unit="minibatch", leave=False):
            chosen = measure_pairs[torch.from_numpy(rng.choice(len(measure_pairs), size=batch, replace=False))]
            a, b = embed(images(frames, chosen, 0), images(frames, chosen, 1))
            for name, loss_fn in loss_fns.items():
                if name in warm_states:
                    loss_fn.load_state_dict(warm_states[name])
                grads = torch.autograd.grad(loss_fn(a, b), params, retain_graph=True)
                flat = torch.cat([g.reshape(-1) for g in grads]).double()
                grad_sum[name] += flat
                grad_sq_sum[name] += float(flat @ flat)
        k = args.minibatches
        results[str(batch)] = {}
        for name in loss_fns:
            mean = grad_sum[name] / k
            trace_cov = (grad_sq_sum[name] - k * float(mean @ mean)) / (k - 1)
            signal = float(mean @ mean) - trace_cov / k
            results[str(batch)][name] = {
                "trace_cov": trace_cov,
                "mean_grad_sq_norm": signal,
                "noise_to_signal": trace_cov / signal if signal > 0 else None,
            }
    return {
        "meta": {
            "game": args.game,
            "pairs_collected": len(pairs),
            "pairs_dropped_at_episode_boundaries": args.envs * args.steps - len(pairs),
            "warmup_pool": len(warmup_pairs),
            "measurement_pool": len(measure_pairs),
            "minibatches": args.minibatches,
            "encoder": "NatureCNN(3x64x64) + ProjectionHead(512 -> 256 -> 64, final BN), random init, train mode",
            "encoder_parameters": sum(p.numel() for p in params),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "load_average_end": os.getloadavg(),
            "seconds": time.perf_counter() - start,
            "args": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        },
        "results": results,
    }


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if value is not None and reference else "n/a"


def markdown_table(results: dict[str, dict]) -> str:
    """Per B and loss: tr Cov, ||E g||^2, noise-to-signal, and the two ratios to SCL."""
    lines = [
        "| B | loss | tr Cov(g) | ||E g||^2 | noise/signal | tr Cov / SCL's | noise/signal / SCL's |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for batch, per_loss in results.items():
        scl = per_loss.get("spectral", {})
        for name, entry in per_loss.items():
            nts = entry["noise_to_signal"]
            lines.append(
                f"| {batch} | {name} | {entry['trace_cov']:.3e} | {entry['mean_grad_sq_norm']:.3e} "
                f"| {'n/a' if nts is None else f'{nts:.3f}'} | {ratio(entry['trace_cov'], scl.get('trace_cov'))} "
                f"| {ratio(nts, scl.get('noise_to_signal'))} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    """tr Cov(g) and noise-to-signal against B, log-log, one line per loss."""
    batches = [int(batch) for batch in results]
    names = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in names:
        entries = [results[str(batch)][name] for batch in batches]
        axes[0].plot(batches, [e["trace_cov"] for e in entries], "o-", label=name)
        axes[1].plot(batches, [e["noise_to_signal"] or float("nan") for e in entries], "o-", label=name)
    for ax, title in zip(axes, ("tr Cov(encoder gradient)", "tr Cov / ||E g||^2")):
        ax.set(xscale="log", yscale="log", xlabel="batch size B", title=title)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure(args)
    meta = report["meta"]
    print(
        f"\n{meta['game']}: {meta['pairs_collected']} pairs ({meta['warmup_pool']} Lambda warm-up, "
        f"{meta['measurement_pool']} measurement), K = {meta['minibatches']}, {meta['seconds']:.0f} s"
    )
    print(markdown_table(report["results"]))
    goals = {}
    for batch, per_loss in report["results"].items():
        if "minc" in per_loss and "spectral" in per_loss:
            minc, scl = per_loss["minc"], per_loss["spectral"]
            raw = minc["trace_cov"] / scl["trace_cov"]
            goals[f"minc_over_scl_trace_cov_B{batch}"] = {"value": raw, "goal": "<= 0.5", "met": raw <= 0.5}
            if minc["noise_to_signal"] is not None and scl["noise_to_signal"] is not None:
                relative = minc["noise_to_signal"] / scl["noise_to_signal"]
                goals[f"minc_over_scl_noise_to_signal_B{batch}"] = {
                    "value": relative, "goal": "<= 0.5", "met": relative <= 0.5,
                }
    for goal, entry in goals.items():
        print(f"- {goal}: {entry['value']:.3f} (goal {entry['goal']}: {'met' if entry['met'] else 'NOT met'})")
    report["goals"] = goals
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    plot(report["results"], args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
