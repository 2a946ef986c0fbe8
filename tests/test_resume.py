"""Exact resume (issue 43): a run killed after a checkpoint, or stopped by a signal in a collection, an update or an
evaluation, and resumed repeats the run that was never stopped evaluation for evaluation and bit for bit (MinAtar DQN
with MINC, CartPole PPO, procgen PPO); each env family's state comes back with its episodes in progress; an env
that cannot give its state is named, and its episodes restart."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.utils import EzPickle
from stable_baselines3.common.vec_env import DummyVecEnv

from minc_rl.agents import MincDQN, MincPPO
from minc_rl.envs import make_vec_env
from minc_rl.runs import run_callbacks, run_io
from minc_rl.runs.run_state import RunState, restore_vec_env, vec_env_state
from train_cli import run_in_process

COMMON = ["progress_bar=false", "torch_threads=1"]
# DQN on MinAtar with MINC on its TD batch: a collection is 4 steps (train_freq), so a signal lands inside one; the
# evaluations sample from the epsilon-greedy policy, so that they draw from the random streams too.
MINATAR_DQN = [
    "env=minatar:breakout", "agent=dqn", "aux=minc", "agent.learning_starts=50", "agent.buffer_size=1000",
    "agent.batch_size=16", "agent.train_freq=4", "agent.exploration_steps=100", "env_options.max_episode_steps=100",
    "eval.every=50", "eval.episodes=2", "eval.n_envs=2", "eval.deterministic=false", "checkpoint.every=100",
    "total_steps=200", *COMMON,
]  # fmt: skip
# PPO with MINC: rollouts of 2 envs x 32 steps, 2 minibatches x 10 epochs per update; sampled evaluations.
CARTPOLE_PPO = [
    "env=gym:CartPole-v1", "encoder=mlp", "aux=minc", "aux.batch=16", "n_envs=2", "agent.n_steps=32",
    "agent.n_minibatches=2", "eval.every=64", "eval.episodes=2", "eval.n_envs=2", "checkpoint.every=128",
    "total_steps=256", *COMMON,
]  # fmt: skip
# procgen's protocol (reward normalisation, training and unseen levels) in rollouts of 2 envs x 16 steps; the Nature
# CNN for speed (its convolutions, like the IMPALA CNN's, round differently on a channels-last image than on a copy)
PROCGEN_PPO = [
    "env=procgen:bigfish", "encoder=nature", "aux=minc", "n_envs=2", "agent.n_steps=16", "agent.n_minibatches=2",
    "eval.every=32", "eval.episodes=1", "eval.n_envs=1", "checkpoint.every=64", "total_steps=128", *COMMON,
]  # fmt: skip
RUNS = {"minatar_dqn": (MINATAR_DQN, MincDQN), "cartpole_ppo": (CARTPOLE_PPO, MincPPO),
        "procgen_ppo": (PROCGEN_PPO, MincPPO)}
Patch = Callable[[pytest.MonkeyPatch], None]


class Killed(BaseException):
    """The process killed right after a checkpoint was written (SIGKILL, an out-of-memory kill, a node failure)."""


def killed_after_checkpoint(step: int) -> Patch:
    """The run dies as soon as its checkpoint of `step` is on disk."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        write = run_callbacks.Checkpoints.run

        def write_then_die(self: run_callbacks.Checkpoints) -> Path:
            path = write(self)
            if self.model.num_timesteps == step:
                raise Killed
            return path

        monkeypatch.setattr(run_callbacks.Checkpoints, "run", write_then_die)

    return patch


def sigterm(owner: type, method: str, when: Callable[[Any], bool], call: int = 1) -> Patch:
    """SIGTERM to this process on the `call`-th call of owner.method (on `self`) for which when(self) holds."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        original, calls = getattr(owner, method), []

        def signalling(self: Any, *args: Any, **kwargs: Any) -> Any:
            if when(self):
                calls.append(True)
                if len(calls) == call:
                    os.kill(os.getpid(), signal.SIGTERM)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(owner, method, signalling)

    return patch


def at_step(step: int) -> Callable[[Any], bool]:
    """Whether a callback's or an agent's step count is `step`."""
    return lambda owner: owner.num_timesteps == step


STOPS: dict[str, Patch] = {
    "minatar_dqn killed after a checkpoint": killed_after_checkpoint(100),
    "minatar_dqn signal in a collection": sigterm(run_callbacks.StopOnSignal, "_on_step", at_step(126)),
    "minatar_dqn signal in an evaluation": sigterm(run_callbacks.Evaluation, "run", at_step(152)),
    "cartpole_ppo killed after a checkpoint": killed_after_checkpoint(128),
    "cartpole_ppo signal in a rollout": sigterm(run_callbacks.StopOnSignal, "_on_step", at_step(150)),
    "cartpole_ppo signal in an update": sigterm(MincPPO, "_gradient_step", at_step(192), call=3),
    "procgen_ppo killed after a checkpoint": killed_after_checkpoint(64),
    "procgen_ppo signal in a rollout": sigterm(run_callbacks.StopOnSignal, "_on_step", at_step(80)),
    "procgen_ppo signal in an update": sigterm(MincPPO, "_gradient_step", at_step(96), call=2),
}
SLOW = ("minatar_dqn signal in an evaluation", "cartpole_ppo killed after a checkpoint",
        "cartpole_ppo signal in a rollout", "procgen_ppo killed after a checkpoint", "procgen_ppo signal in an update")


def tensors_equal(first: Any, second: Any) -> bool:
    """Whether two nests of dicts and lists hold the same values, every tensor bit for bit."""
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(tensors_equal(first[k], second[k]) for k in first)
    if isinstance(first, list):
        return len(first) == len(second) and all(tensors_equal(a, b) for a, b in zip(first, second))
    return torch.equal(first, second) if isinstance(first, torch.Tensor) else first == second


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory) -> Callable[[str], Path]:
    """The run dir of each family's run that was never stopped (made on first use)."""
    made: dict[str, Path] = {}

    def run(family: str) -> Path:
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family) / "run"
            with pytest.MonkeyPatch.context() as monkeypatch:
                run_in_process(monkeypatch, *RUNS[family][0], f"hydra.run.dir={made[family]}")
        return made[family]

    return run


