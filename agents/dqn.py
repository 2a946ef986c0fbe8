"""MincDQN: SB3's DQN with an auxiliary loss on (observation, next observation) pairs from its replay buffer."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import get_parameters_by_name
from stable_baselines3.dqn.policies import DQNPolicy, QNetwork
from torch.nn import functional as F

from minc_rl.agents.auxiliary import AuxBatch, AuxConfig, LinearCritic, MincAuxMixin
from minc_rl.agents.pairs import check_one_step_pairs, ends_without_successor, select_rows, successor_rows


def concat_observations(first: Any, second: Any) -> Any:
    """Two observation batches (tensors or dicts of tensors) as one."""
    if isinstance(first, dict):
        return {key: th.cat([first[key], second[key]]) for key in first}
    return th.cat([first, second])


class MincDQN(MincAuxMixin, DQN):
    """DQN with the auxiliary loss on every gradient step (every aux.every-th), joined to the TD step as `aux.mode`
    says.

    `aux` is a loss name ("minc", "spectral", "infonce", "none") or an AuxConfig / a mapping of its settings. Where
    the pairs come from is `aux.source`: "td" (the default) takes the TD batch's own transitions (o_t, a_t, o_t+1),
    so o_t's features are the Q forward's and only o_t+1 is encoded again, without gradient; "replay" draws
    aux.batch pairs of their own from the replay buffer, apart from the TD batch, and both batches go through the
    online encoder in one forward. Either way a pair whose successor the buffer does not hold (an episode's end under
    optimize_memory_usage, or from an env without terminal_observation) is left out (train/aux_masked). The aux loss
    attaches to the online Q-network's features extractor; the target Q-network is SB3's copy, untouched by it.
    With aux="none", or source="td" at share 0, this is SB3's DQN, update for update.

    With aux.linear_critic, Q(s, a) = phi(s, a)^T w + c on the aux loss's state-action embedding (before its unit
    normalisation): the TD loss trains w and c, the aux loss trains phi and the encoder.
    """

    has_linear_critic = True
    takes_td_settings = True

    def __init__(
        self,
        policy: str | type[DQNPolicy],
        env: Any,
        aux: str | AuxConfig | Mapping[str, Any] = "minc",
        encoder: str = "auto",
        **sb3_kwargs: Any,
    ) -> None:
        self.successors_missing = False  # whether an episode ended without its terminal_observation (successor_rows)
        super().__init__(policy, env, **self._init_aux(policy, aux, encoder, sb3_kwargs))

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.aux.name != "none":
            check_one_step_pairs(self.replay_buffer, self.n_steps, "or aux='none'")
        if self.aux.linear_critic:
            self._use_linear_critic()

    def _store_transition(self, replay_buffer: ReplayBuffer, buffer_action: np.ndarray, new_obs: Any,
                          reward: np.ndarray, dones: np.ndarray, infos: list[dict[str, Any]]) -> None:
        if self.aux_learner is not None and not self.successors_missing:
            self.successors_missing = ends_without_successor(dones, infos, replay_buffer.handle_timeout_termination)
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)

    def _use_linear_critic(self) -> None:
        """Replace the Q-networks' last layer by LinearCritic over the aux head's phi (the target network gets a
        copy, updated as SB3 updates the rest of it); the RL optimizer holds w and c, not phi."""
        self.q_net.q_net = LinearCritic(self.aux_learner.head)
        self.q_net_target.q_net = copy.deepcopy(self.q_net.q_net)
        self.q_net_target.set_training_mode(False)
        self.batch_norm_stats = get_parameters_by_name(self.q_net, ["running_"])  # the head's BatchNorm, too
        self.batch_norm_stats_target = get_parameters_by_name(self.q_net_target, ["running_"])
        phi = {id(p) for p in self.aux_learner.head.parameters()}
        policy = self.policy
        policy.optimizer = policy.optimizer_class(
            [p for p in self.q_net.parameters() if id(p) not in phi], lr=self.lr_schedule(1), **policy.optimizer_kwargs
        )

    @property
    def aux_extractor(self) -> BaseFeaturesExtractor:
        """The online Q-network's features extractor (the target Q-network holds a copy)."""
        return self.q_net.features_extractor

    @property
    def _aux_network(self) -> QNetwork:
        return self.q_net

    def load_pretrained_encoder(self, path: str) -> None:
        """Load an `encoder.pt` into the online encoder and copy it to the target Q-network."""
        super().load_pretrained_encoder(path)
        self.q_net_target.load_state_dict(self.q_net.state_dict())

    def _features(self, observations: Any) -> th.Tensor:
        """The online encoder's features of raw observations (QNetwork.extract_features)."""
        return self.q_net.extract_features(observations, self.q_net.features_extractor)

    def _aux_batch(self, pairs: Any, first_row: int) -> AuxBatch | None:
        """The step's aux pairs whose successor is true, their o_t features from row `first_row` of the step's
        forward (0: the TD batch's own; batch_size: replay pairs after it); None on a TD step without the aux loss
        (aux.every)."""
        if pairs is None:
            return None
        rows = th.arange(first_row, first_row + len(pairs.rewards), device=self.device)
        keep = successor_rows(pairs, self.replay_buffer, self.successors_missing)
        if keep is None:
            return AuxBatch(pairs.observations, pairs.next_observations, rows, pairs.actions)
        self.aux_learner.masked += int((~keep).sum())
        return AuxBatch(select_rows(pairs.observations, keep), select_rows(pairs.next_observations, keep), rows[keep],
                        pairs.actions[keep])

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        """SB3 2.9's DQN.train, with the aux loss joined to each TD step."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        learner = self.aux_learner
        losses, done_steps = [], 0
        for _ in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            # For n-step replay, discount factor is gamma**n_steps (when no early termination)
            discounts = replay_data.discounts if replay_data.discounts is not None else self.gamma

            with th.no_grad():
                next_q_values = self.q_net_target(replay_data.next_observations)
                next_q_values, _ = next_q_values.max(dim=1)
                next_q_values = next_q_values.reshape(-1, 1)
                target_q_values = replay_data.rewards + (1 - replay_data.dones) * discounts * next_q_values

            if learner is None:
                features = rl_features = pairs = None
                current_q_values = self.q_net(replay_data.observations)
            else:
                observations, pairs = replay_data.observations, None
                aux_step = (self._n_updates + done_steps + 1) % self.aux.every == 0
                if aux_step and self.aux.source == "td":
                    pairs = replay_data
                elif aux_step:
                    pairs = self.replay_buffer.sample(self.aux.batch, env=self._vec_normalize_env)  # type: ignore[union-attr]
                    observations = concat_observations(observations, pairs.observations)
                features = self._features(observations)
                rl_features = learner.rl_view(features)
                current_q_values = self.q_net.q_net(rl_features[:batch_size])
            current_q_values = th.gather(current_q_values, dim=1, index=replay_data.actions.long())
            loss = F.smooth_l1_loss(current_q_values, target_q_values)
            losses.append(loss.item())

            done_steps += 1
            first_row = 0 if self.aux.source == "td" else batch_size
            if self._gradient_step(loss, features, rl_features, lambda: self._aux_batch(pairs, first_row)):
                break  # should_stop

        self._n_updates += done_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", np.mean(losses))
