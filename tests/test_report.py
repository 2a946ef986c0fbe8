"""A user's aux-loss study in two commands: a sweep (+study=<name>, rerun into its sweep dir: finished jobs skipped,
stopped ones resumed; Hydra's basic and joblib launchers) and `python -m minc_rl.report`, whose numbers are checked
on synthetic run dirs against hand-derived values and against rliable called directly."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from rliable import library as rly
from rliable import metrics

from minc_rl.runs import report, run_io
from minc_rl.runs.train_config import CONFIG_DIR
from train_cli import ENV, run_in_process

REPS = 50  # bootstrap resamples in these tests (fast); rliable called directly with the same number and seed agrees


def make_run(path: Path, env: str, aux: str, seed: int, finals: dict[str, float], share: float = 0.01, **settings) -> Path:
    """A run dir as minc_rl.train writes it: four evaluations per split whose last three average to finals[split]
    (the first is 100, far off), progress.csv with an aux and a health column, summary.json with a speed and a final
    health of srank 10 + seed, dormant 0.1 * seed (none for aux=spectral, as from a run that did not measure it)."""
    config = {"env": env, "seed": seed, "aux": {"name": aux, "share": share}, "agent": {"name": "ppo"}, **settings}
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    for step, offset in ((100, None), (200, -1.0), (300, 0.0), (400, 1.0)):
        for split, final in finals.items():
            value = 100.0 if offset is None else final + offset
            run_io.append_evaluation(path / "evaluations.csv", dict(step=step, split=split, return_mean=value,
                                                                    return_std=0.0, length_mean=10.0, episodes=1))
    rows = [f"{step},{seed + step / 100},{0.5 * step}" for step in (100, 200, 300, 400)]
    (path / "progress.csv").write_text("time/total_timesteps,train/aux_loss,health/srank\n" + "\n".join(rows) + "\n")
    health = {"srank": 10.0 + seed, "dormant": 0.1 * seed} if aux != "spectral" else {}  # spectral: not measured
    run_io.write_summary(path / "summary.json", {"steps": 400, "interrupted": False, "steps_per_s": 10.0 * (seed + 1),
                                                 "health": health})
    return path


# env -> aux -> final returns of seeds 0, 1, 2 (test split). Baseline-normalised (by aux=none's mean: 2 and 20):
# none 0.5, 1, 1.5 on both envs; minc 2, 2.5, 3 on both; spectral 0.75, 1.25, 1.75 on A and 0.25, 0.75, 1.25 on B.
FINALS = {
    "gym:A": {"none": [1.0, 2.0, 3.0], "minc": [4.0, 5.0, 6.0], "spectral": [1.5, 2.5, 3.5]},
    "gym:B": {"none": [10.0, 20.0, 30.0], "minc": [40.0, 50.0, 60.0], "spectral": [5.0, 15.0, 25.0]},
}


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """FINALS as 18 run dirs (torch_threads and resume differ between them too: bookkeeping, not an arm)."""
    for env, by_aux in FINALS.items():
        for aux, finals in by_aux.items():
            for seed, final in enumerate(finals):
                make_run(tmp_path / "sweep" / f"{env[-1]}_{aux}_{seed}", env, aux, seed, {"test": final},
                         torch_threads=seed + 1, resume=None if seed else f"/runs/{aux}")
    return tmp_path / "sweep"


def test_runs_group_by_the_settings_that_differ_and_final_return_is_the_mean_of_the_last_three(study):
    result = report.analyse(report.find_runs([study]), baseline=["aux=none"], reps=REPS)
    assert result["runs"] == 18 and result["arm_keys"] == ["aux"] and result["baseline"] == "aux=none"
    assert result["arms"] == ["aux=none", "aux=minc", "aux=spectral"]
    a = result["envs"]["gym:A"]["arms"]
    assert a["aux=minc"]["splits"]["test"]["final_returns"] == {0: 4.0, 1: 5.0, 2: 6.0}
    assert a["aux=minc"]["splits"]["test"]["mean"] == pytest.approx(5.0)
    assert a["aux=minc"]["splits"]["test"]["se"] == pytest.approx(1 / np.sqrt(3))  # std 1 over 3 seeds
    change = a["aux=minc"]["splits"]["test"]["vs_baseline"]
    assert change["difference"] == pytest.approx(3.0) and change["relative"] == pytest.approx(1.5)
    assert change["se"] == pytest.approx(np.sqrt(2 / 3))  # sqrt(SE^2 + SE_baseline^2), both 1/sqrt(3)
    assert a["aux=minc"]["steps"] == [400] and a["aux=minc"]["steps_per_s"] == pytest.approx(20.0)
    last_one = report.analyse(report.find_runs([study]), baseline=["aux=none"], last=1, reps=REPS)
    assert last_one["envs"]["gym:A"]["arms"]["aux=minc"]["splits"]["test"]["mean"] == pytest.approx(6.0)


def test_final_health_is_the_mean_and_se_over_seeds_of_each_runs_last_measurement(study):
    """Seeds 0, 1, 2: srank 10, 11, 12 -> 11 ± 1/sqrt(3); dormant 0, 0.1, 0.2 -> 0.1 ± 0.1/sqrt(3)."""
    result = report.analyse(report.find_runs([study]), baseline=["aux=none"], reps=REPS)
    health = result["envs"]["gym:B"]["arms"]["aux=minc"]["health"]
    assert health["srank"]["values"] == {0: 10.0, 1: 11.0, 2: 12.0}
    assert health["srank"]["mean"] == pytest.approx(11.0) and health["srank"]["se"] == pytest.approx(1 / np.sqrt(3))
    assert health["dormant"]["mean"] == pytest.approx(0.1) and health["dormant"]["se"] == pytest.approx(0.1 / np.sqrt(3))
    assert result["envs"]["gym:B"]["arms"]["aux=spectral"]["health"] == {}
    table = report.markdown(result).split("## Final encoder health per env")[1]
    assert "| env | arm | srank | dormant |" in table
    assert "| gym:B | aux=minc | 11.000 ± 0.577 | 0.100 ± 0.058 |" in table
    assert "| gym:B | aux=spectral | - | - |" in table


def test_iqm_and_probability_of_improvement_match_hand_values_and_rliable(study):
    """IQM (25% cut from each end of the 6 scores): none [0.5, 1, 1, 1.5] -> 1.0; minc [2, 2.5, 2.5, 3] -> 2.5;
    spectral [0.75, 0.75, 1.25, 1.25] -> 1.0. P(minc > none) = 1 on both envs: 1.0, with the interval [1, 1].
    P(spectral > none): 6 of 9 pairs on A, 3 of 9 on B: 0.5."""
    arms = report.analyse(report.find_runs([study]), baseline=["aux=none"], reps=REPS, seed=3)["aggregate"]["arms"]
    assert {arm: value["iqm"] for arm, value in arms.items()} == pytest.approx(
        {"aux=none": 1.0, "aux=minc": 2.5, "aux=spectral": 1.0})
    assert arms["aux=minc"]["probability_of_improvement"] == 1.0
    assert arms["aux=minc"]["probability_of_improvement_ci"] == [1.0, 1.0]
    assert arms["aux=spectral"]["probability_of_improvement"] == pytest.approx(0.5)
    assert "probability_of_improvement" not in arms["aux=none"]

    scores = {aux: np.array([[FINALS[env][aux][seed] / np.mean(FINALS[env]["none"]) for env in FINALS] for seed in range(3)])
              for aux in ("none", "minc", "spectral")}  # runs x envs, normalised by aux=none's mean
    np.random.seed(3)
    iqm, iqm_ci = rly.get_interval_estimates({f"aux={k}": v for k, v in scores.items()},
                                             lambda x: np.array([metrics.aggregate_iqm(x)]), reps=REPS)
    poi, poi_ci = rly.get_interval_estimates({f"aux={k}": (scores[k], scores["none"]) for k in ("minc", "spectral")},
                                             metrics.probability_of_improvement, reps=REPS)
    for arm, value in arms.items():
        assert value["iqm"] == pytest.approx(iqm[arm][0]) and value["iqm_ci"] == pytest.approx(iqm_ci[arm][:, 0])
    for arm in ("aux=minc", "aux=spectral"):
        assert arms[arm]["probability_of_improvement"] == pytest.approx(poi[arm])
        assert arms[arm]["probability_of_improvement_ci"] == pytest.approx(np.ravel(poi_ci[arm]))
    # IQM differences by hand: minc 2.5 - 1.0 = 1.5, spectral 1.0 - 1.0 = 0; and as rliable bootstraps them
    assert arms["aux=minc"]["iqm_difference"] == pytest.approx(1.5)
    assert arms["aux=spectral"]["iqm_difference"] == pytest.approx(0.0)
    gap, gap_ci = rly.get_interval_estimates(
        {f"aux={k}": (scores[k], scores["none"]) for k in ("minc", "spectral")},
        lambda x, y: metrics.aggregate_iqm(x) - metrics.aggregate_iqm(y), reps=REPS)
    for arm in ("aux=minc", "aux=spectral"):
        assert arms[arm]["iqm_difference_ci"] == pytest.approx(np.ravel(gap_ci[arm]))
        low, high = arms[arm]["iqm_difference_ci"]
        assert low <= arms[arm]["iqm_difference"] <= high


def test_a_non_finite_evaluation_return_is_refused_naming_the_run_and_step(study):
    """A NaN return is not left out of a mean (which changed the arm's number silently): the report names it."""
    path = study / "A_minc_1" / "evaluations.csv"
    path.write_text(path.read_text().replace("300,test,5.0", "300,test,nan"))
    with pytest.raises(report.ReportError, match=rf"^{path}: the evaluation return at step 300 on test is nan \(of 1 "
                       r"non-finite in all\); the report takes no mean without it: repair or remove that run"):
        report.find_runs([study])


def test_one_seed_per_arm_gives_values_without_intervals_and_says_why(tmp_path):
    """With one seed an arm's bootstrap resamples one run: a zero-width interval, which is no result. The report gives
    the values, no interval, and says that an interval needs >= 2 seeds."""
    for aux, final in (("none", 2.0), ("minc", 3.0)):
        make_run(tmp_path / "sweep" / aux, "gym:A", aux, 0, {"test": final})
    result = report.analyse(report.find_runs([tmp_path / "sweep"]), baseline=["aux=none"], reps=REPS)
    arms = result["aggregate"]["arms"]
    assert arms["aux=minc"]["iqm"] == pytest.approx(1.5) and arms["aux=minc"]["probability_of_improvement"] == 1.0
    assert all(arms[arm]["iqm_ci"] is None for arm in arms)
    assert arms["aux=minc"]["probability_of_improvement_ci"] is None and arms["aux=minc"]["iqm_difference_ci"] is None
    text = report.markdown(result)
    assert "| aux=minc | 1 | 1.50 [no interval: 1 seed] | 0.50 [no interval: 1 seed] | 1.00 [no interval: 1 seed] |" in text
    assert ("aux=none, aux=minc: one seed per env, so no 95% interval (it needs >= 2 seeds per arm)" in text
            and "[1.00, 1.00]" not in text)
    written = report.write_report(report.find_runs([tmp_path / "sweep"]), tmp_path / "out", baseline=["aux=none"], reps=REPS)
    assert not {"aggregate_iqm.png", "aggregate_improvement.png"} & {path.name for path in written}


def test_minmax_normalisation_and_an_arm_missing_an_env(study):
    """Without spectral on B, min-max over every run of the env (A: 1 to 6, B: 10 to 60) gives none 0, 0.2, 0.4
    and minc 0.6, 0.8, 1 on both envs: IQMs 0.2 and 0.8. Spectral, missing an env, is left out and named."""
    runs = [run for run in report.find_runs([study]) if (run.env, run.settings["aux.name"]) != ("gym:B", "spectral")]
    result = report.analyse(runs, baseline=["aux=none"], normalise="minmax", reps=REPS)["aggregate"]
    assert {arm: value["iqm"] for arm, value in result["arms"].items()} == pytest.approx({"aux=none": 0.2, "aux=minc": 0.8})
    assert result["notes"] == ["aux=spectral is left out: it has no seed run on every env (gym:A, gym:B)"]


def test_each_env_is_scored_on_its_first_split_and_tables_follow_the_splits(tmp_path):
    """procgen's unseen levels and gym's test split by default; --split train_levels test scores procgen's training
    levels (minc 2x none there, 0.5x on unseen levels); one table per set of splits."""
    for aux, scale in (("none", 1.0), ("minc", 2.0)):
        for seed in (0, 1):
            make_run(tmp_path / f"p_{aux}_{seed}", "procgen:starpilot", aux, seed,
                     {"train_levels": scale * (seed + 1), "unseen_levels": (seed + 1) / scale})
            make_run(tmp_path / f"g_{aux}_{seed}", "gym:A", aux, seed, {"test": scale * (seed + 1)})
    runs = report.find_runs([tmp_path])
    default = report.analyse(runs, baseline=["aux=none"], reps=REPS)
    assert default["aggregate"]["envs"] == {"gym:A": "test", "procgen:starpilot": "unseen_levels"}
    # minc's scores, by none's means (1.5 on both): unseen 1/3, 2/3 and test 4/3, 8/3; the middle two: 2/3, 4/3
    assert default["aggregate"]["arms"]["aux=minc"]["iqm"] == pytest.approx(1.0)
    training = report.analyse(runs, baseline=["aux=none"], splits=["train_levels", "test"], reps=REPS)
    assert training["aggregate"]["envs"]["procgen:starpilot"] == "train_levels"
    assert training["aggregate"]["arms"]["aux=minc"]["iqm"] == pytest.approx(2.0)  # 4/3, 8/3 on both: middle 4/3, 8/3
    text = report.markdown(default)
    assert "| env | arm | seeds | steps | test: final return | test: vs baseline | steps/s |" in text
    assert "| procgen:starpilot | aux=minc | 2 | 400 | 3.00 ± 1.00 | +1.50 ± 1.12 (+100%) | 0.75 ± 0.25 | -0.75 ± 0.56 (-50%) | 15 |" in text


@pytest.mark.parametrize("baseline, message", [
    (["aux=nonee"], "--baseline aux=nonee: no arm matches; the arms are: aux=minc; aux=none; aux=spectral"),
    (["agent=dqn"], "--baseline agent=dqn: the arms do not differ by agent; they differ by aux"),
    (None, "the runs form several arms (aux=minc; aux=none; aux=spectral): name one with --baseline KEY=VALUE"),
    (["aux"], "--baseline aux: "),
])
def test_a_bad_baseline_is_one_line_naming_the_arms(study, baseline, message):
    with pytest.raises(report.ReportError) as error:
        report.analyse(report.find_runs([study]), baseline=baseline, reps=REPS)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_report_cli_writes_its_files_and_bad_input_is_one_line(study, tmp_path):
    command = [sys.executable, "-m", "minc_rl.report", str(study), "--baseline", "aux=none", "--reps", str(REPS)]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    out = study / "report"
    names = {"report.md", "report.json", "gym_A_returns.png", "gym_A_aux.png", "gym_A_health.png", "gym_B_returns.png",
             "gym_B_aux.png", "gym_B_health.png", "aggregate_iqm.png", "aggregate_improvement.png"}
    assert names <= {path.name for path in out.iterdir()}
    text = (out / "report.md").read_text()
    assert "| gym:A | aux=minc | 3 | 400 | 5.00 ± 0.58 | +3.00 ± 0.82 (+150%) | 20 |" in text
    assert "| aux=minc | 3 | 2.50 [" in text and "| 1.00 [1.00, 1.00] |" in text
    assert json.loads((out / "report.json").read_text())["aggregate"]["arms"]["aux=minc"]["iqm"] == pytest.approx(2.5)



def test_an_out_directory_that_fails_while_the_report_is_written_is_one_line(study, tmp_path, capsys, monkeypatch):
    """A folder that becomes unwritable (or a disk that fills) after the check: one line, not a traceback."""
    from matplotlib.figure import Figure

    def refused(self, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(Figure, "savefig", refused)
    with pytest.raises(SystemExit) as stopped:
        report.main([str(study), "--baseline", "aux=none", "--reps", str(REPS), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"minc_rl.report: error: --out {tmp_path / 'out'}: the report was not written "
                            "(PermissionError: [Errno 13] Permission denied: ")


def test_the_python_api_takes_str_paths_and_refuses_no_runs(study):
    runs = report.find_runs([str(study)])
    assert [run.path for run in runs] == [run.path for run in report.find_runs([study])]
    assert report.load_run(str(runs[0].path)).path == runs[0].path
    with pytest.raises(report.ReportError, match=rf"{study / 'nowhere'} is no directory: not a run directory"):
        report.load_run(study / "nowhere")  # it said the directory held evaluations.csv
    with pytest.raises(report.ReportError, match=rf"{study} holds no evaluations.csv: not a run directory"):
        report.load_run(study)  # a sweep directory
    with pytest.raises(report.ReportError, match=r"no runs to report"):
        report.analyse([], baseline=["aux=none"])
    with pytest.raises(report.ReportError, match=r"--last and --reps must be integers >= 1; got 2.5 and 2000"):
        report.analyse(runs, baseline=["aux=none"], last=2.5)  # a pandas error before


@pytest.mark.parametrize("arguments, message", [
    (["{empty}"], "no run directories (a directory with evaluations.csv) under {empty}"),
    (["{study}", "--baseline", "aux=foo"], "--baseline aux=foo: no arm matches"),
    (["{study}", "{empty}", "--baseline", "aux=none"], "several directories: give --out DIR for the report"),
    (["{study}/nowhere"], "{study}/nowhere: no such directory"),
    (["{study}", "--baseline", "aux=none", "--split", "tset"], "--split tset: gym:A has the splits test"),
    (["{study}", "--baseline", "aux=none", "--seed", "-1"], "--seed must be in [0, 2**32 - 1] (numpy's seeds); got -1"),
    (["{study}", "--baseline", "aux=none", "--out", "{file}"], "--out {file}: a file, not a directory"),
    (["{study}", "--baseline", "aux=none", "--out", "{file}/report"],
     "--out {file}/report: cannot be written ({file} is not a directory); give a writable directory with --out DIR"),
])
def test_bad_input_is_one_line_and_exit_code_2(study, tmp_path, capsys, arguments, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").touch()
    paths = {"study": study, "empty": tmp_path / "empty", "file": tmp_path / "file"}
    with pytest.raises(SystemExit) as stopped:
        report.main([argument.format(**paths) for argument in arguments])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.startswith(f"minc_rl.report: error: {message.format(**paths)}"), error
    assert error.count("\n") == 1


def test_two_runs_of_one_arm_and_seed_are_an_error_naming_both(study):
    """The same settings and seed twice (a sweep run twice into one tree): no silent choice of one of them."""
    make_run(study / "again" / "A_minc_1", "gym:A", "minc", 1, {"test": 9.0}, torch_threads=7)
    with pytest.raises(report.ReportError, match=r"gym:A, aux=minc: two runs of seed 1 \(.*A_minc_1 and .*again/A_minc_1\)"):
        report.analyse(report.find_runs([study]), baseline=["aux=none"], reps=REPS)


def test_the_settings_of_aux_none_are_left_out_of_its_label(tmp_path):
    """aux=none's aux.share changes nothing: the arm reads 'aux=none'; aux=minc's two shares stay two arms."""
    for seed in range(2):
        make_run(tmp_path / f"none_{seed}", "gym:A", "none", seed, {"test": 1.0 + seed})
        for share in (0.01, 0.1):
            make_run(tmp_path / f"minc_{share}_{seed}", "gym:A", "minc", seed, {"test": 2.0 + seed}, share=share)
    result = report.analyse(report.find_runs([tmp_path]), baseline=["aux=none"], reps=REPS)
    assert result["arm_keys"] == ["aux", "aux.share"] and result["baseline"] == "aux=none"
    assert result["arms"] == ["aux=none", "aux=minc aux.share=0.01", "aux=minc aux.share=0.1"]
    assert result["envs"]["gym:A"]["arms"]["aux=none"]["splits"]["test"]["final_returns"] == {0: 1.0, 1: 2.0}
    make_run(tmp_path / "none_0_share_0.1", "gym:A", "none", 0, {"test": 5.0}, share=0.1)
    with pytest.raises(report.ReportError, match=r"gym:A, aux=none: two runs of seed 0"):  # same arm: inert share
        report.analyse(report.find_runs([tmp_path]), baseline=["aux=none"], reps=REPS)


def test_a_run_without_config_yaml_is_named(tmp_path):
    run = make_run(tmp_path / "run", "gym:A", "none", 0, {"test": 1.0})
    (run / "config.yaml").unlink()
    with pytest.raises(report.ReportError, match="run holds evaluations.csv but no config.yaml"):
        report.find_runs([tmp_path])


# --- the sweep: a study config, rerun into its sweep dir --------------------------------------------------------

TINY_STUDY = """\
# @package _global_
env: gym:CartPole-v1
total_steps: {steps}
n_envs: 2
agent: {{n_steps: 32, n_minibatches: 2}}
aux: {{batch: 16}}
eval: {{episodes: 1, n_envs: 1, every: 1_000_000}}
checkpoint: {{every: 64}}
progress_bar: false
torch_threads: 1
hydra:
  sweeper:
    params:
      aux: {arms}
"""


def write_study(config_dir: Path, steps: int, arms: str = "none,minc") -> None:
    """configs/study/tiny.yaml under config_dir: CartPole PPO, aux `arms` (none and minc), `steps` steps."""
    (config_dir / "study").mkdir(parents=True, exist_ok=True)
    (config_dir / "study" / "tiny.yaml").write_text(TINY_STUDY.format(steps=steps, arms=arms))


def test_a_study_sweep_rerun_skips_finished_jobs_resumes_stopped_ones_and_reports(tmp_path, monkeypatch):
    """The user's two commands on a study of their own (--config-dir): the sweep, then the report. A rerun skips both
    finished jobs, also with the arms reordered and one added (jobs are found by their settings, not their number);
    after the study's budget grows, a rerun resumes each from its checkpoint (as a stopped job), in its directory."""
    configs, sweep = tmp_path / "configs", tmp_path / "sweep"
    write_study(configs, 64)
    command = ["-m", "-cd", str(configs), "+study=tiny", f"hydra.sweep.dir={sweep}"]
    run_in_process(monkeypatch, *command)
    jobs = [sweep / "+study=tiny,aux=minc", sweep / "+study=tiny,aux=none"]
    assert sorted(sweep.glob("+study=tiny,aux=*")) == jobs
    assert [json.loads((job / "summary.json").read_text())["steps"] for job in jobs] == [64, 64]
    progress = [pd.read_csv(job / "progress.csv") for job in jobs]
    names = ("config.yaml", "progress.csv", "evaluations.csv", "summary.json", "learning_curve.png")
    run_files = [path for job in jobs for path in [*(job / name for name in names), *job.glob("checkpoints/*")]]
    written = {path: path.stat().st_mtime_ns for path in run_files}

    write_study(configs, 64, arms="spectral,minc,none")  # reordered, and an arm added: only the new arm trains
    run_in_process(monkeypatch, *command)  # no file of either run is written again (Hydra's .hydra/ is)
    assert {path: path.stat().st_mtime_ns for path in run_files} == written
    assert sorted(sweep.glob("+study=tiny,aux=*")) == [*jobs, sweep / "+study=tiny,aux=spectral"]
    jobs.append(sweep / "+study=tiny,aux=spectral")
    progress.append(pd.read_csv(jobs[-1] / "progress.csv"))

    write_study(configs, 128, arms="none,spectral,minc")
    run_in_process(monkeypatch, *command)
    for job, before in zip(jobs, progress):
        summary = json.loads((job / "summary.json").read_text())
        assert (summary["steps"], summary["interrupted"]) == (128, False)
        assert [path.name for path in run_io.checkpoints(job)] == ["step_000000000128.zip", "step_000000000064.zip"]
        continued = pd.read_csv(job / "progress.csv")  # the rows up to step 64 kept, then the resumed run's
        kept = continued[continued[run_io.STEP_COLUMN] <= 64][before.columns].reset_index(drop=True)
        pd.testing.assert_frame_equal(kept, before, check_dtype=False)
        assert continued[run_io.STEP_COLUMN].max() == 128
        assert [int(row["step"]) for row in run_io.read_evaluations(job / "evaluations.csv")] == [64, 128]

    report.main([str(sweep), "--baseline", "aux=none", "--reps", str(REPS)])
    result = json.loads((sweep / "report" / "report.json").read_text())
    assert set(result["arms"]) == {"aux=none", "aux=minc", "aux=spectral"} and result["arm_keys"] == ["aux"]
    assert set(result["envs"]["gym:CartPole-v1"]["arms"]["aux=minc"]["splits"]) == {"test"}


def test_a_job_stopped_before_its_first_checkpoint_stops_the_rerun_and_is_left_as_it_is(tmp_path, monkeypatch):
    """(Its one line: '<job dir> holds a sweep job that stopped before its first checkpoint, so nothing to resume;
    move it away and rerun the sweep'. Hydra's in-process sweep and pytest's capture fixtures do not mix.)"""
    configs, sweep = tmp_path / "configs", tmp_path / "sweep"
    write_study(configs, 64)
    stale = sweep / "+study=tiny,aux=none"
    stale.mkdir(parents=True)
    (stale / "progress.csv").write_text("time/total_timesteps\n32\n")
    with pytest.raises(SystemExit) as stopped:
        run_in_process(monkeypatch, "-m", "-cd", str(configs), "+study=tiny", f"hydra.sweep.dir={sweep}")
    assert stopped.value.code == 2
    assert (stale / "progress.csv").read_text() == "time/total_timesteps\n32\n" and not (stale / "config.yaml").exists()
    assert not (sweep / "+study=tiny,aux=minc").exists()  # the sweep stopped there


def test_the_shipped_studies_compose_with_their_grid():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        minatar = compose("config", overrides=["+study=minatar_aux", "family=minatar"], return_hydra_config=True)
        procgen = compose("config", overrides=["+study=procgen_aux", "family=procgen"], return_hydra_config=True)
    assert (minatar.agent.name, minatar.encoder.name, minatar.total_steps, minatar.eval.every) == ("dqn", "minatar", 50_000, 5_000)
    assert dict(minatar.hydra.sweeper.params) == {
        "seed": "0,1,2", "env": "minatar:breakout,minatar:space_invaders", "aux": "none,minc,spectral"}
    assert (procgen.agent.name, procgen.encoder.name, procgen.total_steps) == ("ppo", "nature", 409_600)


@pytest.mark.slow
def test_a_joblib_sweep_runs_jobs_side_by_side_and_its_rerun_skips_them(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    configs, sweep = tmp_path / "configs", tmp_path / "sweep"
    write_study(configs, 64)
    command = [sys.executable, "-m", "minc_rl.train", "-m", "-cd", str(configs), "+study=tiny", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]
    first = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [json.loads(p.read_text())["steps"] for p in sorted(sweep.glob("*/summary.json"))] == [64, 64]
    rerun = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0 and (rerun.stdout + rerun.stderr).count("skipped") == 2, rerun.stderr[-3000:]
