"""minc_rl.train's run directories and the files it reads (issue 14): a directory belongs to one run (refusal, lock),
every file read is checked (checkpoints with fallback, progress.csv, summary.json, encoder.pt), a full disk during
a checkpoint, a prompt stop inside a PPO update, and the cluster path through submitit_local with SIGTERM / SIGUSR2."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from omegaconf import OmegaConf
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import VecNormalize

from minc_rl.runs import run_io, train_config, training
from minc_rl.agents import MincDQN, MincPPO
from minc_rl.ssl.encoders import build_encoder, save_encoder
from minc_rl.envs import make_vec_env
from minc_rl.common.io import atomic_write, atomic_write_all
from minc_rl.runs.run_callbacks import CheckpointError, Checkpoints, Evaluation, StopOnSignal, Stopped
from minc_rl.runs.run_state import RunState
from minc_rl.common.run_dir import RunLock
from train_cli import ENV, run_in_process

# A CartPole PPO run with the MLP encoder and MINC: 2 envs x 32 steps per rollout, a few seconds per run.
CARTPOLE = [
    "env=gym:CartPole-v1", "encoder=mlp", "aux=minc", "aux.batch=16", "n_envs=2", "agent.n_steps=32",
    "agent.n_minibatches=2", "eval.episodes=1", "eval.n_envs=1", "eval.every=1000000", "progress_bar=false",
    "torch_threads=1",
]  # fmt: skip


def refused(monkeypatch, capsys, *args: str) -> str:
    """The one stderr line of a command line that exits with code 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minc_rl.train: error: "), err
    return err[0].removeprefix("minc_rl.train: error: ")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (but the lock file, which holds the pid of its latest holder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A CartPole run of 128 steps with checkpoints at 64 and 128 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    mp = pytest.MonkeyPatch()
    try:
        run_in_process(mp, *CARTPOLE, "total_steps=128", "checkpoint.every=64", f"hydra.run.dir={run_dir}")
    finally:
        mp.undo()
    assert [p.name for p in run_io.checkpoints(run_dir)] == ["step_000000000128.zip", "step_000000000064.zip"]
    return run_dir


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    return run_dir


# --- a run directory belongs to one run ----------------------------------------------------------------------------


def test_a_fresh_run_in_a_directory_holding_a_run_is_refused_and_nothing_is_touched(monkeypatch, capsys, finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    before = snapshot(run_dir)
    message = refused(monkeypatch, capsys, *CARTPOLE, "total_steps=64", f"hydra.run.dir={run_dir}")
    assert message == (
        f"{run_dir} already holds a run (config.yaml, checkpoints, progress.csv, evaluations.csv, summary.json); continue it with "
        f"resume={run_dir}, or start a new run in another directory (hydra.run.dir=<new dir>)"
    )
    assert snapshot(run_dir) == before  # Hydra did not start either: .hydra/ and train.log are the old run's


def test_a_refused_run_that_hydra_started_leaves_the_runs_hydra_files_alone(monkeypatch, capsys, finished_run, tmp_path):
    """A run dir given as an interpolation is only known once Hydra has started: Hydra writes nothing there (its
    output_subdir is off), and the run's .hydra/ is written by the run that owns the directory."""
    run_dir = copy_run(finished_run, tmp_path)
    assert (run_dir / ".hydra" / "overrides.yaml").read_text().startswith("- env=gym:CartPole-v1\n")
    before = snapshot(run_dir)
    monkeypatch.setenv("RUN_DIR", str(run_dir))
    message = refused(monkeypatch, capsys, *CARTPOLE, "total_steps=64", "hydra.run.dir=${oc.env:RUN_DIR}")
    assert message.startswith(f"{run_dir} already holds a run")
    assert snapshot(run_dir) == before


def test_hints_name_what_works(monkeypatch, capsys, finished_run, tmp_path):
    """A run that crashed before its first checkpoint, resume= with another hydra.run.dir, a read-only run to resume and
    a huge n_envs: each message says what to do instead, and blames the right value."""
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    (crashed / "progress.csv").write_text("")
    message = refused(monkeypatch, capsys, *CARTPOLE, f"hydra.run.dir={crashed}")
    assert message.startswith(f"{crashed} holds a run that stopped before its first checkpoint (config.yaml, progress.csv): "
                              "there is nothing to resume; move it away or delete it")
    message = refused(monkeypatch, capsys, f"resume={crashed}")
    assert message.endswith("the run stopped before its first checkpoint, so there is nothing to resume; move the "
                            "directory away or delete it, and start the run again")
    message = refused(monkeypatch, capsys, f"resume={finished_run}", f"hydra.run.dir={tmp_path / 'elsewhere'}")
    assert message == (f"resume={finished_run} continues in its own run dir; drop hydra.run.dir={tmp_path / 'elsewhere'} "
                       "(to continue elsewhere, copy the run dir there and resume that copy)")
    message = refused(monkeypatch, capsys, *CARTPOLE, "n_envs=100000000", f"hydra.run.dir={tmp_path / 'huge'}")
    assert message == "n_envs=100000000 is more environments than one process runs; give at most 65,536"
    read_only = copy_run(finished_run, tmp_path / "ro")
    real_access = os.access  # as access(2) answers a user without write permission (root may write anywhere)
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == read_only else real_access(p, mode, **k))
    message = refused(monkeypatch, capsys, f"resume={read_only}", "total_steps=256")
    assert message == (f"resume={read_only}: the run dir cannot be written ({read_only} is not writable); copy it to a "
                       "writable place and resume the copy")


def test_a_sweep_is_checked_whole_before_its_first_job(monkeypatch, capsys, tmp_path):
    message = refused(monkeypatch, capsys, "-m", *CARTPOLE, "total_steps=64", "seed=0,-1,2", f"hydra.sweep.dir={tmp_path}")
    assert message == "seed must be an integer >= 0; got -1"
    assert list(tmp_path.iterdir()) == []  # job 0 did not run


def test_a_studys_own_defaults_count_for_the_command_lines_keys(monkeypatch, capsys):
    """+study=representation sets agent=dqn in its defaults: agent.replay_ratio is then a key without agent=dqn."""
    args = ["-m", "+study=representation", "agent.replay_ratio=4", "hydra.sweep.dir=/tmp/unused"]
    monkeypatch.setattr(train_config, "check_sweep_jobs", lambda *a: None)  # only the key check here
    assert train_config.check_command_line(args) == args
    message = refused(monkeypatch, capsys, "-m", "+study=representation", "agent.replay_ratoi=4")
    assert message.startswith("agent.replay_ratoi is not a key of minc_rl.train's config; did you mean agent.replay_ratio?")


def test_sweep_jobs_are_named_by_their_settings_and_jobs_sharing_a_directory_are_refused(monkeypatch, capsys):
    """A job's directory is its settings (a rerun with reordered values or an added arm finds it there): not the job
    number, nor total_steps (a rerun with a larger budget continues its jobs); paths are hashed, not written out."""
    assert train_config.job_dirname("aux=minc,seed=0", ["seed=0", "aux=minc", "total_steps=64"]) == "aux=minc,seed=0"
    assert train_config.job_dirname("", ["total_steps=64"]) == "defaults"
    first, second = (train_config.job_dirname("aux=minc", ["aux=minc", f"encoder.init={p}"]) for p in ("a.pt", "b.pt"))
    assert first.startswith("aux=minc-") and second.startswith("aux=minc-") and first != second
    message = refused(monkeypatch, capsys, "-m", *CARTPOLE, "total_steps=64,128")
    assert message.startswith("the sweep's jobs total_steps=128, total_steps=64 would share one directory: "
                              "progress_bar, torch_threads, total_steps do not name a job's directory")


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ("hydra:\n  sweeper:\n    parms:\n      seed: 0,1\n",
         "{path}: hydra.sweeper.parms is not a key of minc_rl.train's config; did you mean hydra.sweeper.params?"),
        ("defaults:\n  - override /agnet: dqn\n",
         "{path}: its defaults list sets 'agnet', which is not a config group; valid groups: agent, aux, encoder "
         "(e.g. 'override /agent: dqn')"),
        ("defaults:\n  - override /agent: dqm\n",
         "{path}: its defaults list sets agent='dqm', which is not valid; choose one of 'dqn', 'ppo'"),
        ("total_steps: 64\nhydra:\n  sweeper:\n   params: {seed: [0, 1}\n", "{path} is not valid YAML (line 5, column 24: expected ',' or ']', but got '}}'); fix it"),
    ],
)  # fmt: skip
def test_a_bad_study_file_is_one_line_naming_the_file_and_the_fix(monkeypatch, capsys, tmp_path, study, message):
    (tmp_path / "study").mkdir()
    path = tmp_path / "study" / "bad.yaml"
    path.write_text("# @package _global_\n" + study)
    for sweep in (["-m"], []):  # a sweep, and a single run of the study's defaults
        found = refused(monkeypatch, capsys, *sweep, "-cd", str(tmp_path), "+study=bad", *CARTPOLE)
        assert found.startswith("study file " + message.format(path=path)), found


