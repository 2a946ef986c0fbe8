"""Does the MINC auxiliary loss help RL agents? Runs issue 7's sweeps through minc_rl.train and aggregates them.

    python benchmarks/rl_evidence.py run --suite procgen --steps 409600     # PPO starpilot, aux none/minc/spectral
    python benchmarks/rl_evidence.py run --suite minatar --steps 40000      # DQN breakout, space_invaders; none/minc/spectral
    python benchmarks/rl_evidence.py run --suite minatar --steps 6000 --seeds 0 --runs /tmp/r --out /tmp/o  # smoke
    python benchmarks/rl_evidence.py aggregate                              # tables, JSON and plots (--last 3)

`run` starts one `python -m minc_rl.train` process per (env, aux, seed), seed by seed so that an unfinished
benchmark still compares every aux at the seeds it finished, in the run directory <runs>/<suite>/<game>/<aux>/seed<k>
(hydra.run.dir). A run that finished (summary.json, not interrupted, at least --steps steps) is skipped; one with
a checkpoint is resumed (resume=<run dir>); one without a checkpoint starts afresh. Ctrl-C or SIGTERM is passed on
to the run, which writes a checkpoint before it stops: the same command later continues where it stopped. After
each finished run, its config.yaml, summary.json, evaluations.csv and progress.csv (no checkpoints) are copied to
<out>/<suite>/<game>/<aux>/seed<k>.

`aggregate` reads those copies (their env, variant and seed from the layout above) through minc_rl.report, as
`python -m minc_rl.report ... --baseline aux=none` reads run dirs, and writes <out>/<suite>_table.md (also printed:
the report's final returns per game and variant with their difference to aux=none, its IQM and probability of
improvement across games, and the issues' bars), <out>/<suite>.json, the learning curves <out>/<suite>_<game>.png
(evaluation return per split and training-episode return against steps, mean over seeds with a shaded standard-error
band, one line per variant), <out>/<suite>_<game>_training.png (from progress.csv: the aux loss's SCL estimate,
RankMe, Lambda off-diagonal ratio and gradient share, which are what to look at when MINC does not help) and
<out>/<suite>_aggregate_iqm.png, <out>/<suite>_aggregate_improvement.png (rliable's interval plots). The suites' games, aux losses and
shared settings are the study configs configs/train/study/<suite>_aux.yaml; the calibration grids stay here.
How to run the full benchmark, its time budget and how to resume: benchmarks/README_rl_evidence.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from minc_rl.runs import report, run_io
from minc_rl.common.checks import int_at_least, one_line
from minc_rl.common.io import atomic_write
from minc_rl.common.run_dir import RunDirError, RunLock, started_overrides
from minc_rl.runs.train_config import check_command_line, check_jobs
from minc_rl.runs.training import run_finished

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "rl_evidence"
RUNS = ROOT / "outputs" / "rl_evidence"
CALIBRATION_RESULTS = ROOT / "benchmarks" / "results" / "rl_calibration"
STUDIES = ROOT / "configs" / "train" / "study"
COPIED = ("config.yaml", "summary.json", "evaluations.csv", "progress.csv")


def study_suite(suite: str) -> dict[str, Any]:
    """A suite from its study config, configs/train/study/<suite>_aux.yaml: the config-group choices every run
    shares (the study's defaults list: agent, encoder), the games (its env grid) and the aux losses (its aux grid)."""
    study = yaml.safe_load((STUDIES / f"{suite}_aux.yaml").read_text())
    overrides = [f"{key.removeprefix('override /')}={value}" for entry in study["defaults"] for key, value in entry.items()]
    grid = {}
    for key, value in study["hydra"]["sweeper"]["params"].items():
        override = OverridesParser.create().parse_override(f"{key}={value}")  # Hydra's sweep syntax: a,b,c or one
        grid[key] = list(override.sweep_string_iterator()) if override.is_discrete_sweep() else [str(override.value())]
    return {"overrides": overrides, "games": [env.split(":", 1)[1] for env in grid["env"]], "aux": grid["aux"]}


# suite -> the entry point's settings shared by every run, the games and the compared aux losses
SUITES: dict[str, dict[str, Any]] = {suite: study_suite(suite) for suite in ("procgen", "minatar")}
# progress.csv columns of <suite>_<game>_training.png: the auxiliary loss's diagnostics
TRAINING_KEYS = {
    "train/aux_scl_estimate": "SCL plug-in estimate on the aux pairs",
    "train/aux_rankme": "RankMe of the aux embeddings",
    "train/aux_lambda_offdiag_ratio": "Lambda off-diagonal ratio (MINC)",
    "train/aux_grad_share_raw": "aux share of the gradient at the encoder (as the losses give it)",
}
# Cobbe et al. 2020 (PPO, IMPALA CNN, 25M steps, 200 levels, easy): mean test return on unseen levels
COBBE_STEPS = 25_000_000
COBBE_TEST_RETURN = {"coinrun": 8.7, "starpilot": 23.5, "bigfish": 4.7}
Runs = dict[str, dict[str, list[dict[str, Any]]]]  # game -> aux (or variant) -> runs (by_game)
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
GRIDS = {"aux": (), "pairs": (), "td-pairs": (), "representation": (), "replication": (),
         "calibration": ("minc", "spectral"),
         "calibration-pairs": ("minc-state-action",)}
# issue 24: DQN's aux pairs from the TD batch (aux.source=td) against today's replay pairs, at the calibrated shares
TD_PAIRS = {"none": ["aux=none"], "minc": ["aux=minc", "aux.source=replay"], "minc-td": ["aux=minc", "aux.source=td"],
            "spectral-td": ["aux=spectral", "aux.source=td"]}
# issue 25: the representation study's arms (README_representation_study.md); each condition (replay ratio,
# distractors) comes with --override and has its own --runs and --out
REPRESENTATION = {"none": ["aux=none"], "minc": ["aux=minc"],
                  "minc-sa": ["aux=minc", "aux.pairs=state_action", "aux.share=0.1"]}
# issue 39: the positive control, Voelcker et al.'s agent (configs/train/study/selfpred_replication.yaml) with and
# without latent self-prediction (stage 1), MINC as the self-prediction loss with and without a target (stage 2), and
# plain DQN on clean observations (the manipulation check); README_selfpred_replication.md holds the rule
PUBLISHED = "+study=selfpred_replication"
REPLICATION = {"none": [PUBLISHED, "aux=none"], "selfpred": [PUBLISHED, "aux=selfpred"],
               "none-clean": [PUBLISHED, "aux=none", "env_options.distractors.channels=0"],
               "minc-sg": [PUBLISHED, "aux=selfpred", "aux.latent_loss=minc"],
               "minc-free": [PUBLISHED, "aux=selfpred", "aux.latent_loss=minc", "aux.target=none"]}
FIXED_GRIDS = {"td-pairs": TD_PAIRS, "representation": REPRESENTATION, "replication": REPLICATION}  # written out


def calibrated_choice(suite: str, loss: str, results: Path = CALIBRATION_RESULTS) -> list[str]:
    """The overrides of `loss` at the setting its calibration chose (aggregate's <suite>_calibration.json)."""
    path = results / f"{suite}_calibration.json"
    choices = json.loads(path.read_text())["choices"] if path.exists() else {}
    if loss not in choices:
        raise ValueError(f"{path} has no choice for {loss} yet: run its calibration grid and aggregate first")
    return [*CALIBRATED[loss][0], *choices[loss]["overrides"]]


def variants(suite: str, grid: str) -> dict[str, list[str]]:
    """Variant name -> its overrides: the suite's aux losses at their defaults ("aux"), state-action MINC at its
    calibrated setting ("pairs", issue 16's final runs), a grid written out (FIXED_GRIDS: issues 24 and 25), or a
    calibration grid (aux=none and each of the grid's losses at each of its settings)."""
    if grid == "aux":
        return {aux: [f"aux={aux}"] for aux in SUITES[suite]["aux"]}
    if grid == "pairs":
        return {"minc-state-action": calibrated_choice(suite, "minc-state-action")}
    if grid in FIXED_GRIDS:
        return FIXED_GRIDS[grid]
    grid_variants = {"none": ["aux=none"]}
    for loss in GRIDS[grid]:
        loss_overrides, settings = CALIBRATED[loss]
        for name in settings:
            grid_variants[f"{loss}-{name}"] = [*loss_overrides, *CALIBRATION_SETTINGS[name]]
    return grid_variants


def train_command(
    suite: str, game: str, overrides: list[str], seed: int, run_dir: Path, args: argparse.Namespace
) -> list[str]:
    """The minc_rl.train command line of one run: fresh, or resume=run_dir when it has a checkpoint."""
    every = max(args.steps // args.evaluations, 1)
    python = [args.python, "-P"] if args.python else [sys.executable]  # -P: the checkout's minc_rl stays off sys.path
    settings = [f"env={suite}:{game}", *SUITES[suite]["overrides"], *overrides]
    settings += [f"seed={seed}", f"total_steps={args.steps}", f"eval.every={every}", f"checkpoint.every={every}"]
    settings += args.override
    resume = []
    if run_io.latest_checkpoint(run_dir) is not None:
        # the run's own overrides are in its saved config; older code versions refuse a +group one on resume
        started_with = set(started_overrides(run_dir))
        settings = [setting for setting in settings if setting not in started_with]
        resume = [f"resume={run_dir}"]
    return [*python, "-m", "minc_rl.train", *settings, f"hydra.run.dir={run_dir}", *resume]


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


def run_or_stop(name: str, command: list[str]) -> None:
    """run_training(command); if it fails, say so (a stop: run the same command again) and exit with its code."""
    returncode = run_training(command)
    if returncode != 0:
        advice = "run the same command again to continue" if returncode > 128 else "see the error above"
        print(f"{name}: stopped (exit code {returncode}); {advice}", flush=True)
        raise SystemExit(returncode)


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
    shard: tuple[int, int], games: list[str] | None = None,
) -> list[tuple[str, str, int]]:
    """This shard's (game, variant, seed) jobs, seed by seed, of the grid's variants (all, or only those named) on
    the suite's games (all, or only those named)."""
    unknown = sorted(set(only or []) - set(grid))
    if unknown:
        raise ValueError(f"--variants {' '.join(unknown)}: not in the {grid_name} grid; choose from {', '.join(grid)}")
    unknown = sorted(set(games or []) - set(SUITES[suite]["games"]))
    if unknown:
        raise ValueError(f"--games {' '.join(unknown)}: not in the {suite} suite; choose from "
                         f"{', '.join(SUITES[suite]['games'])}")
    names = [name for name in grid if not only or name in only]
    chosen = [game for game in SUITES[suite]["games"] if not games or game in games]
    jobs = [(game, name, seed) for seed in seeds for game in chosen for name in names]
    index, count = shard
    return jobs[index::count]


def check_before_training(args: argparse.Namespace, grid: dict[str, list[str]], jobs: list[tuple[str, str, int]]) -> None:
    """Exit 2 with one line before the first run when a path is unusable or minc_rl.train would refuse a job's
    settings (its own checks, here), rather than hours later or at the first run's start."""
    for option, path in (("--runs", args.runs), ("--out", args.out)):
        if path.exists() and not path.is_dir():
            raise ValueError(f"{option} {path}: a file, not a directory")
    if args.python is not None and not (Path(args.python).is_file() and os.access(args.python, os.X_OK)):
        raise ValueError(f"--python {args.python}: no such executable")
    settings = []
    for game, aux, seed in jobs:
        command = train_command(args.suite, game, grid[aux], seed, args.runs / "check", args)
        settings.append([arg for arg in command[command.index("minc_rl.train") + 1:] if not arg.startswith("hydra.")])
    try:
        check_jobs([check_command_line(job) for job in settings])  # valid_keys starts Hydra afresh: not inside
    except HydraException as error:  # an --override Hydra cannot parse or compose
        raise ValueError(f"--override: {one_line(error)}") from None


def run(args: argparse.Namespace) -> None:
    """Train every (seed, game, variant) of the suite and grid that has not finished (this shard's share of them),
    and copy each finished run's small files (and commit them with --commit)."""
    grid = variants(args.suite, args.grid)
    jobs = select_jobs(args.suite, args.grid, grid, args.seeds, args.variants, args.shard, args.games)
    check_before_training(args, grid, jobs)
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
            run_or_stop(name, command)
        copy_dir.mkdir(parents=True, exist_ok=True)
        for filename in COPIED:
            shutil.copyfile(run_dir / filename, copy_dir / filename)
        if args.commit:
            commit_copies([copy_dir], f"rl_evidence ({args.out}): {args.suite}:{game} {aux} seed {seed} "
                                      f"({args.steps:,} steps)")
    print(f"done; tables and plots: python benchmarks/rl_evidence.py aggregate --results {args.out}", flush=True)


def load_runs(results: Path, suite: str) -> list[report.Run]:
    """The runs `run` copied for `suite`, their settings from the layout <suite>/<game>/<variant>/seed<k> (env, aux:
    the variant, seed), as the copies of older runs carry no config.yaml."""
    return [report.load_run(path.parent, {"env": f"{suite}:{path.parts[-4]}", "aux": path.parts[-3],
                                          "seed": int(path.parts[-2].removeprefix("seed"))})
            for path in sorted((results / suite).glob("*/*/seed*/evaluations.csv"))]


def by_game(runs: list[report.Run]) -> Runs:
    """game -> variant -> runs as calibration() reads them: the summary and each split's (step, return) points."""
    grouped: Runs = {}
    for run in runs:
        curves = {split: list(zip(rows["step"].tolist(), rows["return_mean"].tolist()))
                  for split, rows in run.evaluations.groupby("split", sort=False)}
        game = grouped.setdefault(run.env.split(":", 1)[1], {})
        game.setdefault(run.settings["aux"], []).append({"summary": run.summary, "curves": curves})
    return grouped


# the issues' bars (README_rl_evidence.md): (variant, baseline) -> the variant must be >= the baseline within one SE
BARS = (("minc", "none"), ("minc", "spectral"), ("minc-state-action", "none"), ("minc-state-action", "minc"))


def bar_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each BARS comparison present with >= 2 seeds on both sides, per game and split (result: game -> variant ->
    split -> mean and se): the difference of the final returns' means, its standard error sqrt(SE_a^2 + SE_b^2),
    and whether the variant is >= the baseline within one standard error and above it."""
    checks = []
    for game, rows in result["games"].items():
        for variant, baseline in BARS:
            for split in result["splits"]:
                a, b = (rows.get(name, {}).get(split) for name in (variant, baseline))
                if a is None or b is None or math.isnan(a["se"]) or math.isnan(b["se"]):
                    continue
                change = report.difference(a, b)
                checks.append({"game": game, "split": split, "variant": variant, "baseline": baseline,
                               "difference": change["difference"], "se": change["se"],
                               "within_one_se": change["difference"] >= -change["se"], "above": change["difference"] > 0})
    return checks


def bar_table(checks: list[dict[str, Any]]) -> str:
    """The bar checks as markdown."""
    lines = ["| game | split | comparison | difference ± SE | >= within one SE | above |", "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['game']} | {c['split']} | {c['variant']} vs {c['baseline']} | "
                     f"{report.fmt(c['difference'], c['se'])} | {'yes' if c['within_one_se'] else 'no'} | "
                     f"{'yes' if c['above'] else 'no'} |")
    return "\n".join(lines) + "\n"


def suite_bars(result: dict[str, Any]) -> list[dict[str, Any]]:
    """bar_checks on the report's final returns (its arms 'aux=<variant>')."""
    games = {env.split(":", 1)[1]: {arm.removeprefix("aux="): row["splits"] for arm, row in table["arms"].items()}
             for env, table in result["envs"].items()}
    splits = list(dict.fromkeys(split for table in result["envs"].values() for split in table["splits"]))
    return bar_checks({"games": games, "splits": splits})


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


def cobbe_notes(runs: list[report.Run]) -> list[str]:
    """procgen: how far each game's runs are from Cobbe et al. 2020's 25M steps with the IMPALA CNN."""
    notes = []
    for env, env_runs in report.by_env(runs).items():
        steps = max(run.summary.get("steps", 0) for run in env_runs)
        if env.startswith("procgen:") and steps < COBBE_STEPS:
            encoders = "/".join(sorted({str(run.summary.get("encoder")) for run in env_runs}))
            reference = ", ".join(f"{name} {value}" for name, value in COBBE_TEST_RETURN.items())
            notes.append(f"{env}: {steps:,} steps per run with the {encoders} encoder, {steps / COBBE_STEPS:.1%} of "
                         f"Cobbe et al. 2020's 25M steps with the IMPALA CNN (PPO, 200 levels, easy; unseen-level "
                         f"returns {reference}): early-learning returns, not comparable with theirs.")
    return notes


def aggregate_suite(runs: list[report.Run], results: Path, suite: str, last: int, reps: int) -> str:
    """The report of one suite's runs (baseline aux=none) with the issues' bars: writes <suite>_table.md,
    <suite>.json and the plots; returns the table."""
    result = report.analyse(runs, baseline=["aux=none"], last=last, reps=reps)
    result["bars"] = suite_bars(result)
    table = f"## {suite}\n\n{report.final_return_table(result)}" + "".join(f"- {note}\n" for note in cobbe_notes(runs))
    table += f"\n### Across games\n\n{report.aggregate_markdown(result)}"
    if result["bars"]:
        table += f"\n### The issues' bars\n\n{bar_table(result['bars'])}"
    atomic_write(results / f"{suite}_table.md", lambda tmp: Path(tmp).write_text(table))
    text = json.dumps(run_io.finite_or_none(result), indent=2, allow_nan=False) + "\n"
    atomic_write(results / f"{suite}.json", lambda tmp: Path(tmp).write_text(text))
    colors = report.arm_colors(result)
    figures = {f"{suite}_{name}": figure for name, figure in report.aggregate_figures(result, colors).items()}
    for env, arms in report.group(runs, report.arm_keys(runs), result["baseline"]).items():
        name = f"{suite}_{env.split(':', 1)[1]}"
        figures[name] = report.returns_figure(env, arms, result["envs"][env]["splits"], colors)
        figures[f"{name}_training"] = report.progress_figure(arms, TRAINING_KEYS, colors, f"{env}: training")
    for name, figure in figures.items():
        if figure is not None:
            print(f"wrote {report.save_figure(figure, results / f'{name}.png')}")
    return table


def aggregate(args: argparse.Namespace) -> None:
    """Tables, JSON and learning curves of every suite with copied runs under --results, and the calibration's."""
    found = False
    for suite in SUITES:
        runs = load_runs(args.results, suite)
        if not runs:
            continue
        found = True
        print(aggregate_suite(runs, args.results, suite, args.last, args.reps))
        grouped = by_game(runs)
        if "none" in {v for by_variant in grouped.values() for v in by_variant} and any(
            f"{loss}-{name}" in by_variant for by_variant in grouped.values()
            for loss in CALIBRATED for name in CALIBRATION_SETTINGS
        ):
            chosen = calibration(grouped)
            text = calibration_table(chosen)
            print(f"## {suite} calibration\n\n{text}")
            atomic_write(args.results / f"{suite}_calibration.md", lambda tmp: Path(tmp).write_text(text))
            data = json.dumps(chosen, indent=2) + "\n"
            atomic_write(args.results / f"{suite}_calibration.json", lambda tmp: Path(tmp).write_text(data))
    if not found:
        raise ValueError(f"no runs under {args.results}: expected <suite>/<game>/<aux>/seed<k>/evaluations.csv "
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
    run_parser.add_argument("--steps", type=int_at_least(1), required=True, help="environment steps per run (total_steps)")
    run_parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2])
    run_parser.add_argument("--evaluations", type=int_at_least(1), default=10,
                            help="evaluations (and checkpoints) per run: eval.every = checkpoint.every = steps / this")
    run_parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                            help="extra minc_rl.train override for every run (repeatable), e.g. n_envs=8")
    run_parser.add_argument("--runs", type=Path, default=RUNS, help="run directories (checkpoints; not committed)")
    run_parser.add_argument("--out", type=Path, default=RESULTS, help="where the small files of each run go")
    run_parser.add_argument("--grid", choices=list(GRIDS), default="aux",
                            help="aux: the suite's aux losses at their defaults; calibration: issue 12's grid (minc, "
                            "spectral); calibration-pairs: issue 16's (minc with aux.pairs=state_action); pairs: "
                            "state-action MINC at the setting its calibration chose (issue 16's final runs); "
                            "td-pairs: issue 24's; representation: issue 25's arms (the condition via --override)")
    run_parser.add_argument("--variants", nargs="+", metavar="NAME",
                            help="run only these variants of the grid (default: all), e.g. --variants none")
    run_parser.add_argument("--games", nargs="+", metavar="GAME",
                            help="run only these games of the suite (default: all), e.g. --games space_invaders")
    run_parser.add_argument("--shard", type=shard_spec, default=(0, 1), metavar="I/N",
                            help="run only every N-th job starting at I (parallel processes on disjoint jobs)")
    run_parser.add_argument("--commit", action="store_true", help="git commit each run's copied files as it finishes")
    run_parser.add_argument("--python", default=None, metavar="PATH",
                            help="the interpreter that runs each training (default: this one); a venv with a fixed "
                            "commit installed (not editable) keeps one code version for every run of a comparison")
    aggregate_parser = commands.add_parser("aggregate", help="tables, JSON and learning curves from `run`'s copies")
    aggregate_parser.add_argument("--results", type=Path, default=RESULTS)
    aggregate_parser.add_argument(
        "--last", type=int_at_least(1), default=3, help="final return = mean over each run's last LAST evaluations (less noise)"
    )
    aggregate_parser.add_argument("--reps", type=int_at_least(1), default=2000, help="bootstrap resamples of the IQM and "
                                  "probability-of-improvement intervals (minc_rl.report's --reps)")
    args = parser.parse_args()
    try:
        run(args) if args.command == "run" else aggregate(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
