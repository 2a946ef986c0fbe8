"""minc_rl.envs against the real procgen, ALE, MinAtar, gymnasium and SB3 (no mocks)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium
import numpy as np
import pytest
from minc_rl.envs import (
    FAMILIES,
    MINATAR_GAMES,
    PROCGEN_GAMES,
    ProcgenVecEnv,
    make_eval_env,
    make_vec_env,
    parse_spec,
    validate_spec,
)
from minc_rl.envs.spec import PROCGEN_MODE_GAMES
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.atari_wrappers import (
    AtariWrapper,
    ClipRewardEnv,
    EpisodicLifeEnv,
    MaxAndSkipEnv,
    NoopResetEnv,
    WarpFrame,
)
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first, preprocess_obs
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import (
    VecEnv,
    VecFrameStack,
    VecMonitor,
    VecNormalize,
    VecTransposeImage,
    VecVideoRecorder,
    is_vecenv_wrapped,
)
from torch import nn

MINATAR_CHANNELS = {"asterix": 4, "breakout": 4, "freeway": 7, "seaquest": 10, "space_invaders": 6}
# One short-episode environment per family, for the tests that run every family.
SPECS = ["procgen:bigfish", "atari:Breakout", "minatar:breakout", "gym:CartPole-v1"]


def procgen_env(**kwargs):
    from procgen import ProcgenGym3Env

    return ProcgenGym3Env(**kwargs)


def random_actions(env: VecEnv, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, env.action_space.n, size=(steps, env.num_envs))


def rollout(env: VecEnv, actions: np.ndarray):
    """Observations (T+1, n, ...), rewards and dones (T, n) and the infos of each step under `actions`."""
    observations, rewards, dones, infos = [env.reset()], [], [], []
    for action in actions:
        obs, reward, done, info = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        dones.append(done)
        infos.append(info)
    return np.stack(observations), np.stack(rewards), np.stack(dones), infos


class RandomPolicy:
    """SB3's PolicyPredictor protocol, acting uniformly at random."""

    def __init__(self, env: VecEnv, seed: int = 0) -> None:
        self.env, self.rng = env, np.random.default_rng(seed)

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        return self.rng.integers(0, self.env.action_space.n, size=self.env.num_envs), None


def test_constants_match_the_libraries():
    from procgen.env import ENV_NAMES

    assert FAMILIES == ("procgen", "atari", "minatar", "gym")
    assert PROCGEN_GAMES == tuple(ENV_NAMES)
    assert set(MINATAR_GAMES) == set(MINATAR_CHANNELS)
    assert parse_spec("procgen:coinrun") == ("procgen", "coinrun")
    assert parse_spec("gym:ALE/Pong-v5") == ("gym", "ALE/Pong-v5")


# ---------------------------------------------------------------------------------------------- procgen


def test_procgen_spaces_and_random_rollout():
    env = make_vec_env("procgen:coinrun", 16, seed=0)
    assert env.observation_space == gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    assert env.action_space == gymnasium.spaces.Discrete(15)
    assert isinstance(env, VecMonitor) and isinstance(env.unwrapped, ProcgenVecEnv)
    obs, rewards, dones, infos = rollout(env, random_actions(env, 500))
    assert obs.shape == (501, 16, 64, 64, 3) and obs.dtype == np.uint8
    assert rewards.dtype == np.float32 and dones.dtype == bool
    assert dones.sum() >= 3
    episode_start = np.zeros(16, dtype=int)
    for t, step_infos in enumerate(infos):
        for i, info in enumerate(step_infos):
            assert 0 <= info["level_seed"] < 200 and 0 <= info["prev_level_seed"] < 200
            assert "terminal_observation" not in info
            if dones[t, i]:
                assert info["TimeLimit.truncated"] is False
                assert info["prev_level_complete"] == (rewards[t, i] > 0)  # coinrun pays 10 only for the coin
                assert info["episode"]["l"] == t + 1 - episode_start[i]
                assert info["episode"]["r"] == pytest.approx(rewards[episode_start[i] : t + 1, i].sum())
                episode_start[i] = t + 1
            else:
                assert "TimeLimit.truncated" not in info and "episode" not in info
    env.close()


