"""Every env family ends its episodes: MinAtar and gymnasium ids without a limit of their own are truncated."""

from __future__ import annotations

import csv

import gymnasium
import numpy as np
import pytest
from minc_rl.envs import make_eval_env, make_vec_env
from minc_rl.envs.spec import EPISODE_STEP_LIMIT
from train_cli import run_in_process


class EndlessEnv(gymnasium.Env):
    """An episode that never terminates (as MinAtar seaquest with a sub that never dives)."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(3, np.float32), 0.0, False, False, {}


gymnasium.register("minc_rl_tests/Endless-v0", entry_point=EndlessEnv)  # registered without max_episode_steps


def steps_to_first_end(env, limit: int) -> tuple[int, dict]:
    env.reset()
    for step in range(1, limit + 2):
        _, _, dones, infos = env.step(np.zeros(env.num_envs, dtype=np.int64))
        if dones[0]:
            return step, infos[0]
    raise AssertionError(f"no episode end within {limit + 1} steps")


@pytest.mark.parametrize("make", [make_vec_env, make_eval_env])
def test_minatar_seaquest_doing_nothing_is_truncated_at_the_step_limit(make):
    """NOOPs in seaquest never end an episode: the limit ends it as a truncation, with its terminal observation, so
    SB3's replay buffer keeps bootstrapping through it."""
    step, info = steps_to_first_end(make("minatar:seaquest", 1, seed=0, max_episode_steps=64), 64)
    assert step == 64 and info["TimeLimit.truncated"] and "terminal_observation" in info
    default = make("minatar:breakout", 1, seed=0)
    assert default.get_attr("_max_episode_steps") == [EPISODE_STEP_LIMIT] == [27_000]


@pytest.mark.parametrize("make", [make_vec_env, make_eval_env])
@pytest.mark.parametrize("spec", ["minatar:breakout", "minatar:seaquest", "gym:minc_rl_tests/Endless-v0"])
def test_a_truncated_episode_has_its_episode_record_in_every_family(make, spec):
    """The step limit sits inside the episode recorder (Monitor): a truncated episode reports info['episode'], which
    SB3's evaluate_policy counts; without it an evaluation whose policy never ends an episode never returned."""
    step, info = steps_to_first_end(make(spec, 1, seed=0, max_episode_steps=5), 5)
    assert step == 5 and info["TimeLimit.truncated"] and info["episode"]["l"] == 5


def test_the_issue_43_minatar_run_whose_evaluation_hung_finishes(tmp_path, monkeypatch, one_torch_thread):
    """The run of issue 43: breakout with a 5-step limit, its evaluation of one episode at step 300 counted."""
    run_in_process(monkeypatch, "env=minatar:breakout", "agent=dqn", "aux=none", "total_steps=300", "eval.every=300",
                   "eval.episodes=1", "agent.learning_starts=100", "env_options.max_episode_steps=5",
                   "progress_bar=false", f"hydra.run.dir={tmp_path}")
    rows = list(csv.DictReader(open(tmp_path / "evaluations.csv")))
    assert [(int(row["step"]), float(row["length_mean"])) for row in rows] == [(300, 5.0)]
    assert "rollout/ep_rew_mean" in open(tmp_path / "progress.csv").readline()


def test_gymnasium_ids_without_a_limit_get_one_and_registered_limits_stay():
    endless = make_vec_env("gym:minc_rl_tests/Endless-v0", 1, seed=0)
    assert endless.envs[0].spec.max_episode_steps == EPISODE_STEP_LIMIT
    step, info = steps_to_first_end(make_vec_env("gym:minc_rl_tests/Endless-v0", 1, seed=0, max_episode_steps=10), 10)
    assert step == 10 and info["TimeLimit.truncated"]
    assert make_vec_env("gym:CartPole-v1", 1).envs[0].spec.max_episode_steps == 500  # gymnasium's own
    with pytest.raises(ValueError, match=r"Bad value for minatar option max_episode_steps: 0; expected an int >= 1"):
        make_vec_env("minatar:seaquest", 1, max_episode_steps=0)


def test_training_on_seaquest_returns_from_its_evaluations(tmp_path, monkeypatch, one_torch_thread):
    """The run that hung: DQN on seaquest stopped at its first evaluation, whose greedy episodes never ended."""
    run_in_process(monkeypatch, "env=minatar:seaquest", "agent=dqn", "aux=none", "total_steps=400", "eval.every=200",
                   "eval.episodes=2", "agent.learning_starts=100", "env_options.max_episode_steps=300",
                   "progress_bar=false", f"hydra.run.dir={tmp_path}")
    rows = list(csv.DictReader(open(tmp_path / "evaluations.csv")))
    assert [int(row["step"]) for row in rows] == [200, 400]
