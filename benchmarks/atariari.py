"""AtariARI under the reduced protocol of benchmarks/README_atariari.md (issue 41): MINC, the spectral loss and
InfoNCE pretrained on consecutive frames, and latent self-prediction along the random agent's actions, probed beside
the majority and random-CNN baselines, against the paper.

    python benchmarks/atariari.py run --commit                 # the main table: 5 games x 3 seeds, resumable
    python benchmarks/atariari.py run --games pong --seeds 0 --frames 3000 --steps 5 --epochs 2 --runs /tmp/r --out /tmp/o
    python benchmarks/atariari.py aggregate                    # table.md and atariari.json from the cells' copies
    python benchmarks/atariari.py run --batch 512 --games pong bowling --losses minc spectral --commit   # item 5
    python benchmarks/atariari.py batch                        # batch 64 (the main table) against batch 512

`run` works through the cells seed by seed, then game by game: the baselines cell (python -m minc_rl.probe game=<g>,
the majority and random-CNN probes) and one cell per loss (python -m minc_rl.pretrain data=atari, then
python -m minc_rl.probe encoder=<that run>), each in <runs>/<game>/<method>/seed<k>. A cell whose copy is in
<out>/<game>/<method>/seed<k>/probe.json is done and skipped; a pretraining with a checkpoint is resumed, one
without starts afresh; Ctrl-C or SIGTERM is passed on to the running command. Each finished cell's probe.json and
table.md (and the pretraining's summary.json) are copied to <out> and, with --commit, committed at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from minc_rl.common.checks import int_at_least
from rl_evidence import commit_copies, run_or_stop  # the house's commit-as-you-go and signal-forwarding runner

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "atariari"
RUNS = ROOT / "outputs" / "atariari"
GAMES = ("pong", "breakout", "bowling", "boxing", "mspacman")
LOSSES = ("minc", "spectral", "infonce", "selfpred")  # selfpred: latent self-prediction along the actions
METHODS = ("majority", "random-cnn", *LOSSES)
# the paper's mean F1 per game with random-agent data (the authors' results notebook,
# notebooks/summarize_results.ipynb at commit 9a31785 of mila-iqia/atari-representation-learning, the table of the
# paper's Table 2; Global-T-DIM, InfoNCE between global features of consecutive frames, from its ablation table)
PUBLISHED = {
    "majority": {"pong": 0.10, "breakout": 0.17, "bowling": 0.33, "boxing": 0.01, "mspacman": 0.10},
    "random-cnn": {"pong": 0.17, "breakout": 0.51, "bowling": 0.48, "boxing": 0.19, "mspacman": 0.49},
    "vae": {"pong": 0.09, "breakout": 0.57, "bowling": 0.50, "boxing": 0.20, "mspacman": 0.56},
    "pixel-pred": {"pong": 0.70, "breakout": 0.70, "bowling": 0.81, "boxing": 0.44, "mspacman": 0.74},
    "cpc": {"pong": 0.71, "breakout": 0.74, "bowling": 0.90, "boxing": 0.29, "mspacman": 0.65},
    "infonce": {"pong": 0.65, "breakout": 0.71, "bowling": 0.77, "boxing": 0.32, "mspacman": 0.53},  # Global-T-DIM
    "st-dim": {"pong": 0.81, "breakout": 0.88, "bowling": 0.96, "boxing": 0.58, "mspacman": 0.72},
    "supervised": {"pong": 0.87, "breakout": 0.94, "bowling": 0.95, "boxing": 0.83, "mspacman": 0.87},
}
COPIED = ("probe.json", "table.md")
BATCH = 64  # the paper's pretraining batch; --steps counts steps of it
BATCH_GAMES, BATCH_LOSSES = ("pong", "bowling"), ("minc", "spectral")  # the batch claim's cells (README_atariari.md)


def batch_dirs(batch: int) -> tuple[Path, Path]:
    """(results, runs) of a table pretrained at `batch`: the main table's at the paper's 64, its own folders else."""
    if batch == BATCH:
        return RESULTS, RUNS
    return RESULTS.with_name(f"atariari_batch{batch}"), RUNS.with_name(f"atariari_batch{batch}")


def pretraining_steps(steps: int, batch: int) -> int:
    """The steps at `batch` that see as many pairs (the same epochs) as `steps` steps of 64; ValueError if none do."""
    if steps * BATCH % batch:
        raise ValueError(f"--steps {steps} of {BATCH} pairs ({steps * BATCH} pairs) is no whole number of steps at "
                         f"--batch {batch}; choose a batch that divides {steps * BATCH}")
    return steps * BATCH // batch


def python() -> list[str]:
    """This interpreter; -P keeps the benchmarks folder off the module path of the commands it starts."""
    return [sys.executable, "-P"]


def cell_commands(game: str, method: str, seed: int, run_dir: Path, args: argparse.Namespace) -> list[list[str]]:
    """The commands of one cell: a pretraining (resumed where it has a checkpoint) and the probe, or the probe alone
    for the baselines. Probe frames come from seed `seed`, pretraining frames from seed 1000 + `seed`."""
    probe = [*python(), "-m", "minc_rl.probe", f"game={game}", f"frames={args.frames}", f"seed={seed}",
             f"probe.epochs={args.epochs}", f"cache_dir={args.cache}", "torch_threads=1", "progress=false",
             f"hydra.run.dir={run_dir / 'probe'}"]  # fmt: skip
    if method == "random-cnn":
        return [probe]
    pretrain_dir = run_dir / "pretrain"
    pretrain = [*python(), "-m", "minc_rl.pretrain", "data=atari", f"data.game={game}", f"data.frames={args.frames}",
                f"data.seed={1000 + seed}", f"data.cache_dir={args.cache}", f"loss={method}",
                f"steps={pretraining_steps(args.steps, args.batch)}", f"batch_size={args.batch}", f"seed={seed}",
                "eval.at_start=false", "eval.max_samples=2000", "progress=false", "device=cpu"]  # fmt: skip
    if (pretrain_dir / "checkpoint.pt").exists():
        pretrain = [*python(), "-m", "minc_rl.pretrain", f"resume={pretrain_dir}"]
    else:
        pretrain.append(f"hydra.run.dir={pretrain_dir}")
    return [pretrain, [*probe, f"encoder={pretrain_dir}", f"name={method}"]]


def cells(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(game, method, seed) of every cell asked for, seed by seed so that an unfinished table has whole seeds; the
    random-CNN cell probes the majority baseline too (at the paper's batch only: the baselines do not pretrain)."""
    methods = ["random-cnn", *args.losses] if args.batch == BATCH else list(args.losses)
    return [(game, method, seed) for seed in args.seeds for game in args.games for method in methods]