def test_procgen_every_game_and_distribution_mode_builds():
    for mode, games in PROCGEN_MODE_GAMES.items():
        for game in games:
            env = make_vec_env(f"procgen:{game}", 2, distribution_mode=mode)
            env.reset()
            obs, _, _, _ = env.step(np.zeros(2, dtype=int))
            assert obs.shape == (2, 64, 64, 3)
            env.close()


def test_procgen_mode_a_game_lacks_would_abort_the_process():
    # Why the mode table exists: procgen kills the interpreter (C++ fassert) instead of raising.
    code = "from procgen import ProcgenGym3Env; ProcgenGym3Env(num=1, env_name='coinrun', distribution_mode='memory')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "fassert" in result.stdout + result.stderr
    with pytest.raises(ValueError, match=r"'coinrun' has no distribution_mode 'memory'.*caveflyer, dodgeball"):
        make_vec_env("procgen:coinrun", 1, distribution_mode="memory")


def test_procgen_consecutive_pairs_and_boundaries_match_a_single_env_replay():
    """Each recorded (o_t, o_t+1) is what a fresh single env on the same level produces under the same actions,
    and the vector env flags done exactly where that env starts a new episode."""
    env = make_vec_env("procgen:jumper", 8, seed=1)
    actions = random_actions(env, 250, seed=1)
    obs, rewards, dones, infos = rollout(env, actions)
    reset_infos = env.unwrapped.reset_infos
    assert dones.sum() >= 5
    pairs = 0
    for i in range(env.num_envs):
        starts = [0, *(np.flatnonzero(dones[:, i]) + 1)]
        for t0 in starts:
            level = reset_infos[i]["level_seed"] if t0 == 0 else infos[t0 - 1][i]["level_seed"]
            single = procgen_env(
                num=1, env_name="jumper", num_levels=1, start_level=int(level), distribution_mode="easy"
            )
            _, ob, first = single.observe()
            np.testing.assert_array_equal(ob["rgb"][0], obs[t0, i])
            for t in range(t0, len(actions)):
                single.act(actions[t, i : i + 1])
                reward, ob, first = single.observe()
                assert reward[0] == rewards[t, i]
                assert first[0] == dones[t, i], f"env {i} step {t}: boundary mismatch"
                if dones[t, i]:
                    info = single.get_info()[0]
                    assert infos[t][i]["prev_level_seed"] == level == info["prev_level_seed"]
                    assert infos[t][i]["prev_level_complete"] == info["prev_level_complete"]
                    break
                np.testing.assert_array_equal(ob["rgb"][0], obs[t + 1, i], err_msg=f"env {i} pair ({t}, {t + 1})")
                pairs += 1
            single.close()
    assert pairs == dones.size - dones.sum()
    env.close()


def test_procgen_seeding_reset_and_held_out_levels():
    env = make_vec_env("procgen:coinrun", 4, seed=3)
    raw = procgen_env(num=4, env_name="coinrun", num_levels=200, start_level=0, distribution_mode="easy", rand_seed=3)
    first = env.reset()
    np.testing.assert_array_equal(first, raw.observe()[1]["rgb"])
    np.testing.assert_array_equal(env.reset(), first)  # nothing stepped: same episodes
    env.step(np.zeros(4, dtype=int))
    levels = [info["level_seed"] for info in env.unwrapped.reset_infos]
    env.reset()  # restarts every game on a fresh seed
    assert [info["level_seed"] for info in env.unwrapped.reset_infos] != levels
    assert env.seed(3) == [3, 4, 5, 6]
    np.testing.assert_array_equal(env.reset(), first)  # seed() then reset() rebuilds the same games
    assert not np.array_equal(make_vec_env("procgen:coinrun", 4, seed=4).reset(), first)

    eval_env = make_eval_env("procgen:coinrun", 16, seed=0, num_levels=200)
    eval_env.reset()
    assert max(info["level_seed"] for info in eval_env.unwrapped.reset_infos) >= 200  # the full distribution
    assert eval_env.unwrapped.gym3_env.options["num_levels"] == 0


