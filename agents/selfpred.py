"""Latent self-prediction (aux="selfpred") on SB3's side: an action-conditioned latent model rolled out K steps from
the encoder's features of o_t along the replayed actions a_t..a_t+K-1, each prediction pulled toward a target
encoder's embedding of o_t+k, plus reward prediction (Voelcker et al. 2024's MinAtar arm; SPR's K-step rollout).

`SequenceReplayBuffer` gives the K transitions after each row of SB3's replay sample, with a mask of the steps that
belong to the same episode and that the buffer holds; `latent_model` builds the transition and reward model for the
action space. The model, the latent losses (MSE, SPR's cosine, MINC) and the mask helper are
minc_rl.losses.latent, which pretraining shares.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecNormalize

from minc_rl.losses.latent import LatentModel, sequence_masks


class Sequences(NamedTuple):
    """The K transitions after each row of a replay sample: o_t+1..o_t+K (B, K, ...), a_t..a_t+K-1 (B, K), r_t..
    r_t+K-1 (B, K); `alive[b, k]`: transition t+k is in the buffer and in o_t's episode (its action and reward are
    real); `held[b, k]`: also its successor o_t+k+1 is the true one."""

    next_observations: th.Tensor
    actions: th.Tensor
    rewards: th.Tensor
    alive: th.Tensor
    held: th.Tensor


class SequenceReplayBuffer(ReplayBuffer):
    """SB3's ReplayBuffer that remembers the rows of its last sample, so that `sequences` can read the K transitions
    after them: contiguous rows of the same env, up to the newest row (the buffer's wrap-around is followed, and a
    step past the write position, into older data, is masked), cut at the first episode end (`dones`, truncations
    included). An episode's last successor is held as SB3 holds it: the env's terminal_observation, except with
    optimize_memory_usage (the next episode's first observation takes its slot) or `successors_missing` (an env that
    gives none), where that step is masked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_rows: tuple[np.ndarray, np.ndarray] | None = None  # (buffer rows, env indices) of the last sample

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> Any:
        # SB3 draws each row's env index first thing in _get_samples; draw it again from the same generator state, so
        # that the sample stays SB3's, draw for draw, and its env indices are known (tests check both)
        state = np.random.get_state()
        samples = super()._get_samples(batch_inds, env)
        after = np.random.get_state()
        np.random.set_state(state)
        env_indices = np.random.randint(0, high=self.n_envs, size=(len(batch_inds),))
        np.random.set_state(after)
        self.last_rows = (np.asarray(batch_inds), env_indices)
        return samples

    def sequences(self, horizon: int, successors_missing: bool = False, env: VecNormalize | None = None) -> Sequences:
        """The `horizon` transitions after each row of the last sample (see Sequences)."""
        if self.last_rows is None:
            raise ValueError("SequenceReplayBuffer.sequences reads the rows of the last sample: call sample() first")
        rows, envs = self.last_rows
        steps = np.arange(horizon)
        index = (rows[:, None] + steps) % self.buffer_size  # (B, K): transitions t..t+K-1
        newer = (self.pos - 1 - rows) % self.buffer_size  # rows written after row t, up to the newest
        in_buffer = steps[None, :] <= newer[:, None]
        ends = self.dones[index, envs[:, None]].astype(bool)
        alive, held = sequence_masks(in_buffer, ends, self.optimize_memory_usage or successors_missing)
        if self.optimize_memory_usage:
            following = self.observations[(index + 1) % self.buffer_size, envs[:, None]]
        else:
            following = self.next_observations[index, envs[:, None]]
        actions = self.actions[index, envs[:, None]]
        rewards = self.rewards[index, envs[:, None]]
        data = (self._normalize_obs(following, env), actions.reshape(*index.shape, -1).squeeze(-1),
                self._normalize_reward(rewards, env), alive, held)
        return Sequences(*(self.to_torch(array) for array in data))


def latent_model(features_dim: int, action_space: gym.Space | None, config: Any) -> LatentModel:
    """The LatentModel of an AuxConfig (aux.head_hidden units, aux.reward) for Discrete actions."""
    if not isinstance(action_space, gym.spaces.Discrete):
        raise ValueError(f"aux=selfpred conditions its latent model on Discrete actions; the action space is {action_space}")
    return LatentModel(features_dim, int(action_space.n), config.head_hidden, config.reward)


