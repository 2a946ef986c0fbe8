"""MincAuxCallback: trains a MincExtractor's auxiliary loss inside stock SB3 algorithms (PPO, A2C, DQN, ...)."""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback

from minc_rl.agents.auxiliary import AUGMENT_CHOICES, PairLoss
from minc_rl.checks import check_choice, check_int, check_nonnegative
from minc_rl.extractor import MincExtractor
from minc_rl.losses import AUX_LOSSES


class MincAuxCallback(BaseCallback):
    """After each rollout, `gradient_steps` steps of aux_coef x the auxiliary loss of (o_t, o_t+1) pairs.

    For algorithms without a MINC subclass: the policy needs `features_extractor_class=MincExtractor`
    (its aux, aux_dim, aux_ema... set the loss). On-policy algorithms (PPO, A2C) draw pairs from the rollout
    buffer (o_t+1 in the same episode; the last step pairs with the observation after the rollout),
    off-policy ones (DQN) from the replay buffer's (observation, next observation) once learning has
    started. The steps use the policy's own optimizer (which holds the projection head) and the algorithm's
    max_grad_norm. Each pair batch encodes both views (o_t+1 under stop-gradient). Logs the same
    train/aux_* keys as MincPPO / MincDQN.
    """

    def __init__(
        self,
        gradient_steps: int = 4,
        aux_batch: int = 256,
        aux_coef: float = 1.0,
        aux_augment: str = "none",
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        check_int("gradient_steps", gradient_steps, 1)
        check_int("aux_batch", aux_batch, 2)
        check_nonnegative("aux_coef", aux_coef)
        check_choice("aux_augment", aux_augment, AUGMENT_CHOICES)
        self.gradient_steps = gradient_steps
        self.aux_batch = aux_batch
        self.aux_coef = float(aux_coef)
        self.aux_augment = aux_augment

    def _init_callback(self) -> None:
        network = getattr(self.model, "q_net", None)  # DQN's online Q-network holds its extractor
        network = self.model.policy if network is None else network
        extractor = network.features_extractor
        if not isinstance(extractor, MincExtractor) or extractor.aux == "none":
            built = f"MincExtractor(aux='none')" if isinstance(extractor, MincExtractor) else type(extractor).__name__
            raise ValueError(
                "MincAuxCallback needs policy_kwargs=dict(features_extractor_class=MincExtractor) with aux one of "
                f"{', '.join(map(repr, AUX_LOSSES))}; the policy's features extractor is {built}"
            )
        if int(extractor.head.net[1].num_batches_tracked) == 0:  # a fresh head: undo SB3's orthogonal init
            extractor.reset_head()
        self.pair_loss = PairLoss(extractor, network, self.aux_augment)

    def _on_step(self) -> bool:
        return True

    def _sample_pairs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(o_t, o_t+1) batches of up to aux_batch pairs from the algorithm's buffer, or None if there are none yet."""
        model: BaseAlgorithm = self.model
        buffer = getattr(model, "rollout_buffer", None)
        if isinstance(buffer, RolloutBuffer):
            # on_rollout_end: the buffer is full and not yet flattened; _last_obs follows its last step.
            next_starts = np.concatenate([buffer.episode_starts[1:], np.reshape(model._last_episode_starts, (1, -1))])
            steps, envs = np.nonzero(next_starts == 0)
            pick = np.random.choice(len(steps), size=min(self.aux_batch, len(steps)), replace=False)
            steps, envs = steps[pick], envs[pick]
            last = steps == buffer.buffer_size - 1
            next_obs = buffer.observations[np.minimum(steps + 1, buffer.buffer_size - 1), envs]
            next_obs[last] = model._last_obs[envs[last]]
            return buffer.to_torch(buffer.observations[steps, envs]), buffer.to_torch(next_obs)
        buffer = getattr(model, "replay_buffer", None)
        if isinstance(buffer, ReplayBuffer):
            if model.num_timesteps <= getattr(model, "learning_starts", 0) or buffer.size() == 0:
                return None
            sample = buffer.sample(self.aux_batch, env=model._vec_normalize_env)
            return sample.observations, sample.next_observations
        raise ValueError(f"MincAuxCallback supports SB3's RolloutBuffer and ReplayBuffer; got {type(buffer).__name__}")

    def _on_rollout_end(self) -> None:
        policy = self.model.policy
        policy.set_training_mode(True)
        for _ in range(self.gradient_steps):
            pairs = self._sample_pairs()
            if pairs is None:
                break
            loss = self.pair_loss(*pairs)
            if loss is None:
                continue
            policy.optimizer.zero_grad()
            (self.aux_coef * loss).backward()
            if getattr(self.model, "max_grad_norm", None) is not None:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), self.model.max_grad_norm)
            policy.optimizer.step()
        policy.set_training_mode(False)  # rollouts are collected in evaluation mode
        if self.pair_loss.pairs:
            self.pair_loss.record(self.logger)