@pytest.mark.parametrize("stop", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in STOPS])
def test_a_resumed_run_repeats_the_run_that_was_never_stopped(stop, never_stopped, tmp_path, capsys):
    family = stop.split()[0]
    args, agent = RUNS[family]
    reference, run_dir = never_stopped(family), tmp_path / "run"
    with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises((Killed, SystemExit)) as stopped:
        STOPS[stop](monkeypatch)
        run_in_process(monkeypatch, *args, f"hydra.run.dir={run_dir}")
    assert stopped.type is Killed or stopped.value.code == 128 + signal.SIGTERM
    if stopped.type is SystemExit:
        assert "SIGTERM: stopping and writing a checkpoint" in capsys.readouterr().out  # Hydra logs to stdout
    total = json.loads((reference / "summary.json").read_text())["steps"]
    assert run_io.checkpoint_step(run_io.latest_checkpoint(run_dir)) < total

    with pytest.MonkeyPatch.context() as resume:
        run_in_process(resume, f"resume={run_dir}")
    evaluations = run_io.read_evaluations(run_dir / "evaluations.csv")
    assert evaluations == run_io.read_evaluations(reference / "evaluations.csv") and len(evaluations) >= 4
    resumed, expected = (agent.load(run_io.latest_checkpoint(d), device="cpu") for d in (run_dir, reference))
    assert resumed.num_timesteps == expected.num_timesteps == total
    assert tensors_equal(resumed.get_parameters(), expected.get_parameters())
    finals = ("final_train_return", "final_eval", "health")
    summary, expected_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert {key: summary[key] for key in finals} == {key: expected_summary[key] for key in finals}


# --- each family's envs, and an env that cannot give its state -----------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        ("minatar:seaquest", {"sticky_action_prob": 0.1, "distractors": {"channels": 2}}),
        ("gym:CartPole-v1", {"distractors": {"dims": 2}}),
        ("procgen:bigfish", {}),
        ("atari:Breakout", {"action_repeat_probability": 0.25}),  # ALE's sticky actions draw from its own RNG
    ],
)
def test_an_env_state_brings_back_its_episodes_in_progress(spec, options):
    env = make_vec_env(spec, 2, seed=1, **options)
    rng = np.random.default_rng(0)
    env.reset()
    for actions in rng.integers(env.action_space.n, size=(30, 2)):
        env.step(actions)
    saved = vec_env_state(env)
    actions = rng.integers(env.action_space.n, size=(300, 2))
    first = [tuple(np.copy(x) for x in env.step(a)[:3]) for a in actions]
    restore_vec_env(env, saved)
    again = [tuple(np.copy(x) for x in env.step(a)[:3]) for a in actions]
    assert all(np.array_equal(a, b) for step, repeated in zip(first, again) for a, b in zip(step, repeated))
    assert sum(done.sum() for _, _, done in first) > 0  # new episodes started on the way, from the envs' own streams
    env.close()


class ConstructorPickledCartPole(CartPoleEnv, EzPickle):
    """CartPole that pickles only its constructor arguments (gymnasium's EzPickle, as Box2D and MuJoCo envs do)."""

    def __init__(self) -> None:
        CartPoleEnv.__init__(self)
        EzPickle.__init__(self)


def test_an_env_that_cannot_give_its_state_is_named_once_and_its_episodes_restart(caplog):
    env = DummyVecEnv([lambda: gymnasium.wrappers.TimeLimit(ConstructorPickledCartPole(), 500)])
    model = MincPPO("MlpPolicy", env, aux="none", encoder="mlp", n_steps=16, batch_size=16, seed=0)
    model.learn(16)
    run_state = RunState({"test": make_vec_env("gym:CartPole-v1", 1)}, {})
    with caplog.at_level("WARNING", logger="minc_rl.train"):
        saved = run_state.capture(model)
        run_state.capture(model)
    assert [r.getMessage() for r in caplog.records] == [
        "the training env cannot give its state (EnvStateUnavailable: ConstructorPickledCartPole pickles its "
        "constructor arguments, not its state): a run resumed from this run's checkpoints restarts its episodes and is "
        "not exact"
    ]
    assert run_state.restore(model, saved) == ["the training env (EnvStateUnavailable: its state was not saved)"]
    assert model._last_obs is None and model.num_timesteps == 16  # SB3 resets the env when learn() starts