# ---------------------------------------------------------------------------------------------- atari


def test_atari_standard_preprocessing_for_training_and_evaluation():
    env = make_vec_env("atari:Breakout", 2, seed=0)
    assert env.observation_space == gymnasium.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    assert env.action_space == gymnasium.spaces.Discrete(4)
    assert isinstance(env, VecFrameStack) and env.unwrapped.envs[0].unwrapped.spec.id == "BreakoutNoFrameskip-v4"
    for wrapper in (AtariWrapper, NoopResetEnv, MaxAndSkipEnv, EpisodicLifeEnv, WarpFrame, ClipRewardEnv, Monitor):
        assert env.env_is_wrapped(wrapper) == [True, True], wrapper
    assert env.unwrapped.envs[0].get_wrapper_attr("noop_max") == 30
    assert env.unwrapped.envs[0].get_wrapper_attr("_skip") == 4
    obs, rewards, dones, infos = rollout(env, random_actions(env, 300))
    assert obs.dtype == np.uint8 and set(np.unique(rewards)) <= {0.0, 1.0}
    running = ~dones
    np.testing.assert_array_equal(obs[1:][running][..., :3], obs[:-1][running][..., 1:])  # the stack slides one frame
    life_losses = [info for t, i in zip(*np.nonzero(dones)) if "episode" not in (info := infos[t][i])]
    assert life_losses and all(info["lives"] > 0 for info in life_losses)  # episodic life: a lost life ends it

    eval_env = make_eval_env("atari:Breakout", 2, seed=0, terminal_on_life_loss=True)
    assert eval_env.env_is_wrapped(EpisodicLifeEnv) == [False, False]
    assert eval_env.env_is_wrapped(ClipRewardEnv) == [False, False]
    assert eval_env.env_is_wrapped(NoopResetEnv) == [True, True]
    env.close()
    eval_env.close()


def test_atari_names_match_ignoring_case_and_underscores():
    env = make_vec_env("atari:space_invaders", 1, frame_stack=2)
    assert env.unwrapped.envs[0].unwrapped.spec.id == "SpaceInvadersNoFrameskip-v4"
    assert env.observation_space.shape == (84, 84, 2)
    env.close()


# ---------------------------------------------------------------------------------------------- minatar


@pytest.mark.parametrize("game", MINATAR_GAMES)
def test_minatar_observations_are_channel_first_uint8_images_of_the_state(game):
    env = make_vec_env(f"minatar:{game}", 2, seed=0)
    channels = MINATAR_CHANNELS[game]
    assert env.observation_space == gymnasium.spaces.Box(0, 255, (channels, 10, 10), np.uint8)
    assert env.action_space == gymnasium.spaces.Discrete(6)
    # SB3 reads the channel axis of this space as axis 0, the true one, for every game (seaquest included).
    assert is_image_space(env.observation_space) and is_image_space_channels_first(env.observation_space)
    obs = env.reset()
    for _ in range(100):
        state = np.stack([sub.unwrapped.game.state() for sub in env.envs])  # (n, 10, 10, C) bool
        np.testing.assert_array_equal(obs, state.transpose(0, 3, 1, 2).astype(np.uint8) * 255)
        obs, _, dones, _ = env.step(np.random.default_rng(0).integers(0, 6, 2))
        if dones.any():
            break
    env.close()


