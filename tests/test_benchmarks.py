"""The calibration rule of benchmarks/rl_evidence.py (README_rl_evidence.md) on hand-built runs."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import rl_evidence  # noqa: E402
from minc_rl.common.checks import int_at_least, output_file, positive_number  # noqa: E402
from minc_rl.common.run_dir import RunLock  # noqa: E402


def fake_run(seed: int, returns: list[float]) -> dict:
    """A run as load_runs returns it: evaluation returns at steps 1000, 2000, ..."""
    return {"summary": {"seed": seed}, "curves": {"test": [(1000 * (i + 1), r) for i, r in enumerate(returns)]}}


def grid_runs(areas: dict[str, dict[str, float]]) -> dict:
    """game -> variant -> [one run whose evaluation returns average to the given area]."""
    return {game: {variant: [fake_run(100, [area - 1, area + 1])] for variant, area in by_variant.items()}
            for game, by_variant in areas.items()}


def full_grid(loss: str, scores: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    """Areas on two games for aux=none (2.0 and 10.0) and each of `loss`'s settings (normalised scores given)."""
    areas = {"breakout": {"none": 2.0}, "space_invaders": {"none": 10.0}}
    for name, (first, second) in scores.items():
        areas["breakout"][f"{loss}-{name}"] = 2.0 * first
        areas["space_invaders"][f"{loss}-{name}"] = 10.0 * second
    return areas


def test_area_under_curve_is_the_mean_evaluation_return():
    assert rl_evidence.area_under_curve(fake_run(0, [1.0, 2.0, 6.0])) == pytest.approx(3.0)


def test_calibration_picks_the_best_mean_among_settings_that_keep_090_everywhere():
    scores = {"joint-s0.01": (0.95, 0.92), "joint-s0.03": (0.97, 0.93), "joint-s0.1": (1.00, 0.95),
              "joint-s0.3": (1.30, 0.85), "separate-lr1e-4": (1.10, 1.05), "decoupled-lr1e-3": (1.12, 1.04)}
    result = rl_evidence.calibration(grid_runs(full_grid("minc", scores)))
    assert result["normalised_auc"]["minc-joint-s0.3"] == pytest.approx({"breakout": 1.3, "space_invaders": 0.85})
    # joint-s0.3 has the best mean (1.075) but 0.85 < 0.9 on space_invaders; separate (1.075) and decoupled (1.08)
    # tie within 0.02, and separate is cheaper
    choice = result["choices"]["minc"]
    assert (choice["setting"], choice["met_bar"]) == ("separate-lr1e-4", True)
    assert choice["overrides"] == ["aux.mode=separate", "aux.lr=1e-4"]
    assert "spectral" not in result["choices"]  # its grid is not complete


def test_calibration_falls_back_to_the_least_harmful_setting():
    scores = {"joint-s0.01": (0.90, 0.65), "joint-s0.03": (0.75, 0.60), "joint-s0.1": (0.80, 0.70),
              "joint-s0.3": (1.20, 0.20), "separate-lr1e-4": (0.85, 0.60), "decoupled-lr1e-3": (0.10, 0.10)}
    choice = rl_evidence.calibration(grid_runs(full_grid("spectral", scores)))["choices"]["spectral"]
    assert (choice["setting"], choice["met_bar"]) == ("joint-s0.1", False)  # the highest minimum score, 0.70
    table = rl_evidence.calibration_table(rl_evidence.calibration(grid_runs(full_grid("spectral", scores))))
    assert "no setting kept >= 0.9 of aux=none's AUC on every game" in table and "| spectral-joint-s0.3 | 1.20 | 0.20 | 0.70 |" in table


def test_calibration_waits_for_every_setting_and_breaks_ties_toward_the_smaller_share():
    first = {"joint-s0.1": (0.90, 0.90), "joint-s0.3": (0.60, 0.50), "separate-lr1e-4": (0.70, 0.70),
             "decoupled-lr1e-3": (0.10, 0.10)}
    areas = full_grid("minc", first)
    waiting = rl_evidence.calibration(grid_runs(areas))
    assert "minc" not in waiting["choices"] and waiting["missing"] == {"minc": ["joint-s0.01", "joint-s0.03"]}
    assert "- minc: no choice yet; not yet run on every game: joint-s0.01, joint-s0.03" in \
        rl_evidence.calibration_table(waiting)
    # both smaller shares keep >= 0.9 everywhere; 0.03 has the best mean (1.00), 0.01 (0.99) ties within 0.02
    smaller = {"joint-s0.01": (1.00, 0.98), "joint-s0.03": (1.01, 0.99)}
    areas = {game: {**by_variant, **full_grid("minc", smaller)[game]} for game, by_variant in areas.items()}
    choice = rl_evidence.calibration(grid_runs(areas))["choices"]["minc"]
    assert (choice["setting"], choice["met_bar"]) == ("joint-s0.01", True)
    assert choice["overrides"] == ["aux.mode=joint", "aux.share=0.01"]


