"""Latent self-prediction (aux="selfpred"): an action-conditioned latent model rolled out K steps from the encoder's
features of o_t along the replayed actions a_t..a_t+K-1, each prediction pulled toward a target encoder's embedding of
o_t+k, plus reward prediction (Voelcker et al. 2024's MinAtar arm; SPR's K-step rollout).

`SequenceReplayBuffer` gives the K transitions after each row of SB3's replay sample, with a mask of the steps that
belong to the same episode and that the buffer holds; `LatentModel` is the transition and reward model;
`build_latent_loss` the distance between prediction and target: MSE (Voelcker), cosine with projection and
predictor (SPR), or MINC with the prediction as phi and the target's embedding as mu.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecNormalize
from torch import nn
from torch.nn import functional as F

from minc_rl.losses import MINCLoss
from minc_rl.rl.settings import LATENT_LOSSES


class Sequences(NamedTuple):
    """The K transitions after each row of a replay sample: o_t+1..o_t+K (B, K, ...), a_t..a_t+K-1 (B, K), r_t..
    r_t+K-1 (B, K); `alive[b, k]`: transition t+k is in the buffer and in o_t's episode (its action and reward are
    real); `held[b, k]`: also its successor o_t+k+1 is the true one."""

    next_observations: th.Tensor
    actions: th.Tensor
    rewards: th.Tensor
    alive: th.Tensor
    held: th.Tensor


def sequence_masks(in_buffer: np.ndarray, ends: np.ndarray, end_successor_missing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sequences' `alive` and `held` (B, K) from whether transition t+k is in the buffer and whether it ends an
    episode: alive up to the first end; at an end the successor is held unless the buffer keeps none there."""
    ended_before = np.cumsum(ends, axis=1) - ends > 0  # an episode end among t..t+k-1
    alive = in_buffer & ~ended_before
    return alive, alive & ~ends if end_successor_missing else alive


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


class LatentModel(nn.Module):
    """z_t+1 = f(z_t, a_t) and r_t = g(z_t, a_t): each an MLP (hidden units, ELU) on the latent and the one-hot
    action, as Voelcker et al.'s model (the one-hot's first layer is an embedding of the action: the same map)."""

    def __init__(self, features_dim: int, actions: int, hidden: int, reward: bool) -> None:
        super().__init__()
        self.latent_in, self.latent_action = nn.Linear(features_dim, hidden), nn.Embedding(actions, hidden)
        self.latent_out = nn.Linear(hidden, features_dim)
        self.reward_in = nn.Linear(features_dim, hidden) if reward else None
        self.reward_action = nn.Embedding(actions, hidden) if reward else None
        self.reward_out = nn.Linear(hidden, 1) if reward else None

    def rollout(self, latent: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """Predicted latents z_t+1..z_t+K (B, K, features) from z_t (B, features) along actions (B, K)."""
        predictions = []
        for step in range(actions.shape[1]):
            latent = self.latent_out(F.elu(self.latent_in(latent) + self.latent_action(actions[:, step])))
            predictions.append(latent)
        return th.stack(predictions, dim=1)

    def rewards(self, latents: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """Predicted rewards r_t..r_t+K-1 (B, K) from the latents z_t..z_t+K-1 (B, K, features) and actions (B, K)."""
        hidden = F.elu(self.reward_in(latents) + self.reward_action(actions))
        return self.reward_out(hidden).squeeze(-1)


def latent_model(features_dim: int, action_space: gym.Space | None, config: Any) -> LatentModel:
    """The LatentModel of an AuxConfig (aux.head_hidden units, aux.reward) for Discrete actions."""
    if not isinstance(action_space, gym.spaces.Discrete):
        raise ValueError(f"aux=selfpred conditions its latent model on Discrete actions; the action space is {action_space}")
    return LatentModel(features_dim, int(action_space.n), config.head_hidden, config.reward)


class MSELatentLoss(nn.Module):
    """Mean over rows of the mean squared difference of prediction and target (Voelcker et al.'s byol_mse)."""

    def forward(self, prediction: th.Tensor, target: th.Tensor) -> th.Tensor:
        return (prediction - target).pow(2).mean()


class CosineLatentLoss(nn.Module):
    """SPR's loss: 2 - 2 cos(q(g(prediction)), g(target)), with a linear projection g (the target's through the same
    g, without gradient when the target has none) and a linear predictor q on the online side."""

    def __init__(self, features_dim: int, dim: int) -> None:
        super().__init__()
        self.projection, self.predictor = nn.Linear(features_dim, dim), nn.Linear(dim, dim)

    def forward(self, prediction: th.Tensor, target: th.Tensor) -> th.Tensor:
        online = self.predictor(self.projection(prediction))
        return (2 - 2 * F.cosine_similarity(online, self.projection(target), dim=1)).mean()


def build_latent_loss(kind: str, features_dim: int, dim: int, ema: float, target_has_gradient: bool) -> nn.Module:
    """The latent loss `kind` (mse | cosine | minc). MINC is asymmetric: the prediction is phi, the target's
    embedding mu, each with its own Lambda over the features; both directions only when the target has a gradient."""
    if kind == "mse":
        return MSELatentLoss()
    if kind == "cosine":
        return CosineLatentLoss(features_dim, dim)
    if kind == "minc":
        return MINCLoss(features_dim, ema=ema, asymmetric=True, symmetric=target_has_gradient)
    raise ValueError(f"unknown aux.latent_loss {kind!r}; valid: {', '.join(LATENT_LOSSES)}")
