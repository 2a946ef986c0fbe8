"""Pairs (o_t, o_t+1) from SB3's rollout buffers: which sample follows which, shared by MincPPO and MincAuxCallback."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, NStepReplayBuffer, ReplayBuffer, RolloutBuffer
from stable_baselines3.common.type_aliases import DictReplayBufferSamples, ReplayBufferSamples

from minc_rl.agents.selfpred import Sequences
from minc_rl.losses.latent import sequence_masks

Observations = np.ndarray | dict[str, np.ndarray]


def observations_to_torch(buffer: Any, observations: Observations) -> th.Tensor | dict[str, th.Tensor]:
    """An observation array, or a dict of them, as tensors on the buffer's device."""
    if isinstance(observations, dict):
        return {key: buffer.to_torch(value) for key, value in observations.items()}
    return buffer.to_torch(observations)


def rollout_successors(episode_starts: np.ndarray, last_episode_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Successor index and pair validity of every sample of SB3's flattened rollout buffer.

    `RolloutBuffer.get` flattens (n_steps, n_envs) env-major (`swap_and_flatten`): flat index i = env * n_steps + t.
    The successor of (t, env) is flat index i + 1 while t < n_steps - 1, a valid pair when
    episode_starts[t + 1, env] == 0; for the last step it is n_steps * n_envs + env, i.e. row `env` of the
    observations after the rollout, valid when last_episode_starts[env] == 0 (the env did not just reset).
    """
    n_steps, n_envs = episode_starts.shape
    step = np.arange(n_steps)[None, :]
    env = np.arange(n_envs)[:, None]
    flat = env * n_steps + step
    successor = np.where(step < n_steps - 1, flat + 1, n_steps * n_envs + env)
    next_starts = np.concatenate([episode_starts[1:], np.reshape(last_episode_starts, (1, n_envs))])
    valid = next_starts.T == 0
    return successor.ravel(), valid.ravel()


def select_rows(observations: th.Tensor | dict[str, th.Tensor], keep: th.Tensor) -> th.Tensor | dict[str, th.Tensor]:
    """The rows `keep` (a boolean mask) of an observation batch, a tensor or a dict of them."""
    if isinstance(observations, dict):
        return {key: value[keep] for key, value in observations.items()}
    return observations[keep]


def check_one_step_pairs(buffer: Any, n_steps: int, remedy: str) -> None:
    """ValueError for SB3's n-step replay buffer, whose next_observations are o_t+n: the aux loss pairs o_t, o_t+1."""
    if isinstance(buffer, NStepReplayBuffer):
        raise ValueError(f"n_steps={n_steps}: the n-step buffer's next_observations are o_t+n, not o_t+1; the aux loss "
                         f"needs one-step pairs (n_steps=1), {remedy}")


def ends_without_successor(dones: np.ndarray, infos: list[dict[str, Any]], handles_timeouts: bool) -> bool:
    """Whether a VecEnv step ended an episode without its `terminal_observation` (procgen keeps none): SB3's replay
    buffer then stores the next episode's first observation as that transition's successor."""
    missing = [info for done, info in zip(dones, infos) if done and info.get("terminal_observation") is None]
    if handles_timeouts and any(info.get("TimeLimit.truncated") for info in missing):
        warnings.warn(
            "an episode was truncated without a terminal_observation: its replay sample reads as not done, so the aux "
            "loss cannot leave out that pair (o_T-1, first observation of the next episode); give the env "
            "terminal_observation, or replay_buffer_kwargs=dict(handle_timeout_termination=False)",
            stacklevel=2,
        )
    return bool(missing)


def successor_rows(
    samples: ReplayBufferSamples | DictReplayBufferSamples, buffer: ReplayBuffer, successors_missing: bool
) -> th.Tensor | None:
    """Which rows of a replay sample hold o_t's true successor as next_observations: None when all do, else a
    boolean mask of the rows that did not end an episode. SB3's buffer holds an episode's last successor only as the
    env's terminal_observation (`successors_missing`: some episode ended without one), and not at all with
    optimize_memory_usage, where the next episode's first observation takes its slot (SB3 then needs
    handle_timeout_termination=False, so `dones` marks truncations too)."""
    if not (buffer.optimize_memory_usage or successors_missing):
        return None
    return samples.dones.reshape(-1) == 0


def _as_stored(observations: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A VecEnv's observations laid out as SB3's rollout buffers store them (`add` reshapes Discrete ones, which
    arrive as (n_envs,), to (n_envs, 1))."""
    return np.reshape(observations, (len(observations), *shape))


def gather_successors(flat_observations: np.ndarray, after_observations: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Observations at `index` into flat_observations followed by after_observations (without concatenating them)."""
    inside = index < len(flat_observations)
    out = np.empty((len(index), *flat_observations.shape[1:]), dtype=flat_observations.dtype)
    out[inside] = flat_observations[index[inside]]
    after = _as_stored(after_observations, flat_observations.shape[1:])
    out[~inside] = after[index[~inside] - len(flat_observations)]
    return out


def sample_rollout_pairs(
    buffer: RolloutBuffer | DictRolloutBuffer,
    after_observations: Observations,
    last_episode_starts: np.ndarray,
    count: int,
) -> tuple[Observations, Observations, np.ndarray] | None:
    """Up to `count` random valid pairs (o_t, o_t+1) and their actions a_t, of a full rollout buffer that is not
    flattened yet (n_steps, n_envs, ...); None when the rollout holds no valid pair."""
    successor, valid = rollout_successors(buffer.episode_starts, last_episode_starts)
    candidates = np.flatnonzero(valid)
    if len(candidates) == 0:
        return None
    flat = np.random.choice(candidates, size=min(count, len(candidates)), replace=False)
    following = successor[flat]
    n_steps, n_envs = buffer.episode_starts.shape
    inside = following < n_steps * n_envs

    def pairs_of(observations: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nexts = np.empty((len(flat), *observations.shape[2:]), dtype=observations.dtype)
        nexts[inside] = observations[following[inside] % n_steps, following[inside] // n_steps]
        nexts[~inside] = _as_stored(after, observations.shape[2:])[following[~inside] - n_steps * n_envs]
        return observations[flat % n_steps, flat // n_steps], nexts

    actions = buffer.actions[flat % n_steps, flat // n_steps]
    if isinstance(buffer.observations, dict):
        both = {key: pairs_of(value, after_observations[key]) for key, value in buffer.observations.items()}
        return {k: v[0] for k, v in both.items()}, {k: v[1] for k, v in both.items()}, actions
    return (*pairs_of(buffer.observations, after_observations), actions)


class IndexedSamples(NamedTuple):
    """SB3's RolloutBufferSamples / DictRolloutBufferSamples fields, plus the minibatch's flat buffer indices."""

    observations: th.Tensor | dict[str, th.Tensor]
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    indices: np.ndarray


class PairsMixin:
    """A rollout buffer whose minibatches carry their indices, so that each sample's successor can be found."""

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        super().compute_returns_and_advantage(last_values, dones)  # type: ignore[misc]
        # SB3 passes `dones` = whether the observations after the rollout start new episodes
        self.successors = rollout_successors(self.episode_starts, dones)  # type: ignore[attr-defined]
        self.last_episode_starts = np.asarray(dones, dtype=np.float32).reshape(1, -1)

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> IndexedSamples:
        return IndexedSamples(*super()._get_samples(batch_inds, env), indices=batch_inds)  # type: ignore[misc]

    def successor_pairs(self, indices: np.ndarray, after_observations: Observations, count: int) -> tuple[np.ndarray, Any]:
        """Positions in `indices` whose successor is in the same episode (the first `count`), and those successors
        as tensors. For use during `get` (the buffer is flattened then); after_observations follow the rollout."""
        successor, valid = self.successors
        rows = np.flatnonzero(valid[indices])[:count]
        index = successor[indices[rows]]
        observations = self.observations  # type: ignore[attr-defined]
        if isinstance(observations, dict):
            following = {k: gather_successors(v, after_observations[k], index) for k, v in observations.items()}
        else:
            following = gather_successors(observations, after_observations, index)
        return rows, observations_to_torch(self, following)


    def sequences(self, indices: np.ndarray, after_observations: np.ndarray, horizon: int) -> Sequences:
        """The `horizon` transitions after each flat index (aux=selfpred; see agents.selfpred.Sequences), within the
        rollout and o_t's episode. The rollout holds no terminal observation, so an episode's last successor is
        masked; a truncated episode's last reward carries SB3's bootstrap (gamma times the value of its end)."""
        n_steps, n_envs = self.episode_starts.shape  # type: ignore[attr-defined]
        env, start = np.divmod(indices, n_steps)  # flat index = env * n_steps + t
        steps = start[:, None] + np.arange(horizon)  # (B, K): transitions t..t+K-1
        following = steps + 1  # their successors' steps; n_steps: the observation after the rollout
        starts = np.concatenate([self.episode_starts, self.last_episode_starts])  # type: ignore[attr-defined]
        ends = starts[np.minimum(following, n_steps), env[:, None]].astype(bool)  # o_t+k+1 begins a new episode
        alive, held = sequence_masks(steps < n_steps, ends, end_successor_missing=True)
        successor = np.where(following < n_steps, env[:, None] * n_steps + following, n_steps * n_envs + env[:, None])
        successors = gather_successors(self.observations, after_observations, successor.ravel())  # type: ignore[attr-defined]
        transition = env[:, None] * n_steps + np.minimum(steps, n_steps - 1)
        data = (successors.reshape(*steps.shape, *successors.shape[1:]),
                self.actions[transition].reshape(steps.shape),  # type: ignore[attr-defined]
                self.rewards[np.minimum(steps, n_steps - 1), env[:, None]], alive, held)  # type: ignore[attr-defined]
        return Sequences(*(self.to_torch(array) for array in data))  # type: ignore[attr-defined]


class PairRolloutBuffer(PairsMixin, RolloutBuffer):
    """SB3's RolloutBuffer with minibatch indices and successors (MincPPO's default for Box observations)."""


class PairDictRolloutBuffer(PairsMixin, DictRolloutBuffer):
    """SB3's DictRolloutBuffer with minibatch indices and successors (MincPPO's default for Dict observations)."""
