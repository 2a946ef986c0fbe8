"""Env option `distractors` (envs/distractors.py): channel counts, the game's own channels unchanged, noise with the
asked-for statistics and no correlation over time or with the game, reproducible from the seed, and bad values."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

from minc_rl.envs import Distractors, make_eval_env, make_vec_env, validate_spec
from train_cli import run_in_process

STEPS = 1000


def rollout(env, steps: int = STEPS, seed: int = 0) -> np.ndarray:
    """The observations (steps + 1, n_envs, ...) of `steps` random actions drawn from a generator seeded `seed`."""
    rng = np.random.default_rng(seed)
    observations = [env.reset()]
    for _ in range(steps):
        observations.append(env.step(rng.integers(env.action_space.n, size=env.num_envs))[0])
    env.close()
    return np.stack(observations)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays of the same size, flattened."""
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


@pytest.mark.parametrize(
    ("game", "channels", "k", "added"),
    [("breakout", 4, 3, 3), ("space_invaders", 6, "same", 6), ("breakout", 4, "same", 4), ("breakout", 4, 0, 0)],
)
def test_minatar_gets_k_channels_and_keeps_its_own(game: str, channels: int, k: int | str, added: int) -> None:
    noisy = make_vec_env(f"minatar:{game}", 2, seed=3, distractors={"channels": k, "p": 0.08})
    assert noisy.observation_space.shape == (channels + added, 10, 10)
    with_noise = rollout(noisy, steps=200)
    clean = rollout(make_vec_env(f"minatar:{game}", 2, seed=3), steps=200)
    assert np.array_equal(with_noise[:, :, :channels], clean)  # same game, same episodes, through resets
    assert set(np.unique(with_noise[:, :, channels:])) <= {0, 255}


def test_minatar_noise_is_bernoulli_p_and_independent_of_time_and_game() -> None:
    observations = rollout(make_vec_env("minatar:breakout", 2, seed=0, distractors={"channels": 4, "p": 0.08}))
    game, noise = observations[:, :, :4] > 0, observations[:, :, 4:] > 0
    # 1001 steps x 2 envs x 4 channels x 100 cells: the mean's standard error is 0.0003, a correlation's ~0.001-0.002
    assert abs(noise.mean() - 0.08) < 0.003
    assert abs(correlation(noise[1:], noise[:-1])) < 0.01  # lag-one correlation over time: 0
    assert abs(correlation(noise[:, :, 0], game.any(axis=2))) < 0.02  # with where the game has objects: 0
    assert abs(correlation(noise[:, :, 0], noise[:, :, 1])) < 0.01  # between channels: 0


def test_gym_vectors_get_k_gaussian_dimensions() -> None:
    assert make_vec_env("gym:CartPole-v1", 1, distractors={"dims": "same"}).observation_space.shape == (8,)
    noisy = make_vec_env("gym:CartPole-v1", 2, seed=5, distractors={"dims": 3})
    assert noisy.observation_space.shape == (7,)
    observations = rollout(noisy)
    assert np.array_equal(observations[:, :, :4], rollout(make_vec_env("gym:CartPole-v1", 2, seed=5)))
    noise = observations[:, :, 4:]
    # 6006 draws of N(0, 1): the mean's and a correlation's standard error are about 0.013
    assert abs(noise.mean()) < 0.06 and abs(noise.std() - 1.0) < 0.04
    assert abs(correlation(noise[1:], noise[:-1])) < 0.06


def test_noise_is_reproducible_from_the_seed_and_the_same_in_evaluation_envs() -> None:
    options = {"distractors": {"channels": 2, "p": 0.5}}
    first = rollout(make_vec_env("minatar:breakout", 2, seed=7, **options), steps=50)
    assert np.array_equal(first, rollout(make_vec_env("minatar:breakout", 2, seed=7, **options), steps=50))
    assert np.array_equal(first, rollout(make_eval_env("minatar:breakout", 2, seed=7, **options), steps=50))
    other = rollout(make_vec_env("minatar:breakout", 2, seed=8, **options), steps=50)
    assert not np.array_equal(first[:, :, 4:], other[:, :, 4:])
    assert not np.array_equal(first[:, 0, 4:], first[:, 1, 4:])  # each env its own stream (seed + i)


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ("minatar:breakout", {"channels": -1}, ["distractors option channels: -1", "an int >= 0"]),
        ("minatar:breakout", {"channels": 2.5}, ["distractors option channels: 2.5", "an int >= 0 or 'same'"]),
        ("minatar:breakout", {"channels": "twice"}, ["channels: 'twice'", "an int >= 0 or 'same' (as many as"]),
        ("minatar:breakout", {"channels": 2, "p": 1.5}, ["distractors option p: 1.5", "a number in [0, 1]"]),
        ("minatar:breakout", {"dims": 2}, ["distractors: {'dims': 2}", "keys channels, p (channels required)"]),
        ("minatar:breakout", 4, ["distractors: 4", "keys channels, p"]),
        ("gym:CartPole-v1", {"dims": -2}, ["distractors option dims: -2", "an int >= 0"]),
        ("gym:CartPole-v1", {"channels": 2}, ["distractors: {'channels': 2}", "keys dims (dims required)"]),
        ("procgen:coinrun", {"channels": 2}, ["Unknown option 'distractors' for procgen", "num_levels"]),
    ],
)
def test_a_bad_value_names_itself_and_the_valid_ones(spec: str, value: object, expected: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        validate_spec(spec, distractors=value)
    for text in expected:
        assert text in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("spec", "options", "space"),
    [
        ("gym:Taxi-v4", {}, r"Discrete\(500\)"),
        ("gym:ALE/Pong-v5", {}, r"Box\(0, 255, \(210, 160, 3\), uint8\)"),  # an image, not a vector
        ("gym:ALE/Pong-v5", {"obs_type": "ram"}, r"Box\(0, 255, \(128,\), uint8\)"),  # N(0, 1) cast to uint8 is noise
    ],
)
def test_gym_observations_other_than_float_vectors_are_refused(spec: str, options: dict, space: str) -> None:
    with pytest.raises(ValueError, match=r"N\(0, 1\) distractor dimensions need floating-point vector observations "
                                         rf"\(gym ids such as CartPole-v1\); this env's observation space is {space}"):
        make_vec_env(spec, 1, distractors={"dims": 1}, **options)


def test_the_command_line_refuses_a_bad_distractor_value(monkeypatch, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(monkeypatch, "env=minatar:breakout", "agent=dqn", "env_options.distractors.channels=4",
                       "env_options.distractors.p=2", f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "minc_rl.train: error: Bad value for minatar distractors option p: 2; expected a number in [0, 1]."
    )


def test_binary_channels_on_a_vector_are_refused() -> None:
    with pytest.raises(ValueError, match=r"binary distractor channels \(with p\) need channel-first uint8 images "
                                         r"\(MinAtar\); this env's observation space is Box\(\[-4.8"):
        Distractors(gymnasium.make("CartPole-v1"), 2, 0.08)


@pytest.mark.parametrize(("count", "p", "message"), [
    (-1, 0.08, r"distractors count must be an integer >= 0; got -1"),
    ("4", 0.08, r"distractors count must be an integer >= 0; got '4'"),
    (2, 1.5, r"distractors p must be in \[0, 1\]; got 1.5"),  # every cell 255
])
def test_the_wrapper_itself_checks_its_arguments(count, p, message) -> None:
    env = make_vec_env("minatar:breakout", 1).envs[0]  # MinAtar's (4, 10, 10) uint8 image
    with pytest.raises(ValueError, match=message):
        Distractors(env, count, p)