class TinyCNN(BaseFeaturesExtractor):
    """A 3x3 conv over observation_space.shape[0] channels: what any SB3 CNN takes as the channel axis."""

    def __init__(self, observation_space: gymnasium.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=16)
        self.in_channels = observation_space.shape[0]
        self.net = nn.Sequential(nn.Conv2d(self.in_channels, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 16))

    def forward(self, observations):
        return self.net(observations)


@pytest.mark.parametrize("algo", [PPO, DQN])
def test_minatar_sb3_algorithms_see_the_true_channel_axis(algo):
    game = "seaquest"  # (10, 10, 10): the game SB3's channel heuristic gets wrong when channel-last
    env = make_vec_env(f"minatar:{game}", 2, seed=0)
    kwargs = dict(n_steps=16, batch_size=16, n_epochs=1) if algo is PPO else dict(learning_starts=0, buffer_size=100)
    model = algo("CnnPolicy", env, policy_kwargs={"features_extractor_class": TinyCNN}, seed=0, **kwargs)
    assert not is_vecenv_wrapped(model.get_env(), VecTransposeImage)  # SB3 adds no transpose of its own
    extractor = model.policy.features_extractor if algo is PPO else model.q_net.features_extractor
    assert extractor.in_channels == MINATAR_CHANNELS[game]
    obs = env.reset()
    tensor, _ = model.policy.obs_to_tensor(obs)
    features_input = preprocess_obs(tensor, model.observation_space).numpy()
    np.testing.assert_allclose(features_input, obs / 255.0)  # the CNN gets the (C, 10, 10) layout as is, in [0, 1]
    model.learn(32)
    env.close()


# ---------------------------------------------------------------------------------------------- gymnasium


def test_gym_vector_observations_and_time_limit_truncation():
    env = make_vec_env("gym:CartPole-v1", 3, seed=0, max_episode_steps=7)
    assert env.observation_space.shape == (4,) and env.observation_space.dtype == np.float32
    obs, _, dones, infos = rollout(env, np.zeros((7, 3), dtype=int) + 1)
    assert obs.shape == (8, 3, 4)
    for t, i in zip(*np.nonzero(dones)):  # pole falls (terminated) or the 7-step limit (truncated)
        assert infos[t][i]["TimeLimit.truncated"] == (infos[t][i]["episode"]["l"] == 7)
        assert infos[t][i]["terminal_observation"].shape == (4,)
    env.close()


# ---------------------------------------------------------------------------------------------- all families


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_trajectories(spec):
    envs = [make_vec_env(spec, 2, seed=5) for _ in range(2)]
    actions = random_actions(envs[0], 60)
    (obs_a, rew_a, done_a, _), (obs_b, rew_b, done_b, _) = (rollout(env, actions) for env in envs)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    np.testing.assert_array_equal(done_a, done_b)
    for env in envs:
        env.close()


@pytest.mark.filterwarnings("ignore:VecFrameStack wrapping a VecEnv without terminal_observation")  # procgen has none
@pytest.mark.parametrize("spec", SPECS)
def test_sb3_wrappers_stack_on_top(spec):
    env = make_vec_env(spec, 2, seed=0)
    if len(env.observation_space.shape) == 3 and not is_image_space_channels_first(env.observation_space):
        env = VecTransposeImage(env)
    if len(env.observation_space.shape) == 3:
        env = VecFrameStack(env, 2, channels_order="first")
    env = VecNormalize(env, norm_obs=len(env.observation_space.shape) == 1)
    obs = env.reset()
    assert obs.shape == (2, *env.observation_space.shape)
    for action in random_actions(env, 50):
        obs, reward, done, _ = env.step(action)
        assert obs.shape == (2, *env.observation_space.shape) and np.isfinite(reward).all()
    env.close()


