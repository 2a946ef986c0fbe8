"""The answer of an aux-loss study from the run directories of `python -m minc_rl.train`: the body of
`python -m minc_rl.report <sweep or run dirs> --baseline aux=none`, and find_runs / analyse / write_report for scripts.

Every directory holding evaluations.csv at or under the given paths is a run (with its config.yaml, progress.csv
and summary.json). Runs are grouped by env and by arm: the settings that differ between runs of one env, other
than the seed and bookkeeping such as resume= (BOOKKEEPING). It writes to --out (default: <the one path>/report):

    report.md, report.json   per env and arm: the final return, mean ± standard error over seeds, and its difference
                             to the baseline arm, and the final encoder health (when measured); across envs: the interquartile mean (IQM) of the score normalised
                             per env with 95% stratified-bootstrap intervals, and the probability of improvement over
                             the baseline arm (Agarwal et al. 2021, computed by rliable)
    <env>_returns.png        evaluation return per split and training-episode return against steps
    <env>_aux.png            progress.csv's train/aux_* columns; <env>_health.png: its health/* columns
    aggregate_iqm.png, aggregate_improvement.png   rliable's interval plots

The curves are the mean over seeds with a shaded standard-error band. docs/report.md defines each number.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  rliable's plots draw with pyplot
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.errors import OverrideParseException  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from rliable import library as rly  # noqa: E402
from rliable import metrics, plot_utils  # noqa: E402

from minc_rl.runs import run_io  # noqa: E402
from minc_rl.common.checks import one_line  # noqa: E402
from minc_rl.common.run_dir import writable_problem  # noqa: E402
from minc_rl.common.io import atomic_write  # noqa: E402

# rliable imports absl.logging, whose handler binds the sys.stderr of that moment; logging.config.dictConfig (Hydra's
# logging set-up) closes every handler ever made, and absl's closes its stream unless it is the process's own: a
# redirected stderr (pytest's capture, a caller's) would be closed under them. Bound to the process's stderr it is not.
absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)

# top-level config keys that never make an arm: the run's identity within an arm and how it was run
BOOKKEEPING = ("seed", "env", "resume", "wandb", "progress_bar", "torch_threads")
SPLITS = ("unseen_levels", "test")  # the split scored across envs, first found (procgen: unseen levels)
NORMALISATIONS = ("baseline", "minmax", "none")
TRAINING_RETURN = "rollout/ep_rew_mean"
PROGRESS_PANELS = {"aux": "train/aux_", "health": "health/"}  # <env>_<name>.png: progress.csv columns by prefix
UNSET = "(unset)"  # a setting a run's config.yaml lacks (written by an older version)
PAIR = " vs "  # rliable's probability-of-improvement plot names the pair "X vs Y"
MIN_SEEDS = 2  # per arm, for a bootstrap interval: one run resampled is always itself


class ReportError(ValueError):
    """Input the report cannot use; the message is one line for the user."""


@dataclass(frozen=True)
class Run:
    """One run directory: its settings (config.yaml as dotted keys), evaluations, progress.csv and summary.json."""

    path: Path
    settings: dict[str, Any]
    evaluations: pd.DataFrame  # run_io.EVALUATION_FIELDS, rows in step order
    progress: pd.DataFrame  # empty without progress.csv
    summary: dict[str, Any]

    @property
    def env(self) -> str:
        """The run's env spec."""
        return str(self.settings["env"])

    def final_return(self, split: str, last: int) -> float | None:
        """The mean of the last `last` evaluation returns on `split` (None: never evaluated there)."""
        returns = self.evaluations.loc[self.evaluations["split"] == split, "return_mean"]
        return float(np.mean(returns.iloc[-last:])) if len(returns) else None

    def curve(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation return on `split` against steps."""
        rows = self.evaluations[self.evaluations["split"] == split]
        return rows["step"].to_numpy(float), rows["return_mean"].to_numpy(float)

    def progress_curve(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """A progress.csv column against steps, on the rows that logged it."""
        if column not in self.progress or run_io.STEP_COLUMN not in self.progress:
            return np.empty(0), np.empty(0)
        rows = self.progress[[run_io.STEP_COLUMN, column]].dropna()
        return rows[run_io.STEP_COLUMN].to_numpy(float), rows[column].to_numpy(float)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys; a list becomes its JSON text (hashable)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def load_run(path: str | Path, settings: dict[str, Any] | None = None) -> Run:
    """The run in `path`, its settings from config.yaml unless given (rl_evidence's copies have no config.yaml)."""
    path = Path(path)
    try:
        if settings is None:
            if not (path / "config.yaml").is_file():
                what = "holds evaluations.csv but no config.yaml" if (path / "evaluations.csv").is_file() else (
                    "holds no evaluations.csv" if path.is_dir() else "is no directory")
                raise ReportError(f"{path} {what}: not a run directory of minc_rl.train")
            settings = flatten(yaml.safe_load((path / "config.yaml").read_text()))
        evaluations = pd.DataFrame(run_io.read_evaluations(path / "evaluations.csv"), columns=run_io.EVALUATION_FIELDS)
        evaluations = evaluations.astype({"step": int, "return_mean": float})
        progress_path = path / "progress.csv"
        progress = pd.read_csv(progress_path) if progress_path.is_file() and progress_path.stat().st_size else pd.DataFrame()
        summary = run_io.read_summary(path / "summary.json")
    except ReportError:
        raise
    except Exception as error:  # noqa: BLE001  a damaged file raises anything
        raise ReportError(f"{path}: cannot read its files ({one_line(error)})") from None
    missing = [key for key in ("env", "seed") if key not in settings]
    if missing:
        raise ReportError(f"{path}: its config has no {' or '.join(missing)}")
    bad = evaluations[~np.isfinite(evaluations["return_mean"])]
    if len(bad):  # a mean over the others would silently change the arm's number
        step, split, value = bad.iloc[0][["step", "split", "return_mean"]]
        raise ReportError(f"{path / 'evaluations.csv'}: the evaluation return at step {step} on {split} is {value} (of "
                          f"{len(bad)} non-finite in all); the report takes no mean without it: repair or remove "
                          "that run, or report the other directories")
    return Run(path, settings, evaluations, progress, summary)


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run directory (one holding evaluations.csv) at or under `paths`."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path}: no such directory")
        found += sorted(file.parent for file in path.rglob("evaluations.csv"))
    if not found:
        raise ReportError(f"no run directories (a directory with evaluations.csv) under {', '.join(map(str, paths))}")
    return [load_run(path) for path in dict.fromkeys(found)]


def arm_keys(runs: Sequence[Run]) -> list[str]:
    """The settings that differ between runs of one env, other than BOOKKEEPING: what makes an arm."""
    keys: set[str] = set()
    for env_runs in by_env(runs).values():
        for key in set().union(*(run.settings for run in env_runs)) - keys:
            if key.split(".")[0] not in BOOKKEEPING and len({run.settings.get(key, UNSET) for run in env_runs}) > 1:
                keys.add(key)
    return sorted(keys)


def by_env(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The runs by env, envs in sorted order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.env, []).append(run)
    return dict(sorted(groups.items()))


def short_key(key: str) -> str:
    """A config group's choice as the command line writes it (aux.name -> aux)."""
    return key.removesuffix(".name") if key.count(".") == 1 and key.endswith(".name") else key


def setting_text(value: Any) -> str:
    """A setting's value as the command line writes it (null, true, false, 0.1, minc)."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def inert(key: str, settings: dict[str, Any]) -> bool:
    """Whether `key` is a setting of a config group chosen as none (aux.share under aux=none): it changes nothing."""
    group = key.split(".")[0]
    return key != f"{group}.name" and settings.get(f"{group}.name") == "none"


def arm_label(settings: dict[str, Any], keys: Sequence[str]) -> str:
    """The arm of `settings` as the command line writes it, e.g. 'aux=minc aux.share=0.1' ('all' without keys);
    the settings of a group chosen as none are left out ('aux=none', not 'aux=none aux.share=0.01')."""
    return " ".join(f"{short_key(key)}={setting_text(settings.get(key, UNSET))}"
                    for key in keys if not inert(key, settings)) or "all"


def baseline_arm(spec: Sequence[str], runs: Sequence[Run], keys: Sequence[str]) -> str:
    """The one arm whose settings match `spec` (KEY=VALUE in Hydra's override syntax; aux=none means aux.name=none)."""
    text = " ".join(spec)
    arms = sorted({arm_label(run.settings, keys) for run in runs})
    try:
        overrides = OverridesParser.create().parse_overrides(list(spec))
    except OverrideParseException as error:
        raise ReportError(f"--baseline {text}: {one_line(error)}; give KEY=VALUE, e.g. aux=none") from None
    wanted = {}
    for override in overrides:
        key = override.key_or_group
        key = key if key in keys else f"{key}.name"
        if key not in keys:
            differ = ", ".join(map(short_key, keys)) or "nothing (there is one arm)"
            raise ReportError(f"--baseline {text}: the arms do not differ by {override.key_or_group}; they differ by {differ}")
        wanted[key] = override.value()
    matches = sorted({arm_label(run.settings, keys) for run in runs
                      if all(run.settings.get(key, UNSET) == value for key, value in wanted.items())})
    if len(matches) != 1:
        found = "no arm matches" if not matches else f"{len(matches)} arms match ({'; '.join(matches)}): add a setting"
        raise ReportError(f"--baseline {text}: {found}; the arms are: {'; '.join(arms)}")
    return matches[0]


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN standard error for one value)."""
    array = np.asarray(values, dtype=float)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else math.nan
    return float(array.mean()), se


def difference(value: dict[str, float], baseline: dict[str, float]) -> dict[str, float | None]:
    """mean - baseline mean, its standard error sqrt(SE^2 + SE_baseline^2) and the relative change (None at 0)."""
    change = value["mean"] - baseline["mean"]
    return {"difference": change, "se": math.hypot(value["se"], baseline["se"]),
            "relative": change / abs(baseline["mean"]) if baseline["mean"] != 0 else None}


def group(runs: Sequence[Run], keys: Sequence[str], baseline: str) -> dict[str, dict[str, list[Run]]]:
    """env -> arm -> its runs in seed order; the baseline arm first, then the arms in sorted order. Two runs of one
    arm and seed on an env (the same sweep run twice, say) are an error: which one counts is the user's choice."""
    arms = sorted({arm_label(run.settings, keys) for run in runs}, key=lambda arm: (arm != baseline, arm))
    grouped: dict[str, dict[str, list[Run]]] = {}
    for env, env_runs in by_env(runs).items():
        labels = [arm_label(run.settings, keys) for run in env_runs]
        grouped[env] = {arm: sorted((r for r, label in zip(env_runs, labels) if label == arm), key=lambda r: r.settings["seed"])
                        for arm in arms if arm in labels}
        for arm, arm_runs in grouped[env].items():
            for first, second in zip(arm_runs, arm_runs[1:]):
                if first.settings["seed"] == second.settings["seed"]:
                    raise ReportError(
                        f"{env}, {arm}: two runs of seed {first.settings['seed']} ({first.path} and {second.path}); "
                        "report one of them (give the directories to report, or move the other away)")
    return grouped


def env_table(arms: dict[str, list[Run]], baseline: str, last: int) -> dict[str, Any]:
    """One env's arms: per split the final returns by seed, their mean ± SE and the difference to the baseline arm."""
    splits = list(dict.fromkeys(split for runs in arms.values() for run in runs for split in run.evaluations["split"]))
    rows: dict[str, Any] = {}
    for arm, runs in arms.items():
        speeds = [run.summary["steps_per_s"] for run in runs if run.summary.get("steps_per_s") is not None]
        row: dict[str, Any] = {
            "seeds": [run.settings["seed"] for run in runs],
            "steps": sorted({int(run.evaluations["step"].iloc[-1]) for run in runs if len(run.evaluations)}),
            "steps_per_s": float(np.mean(speeds)) if speeds else None,
            "runs": [str(run.path) for run in runs],
            "splits": {},
        }
        for split in splits:
            finals = {run.settings["seed"]: run.final_return(split, last) for run in runs}
            finals = {seed: value for seed, value in finals.items() if value is not None}
            if finals:
                row["splits"][split] = dict(zip(("mean", "se"), mean_and_se(list(finals.values()))), final_returns=finals)
        rows[arm] = row
        row["health"] = final_health(runs)
    base = rows.get(baseline, {}).get("splits", {})
    for arm, row in rows.items():
        for split, value in row["splits"].items():
            if arm != baseline and split in base:
                value["vs_baseline"] = difference(value, base[split])
    return {"splits": splits, "arms": rows}


def final_health(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per health metric of summary.json (the last measurement of each run): mean ± SE over the runs that have it."""
    by_metric: dict[str, dict[Any, float]] = {}
    for run in runs:
        for metric, value in (run.summary.get("health") or {}).items():
            if value is not None:
                by_metric.setdefault(metric, {})[run.settings["seed"]] = float(value)
    return {metric: dict(zip(("mean", "se"), mean_and_se(list(values.values()))), values=values)
            for metric, values in by_metric.items()}


def normaliser(finals: dict[str, dict[Any, float]], baseline: str, how: str, env: str) -> Callable[[float], float]:
    """The per-env score: the final return over the baseline arm's mean (`baseline`), min-max over every run of the
    env (`minmax`) or as it is (`none`)."""
    if how == "baseline":
        scale = float(np.mean(list(finals[baseline].values())))
        if scale <= 0:
            raise ReportError(f"{env}: the baseline arm's mean final return is {scale:.4g}; dividing by it needs a "
                              "positive mean: use --normalise minmax")
        return lambda score: score / scale
    if how == "minmax":
        every = [value for by_seed in finals.values() for value in by_seed.values()]
        low, high = min(every), max(every)
        if high == low:
            raise ReportError(f"{env}: every run has the final return {low:.4g}; min-max needs two values: use --normalise none")
        return lambda score: (score - low) / (high - low)
    return lambda score: score


def iqm_difference(scores: np.ndarray, baseline_scores: np.ndarray) -> float:
    """IQM(arm) - IQM(baseline) of two (runs x envs) score matrices."""
    return float(metrics.aggregate_iqm(scores) - metrics.aggregate_iqm(baseline_scores))


def aggregate(tables: dict[str, dict[str, Any]], baseline: str, splits: Sequence[str], normalise: str, reps: int,
              seed: int) -> dict[str, Any]:
    """Across envs: per arm the IQM of the normalised final returns (runs x envs), the difference of its IQM and the
    baseline arm's, and its probability of improvement over the baseline arm, each with 95% stratified-bootstrap
    intervals (the two arms resampled independently for the difference) (rliable, `reps` resamples, numpy seeded
    with `seed`). An env enters where the baseline arm has runs; an arm enters with the seeds it has on every env."""
    scored, scores, notes = {}, {}, []
    for env, table in tables.items():
        split = next((s for s in splits if s in table["splits"]), None)
        if split is None and table["splits"]:
            raise ReportError(f"--split {' '.join(splits)}: {env} has the splits {', '.join(table['splits'])}")
        finals = {arm: row["splits"][split]["final_returns"] for arm, row in table["arms"].items() if split in row["splits"]}
        if baseline not in finals:
            notes.append(f"{env} is left out: the baseline arm has no runs there")
            continue
        scored[env] = split
        score = normaliser(finals, baseline, normalise, env)
        for arm, by_seed in finals.items():
            scores.setdefault(arm, {})[env] = {s: score(value) for s, value in by_seed.items()}
    matrices, used = {}, {}
    for arm, by_env_scores in scores.items():
        seeds = sorted(set.intersection(*(set(by_seed) for by_seed in by_env_scores.values())))
        if set(by_env_scores) != set(scored) or not seeds:
            notes.append(f"{arm} is left out: it has no seed run on every env ({', '.join(scored)})")
            continue
        if any(len(by_seed) > len(seeds) for by_seed in by_env_scores.values()):
            notes.append(f"{arm}: seeds {', '.join(map(str, seeds))} only, those run on every env")
        matrices[arm], used[arm] = np.array([[by_env_scores[env][s] for env in scored] for s in seeds]), seeds
    if baseline not in matrices:
        return {"envs": scored, "normalise": normalise, "reps": reps, "arms": {}, "notes": notes}
    state = np.random.get_state()
    np.random.seed(seed)  # rliable's stratified bootstrap draws from numpy's global generator
    try:
        iqm, iqm_ci = rly.get_interval_estimates(matrices, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps)
        pairs = {arm: (matrix, matrices[baseline]) for arm, matrix in matrices.items() if arm != baseline}
        poi, poi_ci = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps)
        gap, gap_ci = rly.get_interval_estimates(pairs, iqm_difference, reps=reps)
    finally:
        np.random.set_state(state)
    def interval(values: np.ndarray, *arms_in: str) -> list[float] | None:
        """A bootstrap interval, or None where an arm has one seed: resampling one run gives a zero-width interval."""
        return [float(v) for v in np.ravel(values)] if all(len(matrices[a]) >= MIN_SEEDS for a in arms_in) else None

    arms = {arm: {"runs_per_env": len(matrix), "seeds": used[arm], "iqm": float(iqm[arm][0]),
                  "iqm_ci": interval(iqm_ci[arm][:, 0], arm)}
            for arm, matrix in matrices.items()}
    for arm in pairs:
        arms[arm].update(probability_of_improvement=float(poi[arm]), probability_of_improvement_ci=interval(poi_ci[arm], arm, baseline),
                         iqm_difference=float(gap[arm]), iqm_difference_ci=interval(gap_ci[arm], arm, baseline))
    few = [arm for arm, matrix in matrices.items() if len(matrix) < MIN_SEEDS]
    if few:
        notes.append(f"{', '.join(few)}: one seed per env, so no 95% interval (it needs >= {MIN_SEEDS} seeds per arm); "
                     "their values are single runs, not estimates with an uncertainty")
    return {"envs": scored, "normalise": normalise, "reps": reps, "arms": arms, "notes": notes}


def analyse(runs: Sequence[Run], baseline: Sequence[str] | None = None, last: int = 3, normalise: str = "baseline",
            splits: Sequence[str] = SPLITS, reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The report's numbers: the arms, per env the final-return table, and the aggregate across envs."""
    if not runs:
        raise ReportError("no runs to report (find_runs gives the runs under run or sweep directories)")
    if any(not isinstance(value, int) or isinstance(value, bool) or value < 1 for value in (last, reps)):
        raise ReportError(f"--last and --reps must be integers >= 1; got {last!r} and {reps!r}")
    if not 0 <= seed < 2**32:
        raise ReportError(f"--seed must be in [0, 2**32 - 1] (numpy's seeds); got {seed}")
    if normalise not in NORMALISATIONS:
        raise ReportError(f"--normalise {normalise}: choose one of {', '.join(NORMALISATIONS)}")
    keys = arm_keys(runs)
    if baseline:
        base = baseline_arm(baseline, runs, keys)
    elif keys:
        arms = "; ".join(sorted({arm_label(run.settings, keys) for run in runs}))
        raise ReportError(f"the runs form several arms ({arms}): name one with --baseline KEY=VALUE")
    else:
        base = arm_label({}, keys)
    grouped = group(runs, keys, base)
    tables = {env: env_table(arms, base, last) for env, arms in grouped.items()}
    return {
        "runs": len(runs),
        "arm_keys": [short_key(key) for key in keys],
        "baseline": base,
        "arms": list(dict.fromkeys(arm for arms in grouped.values() for arm in arms)),
        "last_evaluations": last,
        "envs": tables,
        "aggregate": aggregate(tables, base, splits, normalise, reps, seed),
    }


def fmt(mean: float, se: float, digits: int = 2) -> str:
    """'mean ± se' ('mean (1 seed)' without a standard error), with `digits` decimals."""
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f} (1 seed)"


def fmt_change(change: dict[str, Any]) -> str:
    """'+0.12 ± 0.30 (+5%)': a difference to the baseline arm."""
    text = f"{change['difference']:+.2f}" + (f" ± {change['se']:.2f}" if math.isfinite(change["se"]) else "")
    return text + (f" ({change['relative']:+.0%})" if change["relative"] is not None else "")


def fmt_interval(point: float, interval: list[float] | None) -> str:
    """'0.95 [0.80, 1.10]'; without an interval (one seed) '0.95 [no interval: 1 seed]'."""
    if interval is None:
        return f"{point:.2f} [no interval: 1 seed]"
    return f"{point:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def env_markdown(env: str, table: dict[str, Any]) -> list[str]:
    """The rows of one env in the per-env table (SPLIT columns: final return and vs baseline)."""
    lines = []
    for arm, row in table["arms"].items():
        cells = [env, arm, str(len(row["seeds"])), "/".join(f"{s:,}" for s in row["steps"])]
        for split in table["splits"]:
            value = row["splits"].get(split)
            cells += ["-", "-"] if value is None else [fmt(value["mean"], value["se"]),
                                                       fmt_change(value["vs_baseline"]) if "vs_baseline" in value else "-"]
        cells.append("-" if row["steps_per_s"] is None else f"{row['steps_per_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def final_return_table(result: dict[str, Any]) -> str:
    """Per env and arm the final return on each split (one table per set of splits), with its definition."""
    by_splits: dict[tuple[str, ...], list[str]] = {}
    for env, table in result["envs"].items():
        by_splits.setdefault(tuple(table["splits"]), []).extend(env_markdown(env, table))
    parts = []
    for splits, rows in by_splits.items():
        header = ["env", "arm", "seeds", "steps", *(f"{s}{c}" for s in splits for c in (": final return", ": vs baseline")), "steps/s"]
        parts.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]))
    notes = [f"Final return: each run's mean over its last {result['last_evaluations']} evaluations, then mean ± "
             "standard error over seeds. vs baseline: the difference of the means ± sqrt(SE^2 + SE_baseline^2) "
             "(relative change). steps: each run's last evaluation."]
    for env, table in result["envs"].items():
        steps = sorted({s for row in table["arms"].values() for s in row["steps"]})
        if len(steps) > 1:
            notes.append(f"{env}: runs stopped at different steps ({', '.join(f'{s:,}' for s in steps)}); "
                         "the comparison is not at equal steps.")
    return "\n\n".join(parts) + "\n\n" + "".join(f"- {note}\n" for note in notes)


