"""MincDQN: SB3's DQN with an auxiliary loss on (observation, next observation) pairs from its replay buffer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.dqn.policies import DQNPolicy, QNetwork
from torch.nn import functional as F

from minc_rl.agents.auxiliary import MincAuxMixin
from minc_rl.extractor import MincExtractor


class MincDQN(MincAuxMixin, DQN):
    """DQN whose TD loss on every gradient step adds aux_coef x the auxiliary loss of replay pairs.

    The replay sample's next_observations are the true successors (terminal ones included), so every
    transition is a pair; the first aux_batch of the sample are used, their o_t features taken from the
    Q-network's own forward pass. The sum of both losses takes one optimizer step (one backward through the
    encoder instead of two; the policy optimizer already holds the head). The target Q-network is not
    touched by the auxiliary loss. With aux="none" this is SB3's DQN, update for update.
    """

    def __init__(
        self,
        policy: str | type[DQNPolicy],
        env: Any,
        aux: str = "minc",
        aux_coef: float = 1.0,
        aux_dim: int = 64,
        aux_batch: int = 256,
        aux_ema: float = 0.2,
        aux_augment: str = "none",
        aux_target_tau: float | None = None,
        encoder: str = "auto",
        aux_loss_kwargs: dict[str, Any] | None = None,
        **sb3_kwargs: Any,
    ) -> None:
        sb3_kwargs = self._init_aux(
            aux, aux_coef, aux_dim, aux_batch, aux_ema, aux_augment, aux_target_tau, encoder, aux_loss_kwargs,
            sb3_kwargs,
        )
        super().__init__(policy, env, **sb3_kwargs)

    @property
    def minc_extractor(self) -> MincExtractor:
        """The online Q-network's MincExtractor (the target Q-network holds a copy)."""
        return self.q_net.features_extractor

    @property
    def _aux_policy(self) -> QNetwork:
        return self.q_net

    def load_pretrained_encoder(self, path: str) -> None:
        """Load an `encoder.pt` into the online encoder and copy it to the target Q-network."""
        super().load_pretrained_encoder(path)
        self.q_net_target.load_state_dict(self.q_net.state_dict())

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        """SB3's DQN.train, with the Q-network's features computed once and the auxiliary loss added."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        losses = []
        for _ in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            discounts = replay_data.discounts if replay_data.discounts is not None else self.gamma

            with th.no_grad():
                next_q_values = self.q_net_target(replay_data.next_observations)
                next_q_values, _ = next_q_values.max(dim=1)
                next_q_values = next_q_values.reshape(-1, 1)
                target_q_values = replay_data.rewards + (1 - replay_data.dones) * discounts * next_q_values

            features = self.q_net.extract_features(replay_data.observations, self.q_net.features_extractor)
            current_q_values = self.q_net.q_net(features)
            current_q_values = th.gather(current_q_values, dim=1, index=replay_data.actions.long())
            loss = F.smooth_l1_loss(current_q_values, target_q_values)
            losses.append(loss.item())

            total_loss = loss  # train/loss stays the TD loss, comparable with stock SB3 runs
            if self.pair_loss is not None:
                pairs = slice(0, self.aux_batch)
                aux_loss = self.pair_loss(
                    replay_data.observations[pairs], replay_data.next_observations[pairs], features[pairs]
                )
                if aux_loss is not None:
                    total_loss = loss + self.aux_coef * aux_loss

            self.policy.optimizer.zero_grad()
            total_loss.backward()
            th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()
            self._aux_step_done()

        self._n_updates += gradient_steps

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", np.mean(losses))
        if self.pair_loss is not None:
            self.pair_loss.record(self.logger)