def test_shards_split_the_jobs_disjointly_and_variants_filter_them():
    calibration = rl_evidence.variants("minatar", "calibration")
    shards = [rl_evidence.select_jobs("minatar", "calibration", calibration, [100], None, (k, 3)) for k in range(3)]
    every_job = rl_evidence.select_jobs("minatar", "calibration", calibration, [100], None, (0, 1))
    assert sorted(job for shard in shards for job in shard) == sorted(every_job)
    assert len(every_job) == len(set(every_job)) == 2 * 13  # none and 6 settings of 2 losses
    aux = rl_evidence.variants("minatar", "aux")
    only_none = rl_evidence.select_jobs("minatar", "aux", aux, [0, 1], ["none"], (0, 1))
    assert only_none == [("breakout", "none", 0), ("space_invaders", "none", 0),
                         ("breakout", "none", 1), ("space_invaders", "none", 1)]
    with pytest.raises(ValueError, match="nonee.*choose from none, minc, spectral"):
        rl_evidence.select_jobs("minatar", "aux", aux, [0], ["nonee"], (0, 1))
    replication = rl_evidence.variants("minatar", "replication")
    only_space_invaders = rl_evidence.select_jobs("minatar", "replication", replication, [0, 1], ["none", "selfpred"],
                                                  (0, 1), ["space_invaders"])
    assert only_space_invaders == [("space_invaders", arm, seed) for seed in (0, 1) for arm in ("none", "selfpred")]
    with pytest.raises(ValueError, match="--games pong: not in the minatar suite; choose from breakout, space_invaders"):
        rl_evidence.select_jobs("minatar", "replication", replication, [0], None, (0, 1), ["pong"])


def test_pairs_calibration_grid_tunes_state_action_minc_with_its_rules_four_settings():
    grid = rl_evidence.variants("minatar", "calibration-pairs")
    assert list(grid) == ["none", "minc-state-action-joint-s0.1", "minc-state-action-joint-s0.3",
                          "minc-state-action-separate-lr1e-4", "minc-state-action-decoupled-lr1e-3"]
    assert grid["none"] == ["aux=none"]
    assert grid["minc-state-action-separate-lr1e-4"] == [
        "aux=minc", "aux.pairs=state_action", "aux.mode=separate", "aux.lr=1e-4"]


def test_bar_checks_compare_final_returns_within_one_standard_error():
    """Hand-built final returns: minc 4.0 ± 0.3 against none 4.5 ± 0.4 is within one SE (0.5) but not above; against
    spectral 3.0 ± 0.0 it is above. A single-seed row (NaN SE) enters no check."""
    rows = {"none": {"test": {"mean": 4.5, "se": 0.4}}, "minc": {"test": {"mean": 4.0, "se": 0.3}},
            "spectral": {"test": {"mean": 3.0, "se": 0.0}},
            "minc-state-action": {"test": {"mean": 9.0, "se": float("nan")}}}
    checks = rl_evidence.bar_checks({"games": {"breakout": rows}, "splits": ["test"]})
    assert [(c["variant"], c["baseline"]) for c in checks] == [("minc", "none"), ("minc", "spectral")]
    versus_none, versus_spectral = checks
    assert versus_none["difference"] == pytest.approx(-0.5) and versus_none["se"] == pytest.approx(0.5)
    assert versus_none["within_one_se"] and not versus_none["above"]
    assert versus_spectral["within_one_se"] and versus_spectral["above"]
    rows["minc"]["test"]["mean"] = 3.9  # -0.6 < -0.5
    assert not rl_evidence.bar_checks({"games": {"breakout": rows}, "splits": ["test"]})[0]["within_one_se"]
    assert "| breakout | test | minc vs none | -0.60 ± 0.50 | no | no |" in rl_evidence.bar_table(
        rl_evidence.bar_checks({"games": {"breakout": rows}, "splits": ["test"]}))