def health_table(result: dict[str, Any]) -> str:
    """Per env and arm the final encoder health (summary.json's health/*), mean ± SE over seeds; '' when no run
    measured it."""
    metrics_seen = list(dict.fromkeys(metric for table in result["envs"].values() for row in table["arms"].values()
                                      for metric in row["health"]))
    if not metrics_seen:
        return ""
    lines = ["| env | arm | " + " | ".join(metrics_seen) + " |", "|" + "---|" * (len(metrics_seen) + 2)]
    for env, table in result["envs"].items():
        for arm, row in table["arms"].items():
            cells = [fmt(row["health"][m]["mean"], row["health"][m]["se"], 3) if m in row["health"] else "-" for m in metrics_seen]
            lines.append(f"| {env} | {arm} | " + " | ".join(cells) + " |")
    note = ("- Each run's last health measurement (summary.json), then mean ± standard error over seeds: the agent's "
            "own features on the run's fixed probe batch (docs/training.md#encoder-health).\n")
    return "\n".join(lines) + "\n\n" + note


NORMALISATION_TEXT = {
    "baseline": "the final return over the baseline arm's mean final return on that env (1 = the baseline)",
    "minmax": "(final return - min) / (max - min), min and max over every run of that env",
    "none": "the final return as it is (not normalised)",
}


