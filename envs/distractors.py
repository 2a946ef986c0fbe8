"""Distractor observations (env option `distractors`): extra observation channels of noise that no action or reward
depends on, for testing whether an encoder learns to ignore what carries no information about the game."""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from minc_rl.common.checks import check_int, check_unit_interval

DISTRACTOR_STREAM = 0xD157  # the noise's seeds are SeedSequence(seed, spawn_key=(DISTRACTOR_STREAM,)): not the env's


class Distractors(gymnasium.ObservationWrapper):
    """`count` extra observation channels of i.i.d. noise, drawn anew at every step and reset, independent of the env
    ("same": as many as the env's own, the image's channels or the vector's length).

    With a probability `p` (MinAtar, served as a channel-first uint8 image (C, H, W) by MinAtarImage): `count` binary
    channels appended, each cell 255 with probability `p` and 0 otherwise. Without one (p=None, gym ids): `count`
    i.i.d. N(0, 1) dimensions appended to a floating-point vector (n,). Any other observation space is a ValueError.
    The env's own channels are passed through unchanged. The noise has a numpy Generator of its own, seeded by the
    seed given to reset() (a stream apart from the env's) and continued by the resets without one, so the same seed
    gives the same noise.
    """

    def __init__(self, env: gymnasium.Env, count: int | str, p: float | None) -> None:
        super().__init__(env)
        space = env.observation_space
        count = space.shape[0] if count == "same" and space.shape else count
        check_int("distractors count", count, 0)
        if p is not None:
            check_unit_interval("distractors p", p)
        self.count, self.p = count, p
        self.rng = np.random.default_rng()  # replaced by the first reset(seed=...)
        is_box = isinstance(space, gymnasium.spaces.Box)
        if p is not None:
            if not (is_box and len(space.shape) == 3 and space.dtype == np.uint8):
                raise ValueError(f"binary distractor channels (with p) need channel-first uint8 images (MinAtar); "
                                 f"this env's observation space is {space}")
            channels, height, width = space.shape
            self.observation_space = gymnasium.spaces.Box(0, 255, (channels + count, height, width), np.uint8)
        elif is_box and len(space.shape) == 1 and np.issubdtype(space.dtype, np.floating):
            unbounded = np.full(count, np.inf, dtype=space.dtype)
            self.observation_space = gymnasium.spaces.Box(
                np.concatenate([space.low, -unbounded]), np.concatenate([space.high, unbounded]), dtype=space.dtype
            )
        else:
            raise ValueError(f"N(0, 1) distractor dimensions need floating-point vector observations (gym ids such as "
                             f"CartPole-v1); this env's observation space is {space}")

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """The env's reset; a seed also restarts the noise's own stream."""
        if seed is not None:
            self.rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(DISTRACTOR_STREAM,)))
        return super().reset(seed=seed, options=options)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        """The observation with the noise channels appended."""
        if self.p is not None:
            cells = self.rng.random((self.count, *observation.shape[1:])) < self.p
            noise = cells.astype(np.uint8) * np.uint8(255)
        else:
            noise = self.rng.standard_normal(self.count).astype(observation.dtype)
        return np.concatenate([observation, noise])