def test_final_pairs_variant_takes_the_calibrated_choice(tmp_path):
    with pytest.raises(ValueError, match="no choice for minc-state-action yet: run its calibration grid"):
        rl_evidence.calibrated_choice("minatar", "minc-state-action", tmp_path)
    chosen = rl_evidence.calibration(grid_runs(full_grid("minc-state-action", {
        "joint-s0.1": (0.95, 0.92), "joint-s0.3": (0.8, 0.8), "separate-lr1e-4": (0.97, 0.96),
        "decoupled-lr1e-3": (0.2, 0.2)})))
    (tmp_path / "minatar_calibration.json").write_text(json.dumps(chosen))
    assert rl_evidence.calibrated_choice("minatar", "minc-state-action", tmp_path) == [
        "aux=minc", "aux.pairs=state_action", "aux.mode=separate", "aux.lr=1e-4"]


def test_run_skips_a_run_dir_another_process_is_writing(tmp_path, capsys):
    """A run dir without a checkpoint is started afresh, unless another process holds its lock: then it is left
    as it is (two parallel sweeps never delete each other's runs)."""
    run_dir = tmp_path / "runs" / "minatar" / "breakout" / "none" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "progress.csv").write_text("written by the other run\n")
    args = argparse.Namespace(suite="minatar", grid="aux", seeds=[0], variants=["none"], shard=(0, 2), steps=1000,
                              evaluations=1, override=[], runs=tmp_path / "runs", out=tmp_path / "out", commit=False,
                              python=None, games=None)
    with RunLock(run_dir):
        rl_evidence.run(args)  # shard 0 of 2: breakout's none only
    assert (run_dir / "progress.csv").read_text() == "written by the other run\n"
    assert not (tmp_path / "out").exists()
    assert f"skipped; {run_dir} is in use by another run (pid {os.getpid()})" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (["agent.replay_ratio=1"], {"gradient_steps": 1, "distractors": None}),
        (["agent.replay_ratio=4"], {"gradient_steps": 4, "distractors": None}),
        (["agent.replay_ratio=1", "env_options.distractors.channels=same", "env_options.distractors.p=0.08"],
         {"gradient_steps": 1, "distractors": {"channels": "same", "p": 0.08}}),
    ],
)  # fmt: skip
def test_representation_grid_composes_each_arm_under_each_condition(tmp_path, condition, expected):
    """README_representation_study.md's grid: every arm of every condition composes to the study's settings."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from minc_rl.runs import train_config

    grid = rl_evidence.variants("minatar", "representation")
    assert grid == {"none": ["aux=none"], "minc": ["aux=minc"],
                    "minc-sa": ["aux=minc", "aux.pairs=state_action", "aux.share=0.1"]}
    args = argparse.Namespace(steps=50_000, evaluations=10, override=condition, python=None, games=None)
    commands = {arm: rl_evidence.train_command("minatar", "breakout", overrides, 3, tmp_path / arm, args)
                for arm, overrides in grid.items()}
    tasks = {arm: [a for a in train_config.check_command_line(command[3:]) if not a.startswith("hydra.")]  # as train's main
             for arm, command in commands.items()}
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(train_config.CONFIG_DIR), version_base="1.3"):
        for arm, task in tasks.items():
            cfg = train_config.with_family_defaults("minatar:breakout", task)
            train_config.apply_replay_ratio(cfg, task)
            assert (cfg.agent.name, cfg.aux.name, cfg.seed, cfg.total_steps) == ("dqn", grid[arm][0][4:], 3, 50_000)
            assert (cfg.eval.every, cfg.health.every, cfg.agent.train_freq) == (5_000, 5_000, 1)
            assert cfg.agent.gradient_steps == expected["gradient_steps"]
            assert cfg.env_options.get("distractors") == expected["distractors"]
            assert (cfg.aux.pairs, cfg.aux.share) == (("state_action", 0.1) if arm == "minc-sa" else ("state", 0.01))


def test_a_resume_command_leaves_out_the_overrides_the_run_was_started_with(tmp_path):
    """Those are in the run's saved config; a pinned older code version refuses a +study= override on resume."""
    args = argparse.Namespace(steps=1_000, evaluations=2, override=["torch_threads=1"], python=None, games=None)
    overrides = rl_evidence.variants("minatar", "replication")["selfpred"]
    fresh = rl_evidence.train_command("minatar", "space_invaders", overrides, 3, tmp_path, args)
    assert fresh[fresh.index("minc_rl.train") + 1:] == [
        "env=minatar:space_invaders", "agent=dqn", "+study=selfpred_replication", "aux=selfpred", "seed=3",
        "total_steps=1000", "eval.every=500", "checkpoint.every=500", "torch_threads=1", f"hydra.run.dir={tmp_path}"]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(fresh[fresh.index("minc_rl.train") + 1:-1]))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_000000000500.zip").touch()  # the runner resumes a run dir that has one
    args.override = ["torch_threads=1", "eval.episodes=3"]  # a setting the run was not started with is passed on
    resume = rl_evidence.train_command("minatar", "space_invaders", overrides, 3, tmp_path, args)
    assert resume[resume.index("minc_rl.train") + 1:] == ["eval.episodes=3", f"hydra.run.dir={tmp_path}",
                                                           f"resume={tmp_path}"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--override", "aux.share=2"], "minc_rl.train: error: aux.share must be in [0, 1); got 2"),
    (["--override", "garbage"], "rl_evidence.py: error: --override: OverrideParseException: Error parsing override"),
    (["--python", "/nonexistent/python"], "rl_evidence.py: error: --python /nonexistent/python: no such executable"),
    (["--out", "{file}"], "rl_evidence.py: error: --out {file}: a file, not a directory"),
    (["--evaluations", "0"], "rl_evidence.py run: error: argument --evaluations: must be an integer >= 1; got '0'"),
])
def test_run_refuses_bad_settings_before_its_first_run(tmp_path, extra, message):
    """A bad --override used to surface when the first run started (a bad --out after it had trained)."""
    (tmp_path / "file").touch()
    command = [sys.executable, str(BENCHMARKS / "rl_evidence.py"), "run", "--suite", "minatar", "--steps", "1000",
               "--seeds", "0", "--variants", "minc", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
               *(argument.format(file=tmp_path / "file") for argument in extra)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message.format(file=tmp_path / "file") in done.stderr.splitlines()[-1], done.stderr
    assert not (tmp_path / "runs").exists() and done.stdout == ""


def test_command_line_number_types_take_valid_text_and_name_the_bad():
    parser = argparse.ArgumentParser(prog="bench", exit_on_error=False)
    parser.add_argument("--rounds", type=int_at_least(1))
    parser.add_argument("--warmup", type=int_at_least(0))
    parser.add_argument("--lr", type=positive_number)
    args = parser.parse_args(["--rounds", "3", "--warmup", "0", "--lr", "3e-4"])
    assert (args.rounds, args.warmup, args.lr) == (3, 0, 3e-4)
    for option, text, message in [("--rounds", "0", "must be an integer >= 1; got '0'"),
                                  ("--rounds", "1.5", "must be an integer >= 1; got '1.5'"),
                                  ("--warmup", "-1", "must be an integer >= 0; got '-1'"),
                                  ("--lr", "0", "must be a finite number > 0; got '0'"),
                                  ("--lr", "inf", "must be a finite number > 0; got 'inf'"),
                                  ("--lr", "nan", "must be a finite number > 0; got 'nan'"),
                                  ("--lr", "abc", "must be a finite number > 0; got 'abc'")]:
        with pytest.raises(argparse.ArgumentError, match=re.escape(f"argument {option}: {message}")):
            parser.parse_args([option, text])


def test_output_file_refuses_a_folder_or_a_path_through_a_file(tmp_path):
    """minatar_density.py --out <folder> failed after its work (IsADirectoryError)."""
    (tmp_path / "taken").touch()
    assert output_file(str(tmp_path / "new" / "deeper" / "out.json")) == tmp_path / "new" / "deeper" / "out.json"
    assert output_file(str(tmp_path / "taken")) == tmp_path / "taken"  # overwritten, as a rerun does
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{str(tmp_path)!r} is a directory; give a file path, "
                                                                   f"e.g. {tmp_path / 'results.json'}")):
        output_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{tmp_path / 'taken'} is a file, not a folder")):
        output_file(str(tmp_path / "taken" / "out.json"))