def test_long_job_directory_names_are_shortened_with_a_hash():
    name = ",".join(f"aux.loss_kwargs.option{i}={i}" for i in range(20))
    short = train_config.short_dirname(name)
    assert len(name) > 255 and len(short.encode()) == train_config.MAX_DIRNAME == 200
    assert short == name[:189] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    assert train_config.short_dirname("aux=minc,seed=0") == "aux=minc,seed=0"


def test_two_runs_cannot_share_a_directory_and_a_killed_holder_leaves_no_lock(monkeypatch, capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from minc_rl.common.run_dir import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); import time; time.sleep(600)", str(run_dir)],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = refused(monkeypatch, capsys, *CARTPOLE, "total_steps=64", f"hydra.run.dir={run_dir}")
        assert message == (
            f"{run_dir} is in use by another run (pid {holder.pid}); two runs cannot write one directory: "
            "wait for it to end, or choose another directory (hydra.run.dir=<new dir>)"
        )
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "progress.csv").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the OS drops the lock
        holder.wait()
    with RunLock(run_dir):
        pass


def test_a_read_only_run_directory_is_one_line(monkeypatch, capsys, tmp_path):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: answer as access(2) does for everyone else
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == parent else real_access(p, mode, **k))
    try:
        message = refused(monkeypatch, capsys, *CARTPOLE, f"hydra.run.dir={parent / 'run'}")
    finally:
        parent.chmod(0o755)
    assert message == (
        f"cannot write the run directory {parent / 'run'}: {parent} is not writable; "
        "choose a writable one with hydra.run.dir=<dir>"
    )
    assert not (parent / "run").exists()


