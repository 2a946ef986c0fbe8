"""The files of a training run (minc_rl.train): checkpoints, progress.csv, evaluations.csv, summary.json, the plot.

Layout of a run directory:
    config.yaml                     the resolved config
    progress.csv, events.out.*      SB3's logger (CSV and TensorBoard)
    evaluations.csv                 one row per evaluation and split
    checkpoints/step_<N>.zip        SB3 model: policy (encoder, head, Lambda), optimizer, step count
    checkpoints/step_<N>.vecnormalize.pkl   reward-normalisation statistics, when used
    checkpoints/step_<N>.run_state.pkl      random streams and env states (minc_rl.runs.run_state)
    checkpoints/step_<N>.replay_buffer.pkl  DQN's replay buffer, beside the newest checkpoint
    summary.json, learning_curve.png
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import CSVOutputFormat

from minc_rl.common.checks import one_line
from minc_rl.common.io import atomic_write, atomic_write_all

EVALUATION_FIELDS = ("step", "split", "return_mean", "return_std", "length_mean", "episodes")
STEP_COLUMN = "time/total_timesteps"
_CHECKPOINT = re.compile(r"step_(\d+)\.zip")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return run_dir / "checkpoints" / f"step_{step:012d}.zip"


def checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints in run_dir/checkpoints, newest (largest step count) first."""
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*.zip") if (m := _CHECKPOINT.fullmatch(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the largest step count in run_dir/checkpoints, or None."""
    found = checkpoints(run_dir)
    return found[0] if found else None


def checkpoint_problem(path: Path, vecnormalize: bool, fits: Callable[[dict[str, Any]], str | None] | None = None,
                       ) -> str | None:
    """Why `path` is not a checkpoint a run can resume from, or None: a zip whose members pass their CRC check,
    SB3's data and policy weights that load and are finite, (`vecnormalize`) its reward statistics, its run state
    where it has one, and (`fits`: SB3's data -> a problem or None) a match with the run that resumes it."""
    from stable_baselines3.common.save_util import load_from_zip_file

    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
            missing = {"data", "policy.pth"} - set(archive.namelist())
        if broken is not None:
            return f"its member {broken} fails the CRC check"
        if missing:
            return f"it lacks {', '.join(sorted(missing))}"
        data, params, _ = load_from_zip_file(path, device="cpu", print_system_info=False)
        if not params or "policy" not in params:
            return "it holds no policy weights"
        if not all(torch.isfinite(t).all() for t in params["policy"].values() if t.is_floating_point()):
            return "its policy weights are not finite"
        if vecnormalize:
            with open(vecnormalize_path(path), "rb") as file:
                pickle.load(file)
        try:
            read_run_state(path)
        except ValueError as error:
            return str(error)
        if fits is not None:
            return fits(data)
    except FileNotFoundError as error:
        return f"{error.filename} is missing"
    except Exception as error:  # noqa: BLE001  anything a damaged file raises: the file is not used
        return one_line(error)
    return None


def valid_checkpoint(
    run_dir: Path, vecnormalize: bool, fits: Callable[[dict[str, Any]], str | None] | None = None
) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes checkpoint_problem, and one line for each newer one that does not."""
    damaged = []
    for path in checkpoints(run_dir):
        problem = checkpoint_problem(path, vecnormalize, fits)
        if problem is None:
            return path, damaged
        damaged.append(f"{path.name} ({problem})")
    return None, damaged


def readable_run_files(run_dir: Path) -> str | None:
    """Why a run's progress.csv, evaluations.csv or summary.json cannot be continued, or None (missing is fine)."""
    for path, problem in ((run_dir / "progress.csv", _progress_problem), (run_dir / "evaluations.csv", _evaluations_problem),
                          (run_dir / "summary.json", lambda p: json.loads(p.read_text()) and None)):  # fmt: skip
        if not path.exists():
            continue
        try:
            found = problem(path)
        except Exception as error:  # noqa: BLE001  a damaged file raises anything
            return f"{path} cannot be read ({one_line(error)})"
        if found is not None:
            return f"{path} {found}"
    return None