@pytest.mark.parametrize(("script", "arguments", "message"), [
    ("minatar_density.py", ["--steps", "0"], "argument --steps: must be an integer >= 1; got '0'"),
    ("batch_sweep.py", ["--batch-sizes", "16", "1"], "argument --batch-sizes: must be an integer >= 2; got '1'"),
    ("loss_core.py", ["--min-rounds", "5", "--max-rounds", "2"], "--min-rounds 5 is above --max-rounds 2"),
    ("grad_variance.py", ["--game", "coinrn"], "argument --game: invalid choice: 'coinrn' (choose from 'bigfish',"),
    ("health_cost.py", ["--out", "{tmp}"], "argument --out: '{tmp}' is a directory; give a file path"),
    ("optimizer_step.py", ["--rounds", "0"], "argument --rounds: must be an integer >= 1; got '0'"),
])
def test_benchmarks_refuse_bad_counts_before_any_work(tmp_path, script, arguments, message):
    """--threads 0, --rounds 0 and the like used to start (and crash or print empty tables); a typo'd procgen game
    aborted the process inside procgen's C++."""
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    out = [] if "--out" in arguments else ["--out", str(tmp_path / "out.json")]
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments, *out],
                          capture_output=True, text=True, timeout=120)
    message = message.format(tmp=tmp_path)
    assert done.returncode == 2 and f"{script}: error: {message}" in done.stderr.splitlines()[-1], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_stop_signal_during_a_sweep_run_ends_the_sweep():
    """pretrain catches SIGTERM to checkpoint; batch_sweep (and minc_ablation, which shares run_digits) went on to the
    next run as if nothing had happened."""
    import batch_sweep

    default = signal.getsignal(signal.SIGTERM)

    def signal_once_pretrain_listens() -> None:
        while signal.getsignal(signal.SIGTERM) is default:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_pretrain_listens, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        batch_sweep.run_digits(["loss=minc", "batch_size=16"], steps=100_000, lr=3e-4, seed=0, at_start=False)
    assert stopped.value.code == 128 + signal.SIGTERM