def run(args: argparse.Namespace) -> None:
    """Every cell not done yet, each copied to <out> (and committed with --commit) as it finishes."""
    for number, (game, method, seed) in enumerate(cells(args), 1):
        name = f"[{number}/{len(cells(args))}] {game} {method} seed {seed}"
        copy_dir = args.out / game / method / f"seed{seed}"
        if (copy_dir / "probe.json").is_file():
            print(f"{name}: done; its results are in {copy_dir}", flush=True)
            continue
        run_dir = (args.runs / game / method / f"seed{seed}").resolve()
        for command in cell_commands(game, method, seed, run_dir, args):
            print(f"{name}: {' '.join(command[2:])}", flush=True)
            run_or_stop(name, command)
        copy_dir.mkdir(parents=True, exist_ok=True)
        for filename in COPIED:
            shutil.copyfile(run_dir / "probe" / filename, copy_dir / filename)
        if (run_dir / "pretrain" / "summary.json").is_file():
            shutil.copyfile(run_dir / "pretrain" / "summary.json", copy_dir / "pretrain_summary.json")
        if args.commit:
            commit_copies([copy_dir], f"atariari ({args.out}): {game} {method} seed {seed}")
    print(f"done; the table: python benchmarks/atariari.py aggregate --results {args.out}", flush=True)


