"""`python -m minc_rl.train`: real runs (procgen PPO, MinAtar DQN with wandb offline, a two-job sweep, Ctrl-C and
resume), the config tree, every bad value's exit code 2 and message, and the SLURM launcher's config."""

from __future__ import annotations

import json
import math
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from minc_rl.runs import run_callbacks, train_config, training
from minc_rl.runs.run_state import RunState
from minc_rl.ssl.backbones import build_backbone
from minc_rl.agents import MincDQN, MincPPO
from minc_rl.ssl.encoders import build_encoder, encoder_file_problem, save_encoder
from minc_rl.envs import make_vec_env
from train_cli import ENV, run_in_process

# One torch thread per process: on a shared 2-core machine, torch's default of one thread per core makes every
# process wait on the others (a 25x slowdown measured here under load).
# A procgen game whose random-policy episodes are short (about 100 steps; coinrun's often run to 1000), so that
# the evaluations stay cheap; and PPO settings for a rollout of 4 envs x 32 steps.
TINY_PPO = [
    "n_envs=4", "agent.n_steps=32", "agent.n_minibatches=2", "eval.episodes=2", "eval.n_envs=2", "progress_bar=false",
]  # fmt: skip


def run_cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m minc_rl.train *args` in a subprocess, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "minc_rl.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
    )


def numbers(value):
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        return [n for item in value.values() for n in numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def minc_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The MINC loss buffers (Lambda's EMA sum and step count) of a checkpoint, loaded as a user would."""
    model = MincPPO.load(checkpoint, device="cpu")
    loss = model.aux_learner.loss
    return {"num_timesteps": model.num_timesteps, **{k: v.clone() for k, v in loss.state_dict().items()}, "cov": loss.cov}


# --- the config tree ---------------------------------------------------------------------------------------------


@pytest.fixture
def config_dir():
    """Hydra initialised on configs/train, as minc_rl.train sees it."""
    with initialize_config_dir(str(train_config.CONFIG_DIR), version_base="1.3"):
        yield


@pytest.mark.parametrize(
    ("env", "agent", "expected"),
    [
        # Cobbe et al. 2020
        ("procgen:coinrun", "ppo", {"n_envs": 64, "total_steps": 25_000_000, "encoder.name": "impala",
         "env_options.num_levels": 200, "env_options.distribution_mode": "easy", "normalize_reward": True,
         "agent.n_steps": 256, "agent.n_epochs": 3, "agent.n_minibatches": 8, "agent.learning_rate": 5e-4,
         "agent.gamma": 0.999, "agent.gae_lambda": 0.95, "agent.ent_coef": 0.01, "agent.clip_range": 0.2,
         "aux.share": 0.1}),  # README_rl_evidence: procgen starpilot PPO's calibration
        # rl-zoo3 hyperparams/ppo.yml and dqn.yml, "atari"
        ("atari:Pong", "ppo", {"n_envs": 8, "total_steps": 10_000_000, "encoder.name": "nature", "agent.n_steps": 128,
         "agent.n_epochs": 4, "agent.n_minibatches": 4, "agent.learning_rate": "lin_2.5e-4",
         "agent.clip_range": "lin_0.1", "agent.vf_coef": 0.5, "agent.ent_coef": 0.01}),
        ("atari:Pong", "dqn", {"n_envs": 1, "encoder.name": "nature", "agent.buffer_size": 10_000,
         "agent.learning_rate": 1e-4, "agent.batch_size": 32, "agent.learning_starts": 100_000,
         "agent.target_update_interval": 1000, "agent.train_freq": 4, "agent.exploration_final_eps": 0.01,
         "agent.optimize_memory_usage": True}),
        ("minatar:breakout", "dqn", {"encoder.name": "minatar", "total_steps": 5_000_000, "agent.learning_starts": 5000,
                                     "aux.share": 0.01}),
        ("minatar:breakout", "ppo", {"encoder.name": "minatar", "n_envs": 8}),
        ("gym:CartPole-v1", "ppo", {"encoder.name": "mlp", "n_envs": 4, "total_steps": 200_000}),
        ("gym:CartPole-v1", "dqn", {"encoder.name": "mlp", "agent.buffer_size": 50_000}),
    ],
)  # fmt: skip
def test_family_defaults_follow_the_env(config_dir, env, agent, expected):
    cfg = train_config.with_family_defaults(env, [f"env={env}", f"agent={agent}"])
    assert {key: OmegaConf.select(cfg, key) for key in expected} == expected
    assert cfg.agent.name == agent and cfg.aux.name == "minc"


def test_command_line_wins_over_family_defaults(config_dir):
    overrides = ["env=procgen:bigfish", "encoder=nature", "n_envs=4", "agent.gamma=0.9", "aux=spectral", "aux.share=0.5"]
    cfg = train_config.with_family_defaults("procgen:bigfish", overrides)
    assert (cfg.encoder.name, cfg.n_envs, cfg.agent.gamma, cfg.aux.name, cfg.aux.share) == ("nature", 4, 0.9, "spectral", 0.5)
    assert cfg.agent.n_epochs == 3  # the family's value where the command line says nothing


def test_help_lists_groups_and_choices(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, "--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for line in ("agent: dqn, ppo", "aux: infonce, minc, none, selfpred, spectral", "encoder: impala, minatar, mlp, nature"):
        assert line in out
    assert "env=procgen:coinrun" in out and "hydra/launcher=submitit_slurm" in out and "aux.share" in out


def test_submitit_slurm_launcher_composes(config_dir):
    cfg = compose(
        config_name="config",
        overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600"],
        return_hydra_config=True,
    )
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    launcher = instantiate(cfg.hydra.launcher)  # the plugin takes every key the config holds
    assert launcher.params["partition"] == "gpu" and launcher.params["timeout_min"] == 600


# --- bad values: exit code 2, one line, nothing built -----------------------------------------------------------


BAD_VALUES = [
    (["env=foo:bar"], ["'foo'", "procgen, atari, minatar, gym"]),
    (["env=procgen:nope"], ["'nope'", "coinrun", "bigfish"]),
    (["env=minatar:pong"], ["'pong'", "breakout", "space_invaders"]),
    (["env=atari:Pongg"], ["'Pongg'", "Pong"]),
    (["agent=a2c"], ["agent='a2c'", "'dqn', 'ppo'"]),
    (["aux=foo"], ["aux='foo'", "'infonce', 'minc', 'none', 'selfpred', 'spectral'"]),
    (["-m", "aux=none,foo"], ["aux='foo'", "'infonce', 'minc', 'none', 'selfpred', 'spectral'"]),
    (["encoder=resnet"], ["encoder='resnet'", "'impala', 'minatar', 'mlp', 'nature'"]),
    (["aux.share=-1"], ["aux.share", "[0, 1)", "-1"]),
    (["aux.mode=phase"], ["aux.mode='phase'", "'joint', 'separate', 'decoupled'"]),
    (["aux.lr=0"], ["aux.lr", "> 0", "0"]),
    (["aux.ema=0"], ["aux.ema", "(0, 1]", "0"]),
    (["aux.ema=1.5"], ["aux.ema", "(0, 1]", "1.5"]),
    (["aux.augment=crop"], ["aux.augment='crop'", "'none', 'shift'"]),
    (["total_steps=0"], ["total_steps", ">= 1", "0"]),
    (["agent=dqn", "env=gym:Pendulum-v1"], ["agent=dqn", "discrete", "Box", "agent=ppo"]),
    (["device=tpu"], ["device='tpu'", "'auto', 'cpu', 'cuda'"]),
    (["agent.learning_rate=lin_x"], ["agent.learning_rate='lin_x'", "lin_<number>"]),
    # SB3 takes these unchecked: a traceback mid-run, torch's own words, or a run that trains on nonsense
    (["agent.learning_rate=-1"], ["agent.learning_rate must be a finite number >= 0; got -1"]),
    (["agent.learning_rate=lin_-1e-3"], ["agent.learning_rate must be a finite number >= 0; got -0.001"]),
    (["agent.n_epochs=0"], ["agent.n_epochs must be an integer >= 1; got 0"]),
    (["agent.ent_coef=abc"], ["agent.ent_coef must be a finite number >= 0; got 'abc'"]),
    (["agent.gamma=1.5"], ["agent.gamma must be in [0, 1]; got 1.5"]),
    (["agent.clip_range=-0.2"], ["agent.clip_range must be a finite number > 0; got -0.2"]),
    (["agent.normalize_advantage=maybe"], ["agent.normalize_advantage must be true or false; got 'maybe'"]),
    (["agent=dqn", "agent.batch_size=0"], ["agent.batch_size must be an integer >= 1; got 0"]),
    (["agent=dqn", "agent.buffer_size=0"], ["agent.buffer_size must be an integer >= 1; got 0"]),
    (["agent=dqn", "agent.train_freq=0"], ["agent.train_freq must be an integer >= 1; got 0"]),
    (["agent=dqn", "agent.exploration_final_eps=2"], ["agent.exploration_final_eps must be in [0, 1]; got 2"]),
    (["eval.deterministic=maybe"], ["eval.deterministic must be true or false; got 'maybe'"]),
    (["normalize_reward=maybe"], ["normalize_reward must be true or false; got 'maybe'"]),
    (["encoder.init=/nonexistent/encoder.pt"], ["encoder.init", "/nonexistent/encoder.pt", "no such file"]),
    (["resume=/nonexistent/run"], ["resume='/nonexistent/run': no such directory (give the run directory to continue)"]),
    (["resume=/"], ["resume='/' is not a run directory of minc_rl.train (it has no config.yaml)"]),
    (["family=atari"], ["family", "env="]),
    (["seed=-1"], ["seed must be an integer >= 0; got -1"]),
    # procgen's 64 training envs: the largest seed any env gets is seed + 1,000,000 + 63
    (["seed=2147483647"], ["seed=2147483647 is too large: the evaluation envs use seed + 1,000,000 + i", "[0, 2146483584]"]),
    (["n_envs=4", "eval.n_envs=2", "seed=2146483645"], ["seed=2146483645 is too large", "[0, 2146483644]"]),
    (["aux.emaa=0.1"], ["aux.emaa is not a key of minc_rl.train's config; did you mean aux.ema?"]),
    (["+aux.emaa=0.1"], ["aux.emaa is not a key of minc_rl.train's config; did you mean aux.ema?"]),  # never added
    (["++aux.emaa=0.1"], ["aux.emaa is not a key of minc_rl.train's config; did you mean aux.ema?"]),
    (["total_step=1000"], ["total_step is not a key of minc_rl.train's config; did you mean total_steps?"]),
    (["agent.learning_rat=1e-3"], ["did you mean agent.learning_rate? (to give SB3 another keyword argument, write +agent.learning_rat=<value>)"]),
    (["-m", "aux=none,spectral", "aux.emaa=1"], ["aux.emaa is not a key of minc_rl.train's config; did you mean aux.ema?"]),
    (["env_options.distribution_mod=hard"], ["Unknown option 'distribution_mod' for procgen environments", "distribution_mode"]),
]


@pytest.mark.parametrize(("args", "expected"), BAD_VALUES, ids=[" ".join(args) for args, _ in BAD_VALUES])
def test_bad_value_exits_2_with_one_line_before_building_anything(monkeypatch, capsys, tmp_path, args, expected):
    built = []
    monkeypatch.setattr(training, "make_vec_env", lambda *a, **k: built.append(a))
    monkeypatch.setattr(training, "make_eval_env", lambda *a, **k: built.append(a))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, *args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minc_rl.train: error: "), err
    for text in expected:
        assert text in err[0], err[0]
    assert built == []
    # Hydra may have made its run dir (.hydra/, train.log) before the check; nothing of the run is there
    assert not run_dir.exists() or {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}


def test_bad_value_exit_code_from_the_real_command():
    result = run_cli("env=procgen:coinrun", "aux=minc", "aux.share=-1", "hydra.run.dir=/tmp/minc_rl_never_made")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "minc_rl.train: error: aux.share must be in [0, 1); got -1"
    )
    assert not Path("/tmp/minc_rl_never_made/checkpoints").exists()


# --- real runs -----------------------------------------------------------------------------------------------------


def test_ppo_on_procgen_writes_every_output(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "env=procgen:bigfish", "aux=minc", "total_steps=256", *TINY_PPO, "progress_bar=true",
        "eval.every=128", "checkpoint.every=128", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"outputs in {run_dir}" in result.stdout
    assert "step/s" in result.stderr  # the progress bar

    config = OmegaConf.load(run_dir / "config.yaml")
    assert (config.n_envs, config.agent.gamma, config.agent.n_epochs) == (4, 0.999, 3)  # command line, then family
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml") == config
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert {k: summary[k] for k in ("env", "agent", "aux", "encoder", "seed", "steps", "interrupted")} == {
        "env": "procgen:bigfish", "agent": "ppo", "aux": "minc", "encoder": "impala", "seed": 0, "steps": 256,
        "interrupted": False,
    }  # fmt: skip
    assert all(math.isfinite(n) for n in numbers(summary))
    assert summary["wall_time_s"] > 0 and summary["steps_per_s"] > 0
    assert set(summary["final_eval"]) == {"train_levels", "unseen_levels"}
    assert summary["final_test_return"] == summary["final_eval"]["unseen_levels"]
    assert summary["aux_metrics"]["lambda_eig_max"] > 0 and summary["aux_metrics"]["rankme"] > 1

    evaluations = pd.read_csv(run_dir / "evaluations.csv")
    assert sorted(zip(evaluations.step, evaluations.split)) == [
        (128, "train_levels"), (128, "unseen_levels"), (256, "train_levels"), (256, "unseen_levels"),
    ]  # fmt: skip
    assert (evaluations.episodes == 2).all()
    progress = pd.read_csv(run_dir / "progress.csv")
    assert {"train/aux_loss", "train/aux_lambda_eig_max", "eval/unseen_levels_return", "train/value_loss"} <= set(progress)
    assert progress["time/total_timesteps"].tolist() == [128, 256, 256]  # two PPO iterations, then the final row

    checkpoints = sorted((run_dir / "checkpoints").glob("step_*.zip"))
    assert [p.name for p in checkpoints] == ["step_000000000128.zip", "step_000000000256.zip"]
    assert (run_dir / "checkpoints" / "step_000000000256.vecnormalize.pkl").exists()  # procgen normalises rewards
    state = minc_state(checkpoints[-1])
    assert state["num_timesteps"] == 256 and state["steps"] == 2 * 3 * 2  # 2 iterations x 3 epochs x 2 minibatches
    assert torch.isfinite(state["cov"]).all() and state["cov"].abs().sum() > 0


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks of CRC, length, type, payload)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(Record.FromString(pending))
            pending = b""
    return records


def test_dqn_on_minatar_with_wandb_offline(tmp_path):
    run_dir = tmp_path / "run"
    # Offline mode, and a W&B server address where nothing listens: any attempt to reach it would be logged.
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": ""}
    result = run_cli(
        "env=minatar:breakout", "agent=dqn", "aux=minc", "total_steps=600", "agent.learning_starts=100",
        "agent.buffer_size=1000", "eval.episodes=2", "eval.n_envs=2", "eval.every=300",
        "checkpoint.every=300", "progress_bar=false", "wandb.enabled=true", "wandb.tags=[test,minatar]",
        f"hydra.run.dir={run_dir}",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["env"], summary["agent"], summary["steps"]) == ("minatar:breakout", "dqn", 600)
    assert all(math.isfinite(n) for n in numbers(summary))
    assert summary["final_train_return"] is not None and summary["final_test_return"] is not None
    assert summary["aux_metrics"]["pairs"] == 32
    assert pd.read_csv(run_dir / "evaluations.csv").split.tolist() == ["test", "test"]
    assert (run_dir / "checkpoints" / "step_000000000600.replay_buffer.pkl").exists()  # the newest checkpoint's only
    model = MincDQN.load(run_dir / "checkpoints" / "step_000000000600.zip", device="cpu")
    assert model.num_timesteps == 600 and model.aux_learner.loss.steps > 0

    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    records = wandb_records(next(offline_run.glob("run-*.wandb")))
    kinds = {record.WhichOneof("record_type") for record in records}
    assert {"run", "history", "summary"} <= kinds
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.project == "minc_rl" and list(run_record.tags) == ["test", "minatar"]
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]  # fmt: skip
    logged = {key for row in history for key in row}
    assert {"train/aux_loss", "train/aux_rankme", "rollout/ep_rew_mean", "eval/test_return", "train/loss"} <= logged
    assert all(math.isfinite(row["train/aux_loss"]) for row in history if "train/aux_loss" in row)
    summary_keys = {item.key for r in records if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert {"final_test_return", "steps_per_s"} <= summary_keys
    wandb_logs = "".join(p.read_text() for p in offline_run.glob("logs/*.log"))
    assert "127.0.0.1:9" not in wandb_logs and "api.wandb.ai" not in wandb_logs


def test_multirun_runs_every_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m", "env=procgen:bigfish", "aux=none,minc", "total_steps=128", *TINY_PPO, "eval.every=1000",
        "eval.episodes=1", "eval.n_envs=1", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summaries = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]
    assert [(s["aux"], s["steps"]) for s in summaries] == [("minc", 128), ("none", 128)]  # in dirs named aux=<arm>
    assert summaries[1]["aux_metrics"] == {} and summaries[0]["aux_metrics"]["lambda_eig_max"] > 0


# --- Ctrl-C and resume ---------------------------------------------------------------------------------------------


def test_sigint_checkpoints_and_resume_continues(tmp_path, monkeypatch, one_torch_thread):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "minc_rl.train", "env=procgen:bigfish", "aux=minc", "total_steps=1000000", *TINY_PPO,
         "eval.every=1000000", "checkpoint.every=128", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    first = run_dir / "checkpoints" / "step_000000000128.zip"
    deadline = time.monotonic() + 180
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert f"continue with: python -m minc_rl.train resume={run_dir}" in stdout

    checkpoint = max((run_dir / "checkpoints").glob("step_*.zip"))
    interrupted = minc_state(checkpoint)
    step = interrupted["num_timesteps"]
    assert step >= 128 and checkpoint.name == f"step_{step:012d}.zip"
    assert interrupted["steps"] > 0 and torch.isfinite(interrupted["cov"]).all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == step

    # Resuming at the budget it already reached: nothing to train, and the same step count and Lambda come back.
    run_in_process(monkeypatch, f"resume={run_dir}", f"total_steps={step}")
    reloaded = minc_state(checkpoint)
    assert reloaded["num_timesteps"] == step
    for key in ("ema_sum", "steps", "skipped", "cov"):
        torch.testing.assert_close(reloaded[key], interrupted[key], rtol=0, atol=0)

    # Resuming with one more rollout (4 envs x 32 steps): the step count and Lambda's EMA continue from the checkpoint.
    run_in_process(monkeypatch, f"resume={run_dir}", f"total_steps={step + 128}")
    resumed = minc_state(run_dir / "checkpoints" / f"step_{step + 128:012d}.zip")
    assert resumed["num_timesteps"] == step + 128
    assert resumed["steps"] == interrupted["steps"] + 2 * 3  # 3 epochs x 2 minibatches, on top of the saved count
    progress = pd.read_csv(run_dir / "progress.csv")["time/total_timesteps"].tolist()
    kept = [s for s in progress if s <= step]
    assert progress == sorted(progress) and kept and set(progress[len(kept) :]) == {step + 128}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["steps"] == step + 128
    assert OmegaConf.load(run_dir / "config.yaml").total_steps == step + 128


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("aux=none", "resume: the run in {run} has aux=minc; it cannot continue with aux=none"),
        ("env=procgen:coinrun", "resume: the run in {run} has env=procgen:bigfish; it cannot continue with env=procgen:coinrun"),
    ],
)
def test_resume_refuses_another_env_or_aux(monkeypatch, capsys, tmp_path, override, message):
    with initialize_config_dir(str(train_config.CONFIG_DIR), version_base="1.3"):
        cfg = train_config.with_family_defaults("procgen:bigfish", ["env=procgen:bigfish"])
    tmp_path.joinpath("config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, f"resume={tmp_path}", override)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "minc_rl.train: error: " + message.format(run=tmp_path)


# --- encoder.init and checkpoint hygiene ---------------------------------------------------------------------------


def test_encoder_init_loads_a_pretrained_encoder_and_refuses_a_mismatched_one(tmp_path, monkeypatch, capsys, one_torch_thread):
    torch.manual_seed(1)
    pretrained = build_encoder("impala", (3, 64, 64))
    save_encoder(str(tmp_path / "impala.pt"), pretrained, "impala", (3, 64, 64))
    # learning rate 0: the weights the run ends with are the ones it loaded
    run_in_process(
        monkeypatch, "env=procgen:bigfish", f"encoder.init={tmp_path / 'impala.pt'}", "agent.learning_rate=0",
        "total_steps=128", *TINY_PPO, "eval.every=1000", "eval.episodes=1", "eval.n_envs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    encoder = MincPPO.load(tmp_path / "run" / "checkpoints" / "step_000000000128.zip", device="cpu").aux_extractor.encoder
    for name, weight in pretrained.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], weight, rtol=0, atol=0)

    save_encoder(str(tmp_path / "nature.pt"), build_encoder("nature", (3, 64, 64)), "nature", (3, 64, 64))
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(
            monkeypatch, "env=procgen:bigfish", f"encoder.init={tmp_path / 'nature.pt'}", "total_steps=128", *TINY_PPO,
            f"hydra.run.dir={tmp_path / 'mismatch'}",
        )  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"minc_rl.train: error: encoder.init='{tmp_path / 'nature.pt'}': it holds a 'nature' encoder; this run's "
        "encoder is 'impala' (set encoder=nature or pretrain one with backbone=impala)"
    )
    assert not (tmp_path / "mismatch" / "checkpoints").exists()


def test_an_encoder_the_agents_do_not_take_is_refused_with_a_fix_that_exists(tmp_path):
    """pretrain's convnet backbone has no agent encoder: the message must not suggest encoder=convnet."""
    save_encoder(str(tmp_path / "convnet.pt"), build_backbone("convnet", (3, 64, 64)), "convnet", (3, 64, 64))
    assert encoder_file_problem(tmp_path / "convnet.pt", "impala") == (
        "it holds a 'convnet' encoder; this run's encoder is 'impala' (the agents do not take it; pretrain one with "
        "backbone=impala)"
    )


def test_a_model_with_non_finite_parameters_is_never_checkpointed(tmp_path, one_torch_thread):
    model = MincPPO("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), encoder="mlp", n_steps=16, batch_size=16)
    checkpoints = run_callbacks.Checkpoints(tmp_path, every=1, replay_buffer=False, run_state=RunState({}, {}))
    checkpoints.init_callback(model)
    healthy = checkpoints.run().read_bytes()  # a healthy model is saved
    with torch.no_grad():
        next(model.policy.parameters())[0].fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite parameters at step 0: not checkpointed"):
        checkpoints.run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000000000.run_state.pkl",
                                                                         "step_000000000000.zip"]
    assert (tmp_path / "checkpoints" / "step_000000000000.zip").read_bytes() == healthy