def aggregate_markdown(result: dict[str, Any]) -> str:
    """The across-env table: IQM, its difference to the baseline's and the probability of improvement with their
    intervals, and how they were made."""
    summary = result["aggregate"]
    if not summary["arms"]:
        return "No aggregate: " + "; ".join(summary["notes"]) + "\n"
    lines = [f"| arm | runs per env | IQM of the normalised score [95% CI] | IQM - IQM({result['baseline']}) [95% CI] "
             f"| P(arm > {result['baseline']}) [95% CI] |", "|---|---|---|---|---|"]
    for arm, value in summary["arms"].items():
        gap, poi = (("-", "-") if "probability_of_improvement" not in value
                    else (fmt_interval(value["iqm_difference"], value["iqm_difference_ci"]),
                          fmt_interval(value["probability_of_improvement"], value["probability_of_improvement_ci"])))
        lines.append(f"| {arm} | {value['runs_per_env']} | {fmt_interval(value['iqm'], value['iqm_ci'])} | {gap} | {poi} |")
    splits = ", ".join(f"{env}: {split}" for env, split in summary["envs"].items())
    notes = [f"Score per run and env: {NORMALISATION_TEXT[summary['normalise']]}; the final return on {splits}.",
             "IQM: the mean of the middle 50% of all runs' scores (runs x envs); its difference to the baseline's is "
             "bootstrapped with both arms resampled. P(arm > baseline): the probability "
             "that a run of the arm scores above a run of the baseline on an env, averaged over envs "
             "(Agarwal et al. 2021). Intervals: 95% stratified bootstrap over runs, per env, "
             f"{summary['reps']:,} resamples (rliable).", *summary["notes"]]
    return "\n".join(lines) + "\n\n" + "".join(f"- {note}\n" for note in notes)