# --- the config: misspelt keys, env_options --------------------------------------------------------------------------


def test_env_options_and_loss_kwargs_are_taken_without_plus(monkeypatch, tmp_path):
    seen = []

    def stop_before_building(cfg):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(training, "build_envs", stop_before_building)
    with pytest.raises(SystemExit):
        run_in_process(
            monkeypatch, "env=procgen:bigfish", "env_options.distribution_mode=hard", "env_options.use_backgrounds=false",
            "aux=spectral", "aux.loss_kwargs.mu=2.0", f"hydra.run.dir={tmp_path / 'run'}",
        )  # fmt: skip
    (cfg,) = seen
    assert cfg.env_options.distribution_mode == "hard" and cfg.env_options.use_backgrounds is False
    assert cfg.env_options.num_levels == 200  # the family default stays
    assert cfg.aux.loss_kwargs.mu == 2.0  # the loss's own options, documented in aux/spectral.yaml, need no + either


# --- encoder.pt ----------------------------------------------------------------------------------------------------


def encoder_files(folder: Path) -> dict[str, Path]:
    """Bad encoder.pt files: random bytes, a torch file of other keys, NaN weights, another architecture's weights."""
    folder.mkdir()
    files = {name: folder / f"{name}.pt" for name in ("random", "keys", "nan", "shapes")}
    files["random"].write_bytes(os.urandom(4096))
    torch.save({"weights": torch.zeros(3)}, files["keys"])
    impala = build_encoder("impala", (3, 64, 64))
    with torch.no_grad():
        next(impala.parameters()).fill_(float("nan"))
    save_encoder(str(files["nan"]), impala, "impala", (3, 64, 64))
    nature = build_encoder("nature", (3, 64, 64))
    save_encoder(str(files["shapes"]), nature, "impala", (3, 64, 64))  # named impala, nature's tensors
    return files


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("random", "not a torch file written by minc_rl.pretrain ("),
        ("keys", "not an encoder.pt: it holds ['weights'], an encoder.pt holds ['name', 'input_shape', 'features_dim', 'state_dict']"),
        ("nan", "its weights are not finite ("),
        ("shapes", "its weights do not fit the 'impala' architecture (other tensor names or shapes)"),
    ],
)  # fmt: skip
def test_a_bad_encoder_file_is_one_line_before_anything_is_built(monkeypatch, capsys, tmp_path, case, expected):
    path = encoder_files(tmp_path / "encoders")[case]
    built = []
    monkeypatch.setattr(training, "make_vec_env", lambda *a, **k: built.append(a))
    message = refused(monkeypatch, capsys, "env=procgen:bigfish", f"encoder.init={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert message.startswith(f"encoder.init='{path}': {expected}"), message
    assert built == [] and not (tmp_path / "run" / "config.yaml").exists()


# --- checkpoints and the other files of a resumed run ----------------------------------------------------------------


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_valid_one(monkeypatch, capsys, finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    latest = run_dir / "checkpoints" / "step_000000000128.zip"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated, as by a crash during a copy
    run_in_process(monkeypatch, f"resume={run_dir}", "total_steps=192")
    captured = capsys.readouterr()
    assert (
        "resuming from step_000000000064.zip: the newer step_000000000128.zip (BadZipFile: File is not a zip file) "
        "is skipped"
    ) in captured.out + captured.err
    assert MincPPO.load(run_dir / "checkpoints" / "step_000000000192.zip", device="cpu").num_timesteps == 192
    assert run_io.checkpoint_problem(latest, vecnormalize=False) is None  # step 128 was written again by the resumed run
    steps = pd.read_csv(run_dir / "progress.csv")["time/total_timesteps"].tolist()
    assert steps == sorted(steps) and steps[-1] == 192 and steps.count(128) == 1  # the rows after step 64 were redone
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 192


def test_resume_of_a_finished_run_leaves_it_untouched_and_says_how_to_extend_it(monkeypatch, capsys, finished_run, tmp_path):
    """resume= without a larger total_steps: no evaluation, no new row, summary.json and config.yaml as they were."""
    run_dir = copy_run(finished_run, tmp_path)
    before = snapshot(run_dir)
    for budget in ([], ["total_steps=64"]):  # the run's own total_steps, or a smaller one
        run_in_process(monkeypatch, f"resume={run_dir}", *budget)
        assert "holds a finished run of 128 steps; nothing to do" in capsys.readouterr().out
        assert snapshot(run_dir) == before


def test_a_study_run_resumes_with_the_command_line_it_was_started_with(monkeypatch, capsys, tmp_path):
    """`+study=<file>` adds a config group the saved config.yaml holds no key of: resuming with the run's own command
    line (as rl_evidence.py does) continues it; another study file is refused."""
    study = ["env=minatar:breakout", "agent=dqn", "+study=selfpred_replication", "aux=none", "agent.buffer_size=1000",
             "agent.learning_starts=50", "agent.batch_size=32", "checkpoint.every=100", "eval.every=100",
             "eval.episodes=1", "progress_bar=false", "torch_threads=1", f"hydra.run.dir={tmp_path}"]
    run_in_process(monkeypatch, *study, "total_steps=100")
    run_in_process(monkeypatch, *study, "total_steps=200", f"resume={tmp_path}")
    assert MincDQN.load(tmp_path / "checkpoints" / "step_000000000200.zip", device="cpu").num_timesteps == 200
    assert OmegaConf.load(tmp_path / ".hydra" / "overrides.yaml")[2] == "+study=selfpred_replication"
    capsys.readouterr()
    message = refused(monkeypatch, capsys, *study[:2], "+study=representation", "total_steps=300", f"resume={tmp_path}")
    assert message == f"resume: '+study=representation' is not a key=value override of a key of the run in {tmp_path}"


def test_a_damaged_run_state_is_skipped_like_a_damaged_checkpoint(monkeypatch, capsys, finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    state = run_io.run_state_path(run_dir / "checkpoints" / "step_000000000128.zip")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a crash during a copy
    run_in_process(monkeypatch, f"resume={run_dir}", "total_steps=192")
    captured = capsys.readouterr()
    assert ("resuming from step_000000000064.zip: the newer step_000000000128.zip (its run state "
            "step_000000000128.run_state.pkl cannot be read (UnpicklingError: pickle data was truncated)) is skipped"
            in captured.out + captured.err)  # fmt: skip
    assert "has no run state" not in captured.out + captured.err
    assert run_io.read_run_state(run_dir / "checkpoints" / "step_000000000192.zip") is not None
    other = run_dir / "checkpoints" / "step_000000000064.run_state.pkl"
    state.write_bytes(other.read_bytes())  # another step's
    assert run_io.checkpoint_problem(state.with_suffix("").with_suffix(".zip"), vecnormalize=False) == (
        "its run state step_000000000128.run_state.pkl is the state of step 64")


def test_a_checkpoint_without_a_run_state_resumes_as_before_with_one_line(monkeypatch, capsys, finished_run, tmp_path):
    """A checkpoint written before exact resume: the run continues from it, its random streams and episodes anew."""
    run_dir = copy_run(finished_run, tmp_path)
    for state in (run_dir / "checkpoints").glob("*.run_state.pkl"):
        state.unlink()
    run_in_process(monkeypatch, f"resume={run_dir}", "total_steps=192")
    captured = capsys.readouterr()
    assert ("step_000000000128.zip has no run state (it was written before exact resume): the random streams restart "
            "from the run's seed and the episodes in progress restart") in captured.out + captured.err
    assert MincPPO.load(run_dir / "checkpoints" / "step_000000000192.zip", device="cpu").num_timesteps == 192


def test_a_resume_with_other_env_settings_restarts_the_episodes_and_says_so(monkeypatch, capsys, finished_run, tmp_path):
    """Saved envs come back only into envs built the same way: 4 envs are not the saved 2 (nor their options)."""
    run_dir = copy_run(finished_run, tmp_path)
    run_in_process(monkeypatch, f"resume={run_dir}", "total_steps=256", "n_envs=4")
    assert ("resuming step_000000000128.zip, not exactly: the episodes of the training env (EnvStateUnavailable: it was "
            "saved with other n_envs); the evaluation env test (EnvStateUnavailable: it was saved with other n_envs) "
            "restart") in capsys.readouterr().out  # fmt: skip
    assert MincPPO.load(run_dir / "checkpoints" / "step_000000000256.zip", device="cpu").num_timesteps == 256


def test_a_checkpoint_of_another_run_is_skipped_like_a_damaged_one(monkeypatch, capsys, finished_run, tmp_path):
    """A newer checkpoint that is not this run's (another agent's, copied in) is named and passed over; a config.yaml
    edited to another env fits no checkpoint: one line, nothing written."""
    run_dir = copy_run(finished_run, tmp_path)
    dqn = MincDQN("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), aux="none", learning_starts=10)
    dqn.save(run_dir / "checkpoints" / "step_000000000150.zip")
    run_in_process(monkeypatch, f"resume={run_dir}", "total_steps=192")
    captured = capsys.readouterr()
    assert ("the newer step_000000000150.zip (it holds a DQNPolicy, not a policy of agent=ppo) is skipped"
            in captured.out + captured.err)
    assert MincPPO.load(run_dir / "checkpoints" / "step_000000000192.zip", device="cpu").num_timesteps == 192

    edited = copy_run(finished_run, tmp_path / "edited")
    (edited / "config.yaml").write_text((edited / "config.yaml").read_text().replace("  dim: 64\n", "  dim: 32\n", 1))
    before = snapshot(edited)
    message = refused(monkeypatch, capsys, f"resume={edited}", "total_steps=192")
    assert message.startswith(f"resume='{edited}': no checkpoint in {edited / 'checkpoints'} can be loaded: ")
    assert "aux.dim=32 (saved: 64)" in message
    assert snapshot(edited) == before


def test_a_dqn_resume_never_mixes_a_newer_replay_buffer_into_an_older_checkpoint(monkeypatch, capsys, tmp_path,
                                                                                   finished_run):
    run_dir = tmp_path / "run"
    dqn = ["env=gym:CartPole-v1", "agent=dqn", "encoder=mlp", "aux=minc", "agent.learning_starts=50",
           "eval.episodes=1", "eval.n_envs=1", "eval.every=1000000", "progress_bar=false", "torch_threads=1"]
    run_in_process(monkeypatch, *dqn, "total_steps=200", "checkpoint.every=100", f"hydra.run.dir={run_dir}")
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_000000000100.run_state.pkl", "step_000000000100.zip", "step_000000000200.replay_buffer.pkl",
                     "step_000000000200.run_state.pkl", "step_000000000200.zip"]  # fmt: skip
    assert OmegaConf.load(run_dir / "config.yaml").aux.source == "td"  # DQN's default, named in the run's config
    assert OmegaConf.load(finished_run / "config.yaml").aux.source is None  # PPO takes pairs of its own
    newest = run_dir / "checkpoints" / "step_000000000200.zip"
    newest.write_bytes(newest.read_bytes()[:1000])
    message = refused(monkeypatch, capsys, f"resume={run_dir}", "total_steps=300")
    assert "step_000000000100.zip is resumed (a newer checkpoint was skipped), but the replay buffer there" in message
    run_in_process(monkeypatch, f"resume={run_dir}", "total_steps=300", "checkpoint.replay_buffer=false")
    assert MincDQN.load(run_dir / "checkpoints" / "step_000000000300.zip", device="cpu").num_timesteps == 300


def test_no_loadable_checkpoint_is_one_line_and_nothing_is_overwritten(monkeypatch, capsys, finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    for path in run_io.checkpoints(run_dir):
        path.write_bytes(b"PK\x03\x04" + os.urandom(100))
    before = snapshot(run_dir)
    message = refused(monkeypatch, capsys, f"resume={run_dir}", "total_steps=192")
    assert message == (
        f"resume={str(run_dir)!r}: no checkpoint in {run_dir / 'checkpoints'} can be loaded: "
        "step_000000000128.zip (BadZipFile: File is not a zip file); step_000000000064.zip (BadZipFile: File is not a zip file)"
    )
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("progress.csv", b"time/total_timesteps,a\n1,2\n\x00\xff,\"unclosed\n", "cannot be read ("),
        ("progress.csv", b"a,b\n1,2\n", "progress.csv has no time/total_timesteps column"),
        ("evaluations.csv", b"step,split\n1,test\n", "evaluations.csv has the columns ['step', 'split']"),
        ("summary.json", b'{"steps": 12', "summary.json cannot be read (JSONDecodeError: "),
    ],
)  # fmt: skip
def test_a_damaged_run_file_on_resume_is_one_line_and_nothing_is_overwritten(
    monkeypatch, capsys, finished_run, tmp_path, name, content, expected
):
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / name).write_bytes(content)
    before = snapshot(run_dir)
    message = refused(monkeypatch, capsys, f"resume={run_dir}", "total_steps=192")
    assert message.startswith(f"resume={str(run_dir)!r}: ") and expected in message, message
    assert message.endswith("; repair it or move it away, then resume again")
    assert snapshot(run_dir) == before


# --- a full disk during a checkpoint -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text + "eval: [unclosed\n", "its config.yaml cannot be read ("),
        (lambda text: text + "totl_steps: 64\n", "in its config.yaml, totl_steps is not a key of minc_rl.train's config; "
                                                  "did you mean total_steps? (a run would ignore it: fix or remove it in "),
        (lambda text: text.replace("  every: 1000000\n", "  every: 1000000\n  evry: 5\n", 1),
         "in its config.yaml, eval.evry is not a key of minc_rl.train's config; did you mean eval.every?"),
    ],
)  # fmt: skip
def test_a_hand_edited_config_yaml_on_resume_is_one_line_as_on_the_command_line(monkeypatch, capsys, finished_run,
                                                                                  tmp_path, edit, message):
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / "config.yaml").write_text(edit((run_dir / "config.yaml").read_text()))
    before = snapshot(run_dir)
    found = refused(monkeypatch, capsys, f"resume={run_dir}", "total_steps=192")
    assert found.startswith(f"resume={run_dir}: ") and message in found, found
    assert snapshot(run_dir) == before