def test_vec_monitor_on_the_bare_procgen_vec_env():
    env = VecMonitor(ProcgenVecEnv("bigfish", 4, seed=0, num_levels=200, start_level=0, distribution_mode="easy"))
    _, rewards, dones, infos = rollout(env, random_actions(env, 200))
    assert dones.any()
    episode_lengths = [infos[t][i]["episode"]["l"] for t, i in zip(*np.nonzero(dones))]
    assert all(length >= 1 for length in episode_lengths)
    env.close()


@pytest.mark.parametrize("spec", SPECS)
def test_evaluate_policy_with_a_random_policy(spec):
    env = make_eval_env(spec, 2, seed=0)
    returns, lengths = evaluate_policy(RandomPolicy(env), env, n_eval_episodes=4, return_episode_rewards=True)
    assert len(returns) == len(lengths) == 4
    assert all(np.isfinite(returns)) and min(lengths) >= 1
    env.close()


def test_video_recorder_writes_procgen_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _point_moviepy_at_bundled_ffmpeg(monkeypatch)
    env = make_vec_env("procgen:bigfish", 2, seed=0, render_mode="rgb_array")
    assert env.render_mode == "rgb_array" and env.unwrapped.metadata["render_fps"] == 15
    frames = env.unwrapped.get_images()
    assert len(frames) == 2 and frames[0].shape == (512, 512, 3) and frames[0].dtype == np.uint8
    env = VecVideoRecorder(env, str(tmp_path), record_video_trigger=lambda step: step == 0, video_length=10)
    env.reset()
    for action in random_actions(env, 12):
        _, _, _, infos = env.step(action)
        assert "rgb" not in infos[0]
    env.close()
    (video,) = tmp_path.glob("*.mp4")
    assert video.stat().st_size > 1000


def _point_moviepy_at_bundled_ffmpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    """gym3 pins imageio-ffmpeg < 0.4, whose import needs pkg_resources (gone from setuptools >= 81); moviepy 1.x
    then fails to find ffmpeg. FFMPEG_BINARY, read when moviepy.config is imported, points it at the bundled one."""
    if "moviepy.config" in sys.modules:
        return
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        (binary,) = Path(importlib.util.find_spec("imageio_ffmpeg").submodule_search_locations[0], "binaries").glob(
            "ffmpeg*"
        )
        monkeypatch.setenv("FFMPEG_BINARY", str(binary))