def standard_error(values: list[float]) -> float:
    """The standard error of the mean over seeds; nan for fewer than two."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def collect_scores(results: Path) -> dict[str, dict[str, list[float]]]:
    """method -> game -> the game's F1 (mean of category means) of each finished seed, from the cells' copies."""
    scores: dict[str, dict[str, list[float]]] = {}
    for path in sorted(results.glob("*/*/seed*/probe.json")):
        for method, result in json.loads(path.read_text())["methods"].items():
            scores.setdefault(method, {}).setdefault(path.parent.parent.parent.name, []).append(result["f1"])
    return scores


def aggregate(args: argparse.Namespace) -> dict[str, Any]:
    """The table in the paper's layout (games x methods, mean F1 over seeds +- SE, the published values beside) and
    Kendall's tau between the measured and the published ranking of the methods both have."""
    scores = collect_scores(args.results)
    if not scores:
        raise ValueError(f"{args.results} holds no finished cell (<game>/<method>/seed<k>/probe.json)")
    games = [game for game in GAMES if any(game in by_game for by_game in scores.values())]
    methods = [method for method in METHODS if method in scores]
    means = {m: {g: float(np.mean(scores[m][g])) for g in games if g in scores[m]} for m in methods}
    lines = ["| game | " + " | ".join(f"{m} (ours) | {m} (paper)" if m in PUBLISHED else f"{m} (ours)"
                                      for m in methods) + " |",
             "|---|" + "---|" * sum(2 if m in PUBLISHED else 1 for m in methods)]  # fmt: skip
    for game in [*games, "mean"]:
        cells_text = []
        for method in methods:
            values = scores[method].get(game, []) if game != "mean" else list(means[method].values())
            ours = f"{np.mean(values):.2f} +- {standard_error(values):.2f} (n={len(values)})" \
                if len(values) > 1 else (f"{values[0]:.2f} (n=1)" if values else "")
            paper = PUBLISHED.get(method, {})
            published = [paper[g] for g in (games if game == "mean" else [game]) if g in paper]
            cells_text += [ours, *([f"{np.mean(published):.2f}"] if method in PUBLISHED else [])]
        lines.append(f"| {game} | {' | '.join(cells_text)} |")
    shared = [m for m in methods if m in PUBLISHED and len(means[m]) == len(games)]
    tau = None
    if len(shared) >= 2:
        measured = [np.mean(list(means[m].values())) for m in shared]
        published = [np.mean([PUBLISHED[m][g] for g in games]) for m in shared]
        tau = float(kendalltau(measured, published).statistic)
    lines += ["", f"Kendall's tau between the measured and the published mean F1 of {', '.join(shared)}: "
              + ("n/a (fewer than two methods on every game)" if tau is None else f"{tau:.2f}")]
    text = "\n".join(lines) + "\n"
    result = {"scores": scores, "means": means, "published": PUBLISHED, "kendall_tau": tau, "tau_methods": shared}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "table.md").write_text(text)
    (args.results / "atariari.json").write_text(json.dumps(result, indent=2))
    print(text, flush=True)
    return result


