"""agent.replay_ratio (minc_rl.train): gradient steps per environment step, turned into SB3 DQN's train_freq and
gradient_steps; a conflict with either of them on the command line, and a bad ratio, exit 2 with one line."""

from __future__ import annotations

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from minc_rl.runs import train_config, training
from minc_rl.envs import make_vec_env
from train_cli import run_in_process


@pytest.fixture
def config_dir():
    """Hydra initialised on configs/train/, as minc_rl.train composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(train_config.CONFIG_DIR), version_base="1.3"):
        yield


@pytest.mark.parametrize(
    ("ratio", "n_envs", "expected"),
    [
        (1, 1, (1, 1)),  # the MinAtar paper: one gradient step per environment step
        (4, 1, (1, 4)),  # four gradient steps after every step
        (0.25, 1, (4, 1)),  # SB3's default: one gradient step every 4 steps
        (0.75, 1, (4, 3)),  # 3 gradient steps every 4 steps
        (0.25, 8, (1, 2)),  # 8 envs: a vector step is 8 env steps, so 2 gradient steps per vector step
        (0.1, 4, (5, 2)),  # 2 / (5 x 4) = 0.1
    ],
)
def test_replay_ratio_as_train_freq_and_gradient_steps(ratio: float, n_envs: int, expected: tuple[int, int]) -> None:
    train_freq, gradient_steps = train_config.replay_ratio_schedule(ratio, n_envs)
    assert (train_freq, gradient_steps) == expected
    assert gradient_steps / (train_freq * n_envs) == ratio


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (0, "agent.replay_ratio=0 is not valid; give a number > 0 of gradient steps per environment step"),
        (-1, "agent.replay_ratio=-1 is not valid"),
        ("fast", "agent.replay_ratio='fast' is not valid"),
        (True, "agent.replay_ratio=True is not valid"),
        (float("inf"), "agent.replay_ratio=inf is not valid"),
        (0.3333, "agent.replay_ratio=0.3333 with n_envs=1 is not g / (f x n_envs) gradient steps per environment "
                 "step with whole g >= 1 and 1 <= f <= 1000"),
    ],
)  # fmt: skip
def test_a_bad_replay_ratio_names_itself(ratio: object, expected: str) -> None:
    with pytest.raises(ValueError) as error:
        train_config.replay_ratio_schedule(ratio, 1)
    assert str(error.value).startswith(expected), str(error.value)


def test_replay_ratio_sets_the_config_and_sb3s_dqn(config_dir) -> None:
    overrides = ["env=minatar:breakout", "agent=dqn", "aux=none", "agent.replay_ratio=4"]
    cfg = train_config.with_family_defaults("minatar:breakout", overrides)
    assert (cfg.agent.train_freq, cfg.agent.gradient_steps) == (1, 1)  # family_agent/minatar_dqn.yaml
    train_config.apply_replay_ratio(cfg, overrides)
    assert (cfg.agent.train_freq, cfg.agent.gradient_steps, cfg.agent.replay_ratio) == (1, 4, 4)
    model = training.build_model(cfg, make_vec_env("minatar:breakout", 1, seed=0))
    assert (model.train_freq.frequency, model.train_freq.unit.value, model.gradient_steps) == (1, "step", 4)


def test_without_replay_ratio_the_family_settings_stay(config_dir) -> None:
    overrides = ["env=gym:CartPole-v1", "agent=dqn"]
    cfg = train_config.with_family_defaults("gym:CartPole-v1", overrides)
    train_config.apply_replay_ratio(cfg, overrides)
    assert (cfg.agent.replay_ratio, cfg.agent.train_freq, cfg.agent.gradient_steps) == (None, 4, 1)


def test_replay_ratio_beside_train_freq_on_the_command_line_exits_2(monkeypatch, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, "env=minatar:breakout", "agent=dqn", "agent.replay_ratio=4", "agent.gradient_steps=2",
                       "agent.train_freq=1", f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "minc_rl.train: error: agent.replay_ratio=4 sets agent.train_freq and agent.gradient_steps; drop "
        "agent.gradient_steps and agent.train_freq, or set agent.replay_ratio=null to give them yourself"
    )
