"""MincPPO: SB3's PPO with an auxiliary loss on consecutive observations from its own rollout buffer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import RolloutBufferSamples
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from minc_rl.agents.auxiliary import MincAuxMixin, gather_successors, rollout_successors
from minc_rl.extractor import MincExtractor


def evaluate_actions_from_features(
    policy: ActorCriticPolicy, features: th.Tensor | tuple[th.Tensor, th.Tensor], actions: th.Tensor
) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
    """ActorCriticPolicy.evaluate_actions after its extract_features call, so the caller can reuse the features."""
    if policy.share_features_extractor:
        latent_pi, latent_vf = policy.mlp_extractor(features)
    else:
        pi_features, vf_features = features
        latent_pi = policy.mlp_extractor.forward_actor(pi_features)
        latent_vf = policy.mlp_extractor.forward_critic(vf_features)
    distribution = policy._get_action_dist_from_latent(latent_pi)
    return policy.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()


class MincPPO(MincAuxMixin, PPO):
    """PPO whose loss on every minibatch adds aux_coef x the auxiliary loss of (o_t, o_t+1) pairs.

    The pairs are the minibatch's own o_t (up to aux_batch of those whose successor is in the same episode),
    so the encoder features the policy loss computes are reused; only the successors are encoded again,
    without gradient (or by an EMA target encoder when aux_target_tau is a float). With aux="none" this is
    SB3's PPO, update for update.
    """

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
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
        """The MincExtractor whose encoder the policy uses (the actor's, if actor and critic do not share one)."""
        return self.policy.features_extractor

    @property
    def _aux_policy(self) -> ActorCriticPolicy:
        return self.policy

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.aux != "none" and type(self.rollout_buffer) is not RolloutBuffer:
            raise ValueError(f"aux={self.aux!r} needs SB3's RolloutBuffer; got {type(self.rollout_buffer).__name__}")

    def _minibatches(self) -> Iterator[tuple[np.ndarray, RolloutBufferSamples]]:
        """`rollout_buffer.get(batch_size)`, together with each minibatch's flat (env-major) buffer indices."""
        total = self.rollout_buffer.buffer_size * self.rollout_buffer.n_envs
        rng_state = np.random.get_state()
        order = np.random.permutation(total)  # the permutation RolloutBuffer.get is about to draw
        np.random.set_state(rng_state)
        for start, rollout_data in zip(range(0, total, self.batch_size), self.rollout_buffer.get(self.batch_size)):
            yield order[start : start + self.batch_size], rollout_data

    def _minibatch_pairs(self, batch_inds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the minibatch whose successor is in the same episode (at most aux_batch), and those successors."""
        successor, valid = self._successors
        rows = np.flatnonzero(valid[batch_inds])[: self.aux_batch]
        return rows, gather_successors(self.rollout_buffer.observations, self._last_obs, successor[batch_inds[rows]])

    def _aux_loss(
        self, batch_inds: np.ndarray, rollout_data: RolloutBufferSamples, features: th.Tensor
    ) -> th.Tensor | None:
        """Auxiliary loss of the valid pairs whose o_t is in this minibatch, reusing the minibatch's features."""
        rows, next_obs = self._minibatch_pairs(batch_inds)
        rows_t = th.as_tensor(rows, device=self.device)
        next_obs_t = self.rollout_buffer.to_torch(next_obs)
        return self.pair_loss(rollout_data.observations[rows_t], next_obs_t, features[rows_t])

    def train(self) -> None:
        """SB3's PPO.train, with the features computed once per minibatch and the auxiliary loss added."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
        if self.pair_loss is not None:
            # train() directly follows collect_rollouts, so _last_obs / _last_episode_starts are the observations
            # after the rollout and whether they start new episodes.
            self._successors = rollout_successors(self.rollout_buffer.episode_starts, self._last_episode_starts)

        entropy_losses, pg_losses, value_losses, clip_fractions = [], [], [], []
        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for batch_inds, rollout_data in self._minibatches():
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()

                features = self.policy.extract_features(rollout_data.observations)
                values, log_prob, entropy = evaluate_actions_from_features(self.policy, features, actions)
                values = values.flatten()
                advantages = rollout_data.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

                ratio = th.exp(log_prob - rollout_data.old_log_prob)
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()
                pg_losses.append(policy_loss.item())
                clip_fractions.append(th.mean((th.abs(ratio - 1) > clip_range).float()).item())

                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = rollout_data.old_values + th.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf
                    )
                value_loss = F.mse_loss(rollout_data.returns, values_pred)
                value_losses.append(value_loss.item())

                entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
                entropy_losses.append(entropy_loss.item())

                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss

                with th.no_grad():
                    log_ratio = log_prob - rollout_data.old_log_prob
                    approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break

                total_loss = loss  # train/loss stays PPO's own loss, comparable with stock SB3 runs
                if self.pair_loss is not None:
                    pi_features = features if self.policy.share_features_extractor else features[0]
                    aux_loss = self._aux_loss(batch_inds, rollout_data, pi_features)
                    if aux_loss is not None:
                        total_loss = loss + self.aux_coef * aux_loss

                self.policy.optimizer.zero_grad()
                total_loss.backward()
                th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
                self._aux_step_done()

            self._n_updates += 1
            if not continue_training:
                break

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())

        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
        if self.pair_loss is not None:
            self.pair_loss.record(self.logger)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_successors"]
