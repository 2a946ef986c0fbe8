"""make_vec_env / make_eval_env: an SB3 VecEnv from a 'family:name' spec string."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack, VecMonitor

from .distractors import Distractors
from .procgen_vec_env import ProcgenVecEnv
from .quiet import make_gymnasium_env
from .spec import EPISODE_STEP_LIMIT, check_seed, resolve_spec


class MinAtarImage(gymnasium.ObservationWrapper):
    """MinAtar's boolean (10, 10, C) state as a channel-first uint8 (C, 10, 10) image with values {0, 255}.

    255 makes SB3 take it for an image and scale it to {0, 1}. Channel-first because SB3 guesses the channel
    axis as the smallest one: seaquest's channel-last (10, 10, 10) would silently pass as channel-first, and
    SB3's VecTransposeImage refuses it. Past 10 channels (distractor channels) SB3's guess takes a 10-pixel side
    for the channels whatever the layout, so the image says what it is: `channels_first`, which MincPPO and
    MincDQN read (agents.auxiliary.declares_channels_first) instead of guessing.
    """

    channels_first = True

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        height, width, channels = env.observation_space.shape
        self.observation_space = gymnasium.spaces.Box(0, 255, (channels, height, width), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(observation.transpose(2, 0, 1), dtype=np.uint8) * np.uint8(255)


def make_minatar_env(limit: int, **kwargs: Any) -> gymnasium.Env:
    """A MinAtar game as a channel-first image, ended after `limit` steps as a truncation. The time limit is inside
    SB3's Monitor (make_vec_env wraps what this returns), so a truncated episode has its record in info['episode']
    and SB3's evaluation counts it: with the limit outside, a policy that never ends an episode hung evaluations."""
    from minatar.gym import BaseEnv

    return gymnasium.wrappers.TimeLimit(MinAtarImage(BaseEnv(**kwargs)), limit)


def make_vec_env(spec: str, n_envs: int, seed: int = 0, **options: Any) -> VecEnv:
    """Training envs for `spec` ('procgen:coinrun', 'atari:Pong', 'minatar:breakout', 'gym:CartPole-v1').

    Every env reports finished episodes in info['episode'] (Monitor / VecMonitor): do not add a VecMonitor.
    """
    return _make(spec, n_envs, seed, options, evaluation=False)


def make_eval_env(spec: str, n_envs: int, seed: int = 0, **options: Any) -> VecEnv:
    """Held-out evaluation envs: procgen's full level distribution (num_levels=0, start_level=0, whatever the
    training options say), Atari without end-of-life terminations and reward clipping; the rest as make_vec_env."""
    return _make(spec, n_envs, seed, options, evaluation=True)


def _make(spec: str, n_envs: int, seed: int, options: dict[str, Any], evaluation: bool) -> VecEnv:
    family, name, resolved = resolve_spec(spec, n_envs, options)
    check_seed(seed)
    if family == "procgen":
        if evaluation and resolved["distribution_mode"] != "exploration":
            resolved.update(num_levels=0, start_level=0)
        return VecMonitor(ProcgenVecEnv(name, n_envs, seed, **resolved))

    options = dict(options)
    options.pop("distractors", None)
    if family == "atari":
        frame_stack = options.pop("frame_stack", 4)
        if evaluation:
            options.update(terminal_on_life_loss=False, clip_reward=False)
        venv = make_atari_env(make_gymnasium_env, n_envs, seed, env_kwargs={"env_id": resolved}, wrapper_kwargs=options)
        return VecFrameStack(venv, frame_stack)
    if family == "minatar":
        limit = options.pop("max_episode_steps", EPISODE_STEP_LIMIT)
        env_kwargs = {"game": name, "use_minimal_action_set": options.pop("minimal_action_set", False), **options}
        env_kwargs = {"limit": limit, **env_kwargs}
        return sb3_make_vec_env(make_minatar_env, n_envs, seed, wrapper_class=with_distractors(None, resolved),
                                env_kwargs=env_kwargs)
    wrapper = with_distractors(None, resolved)
    if gymnasium.spec(name).max_episode_steps is None:  # an id registered without a step limit gets ours
        options.setdefault("max_episode_steps", EPISODE_STEP_LIMIT)
    env_kwargs = {"env_id": name, **options}
    return sb3_make_vec_env(make_gymnasium_env, n_envs, seed, env_kwargs=env_kwargs, wrapper_class=wrapper)


def with_distractors(
    wrapper: Callable[[gymnasium.Env], gymnasium.Env] | None, distractors: tuple[int | str, float | None] | None
) -> Callable[[gymnasium.Env], gymnasium.Env] | None:
    """`wrapper` followed by Distractors(count, p) when `distractors` asks for them, else `wrapper` alone."""
    if distractors is None:
        return wrapper
    count, p = distractors
    return lambda env: Distractors(wrapper(env) if wrapper is not None else env, count, p)