# ---------------------------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    ("coinrun", {}, r"Bad environment spec 'coinrun'.*'family:name'.*procgen, atari, minatar, gym"),
    ("mujoco:Ant", {}, r"Unknown environment family 'mujoco'.*valid families: procgen, atari, minatar, gym"),
    ("procgen:", {}, r"names no environment after 'procgen:'"),
    ("procgen:coinrunn", {}, r"Unknown procgen game 'coinrunn'; valid games: bigfish, .*coinrun, .*starpilot"),
    (
        "minatar:pong",
        {},
        r"Unknown MinAtar game 'pong'; valid games: asterix, breakout, freeway, seaquest, space_invaders",
    ),
    ("atari:Breakot", {}, r"Unknown Atari game 'Breakot'; close matches: Breakout.*valid games: .*Pong"),
    ("gym:CartPol-v1", {}, r"Unknown gymnasium id 'CartPol-v1'; close matches: CartPole-v1"),
    ("gym:Qwzx", {}, r"Unknown gymnasium id 'Qwzx'; no close match"),
    ("procgen:coinrun", {"num_levels": -1}, r"procgen option num_levels: -1; expected an int >= 0"),
    ("procgen:coinrun", {"start_level": 1.5}, r"procgen option start_level: 1.5; expected an int >= 0"),
    (
        "procgen:coinrun",
        {"distribution_mode": "medium"},
        r"distribution_mode: 'medium'; expected one of \('easy', 'hard', 'extreme', 'memory', 'exploration'\)",
    ),
    (
        "procgen:bigfish",
        {"distribution_mode": "exploration"},
        r"'bigfish' has no distribution_mode 'exploration'; 'exploration' exists for: caveflyer",
    ),
    (
        "procgen:coinrun",
        {"distribution_mode": "exploration", "num_levels": 5},
        r"'exploration' fixes the level; drop num_levels",
    ),
    ("procgen:coinrun", {"render_mode": "human"}, r"render_mode: 'human'; expected one of \(None, 'rgb_array'\)"),
    ("procgen:coinrun", {"use_backgrounds": 1}, r"use_backgrounds: 1; expected True or False"),
    (
        "procgen:coinrun",
        {"levels": 3},
        r"Unknown option 'levels' for procgen environments; valid options: center_agent, .*num_levels",
    ),
    ("atari:Pong", {"frame_stack": 0}, r"atari option frame_stack: 0; expected an int >= 1"),
    (
        "atari:Pong",
        {"action_repeat_probability": 1.5},
        r"action_repeat_probability: 1.5; expected a number in \[0, 1\]",
    ),
    ("minatar:breakout", {"sticky_action_prob": -0.1}, r"sticky_action_prob: -0.1; expected a number in \[0, 1\]"),
    (
        "minatar:breakout",
        {"num_levels": 3},
        r"Unknown option 'num_levels' for minatar environments; valid options: difficulty_ramping, distractors, max_episode_steps, minimal_action_set, sticky_action_prob",
    ),
    (
        "gym:CartPole-v1",
        {"gravity": 3.0},
        r"Unknown option 'gravity' for gym:CartPole-v1 environments; valid options: distractors, max_episode_steps, sutton_barto_reward",
    ),
    ("gym:CartPole-v1", {"max_episode_steps": 0}, r"max_episode_steps: 0; expected an int >= 1"),
]


@pytest.mark.parametrize(("spec", "options", "message"), BAD_INPUTS, ids=[f"{s}-{sorted(o)}" for s, o, _ in BAD_INPUTS])
def test_bad_spec_or_option_is_one_clear_value_error(spec, options, message):
    with pytest.raises(ValueError, match=message):
        validate_spec(spec, 2, **options)
    with pytest.raises(ValueError, match=message):
        make_vec_env(spec, 2, **options)


@pytest.mark.parametrize("n_envs", [0, -3, 1.5, True, "4"])
def test_bad_n_envs(n_envs):
    for check in (validate_spec, make_vec_env, make_eval_env):
        with pytest.raises(ValueError, match=rf"n_envs must be an int >= 1, got {n_envs!r}"):
            check("procgen:coinrun", n_envs)


@pytest.mark.parametrize("seed", [-1, 2**31, 0.5])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=rf"seed must be an int in \[0, 2\*\*31\), got {seed!r}"):
        make_vec_env("gym:CartPole-v1", 1, seed=seed)


def test_validate_spec_builds_nothing(monkeypatch: pytest.MonkeyPatch):
    import procgen

    def refuse(*args, **kwargs):
        raise AssertionError("validate_spec built an environment")

    monkeypatch.setattr(procgen, "ProcgenGym3Env", refuse)
    monkeypatch.setattr(gymnasium, "make", refuse)
    for spec in ("procgen:coinrun", "atari:Pong", "minatar:seaquest", "gym:CartPole-v1", "gym:ALE/Pong-v5"):
        assert validate_spec(spec, 8) is None
    assert (
        validate_spec("procgen:dodgeball", 64, distribution_mode="extreme", num_levels=0, render_mode="rgb_array")
        is None
    )


def test_a_normal_run_prints_no_third_party_banner():
    code = textwrap.dedent(
        """
        import numpy as np
        from minc_rl.envs import make_vec_env
        for spec in ("procgen:coinrun", "atari:Pong", "minatar:seaquest", "gym:CartPole-v1"):
            env = make_vec_env(spec, 2)
            env.reset()
            env.step(np.zeros(2, dtype=int))
            env.close()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""
