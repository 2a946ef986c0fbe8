"""Procgen's batched C++ environment (ProcgenGym3Env) as an SB3 VecEnv, with exact episode boundaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn


class ProcgenVecEnv(VecEnv):
    """All `num_envs` procgen games run in one ProcgenGym3Env; no per-env Python loop on the step path.

    gym3 reports an episode end as `first[i]` on the observation after the last step: procgen has already
    reset that game, so the returned observation is the new episode's first one. That is SB3's `dones`
    contract. procgen keeps no terminal observation, so infos carry no `terminal_observation`, and a
    timed-out episode is an ordinary termination for procgen: done infos say `TimeLimit.truncated=False`.
    Every info has procgen's `level_seed` (the level of the returned observation), `prev_level_seed` and
    `prev_level_complete` (on a done step: the finished episode's level and whether it was solved).

    reset() restarts every game: it rebuilds the C++ env with the seed set by seed(), else with the next
    seed of a generator seeded by `seed` (the first build uses `seed` itself), so runs are reproducible.
    The batch is a single object: get_attr, set_attr and env_method act on this VecEnv for every index.
    `procgen_kwargs` go to ProcgenGym3Env unchecked and with procgen's own defaults; make_vec_env checks them
    and applies minc_rl's (200 levels, easy).
    """

    def __init__(self, game: str, num_envs: int, seed: int = 0, render_mode: str | None = None, **procgen_kwargs: Any):
        self.game = game
        self.render_mode = render_mode
        self._procgen_kwargs = procgen_kwargs
        self._seed_stream = np.random.default_rng(seed)
        super().__init__(num_envs, spaces.Box(0, 255, (64, 64, 3), np.uint8), spaces.Discrete(15))
        self.metadata["render_fps"] = 15  # procgen's own rate for videos
        self.gym3_env = self._build(seed)
        self._stepped = False

    def _build(self, seed: int) -> Any:
        from procgen import ProcgenGym3Env

        return ProcgenGym3Env(
            num=self.num_envs, env_name=self.game, rand_seed=seed, render_mode=self.render_mode, **self._procgen_kwargs
        )

    def reset(self) -> VecEnvObs:
        """First observations of new episodes; the games in progress are dropped (see the class docstring)."""
        seed = self._seeds[0]
        if seed is not None or self._stepped:
            if seed is None:
                seed = int(self._seed_stream.integers(2**31))
            self.gym3_env.close()
            self.gym3_env = self._build(seed)
            self._stepped = False
        self._reset_seeds()
        _, ob, _ = self.gym3_env.observe()
        self.reset_infos = self._infos()
        return ob["rgb"]

    def step_async(self, actions: np.ndarray) -> None:
        self.gym3_env.act(np.asarray(actions).reshape(self.num_envs))
        self._stepped = True

    def step_wait(self) -> VecEnvStepReturn:
        reward, ob, first = self.gym3_env.observe()
        infos = self._infos()
        for i in np.flatnonzero(first):
            infos[i]["TimeLimit.truncated"] = False
        return ob["rgb"], reward, first, infos

    def _infos(self) -> list[dict[str, Any]]:
        infos = self.gym3_env.get_info()
        if self.render_mode is not None:
            for info in infos:
                del info["rgb"]  # the 512x512 render frame; get_images() reads it on demand
        return infos

    def get_images(self) -> Sequence[np.ndarray | None]:
        """The 512x512 frames with render_mode='rgb_array', else the 64x64 observations."""
        if self.render_mode == "rgb_array":
            return [info["rgb"] for info in self.gym3_env.get_info()]
        return list(self.gym3_env.observe()[1]["rgb"])

    def close(self) -> None:
        self.gym3_env.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        result = getattr(self, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]