def markdown(result: dict[str, Any], figures: Sequence[Path] = ()) -> str:
    """report.md: the arms, the per-env table, the aggregate, the final health and the plots."""
    differ = ", ".join(result["arm_keys"]) or "nothing (one arm)"
    text = (f"# Report\n\n{result['runs']} runs on {len(result['envs'])} envs; the arms differ by {differ}; "
            f"baseline: {result['baseline']}.\n\n## Final return per env\n\n{final_return_table(result)}\n"
            f"## Across envs\n\n{aggregate_markdown(result)}")
    health = health_table(result)
    if health:
        text += f"\n## Final encoder health per env\n\n{health}"
    if figures:
        text += "\n## Plots\n\n" + "".join(f"![{path.stem}]({path.name})\n" for path in figures)
    return text


def band(curves: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The runs' curves on common steps (their steps within the range all cover; `points` evenly spaced ones when
    more): steps, mean over runs and its standard error. None when the runs share no step range."""
    curves = [(steps, values) for steps, values in curves if len(steps)]
    if not curves:
        return None
    low, high = max(steps[0] for steps, _ in curves), min(steps[-1] for steps, _ in curves)
    grid = np.unique(np.concatenate([steps[(steps >= low) & (steps <= high)] for steps, _ in curves]))
    if len(grid) == 0:
        return None
    if len(grid) > points:
        grid = np.linspace(low, high, points)
    values = np.array([np.interp(grid, steps, series) for steps, series in curves])
    se = values.std(axis=0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.zeros(len(grid))
    return grid, values.mean(axis=0), se


def curves_figure(panels: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]], colors: dict[str, str],
                  title: str) -> Figure:
    """One panel per entry (panel title -> arm -> each run's (steps, values)): per arm the mean over its runs with
    a shaded standard-error band."""
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (name, arms) in zip(axes, panels.items()):
        for arm, curves in arms.items():
            found = band(curves)
            if found is not None:
                steps, mean, se = found
                axis.plot(steps, mean, color=colors[arm], label=f"{arm} ({len(curves)})")
                axis.fill_between(steps, mean - se, mean + se, color=colors[arm], alpha=0.25)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("environment steps")
        axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        axis.grid(alpha=0.3)
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    if axes[0].has_data():
        axes[0].legend(fontsize=7, title="arm (runs)", title_fontsize=7)
    figure.suptitle(title)
    return figure


def returns_figure(env: str, arms: dict[str, list[Run]], splits: Sequence[str], colors: dict[str, str]) -> Figure:
    """Evaluation return per split and (from progress.csv, when logged) training-episode return against steps."""
    panels = {f"evaluation return: {split}": {arm: [run.curve(split) for run in runs] for arm, runs in arms.items()}
              for split in splits}
    if any(TRAINING_RETURN in run.progress for runs in arms.values() for run in runs):
        panels["training episode return (last 100)"] = {arm: [run.progress_curve(TRAINING_RETURN) for run in runs]
                                                        for arm, runs in arms.items()}
    return curves_figure(panels, colors, f"{env}: return")


def progress_figure(arms: dict[str, list[Run]], columns: dict[str, str], colors: dict[str, str], title: str) -> Figure | None:
    """The progress.csv `columns` (column -> panel title) that any run logged, one panel each; None if none was."""
    panels = {label: {arm: [run.progress_curve(column) for run in runs] for arm, runs in arms.items()}
              for column, label in columns.items()}
    panels = {label: by_arm for label, by_arm in panels.items() if any(len(s) for c in by_arm.values() for s, _ in c)}
    return curves_figure(panels, colors, title) if panels else None


def env_figures(env: str, arms: dict[str, list[Run]], splits: Sequence[str], colors: dict[str, str]) -> dict[str, Figure]:
    """An env's figures by name: returns, and one figure per PROGRESS_PANELS prefix with the columns runs logged."""
    figures = {"returns": returns_figure(env, arms, splits, colors)}
    for name, prefix in PROGRESS_PANELS.items():
        columns = sorted({c for runs in arms.values() for run in runs for c in run.progress.columns if c.startswith(prefix)})
        figure = progress_figure(arms, {column: column for column in columns}, colors, f"{env}: {prefix}*")
        if figure is not None:
            figures[name] = figure
    return figures


def aggregate_figures(result: dict[str, Any], colors: dict[str, str]) -> dict[str, Any]:
    """rliable's plots of the aggregate: the IQM intervals and the probability-of-improvement intervals."""
    arms = {arm: value for arm, value in result["aggregate"]["arms"].items() if value["iqm_ci"] is not None}
    if not arms:
        return {}
    iqm, _ = plot_utils.plot_interval_estimates(
        {arm: [v["iqm"]] for arm, v in arms.items()}, {arm: np.array([v["iqm_ci"]]).T for arm, v in arms.items()},
        metric_names=["IQM"], algorithms=list(arms), colors=colors, xlabel="normalised score", subfigure_width=5,
        row_height=0.6)
    figures = {"aggregate_iqm": iqm}
    pairs = {f"{arm}{PAIR}{result['baseline']}": v for arm, v in arms.items() if v.get("probability_of_improvement_ci")}
    if pairs:
        figure, axis = plt.subplots(figsize=(5, 0.8 + 0.5 * len(pairs)))
        plot_utils.plot_probability_of_improvement(
            {pair: v["probability_of_improvement"] for pair, v in pairs.items()},
            {pair: np.array(v["probability_of_improvement_ci"]) for pair, v in pairs.items()},
            pair_separator=PAIR, ax=axis, colors=[colors[pair.split(PAIR)[0]] for pair in pairs], xticks=[0, 0.25, 0.5, 0.75, 1],
            labelsize="medium", ticklabelsize="medium")
        figures["aggregate_improvement"] = figure
    return figures


def file_name(text: str) -> str:
    """`text` as a file name: anything but letters, digits, '.', '-' and '_' becomes '_'."""
    return re.sub(r"[^\w.-]", "_", text)


def save_figure(figure: Any, path: Path) -> Path:
    """Write a figure atomically as PNG (and close it if pyplot holds it)."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(figure)
    return path


def arm_colors(result: dict[str, Any]) -> dict[str, str]:
    """One colour per arm, the same in every figure."""
    return {arm: f"C{index % 10}" for index, arm in enumerate(result["arms"])}


def write_report(runs: Sequence[Run], out: Path, **options: Any) -> list[Path]:
    """analyse(runs, **options), then write report.md, report.json and the plots to `out`; returns the files."""
    result = analyse(runs, **options)
    colors = arm_colors(result)
    grouped = group(runs, arm_keys(runs), result["baseline"])
    figures = []
    for env, arms in grouped.items():
        for name, figure in env_figures(env, arms, result["envs"][env]["splits"], colors).items():
            figures.append(save_figure(figure, out / f"{file_name(env)}_{name}.png"))
    figures += [save_figure(figure, out / f"{name}.png") for name, figure in aggregate_figures(result, colors).items()]
    text = json.dumps(run_io.finite_or_none(result), indent=2, allow_nan=False) + "\n"
    written = [atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text))]
    report = markdown(result, figures)
    written.insert(0, atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(report)))
    return written + figures


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one line on stderr and exit code 2 for input the report cannot use."""
    parser = argparse.ArgumentParser(prog="python -m minc_rl.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, metavar="DIR", help="sweep or run directories (searched for runs)")
    parser.add_argument("--baseline", nargs="+", metavar="KEY=VALUE",
                        help="the baseline arm's settings, as minc_rl.train takes them, e.g. aux=none")
    parser.add_argument("--out", type=Path, help="output directory (default: DIR/report, with one DIR)")
    parser.add_argument("--last", type=int, default=3,
                        help="final return = a run's mean over its last LAST evaluations (default 3, as rl_evidence)")
    parser.add_argument("--normalise", choices=NORMALISATIONS, default="baseline",
                        help="the score across envs: final return over the baseline arm's mean (default), min-max "
                        "over the env's runs, or none")
    parser.add_argument("--split", nargs="+", default=list(SPLITS), metavar="SPLIT",
                        help="the evaluation split scored across envs, the first an env has (default: unseen_levels test)")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    args = parser.parse_args(argv)
    try:
        if args.out is None and len(args.paths) > 1:
            raise ReportError("several directories: give --out DIR for the report")
        out = args.out or args.paths[0] / "report"
        if out.exists() and not out.is_dir():
            raise ReportError(f"--out {out}: a file, not a directory")
        problem = writable_problem(out)
        if problem is not None:
            raise ReportError(f"--out {out}: cannot be written ({problem}); give a writable directory with --out DIR")
        try:
            written = write_report(find_runs(args.paths), out, baseline=args.baseline, last=args.last,
                                   normalise=args.normalise, splits=args.split, reps=args.reps, seed=args.seed)
        except OSError as error:  # a full disk, or a folder that stopped being writable during the analysis
            raise ReportError(f"--out {out}: the report was not written ({one_line(error)}); give a writable directory "
                              "with --out DIR") from None
    except ReportError as error:
        print(f"minc_rl.report: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(written[0].read_text())
    print(f"minc_rl.report: wrote {', '.join(path.name for path in written)} to {out}")


if __name__ == "__main__":
    main()