def _progress_problem(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return None
    frame = pd.read_csv(path)
    if STEP_COLUMN not in frame:
        return f"has no {STEP_COLUMN} column"
    pd.to_numeric(frame[STEP_COLUMN])
    return None


def _evaluations_problem(path: Path) -> str | None:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if tuple(reader.fieldnames or ()) != EVALUATION_FIELDS:
            return f"has the columns {reader.fieldnames}, not {list(EVALUATION_FIELDS)}"
        for row in reader:
            int(row["step"])
    return None


def checkpoint_step(path: Path) -> int:
    """The step count in a checkpoint's file name."""
    return int(_CHECKPOINT.fullmatch(path.name).group(1))


def vecnormalize_path(checkpoint: Path) -> Path:
    """The reward-normalisation statistics saved with `checkpoint`."""
    return checkpoint.with_suffix(".vecnormalize.pkl")


def run_state_path(checkpoint: Path) -> Path:
    """The random streams and env states saved with `checkpoint` (minc_rl.runs.run_state)."""
    return checkpoint.with_suffix(".run_state.pkl")


def read_run_state(checkpoint: Path) -> bytes | None:
    """The run state saved with `checkpoint`, None for a checkpoint without one (written before exact resume);
    ValueError naming the file when it cannot be read or belongs to another step."""
    path = run_state_path(checkpoint)
    if not path.exists():
        return None
    try:
        saved = path.read_bytes()
        step = pickle.loads(saved)["step"]
    except Exception as error:  # noqa: BLE001  a damaged pickle raises anything
        raise ValueError(f"its run state {path.name} cannot be read ({one_line(error)})") from error
    if step != checkpoint_step(checkpoint):
        raise ValueError(f"its run state {path.name} is the state of step {step}")
    return saved


def replay_buffer_path(checkpoint: Path) -> Path:
    """DQN's replay buffer saved with `checkpoint` (only the newest checkpoint keeps one: it can be large)."""
    return checkpoint.with_suffix(".replay_buffer.pkl")


LEGACY_REPLAY_BUFFER = "replay_buffer.pkl"  # before one replay buffer per checkpoint: the newest checkpoint's


def parameters_finite(model: BaseAlgorithm) -> bool:
    """Whether every floating-point tensor of the policy (weights, Lambda, BN statistics) is finite."""
    return all(torch.isfinite(t).all() for t in model.policy.state_dict().values() if t.is_floating_point())


def save_checkpoint(model: BaseAlgorithm, run_dir: Path, replay_buffer: bool, run_state: bytes) -> Path:
    """Write the checkpoint of the model's current step with its `run_state` (minc_rl.runs.run_state): every file
    (replay buffer, reward statistics, run state, the .zip) is written to a temporary file first and renamed only
    when all are written, the .zip last, which marks the checkpoint complete. A failed write (a full disk) leaves
    the previous checkpoint and no temporary file."""
    path = checkpoint_path(run_dir, model.num_timesteps)
    writes = [(run_state_path(path), lambda tmp: Path(tmp).write_bytes(run_state))]
    if replay_buffer and getattr(model, "replay_buffer", None) is not None:
        writes.append((replay_buffer_path(path), model.save_replay_buffer))
    vec_normalize = model.get_vec_normalize_env()
    if vec_normalize is not None:
        writes.append((vecnormalize_path(path), vec_normalize.save))
    atomic_write_all([*writes, (path, model.save)])
    for older in [*(run_dir / "checkpoints").glob("*.replay_buffer.pkl"), run_dir / "checkpoints" / LEGACY_REPLAY_BUFFER]:
        if older != replay_buffer_path(path):
            older.unlink(missing_ok=True)  # only now: the new checkpoint and its replay buffer are complete
    return path


def open_progress_csv(path: Path, until_step: int | None) -> CSVOutputFormat:
    """SB3's CSV writer on `path`; when resuming (until_step given), the rows up to that step are kept."""
    kept = None
    if until_step is not None and path.exists() and path.stat().st_size > 0:
        kept = pd.read_csv(path)
        kept = kept[kept[STEP_COLUMN] <= until_step] if STEP_COLUMN in kept else kept.iloc[:0]
    writer = CSVOutputFormat(str(path))  # opens with "w+", i.e. truncates
    if kept is not None and len(kept.columns):
        kept.to_csv(writer.file, index=False)
        writer.keys = list(kept.columns)
        writer.file.flush()
    return writer


def truncate_evaluations(path: Path, until_step: int) -> None:
    """Drop the rows of evaluations.csv after `until_step` (those a resumed run will redo)."""
    if path.exists():
        rows = [row for row in read_evaluations(path) if int(row["step"]) <= until_step]
        atomic_write(path, lambda tmp: _write_rows(tmp, rows))


def append_evaluation(path: Path, row: dict[str, Any]) -> None:
    """Add one row (EVALUATION_FIELDS) to evaluations.csv."""
    new = not path.exists()
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, EVALUATION_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_evaluations(path: Path) -> list[dict[str, str]]:
    """The rows of evaluations.csv ([] when there is none)."""
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _write_rows(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, EVALUATION_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (also inside dicts and lists) replaced by None, for strict JSON."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_summary(path: Path) -> dict[str, Any]:
    """summary.json as a dict ({} when there is none)."""
    return json.loads(path.read_text()) if path.exists() else {}


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """summary.json, atomically; numbers that are not finite become null."""
    text = json.dumps(finite_or_none(summary), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plot_learning_curve(run_dir: Path, title: str) -> Path:
    """learning_curve.png: training episode return (progress.csv) and evaluation returns against steps; below them,
    when progress.csv has them, the encoder health of minc_rl.rl.health (srank, RankMe, dormant fraction)."""
    progress = run_dir / "progress.csv"
    frame = pd.read_csv(progress) if progress.exists() and progress.stat().st_size > 0 else pd.DataFrame()
    health = STEP_COLUMN in frame and "health/srank" in frame and frame["health/srank"].notna().any()
    figure = Figure(figsize=(7, 7.5 if health else 4.5))
    axes, *below = figure.subplots(2 if health else 1, 1, sharex=True, squeeze=False)[:, 0]
    if "rollout/ep_rew_mean" in frame and STEP_COLUMN in frame:
        returns = frame.dropna(subset=["rollout/ep_rew_mean"])
        axes.plot(returns[STEP_COLUMN], returns["rollout/ep_rew_mean"], label="training episodes (last 100)", alpha=0.7)
    if health:
        plot_health(below[0], frame)
    evaluations = pd.DataFrame(read_evaluations(run_dir / "evaluations.csv"))
    if len(evaluations):
        for column in ("step", "return_mean", "return_std"):
            evaluations[column] = evaluations[column].astype(float)
        for split, rows in evaluations.groupby("split", sort=False):
            axes.errorbar(rows["step"], rows["return_mean"], yerr=rows["return_std"], marker="o", capsize=3, label=f"eval: {split}")
    (below[0] if health else axes).set_xlabel("environment steps")
    axes.set_ylabel("episode return")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.has_data():
        axes.legend()
    path = run_dir / "learning_curve.png"
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    return path


def plot_health(axes: Axes, frame: pd.DataFrame) -> None:
    """srank and RankMe of the agent's features (left axis) and the mean dormant fraction of its ReLU layers (right
    axis) against steps, from progress.csv's health/ columns."""
    rows = frame.dropna(subset=["health/srank"])
    axes.plot(rows[STEP_COLUMN], rows["health/srank"], marker=".", label="srank (delta 0.01)")
    axes.plot(rows[STEP_COLUMN], rows["health/rankme"], marker=".", label="RankMe")
    axes.set_ylabel("rank of the features")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")
    if "health/dormant" in rows:
        dormant = axes.twinx()
        dormant.plot(rows[STEP_COLUMN], rows["health/dormant"], color="tab:red", marker=".", label="dormant fraction")
        dormant.set_ylim(0, 1)
        dormant.set_ylabel("dormant fraction (ReLU layers)")
        dormant.legend(loc="upper right")
