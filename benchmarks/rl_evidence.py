"""Does the MINC auxiliary loss help RL agents? Runs issue 7's sweeps through minc_rl.train and aggregates them.

    python benchmarks/rl_evidence.py run --suite procgen --steps 409600     # PPO starpilot, aux none/minc/spectral
    python benchmarks/rl_evidence.py run --suite minatar --steps 40000      # DQN breakout, space_invaders; none/minc
    python benchmarks/rl_evidence.py run --suite minatar --steps 6000 --seeds 0 --runs /tmp/r --out /tmp/o  # smoke
    python benchmarks/rl_evidence.py aggregate                              # tables, JSON and plots (--last 3)

`run` starts one `python -m minc_rl.train` process per (env, aux, seed), seed by seed so that an unfinished
benchmark still compares every aux at the seeds it finished, in the run directory <runs>/<suite>/<game>/<aux>/seed<k>
(hydra.run.dir). A run that finished (summary.json, not interrupted, at least --steps steps) is skipped; one with
a checkpoint is resumed (resume=<run dir>); one without a checkpoint starts afresh. Ctrl-C or SIGTERM is passed on
to the run, which writes a checkpoint before it stops: the same command later continues where it stopped. After
each finished run, its summary.json, evaluations.csv and progress.csv (nothing else: no checkpoints) are copied to
<out>/<suite>/<game>/<aux>/seed<k>.

`aggregate` reads those copies and writes <out>/<suite>_table.md (also printed), <out>/<suite>.json and the
learning curves <out>/<suite>_<game>.png (evaluation return against steps, mean over seeds with a shaded
standard-error band, one line per aux; procgen: training-level and unseen-level panels) and
<out>/<suite>_<game>_training.png (from progress.csv: training-episode return, and the aux loss's SCL estimate,
RankMe and Lambda off-diagonal ratio, which are what to look at when MINC does not help).
How to run the full benchmark, its time budget and how to resume: benchmarks/README_rl_evidence.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
import numpy as np  # noqa: E402

from minc_rl import run_io  # noqa: E402
from minc_rl.io import atomic_write  # noqa: E402
from minc_rl.run_dir import RunDirError, RunLock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "rl_evidence"
RUNS = ROOT / "outputs" / "rl_evidence"
CALIBRATION_RESULTS = ROOT / "benchmarks" / "results" / "rl_calibration"
COPIED = ("summary.json", "evaluations.csv", "progress.csv")
# suite -> the entry point's settings shared by every run, the games and the compared aux losses
SUITES: dict[str, dict[str, Any]] = {
    "procgen": {
        "overrides": ["agent=ppo", "encoder=nature"],  # family/procgen.yaml: 200 levels, easy, reward normalisation
        "games": ["starpilot"],
        "aux": ["none", "minc", "spectral"],
        "splits": ["train_levels", "unseen_levels"],
    },
    "minatar": {
        "overrides": ["agent=dqn"],  # family/minatar.yaml: the MinAtar paper's CNN (encoder=minatar)
        "games": ["breakout", "space_invaders"],
        "aux": ["none", "minc", "spectral"],
        "splits": ["test"],
    },
}
# progress.csv columns drawn by plot_training: SB3's training-episode return and the auxiliary loss's diagnostics
TRAINING_KEYS = {
    "rollout/ep_rew_mean": "training episode return (last 100)",
    "train/aux_scl_estimate": "SCL plug-in estimate on the aux pairs",
    "train/aux_rankme": "RankMe of the aux embeddings",
    "train/aux_lambda_offdiag_ratio": "Lambda off-diagonal ratio (MINC)",
    "train/aux_grad_share_raw": "aux share of the gradient at the encoder (as the losses give it)",
}
SPLIT_LABELS = {"train_levels": "training levels", "unseen_levels": "unseen levels", "test": "evaluation (greedy)"}
# Cobbe et al. 2020 (PPO, IMPALA CNN, 25M steps, 200 levels, easy): mean test return on unseen levels
COBBE_STEPS = 25_000_000
COBBE_TEST_RETURN = {"coinrun": 8.7, "starpilot": 23.5, "bigfish": 4.7}
Runs = dict[str, dict[str, list[dict[str, Any]]]]  # game -> aux (or variant) -> runs (load_runs)
# issue 12's calibration settings (README_rl_evidence.md, "Calibration"): setting -> overrides, in the order that
# breaks ties: cheapest first (joint before separate before decoupled), then the smaller share
CALIBRATION_SETTINGS = {
    "joint-s0.01": ["aux.mode=joint", "aux.share=0.01"],
    "joint-s0.03": ["aux.mode=joint", "aux.share=0.03"],
    "joint-s0.1": ["aux.mode=joint", "aux.share=0.1"],
    "joint-s0.3": ["aux.mode=joint", "aux.share=0.3"],
    "separate-lr1e-4": ["aux.mode=separate", "aux.lr=1e-4"],
    "decoupled-lr1e-3": ["aux.mode=decoupled", "aux.lr=1e-3"],
}
FIRST_SETTINGS = ("joint-s0.1", "joint-s0.3", "separate-lr1e-4", "decoupled-lr1e-3")  # before the smaller shares
# the calibrated aux losses -> their overrides and the settings their calibration tries
CALIBRATED = {
    "minc": (["aux=minc"], tuple(CALIBRATION_SETTINGS)),
    "spectral": (["aux=spectral"], tuple(CALIBRATION_SETTINGS)),
    # issue 16: phi(o_t, a_t) against mu(o_t+1); its rule was written before the smaller shares
    "minc-state-action": (["aux=minc", "aux.pairs=state_action"], FIRST_SETTINGS),
}
GRIDS = {"aux": (), "pairs": (), "td-pairs": (), "calibration": ("minc", "spectral"),
         "calibration-pairs": ("minc-state-action",)}
# issue 24: DQN's aux pairs from the TD batch (aux.source=td) against today's replay pairs, at the calibrated shares
TD_PAIRS = {"none": ["aux=none"], "minc": ["aux=minc"], "minc-td": ["aux=minc", "aux.source=td"],
            "spectral-td": ["aux=spectral", "aux.source=td"]}


def calibrated_choice(suite: str, loss: str, results: Path = CALIBRATION_RESULTS) -> list[str]:
    """The overrides of `loss` at the setting its calibration chose (aggregate's <suite>_calibration.json)."""
    path = results / f"{suite}_calibration.json"
    choices = json.loads(path.read_text())["choices"] if path.exists() else {}
    if loss not in choices:
        raise ValueError(f"{path} has no choice for {loss} yet: run its calibration grid and aggregate first")
    return [*CALIBRATED[loss][0], *choices[loss]["overrides"]]


def variants(suite: str, grid: str) -> dict[str, list[str]]:
    """Variant name -> its overrides: the suite's aux losses at their defaults ("aux"), state-action MINC at its
    calibrated setting ("pairs", issue 16's final runs), or a calibration grid (aux=none and each of the grid's
    losses at each of its settings)."""
    if grid == "aux":
        return {aux: [f"aux={aux}"] for aux in SUITES[suite]["aux"]}
    if grid == "pairs":
        return {"minc-state-action": calibrated_choice(suite, "minc-state-action")}
    if grid == "td-pairs":
        return TD_PAIRS
    grid_variants = {"none": ["aux=none"]}
    for loss in GRIDS[grid]:
        loss_overrides, settings = CALIBRATED[loss]
        for name in settings:
            grid_variants[f"{loss}-{name}"] = [*loss_overrides, *CALIBRATION_SETTINGS[name]]
    return grid_variants


def run_finished(run_dir: Path, steps: int) -> bool:
    """Whether run_dir holds a run that reached `steps` without being interrupted."""
    summary = run_io.read_summary(run_dir / "summary.json")
    return bool(summary) and not summary["interrupted"] and summary["steps"] >= steps


def train_command(
    suite: str, game: str, overrides: list[str], seed: int, run_dir: Path, args: argparse.Namespace
) -> list[str]:
    """The minc_rl.train command line of one run: fresh, or resume=run_dir when it has a checkpoint."""
    every = max(args.steps // args.evaluations, 1)
    python = [args.python, "-P"] if args.python else [sys.executable]  # -P: the checkout's minc_rl stays off sys.path
    command = [*python, "-m", "minc_rl.train", f"env={suite}:{game}", *SUITES[suite]["overrides"], *overrides]
    command += [f"seed={seed}", f"total_steps={args.steps}", f"eval.every={every}", f"checkpoint.every={every}"]
    command += [*args.override, f"hydra.run.dir={run_dir}"]
    if run_io.latest_checkpoint(run_dir) is not None:
        command.append(f"resume={run_dir}")
    return command


def run_training(command: list[str]) -> int:
    """Run one training process in its own session; a SIGINT or SIGTERM to this script is passed on once, so the
    run writes its checkpoint and stops (a second Ctrl-C would interrupt that checkpoint)."""
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if not received:
            process.send_signal(signum)
        received.append(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 + received[0] if received else returncode


def commit_copies(paths: list[Path], message: str) -> None:
    """git commit exactly `paths` (a sweep commits each run as it finishes); nothing new is no commit, a failure is
    reported, not fatal."""
    for attempt in range(5):
        added = subprocess.run(["git", "add", "--", *map(str, paths)], cwd=ROOT, capture_output=True, text=True)
        unchanged = ["git", "diff", "--cached", "--quiet", "--", *map(str, paths)]
        if added.returncode == 0 and subprocess.run(unchanged, cwd=ROOT).returncode == 0:
            return  # the same results are already committed
        done = added.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", *map(str, paths)], cwd=ROOT, capture_output=True, text=True
        ).returncode == 0
        if done:
            return
        time.sleep(2 + 3 * attempt)  # another git process holds the index lock
    print(f"could not commit {', '.join(map(str, paths))}; commit them by hand", flush=True)


def select_jobs(
    suite: str, grid_name: str, grid: dict[str, list[str]], seeds: list[int], only: list[str] | None,
    shard: tuple[int, int],
) -> list[tuple[str, str, int]]:
    """This shard's (game, variant, seed) jobs, seed by seed, of the grid's variants (all, or only those named)."""
    unknown = sorted(set(only or []) - set(grid))
    if unknown:
        raise ValueError(f"--variants {' '.join(unknown)}: not in the {grid_name} grid; choose from {', '.join(grid)}")
    names = [name for name in grid if not only or name in only]
    jobs = [(game, name, seed) for seed in seeds for game in SUITES[suite]["games"] for name in names]
    index, count = shard
    return jobs[index::count]


def run(args: argparse.Namespace) -> None:
    """Train every (seed, game, variant) of the suite and grid that has not finished (this shard's share of them),
    and copy each finished run's small files (and commit them with --commit)."""
    if args.steps < 1 or args.evaluations < 1:
        raise ValueError(f"--steps and --evaluations must be >= 1; got {args.steps} and {args.evaluations}")
    grid = variants(args.suite, args.grid)
    jobs = select_jobs(args.suite, args.grid, grid, args.seeds, args.variants, args.shard)
    for number, (game, aux, seed) in enumerate(jobs, 1):
        name = f"[{number}/{len(jobs)}] {args.suite}:{game} aux={aux} seed={seed}"
        run_dir = (args.runs / args.suite / game / aux / f"seed{seed}").resolve()
        copy_dir = args.out / args.suite / game / aux / f"seed{seed}"
        if run_finished(copy_dir, args.steps) and not run_finished(run_dir, args.steps):
            print(f"{name}: finished; its results are in {copy_dir}", flush=True)  # run dirs do not outlive a machine
            continue
        if run_finished(run_dir, args.steps):
            print(f"{name}: finished in {run_dir}", flush=True)
        else:
            if run_dir.exists() and run_io.latest_checkpoint(run_dir) is None:
                try:
                    with RunLock(run_dir):  # never delete a run another process is writing
                        shutil.rmtree(run_dir)
                except RunDirError as error:
                    print(f"{name}: skipped; {error}", flush=True)
                    continue
                print(f"{name}: {run_dir} had no checkpoint; starting afresh", flush=True)
            command = train_command(args.suite, game, grid[aux], seed, run_dir, args)
            print(f"{name}: {' '.join(command[1:])}", flush=True)
            returncode = run_training(command)
            if returncode != 0:
                advice = "run the same command again to continue" if returncode > 128 else "see the error above"
                print(f"{name}: stopped (exit code {returncode}); {advice}", flush=True)
                raise SystemExit(returncode)
        copy_dir.mkdir(parents=True, exist_ok=True)
        for filename in COPIED:
            shutil.copyfile(run_dir / filename, copy_dir / filename)
        if args.commit:
            commit_copies([copy_dir], f"rl_evidence: {args.suite}:{game} {aux} seed {seed} ({args.steps:,} steps)")
    print(f"done; tables and plots: python benchmarks/rl_evidence.py aggregate --results {args.out}", flush=True)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean over seeds (NaN standard error for a single seed)."""
    array = np.asarray(values, dtype=float)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else math.nan
    return float(array.mean()), se


def load_runs(results: Path, suite: str) -> Runs:
    """game -> aux -> the runs (summary and evaluation rows by split) copied by `run`, seeds in order."""
    runs: Runs = {}
    for summary_path in sorted((results / suite).glob("*/*/seed*/summary.json")):
        game, aux = summary_path.parts[-4], summary_path.parts[-3]
        curves: dict[str, list[tuple[int, float]]] = {}
        for row in run_io.read_evaluations(summary_path.parent / "evaluations.csv"):
            curves.setdefault(row["split"], []).append((int(row["step"]), float(row["return_mean"])))
        run = {"summary": run_io.read_summary(summary_path), "curves": curves,
               "progress": read_progress(summary_path.parent / "progress.csv")}
        runs.setdefault(game, {}).setdefault(aux, []).append(run)
    return runs


def read_progress(path: Path) -> dict[str, np.ndarray]:
    """progress.csv's TRAINING_KEYS as (steps, values) arrays with the rows that logged them; {} without the file."""
    if not path.exists():
        return {}
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    series = {}
    for key in TRAINING_KEYS:
        points = [(float(r["time/total_timesteps"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if points:
            series[key] = np.array(points).T
    return series


def aux_order(suite: str, names: Any) -> list[str]:
    """The aux names in the suite's order (none first), then any others found (e.g. from an --override run)."""
    return [a for a in SUITES[suite]["aux"] if a in names] + sorted(set(names) - set(SUITES[suite]["aux"]))


def fmt(mean: float, se: float) -> str:
    """'mean ± se' for the table."""
    return f"{mean:.2f} ± {se:.2f}" if math.isfinite(se) else f"{mean:.2f} (1 seed)"


def aggregate_suite(runs: Runs, suite: str, last: int) -> dict[str, Any]:
    """Final returns (each run's mean over its `last` evaluations; mean, standard error over seeds, change against
    aux=none) per game, aux and split."""
    splits = SUITES[suite]["splits"]
    games: dict[str, Any] = {}
    for game, by_aux in runs.items():
        rows: dict[str, Any] = {}
        for aux in aux_order(suite, by_aux):
            group = by_aux[aux]
            row: dict[str, Any] = {
                "seeds": [r["summary"]["seed"] for r in group],
                "encoder": group[0]["summary"]["encoder"],
                "steps": sorted({r["summary"]["steps"] for r in group}),
                "steps_per_s": mean_and_se([r["summary"]["steps_per_s"] for r in group])[0],
                "wall_time_s": sum(r["summary"]["wall_time_s"] for r in group),
                "aux_metrics": {
                    key: float(np.mean([r["summary"]["aux_metrics"].get(key, np.nan) for r in group]))
                    for key in group[0]["summary"]["aux_metrics"]
                },
            }
            for split in splits:
                finals = [np.mean([v for _, v in r["curves"][split][-last:]]) for r in group if r["curves"].get(split)]
                row[split] = dict(zip(("mean", "se"), mean_and_se(finals))) if finals else None
            rows[aux] = row
        for row in rows.values():
            for split in splits:
                base = rows.get("none", {}).get(split)
                if row[split] is not None and base is not None:
                    row[split]["change_vs_none"] = row[split]["mean"] - base["mean"]
                    row[split]["relative_change_vs_none"] = (
                        (row[split]["mean"] - base["mean"]) / abs(base["mean"]) if base["mean"] != 0 else None
                    )
        games[game] = rows
    return {"suite": suite, "splits": splits, "last_evaluations": last, "games": games}


# the issues' bars (README_rl_evidence.md): (variant, baseline) -> the variant must be >= the baseline within one SE
BARS = (("minc", "none"), ("minc", "spectral"), ("minc-state-action", "none"), ("minc-state-action", "minc"))


def bar_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each BARS comparison present with >= 2 seeds on both sides, per game and split: the difference of the final
    returns' means, its standard error sqrt(SE_a^2 + SE_b^2), and whether the variant is >= the baseline within
    one standard error and above it."""
    checks = []
    for game, rows in result["games"].items():
        for variant, baseline in BARS:
            for split in result["splits"]:
                a, b = (rows.get(name, {}).get(split) for name in (variant, baseline))
                if a is None or b is None or math.isnan(a["se"]) or math.isnan(b["se"]):
                    continue
                difference, se = a["mean"] - b["mean"], math.hypot(a["se"], b["se"])
                checks.append({"game": game, "split": split, "variant": variant, "baseline": baseline,
                               "difference": difference, "se": se, "within_one_se": difference >= -se,
                               "above": difference > 0})
    return checks


def bar_table(checks: list[dict[str, Any]]) -> str:
    """The bar checks as markdown."""
    lines = ["| game | split | comparison | difference ± SE | >= within one SE | above |", "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['game']} | {c['split']} | {c['variant']} vs {c['baseline']} | "
                     f"{fmt(c['difference'], c['se'])} | {'yes' if c['within_one_se'] else 'no'} | "
                     f"{'yes' if c['above'] else 'no'} |")
    return "\n".join(lines) + "\n"


def area_under_curve(run: dict[str, Any]) -> float:
    """A run's area under the learning curve: the mean of all its evaluation returns (splits averaged)."""
    return float(np.mean([np.mean([r for _, r in curve]) for curve in run["curves"].values()]))


def calibration(runs: Runs) -> dict[str, Any]:
    """README_rl_evidence.md's calibration rule: each variant's AUC over aux=none's at the same seed (normalised
    score) per game, and per loss the chosen setting (>= 0.9 on every game, then the best mean; ties within 0.02
    to the cheaper setting, CALIBRATION_SETTINGS' order), once every setting of the loss has run on every game."""
    scores: dict[str, dict[str, float]] = {}
    for game, by_variant in runs.items():
        base = {r["summary"]["seed"]: area_under_curve(r) for r in by_variant.get("none", [])}
        for variant, group in by_variant.items():
            ratios = [area_under_curve(r) / base[r["summary"]["seed"]] for r in group if base.get(r["summary"]["seed"])]
            if ratios:
                scores.setdefault(variant, {})[game] = float(np.mean(ratios))
    choices, missing = {}, {}
    for loss, (_, settings) in CALIBRATED.items():
        candidates = [(name, scores[f"{loss}-{name}"]) for name in settings
                      if set(scores.get(f"{loss}-{name}", {})) == set(runs)]
        if len(candidates) < len(settings):
            if any(f"{loss}-{name}" in scores for name in settings):
                missing[loss] = [name for name in settings if name not in dict(candidates)]
            continue
        qualified = [(name, score) for name, score in candidates if min(score.values()) >= 0.9]
        pool, criterion = (qualified, np.mean) if qualified else (candidates, np.min)
        best = max(criterion(list(score.values())) for _, score in pool)
        chosen = next(name for name, score in pool if criterion(list(score.values())) >= best - 0.02)
        choices[loss] = {"setting": chosen, "overrides": CALIBRATION_SETTINGS[chosen], "met_bar": bool(qualified),
                         "mean_score": float(np.mean(list(scores[f"{loss}-{chosen}"].values())))}
    return {"games": sorted(runs), "normalised_auc": scores, "choices": choices, "missing": missing}


def calibration_table(result: dict[str, Any]) -> str:
    """Every tried setting's normalised AUC per game, and the choice per loss."""
    games = result["games"]
    lines = ["| variant | " + " | ".join(games) + " | mean |", "|---|" + "---|" * (len(games) + 1)]
    for variant, score in result["normalised_auc"].items():
        cells = [f"{score[g]:.2f}" if g in score else "-" for g in games]
        mean = f"{np.mean(list(score.values())):.2f}" if len(score) == len(games) else "-"
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {mean} |")
    notes = [f"chosen for {loss}: {c['setting']} ({' '.join(c['overrides'])}), mean normalised AUC "
             f"{c['mean_score']:.2f}" + ("" if c["met_bar"] else "; no setting kept >= 0.9 of aux=none's AUC on every game")
             for loss, c in result["choices"].items()]
    notes += [f"{loss}: no choice yet; not yet run on every game: {', '.join(names)}"
              for loss, names in result.get("missing", {}).items()]
    return "\n".join(lines) + "\n\nNormalised AUC: mean evaluation return over the run / aux=none's, same seed.\n" + \
        "".join(f"- {note}\n" for note in notes)


def markdown_table(result: dict[str, Any]) -> str:
    """The suite's results as markdown: one row per game and aux, a note on budgets and Cobbe et al. 2020."""
    splits = result["splits"]
    header = ["game", "aux", "seeds", "steps"]
    for split in splits:
        header += [f"{SPLIT_LABELS[split]}: final return", "vs none"]
    header += ["steps/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for game, rows in result["games"].items():
        for aux, row in rows.items():
            cells = [game, aux, str(len(row["seeds"])), "/".join(f"{s:,}" for s in row["steps"])]
            for split in splits:
                value = row[split]
                if value is None:
                    cells += ["-", "-"]
                    continue
                cells.append(fmt(value["mean"], value["se"]))
                relative = value.get("relative_change_vs_none")
                change = value.get("change_vs_none")
                cells.append("-" if change is None or aux == "none" else
                             f"{change:+.2f}" + (f" ({relative:+.0%})" if relative is not None else ""))
            cells.append(f"{row['steps_per_s']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        steps = sorted({s for row in rows.values() for s in row["steps"]})
        if len(steps) > 1:
            notes.append(f"{game}: runs stopped at different step counts ({', '.join(f'{s:,}' for s in steps)}); "
                         "the comparison is not at equal steps.")
        if result["suite"] == "procgen" and steps and max(steps) < COBBE_STEPS:
            encoders = sorted({row["encoder"] for row in rows.values()})
            reference = ", ".join(f"{name} {value}" for name, value in COBBE_TEST_RETURN.items())
            notes.append(
                f"{game}: {max(steps):,} steps per run with the {'/'.join(encoders)} encoder, "
                f"{max(steps) / COBBE_STEPS:.1%} of Cobbe et al. 2020's 25M steps with the IMPALA CNN (PPO, 200 "
                f"levels, easy; unseen-level returns {reference}): early-learning returns, not comparable with theirs."
            )
    notes.append(f"Final return: each run's mean over its last {result['last_evaluations']} evaluations "
                 "(minc_rl.train's eval.episodes episodes per split each), then mean ± standard error over seeds; "
                 "vs none: difference of the means (relative change).")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def plot_band(axis: Any, steps: np.ndarray, values: np.ndarray, label: str, color: str) -> None:
    """Mean over seeds (rows of `values`) against steps, with a shaded standard-error band."""
    mean = values.mean(axis=0)
    se = values.std(axis=0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
    axis.plot(steps, mean, color=color, label=f"{label} ({len(values)} seeds)")
    axis.fill_between(steps, mean - se, mean + se, color=color, alpha=0.25)


def finish_axis(axis: Any, title: str) -> None:
    """Title, step axis in thousands, grid and (when anything was drawn) legend."""
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("environment steps")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
    axis.grid(alpha=0.3)
    if axis.has_data():
        axis.legend(fontsize=8)


def save_figure(figure: Any, path: Path) -> Path:
    """Write the figure atomically as PNG and close it."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(figure)
    return path


def plot_curves(runs: Runs, results: Path, suite: str) -> list[Path]:
    """One PNG per game: evaluation return against steps, mean over seeds with a shaded standard-error band."""
    paths = []
    splits = SUITES[suite]["splits"]
    for game, by_aux in runs.items():
        figure, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
        for axis, split in zip(axes[0], splits):
            for color, aux in enumerate(aux_order(suite, by_aux)):
                group = by_aux[aux]
                curves = [r["curves"][split] for r in group if r["curves"].get(split)]
                if not curves:
                    continue
                length = min(len(c) for c in curves)  # the k-th evaluation of every seed (same steps by construction)
                steps = np.mean([[s for s, _ in c[:length]] for c in curves], axis=0)
                plot_band(axis, steps, np.array([[r for _, r in c[:length]] for c in curves]), aux, f"C{color}")
            finish_axis(axis, f"{suite}:{game}, {SPLIT_LABELS[split]}")
            axis.set_ylabel("episode return")
        paths.append(save_figure(figure, results / f"{suite}_{game}.png"))
    return paths


def plot_training(runs: Runs, results: Path, suite: str) -> list[Path]:
    """One PNG per game: TRAINING_KEYS from the runs' progress.csv against steps, each seed interpolated onto a
    common grid of 50 steps, mean with a shaded standard-error band, one line per aux."""
    paths = []
    for game, by_aux in runs.items():
        figure, axes = plt.subplots(1, len(TRAINING_KEYS), figsize=(5 * len(TRAINING_KEYS), 3.6), squeeze=False)
        for axis, (key, label) in zip(axes[0], TRAINING_KEYS.items()):
            for color, aux in enumerate(aux_order(suite, by_aux)):  # an aux keeps its colour in every panel
                series = [r["progress"][key] for r in by_aux[aux] if key in r["progress"]]
                if not series:
                    continue
                grid = np.linspace(max(s[0, 0] for s in series), min(s[0, -1] for s in series), 50)
                plot_band(axis, grid, np.array([np.interp(grid, s[0], s[1]) for s in series]), aux, f"C{color}")
            finish_axis(axis, label)
        figure.suptitle(f"{suite}:{game}, training")
        paths.append(save_figure(figure, results / f"{suite}_{game}_training.png"))
    return paths


def aggregate(args: argparse.Namespace) -> None:
    """Tables, JSON and learning curves of every suite with copied runs under --results."""
    if args.last < 1:
        raise ValueError(f"--last must be >= 1; got {args.last}")
    found = False
    for suite in SUITES:
        runs = load_runs(args.results, suite)
        if not runs:
            continue
        found = True
        result = aggregate_suite(runs, suite, args.last)
        result["bars"] = bar_checks(result)
        table = markdown_table(result)
        if result["bars"]:
            table += f"\n### The issues' bars\n\n{bar_table(result['bars'])}"
        print(f"## {suite}\n\n{table}")
        atomic_write(args.results / f"{suite}_table.md", lambda tmp: Path(tmp).write_text(f"## {suite}\n\n{table}"))
        text = json.dumps(run_io.finite_or_none(result), indent=2, allow_nan=False) + "\n"
        atomic_write(args.results / f"{suite}.json", lambda tmp: Path(tmp).write_text(text))
        for path in [*plot_curves(runs, args.results, suite), *plot_training(runs, args.results, suite)]:
            print(f"wrote {path}")
        if "none" in {v for by_variant in runs.values() for v in by_variant} and any(
            f"{loss}-{name}" in by_variant for by_variant in runs.values()
            for loss in CALIBRATED for name in CALIBRATION_SETTINGS
        ):
            chosen = calibration(runs)
            text = calibration_table(chosen)
            print(f"## {suite} calibration\n\n{text}")
            atomic_write(args.results / f"{suite}_calibration.md", lambda tmp: Path(tmp).write_text(text))
            data = json.dumps(chosen, indent=2) + "\n"
            atomic_write(args.results / f"{suite}_calibration.json", lambda tmp: Path(tmp).write_text(data))
    if not found:
        raise ValueError(f"no runs under {args.results}: expected <suite>/<game>/<aux>/seed<k>/summary.json "
                         f"for a suite in {', '.join(SUITES)} (written by `run`)")


def shard_spec(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        shard, shards = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N, e.g. 0/3; got {text!r}") from None
    if not 0 <= shard < shards:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N; got {text!r}")
    return shard, shards


def main() -> None:
    """Parse the command line and run a subcommand."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train the suite's runs (resuming unfinished ones)")
    run_parser.add_argument("--suite", choices=list(SUITES), required=True)
    run_parser.add_argument("--steps", type=int, required=True, help="environment steps per run (total_steps)")
    run_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run_parser.add_argument("--evaluations", type=int, default=10,
                            help="evaluations (and checkpoints) per run: eval.every = checkpoint.every = steps / this")
    run_parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                            help="extra minc_rl.train override for every run (repeatable), e.g. n_envs=8")
    run_parser.add_argument("--runs", type=Path, default=RUNS, help="run directories (checkpoints; not committed)")
    run_parser.add_argument("--out", type=Path, default=RESULTS, help="where the small files of each run go")
    run_parser.add_argument("--grid", choices=list(GRIDS), default="aux",
                            help="aux: the suite's aux losses at their defaults; calibration: issue 12's grid (minc, "
                            "spectral); calibration-pairs: issue 16's (minc with aux.pairs=state_action); pairs: "
                            "state-action MINC at the setting its calibration chose (issue 16's final runs)")
    run_parser.add_argument("--variants", nargs="+", metavar="NAME",
                            help="run only these variants of the grid (default: all), e.g. --variants none")
    run_parser.add_argument("--shard", type=shard_spec, default=(0, 1), metavar="I/N",
                            help="run only every N-th job starting at I (parallel processes on disjoint jobs)")
    run_parser.add_argument("--commit", action="store_true", help="git commit each run's copied files as it finishes")
    run_parser.add_argument("--python", default=None, metavar="PATH",
                            help="the interpreter that runs each training (default: this one); a venv with a fixed "
                            "commit installed (not editable) keeps one code version for every run of a comparison")
    aggregate_parser = commands.add_parser("aggregate", help="tables, JSON and learning curves from `run`'s copies")
    aggregate_parser.add_argument("--results", type=Path, default=RESULTS)
    aggregate_parser.add_argument(
        "--last", type=int, default=3, help="final return = mean over each run's last LAST evaluations (less noise)"
    )
    args = parser.parse_args()
    try:
        run(args) if args.command == "run" else aggregate(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