def test_an_evaluations_csv_that_cannot_be_replaced_on_resume_is_one_line(monkeypatch, capsys, finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    replace = os.replace

    def refuse_evaluations(source, target):  # as a file system that refuses it (root ignores permission bits)
        if Path(target).name == "evaluations.csv":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_evaluations)
    found = refused(monkeypatch, capsys, f"resume={run_dir}", "total_steps=192")
    assert found == (f"resume={str(run_dir)!r}: {run_dir / 'evaluations.csv'} cannot be replaced by its rows up to step "
                     f"128 (PermissionError: [Errno 13] Permission denied: '{run_dir / 'evaluations.csv'}'); make the "
                     "run dir and its files writable (or free disk space), then resume again")
    assert not list(run_dir.glob(".evaluations.csv.*.tmp"))


def test_a_full_disk_while_the_learning_curve_is_drawn_is_a_warning_and_the_run_finishes(monkeypatch, capsys, tmp_path):
    from matplotlib.figure import Figure

    def disk_full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", disk_full)
    run_in_process(monkeypatch, *CARTPOLE, "total_steps=64", f"hydra.run.dir={tmp_path}")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"minc_rl.train: warning: {tmp_path / 'learning_curve.png'} was not written (OSError: [Errno 28] "
                        "No space left on device); the checkpoint and summary.json were written, so the run is complete "
                        "without its plot"]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 64
    assert not (tmp_path / "learning_curve.png").exists() and not list(tmp_path.glob(".learning_curve.png.*"))


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_leaves_no_orphan(tmp_path, monkeypatch, one_torch_thread):
    env = VecNormalize(make_vec_env("gym:CartPole-v1", 1), norm_obs=False)  # two files per checkpoint: .pkl and .zip
    model = MincPPO("MlpPolicy", env, encoder="mlp", n_steps=16, batch_size=16)
    checkpoints = Checkpoints(tmp_path, every=1, replay_buffer=False, run_state=RunState({}, {}))
    checkpoints.init_callback(model)
    first = checkpoints.run()
    before = snapshot(tmp_path)
    assert set(before) == {"checkpoints/step_000000000000.zip", "checkpoints/step_000000000000.vecnormalize.pkl",
                           "checkpoints/step_000000000000.run_state.pkl"}  # fmt: skip

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")  # the disk fills up half-way through the zip
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    model.num_timesteps = 16
    monkeypatch.setattr(model, "save", disk_full)
    with pytest.raises(CheckpointError) as error:
        checkpoints.run()
    assert str(error.value) == (
        "the checkpoint of step 16 was not written (OSError: [Errno 28] No space left on device); "
        f"the last checkpoint, {first}, is intact"
    )
    assert snapshot(tmp_path) == before  # no step_16 .pkl files without their .zip, no temporary file
    assert run_io.checkpoint_problem(first, vecnormalize=True) is None
    env.close()


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_atomic_writes_give_files_the_permissions_of_a_plain_open(tmp_path, umask):
    """tempfile.mkstemp's 0600 made config.yaml, summary.json, checkpoints and plots unreadable to the rest of a
    cluster group, beside 0644 files that SB3 and pandas wrote."""
    previous = os.umask(umask)
    try:
        single = atomic_write(tmp_path / "one.json", lambda tmp: Path(tmp).write_text("{}"))
        pair = atomic_write_all([(tmp_path / "a.csv", lambda tmp: Path(tmp).write_text("a")),
                                 (tmp_path / "b.csv", lambda tmp: Path(tmp).write_text("b"))])
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert [path.stat().st_mode & 0o777 for path in (single, *pair)] == [expected] * 3
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.csv", "b.csv", "one.json", "plain.txt"]