def batch_claim(args: argparse.Namespace) -> dict[str, Any]:
    """The batch claim's table (README_atariari.md): per game and loss the mean F1 over seeds at batch 64 (the main
    table's cells) and at --batch, and the change from the large batch to 64 with its standard error."""
    small, large = collect_scores(args.results), collect_scores(args.large)
    rows, result = [], {}
    for game in BATCH_GAMES:
        for loss in BATCH_LOSSES:
            at_small, at_large = small.get(loss, {}).get(game, []), large.get(loss, {}).get(game, [])
            if not at_small or not at_large:
                continue
            change = float(np.mean(at_small) - np.mean(at_large))
            error = float(np.hypot(standard_error(at_small), standard_error(at_large)))
            result.setdefault(game, {})[loss] = {"batch64": at_small, f"batch{args.batch}": at_large,
                                                 "change": change, "se": error}  # fmt: skip
            rows.append(f"| {game} | {loss} | {np.mean(at_small):.3f} (n={len(at_small)}) | "
                        f"{np.mean(at_large):.3f} (n={len(at_large)}) | {change:+.3f} +- {error:.3f} |")
        if len(result.get(game, {})) == len(BATCH_LOSSES):
            minc, spectral = (result[game][loss] for loss in BATCH_LOSSES)
            result[game]["minc_minus_spectral"] = {"change": minc["change"] - spectral["change"],
                                                   "se": float(np.hypot(minc["se"], spectral["se"]))}  # fmt: skip
            rows.append(f"| {game} | minc - spectral | | | {minc['change'] - spectral['change']:+.3f} +- "
                        f"{result[game]['minc_minus_spectral']['se']:.3f} |")
    if not rows:
        raise ValueError(f"no (game, loss) of {BATCH_GAMES} x {BATCH_LOSSES} has cells in both {args.results} and "
                         f"{args.large}")
    text = "\n".join([f"| game | loss | F1 at batch {BATCH} | F1 at batch {args.batch} | change ({BATCH} - {args.batch}) +- SE |",
                      "|---|---|---|---|---|", *rows]) + "\n"  # fmt: skip
    args.large.mkdir(parents=True, exist_ok=True)
    (args.large / "batch_claim.md").write_text(text)
    (args.large / "batch_claim.json").write_text(json.dumps(result, indent=2))
    print(text, flush=True)
    return result


def main() -> None:
    """Parse the command line and run a subcommand."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the cells not done yet (resuming unfinished pretraining)")
    run_parser.add_argument("--games", nargs="+", choices=GAMES, default=list(GAMES))
    run_parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    run_parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2])
    run_parser.add_argument("--frames", type=int_at_least(1), default=15_000,
                            help="frames collected for the probe and, apart, for pretraining (paper: 50,000 / 100,000)")
    run_parser.add_argument("--steps", type=int_at_least(1), default=200,
                            help="pretraining steps of 64 pairs (paper: 100 epochs of its 100,000 frames)")
    run_parser.add_argument("--epochs", type=int_at_least(1), default=20, help="most probe epochs (paper: 100)")
    run_parser.add_argument("--batch", type=int_at_least(1), default=BATCH,
                            help="pretraining batch; the steps are scaled to the same pairs (epochs) as --steps of 64")
    run_parser.add_argument("--runs", type=Path, help="run directories (checkpoints; not committed); default "
                            "outputs/atariari, or outputs/atariari_batch<B>")
    run_parser.add_argument("--out", type=Path, help="where each cell's small files go; default "
                            "benchmarks/results/atariari, or benchmarks/results/atariari_batch<B>")
    run_parser.add_argument("--cache", type=Path, default=RUNS / "frames", help="the collected frames")
    run_parser.add_argument("--commit", action="store_true", help="git commit each cell's files as it finishes")
    aggregate_parser = commands.add_parser("aggregate", help="the table from `run`'s copies")
    aggregate_parser.add_argument("--results", type=Path, default=RESULTS)
    batch_parser = commands.add_parser("batch", help="the batch claim: batch 64 (the main table) against --batch")
    batch_parser.add_argument("--batch", type=int_at_least(1), default=512)
    batch_parser.add_argument("--results", type=Path, default=RESULTS, help="the main table's copies (batch 64)")
    batch_parser.add_argument("--large", type=Path, help="the large batch's copies; default "
                              "benchmarks/results/atariari_batch<B>")
    args = parser.parse_args()
    try:
        if args.command == "run":
            pretraining_steps(args.steps, args.batch)  # a batch that makes no whole number of steps: refused first
            results, runs = batch_dirs(args.batch)
            args.out, args.runs = args.out or results, args.runs or runs
        if args.command == "batch":
            args.large = args.large or batch_dirs(args.batch)[0]
        {"run": run, "aggregate": aggregate, "batch": batch_claim}[args.command](args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