def write_cell(folder: Path, game: str, method: str, seed: int, f1: float) -> None:
    """A finished cell's copy as benchmarks/atariari.py run leaves it: probe.json with the method's game F1."""
    cell = folder / game / method / f"seed{seed}"
    cell.mkdir(parents=True)
    (cell / "probe.json").write_text(json.dumps({"methods": {method: {"f1": f1}}}))


def test_the_atariari_batch_claim_pretrains_on_the_same_pairs_and_compares_by_hand(tmp_path):
    """Issue 41 item 5: at --batch 512 a cell pretrains 25 steps (the 12,800 pairs of 200 steps of 64) with no
    baseline cells; `batch` reports each loss's change from 512 to 64 and MINC's minus the spectral loss's, with
    standard errors, as computed by hand below."""
    import atariari

    args = argparse.Namespace(games=["pong"], losses=["minc"], seeds=[0], frames=3000, steps=200, epochs=2,
                              batch=512, cache=tmp_path / "frames")  # fmt: skip
    assert atariari.cells(args) == [("pong", "minc", 0)]
    pretrain, _ = atariari.cell_commands("pong", "minc", 0, tmp_path / "run", args)
    assert "steps=25" in pretrain and "batch_size=512" in pretrain
    assert atariari.cells(argparse.Namespace(**{**vars(args), "batch": 64}))[0] == ("pong", "random-cnn", 0)
    with pytest.raises(ValueError, match="--steps 200 of 64 pairs .* no whole number of steps at --batch 500"):
        atariari.pretraining_steps(200, 500)
    small, large = tmp_path / "b64", tmp_path / "b512"
    for seed, (minc64, spectral64, minc512, spectral512) in enumerate([(0.5, 0.4, 0.4, 0.5), (0.7, 0.4, 0.4, 0.3)]):
        for folder, method, f1 in ((small, "minc", minc64), (small, "spectral", spectral64),
                                   (large, "minc", minc512), (large, "spectral", spectral512)):  # fmt: skip
            write_cell(folder, "pong", method, seed, f1)
    result = atariari.batch_claim(argparse.Namespace(results=small, large=large, batch=512))
    # minc: 64 -> (0.5, 0.7), 512 -> (0.4, 0.4): change 0.2, SE sqrt(0.02 / 2 + 0) = 0.1
    # spectral: 64 -> (0.4, 0.4), 512 -> (0.5, 0.3): change 0.0, SE sqrt(0 + 0.02 / 2) = 0.1
    assert result["pong"]["minc"]["change"] == pytest.approx(0.2) and result["pong"]["minc"]["se"] == pytest.approx(0.1)
    assert result["pong"]["spectral"]["change"] == pytest.approx(0.0)
    assert result["pong"]["minc_minus_spectral"]["change"] == pytest.approx(0.2)
    assert result["pong"]["minc_minus_spectral"]["se"] == pytest.approx(0.1 * 2**0.5)
    assert "| pong | minc - spectral | | | +0.200 +- 0.141 |" in (large / "batch_claim.md").read_text()
    assert "bowling" not in result