# --- a prompt stop: inside a PPO update, rolled back to the rollout's start -------------------------------------------


class SignalAtRolloutEnd(BaseCallback):
    """Sends this process `signum` when the first rollout is complete, just before the update starts."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum

    def _on_rollout_end(self) -> None:
        if self.model.num_timesteps <= 64:
            os.kill(os.getpid(), self.signum)

    def _on_step(self) -> bool:
        return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_a_signal_stops_a_ppo_update_after_its_current_minibatch_and_rolls_back(signum, one_torch_thread):
    env = make_vec_env("gym:CartPole-v1", 1)
    # 10 epochs x 8 minibatches: a full update is 80 MINC steps
    model = MincPPO("MlpPolicy", env, aux={"name": "minc", "batch": 8}, encoder="mlp", n_steps=64, batch_size=8, n_epochs=10)
    started = [parameter.detach().clone() for parameter in model.policy.parameters()]
    stop = StopOnSignal(RunState({}, {}))
    stop.install()
    try:
        with pytest.raises(Stopped):  # at the next rollout start, before its first step
            model.learn(128, callback=CallbackList([stop, SignalAtRolloutEnd(signum)]))
    finally:
        stop.restore()
    assert stop.signum == signum and stop.cut
    assert int(model.aux_learner.loss.steps) == 1 and model.num_timesteps == 64  # one minibatch of the update
    stop.roll_back()  # to the start of the rollout whose update the stop cut
    assert model.num_timesteps == 0 and int(model.aux_learner.loss.steps) == 0
    assert all(torch.equal(a, b) for a, b in zip(started, model.policy.parameters()))
    assert run_io.parameters_finite(model)
    env.close()


# --- the cluster path: a sweep through submitit_local, stopped as SLURM stops a job -----------------------------------


def test_a_submitit_sweep_runs_and_a_job_stopped_by_sigterm_or_sigusr2_resumes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "minc_rl.train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
         *CARTPOLE, "checkpoint.every=64", "total_steps=100000001", "seed=1,2", f"hydra.sweep.dir={sweep}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )  # fmt: skip
    try:
        jobs = {}
        deadline = time.monotonic() + 240
        while len(jobs) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            for number in (1, 2):
                found = list(sweep.glob(f"*seed={number}/checkpoints/step_*.zip"))
                if found and number not in jobs:
                    jobs[number] = found[0].parents[1]
            time.sleep(0.5)
        assert len(jobs) == 2, launcher.communicate(timeout=60)[0][-3000:]
        # job 1: SIGTERM to the job's step (submitit's local controller forwards it to the task, as srun does)
        task_1 = psutil.Process(int((jobs[1] / ".lock").read_text()))
        os.kill(task_1.parent().pid, signal.SIGTERM)
        # job 2: SIGUSR2 to the task, as SLURM does with --signal=USR2@<seconds> before the time limit
        task_2 = int((jobs[2] / ".lock").read_text())
        os.kill(task_2, signal.SIGUSR2)
        output = launcher.communicate(timeout=180)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0  # the two stopped jobs are reported as failed by the launcher
    for number, signum in ((1, signal.SIGTERM), (2, signal.SIGUSR2)):
        summary = json.loads((jobs[number] / "summary.json").read_text())
        assert summary["interrupted"] is True and summary["steps"] >= 64, (number, output[-3000:])
        assert run_io.latest_checkpoint(jobs[number]).name == f"step_{summary['steps']:012d}.zip"
        log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
        assert f"{signal.Signals(signum).name}: stopping and writing a checkpoint" in log

    # the stopped job continues with resume=, from its checkpoint, to a larger budget
    step = json.loads((jobs[2] / "summary.json").read_text())["steps"]
    hint = f"""continue with: python -m minc_rl.train 'resume="{jobs[2]}"'"""  # the job dir holds = and ,: quoted
    assert hint in log
    run_in_process(monkeypatch, f'resume="{jobs[2]}"', f"total_steps={step + 64}")  # what the shell passes on
    summary = json.loads((jobs[2] / "summary.json").read_text())
    assert (summary["steps"], summary["interrupted"]) == (step + 64, False)
    assert MincPPO.load(run_io.latest_checkpoint(jobs[2]), device="cpu").num_timesteps == step + 64


@pytest.mark.parametrize("written", ["none", "train_levels"])
def test_a_resumed_run_makes_up_the_evaluation_a_stop_abandoned(tmp_path, written):
    """A stop during the evaluation due at step 200 leaves no row (or only the first split's); the run resumed from
    the stop's checkpoint (step 232) evaluates every split at its start, so no run lacks an evaluation point. One
    resumed at its budget leaves it to its final evaluation (at that step), which would otherwise come twice."""
    path = tmp_path / "evaluations.csv"
    row = dict(return_mean=1.0, return_std=0.0, length_mean=9.0, episodes=1)
    for split in ("train_levels", "unseen_levels"):
        run_io.append_evaluation(path, dict(step=100, split=split, **row))
    if written != "none":
        run_io.append_evaluation(path, dict(step=200, split=written, **row))
    model = MincPPO("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), aux="none", n_steps=32, seed=0)
    model.num_timesteps, model._total_timesteps = 232, 1000
    model.set_logger(configure(None, []))
    envs = {split: make_vec_env("gym:CartPole-v1", 1, seed=5) for split in ("train_levels", "unseen_levels")}
    evaluation = Evaluation(envs, 100, 2, True, path, StopOnSignal(RunState(envs, {})))
    evaluation.init_callback(model)
    evaluation.on_training_start({}, {})
    rows = [(int(r["step"]), r["split"]) for r in run_io.read_evaluations(path)]
    assert rows == [(100, "train_levels"), (100, "unseen_levels"), (232, "train_levels"), (232, "unseen_levels")]
    assert evaluation.next_step == 300

    evaluation.on_training_start({}, {})  # evaluated: a second start adds nothing
    assert len(run_io.read_evaluations(path)) == 4

    model.num_timesteps = model._total_timesteps = 300
    run_io.append_evaluation(path, dict(step=300, split="train_levels", **row))
    evaluation.on_training_start({}, {})
    assert [int(r["step"]) for r in run_io.read_evaluations(path)] == [100, 100, 232, 232]
