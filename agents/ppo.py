"""MincPPO: SB3's PPO with an auxiliary loss on consecutive observations from its own rollout buffer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from minc_rl.agents.auxiliary import AuxBatch, AuxConfig, MincAuxMixin
from minc_rl.agents.pairs import IndexedSamples, PairDictRolloutBuffer, PairRolloutBuffer, PairsMixin


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
    """PPO with the auxiliary loss of (o_t, o_t+1) pairs on every minibatch, joined to the PPO step as `aux.mode` says.

    `aux` is a loss name ("minc", "spectral", "infonce", "none") or an AuxConfig / a mapping of its settings. The
    pairs are the minibatch's own o_t (up to aux.batch of those whose successor is in the same episode), so the
    features PPO computes are reused; only the successors are encoded again, without gradient. The aux loss
    attaches to the policy's features extractor (the actor's, if actor and critic do not share one), whatever it
    is; `encoder` picks MincExtractor's network when the policy does not name an extractor. With aux="none" this
    is SB3's PPO, update for update.
    """

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: Any,
        aux: str | AuxConfig | Mapping[str, Any] = "minc",
        encoder: str = "auto",
        **sb3_kwargs: Any,
    ) -> None:
        super().__init__(policy, env, **self._init_aux(policy, aux, encoder, sb3_kwargs, env))

    @property
    def aux_extractor(self) -> BaseFeaturesExtractor:
        """The features extractor the aux loss trains (the actor's, if actor and critic do not share one)."""
        return self.policy.pi_features_extractor

    @property
    def _aux_network(self) -> ActorCriticPolicy:
        return self.policy

    def _setup_model(self) -> None:
        if self.aux.name == "selfpred" and isinstance(self.observation_space, spaces.Dict):
            raise ValueError("aux=selfpred rolls its latent model over image or vector observations; the observation "
                             f"space is a Dict ({', '.join(self.observation_space.spaces)}): use a pair loss (minc, "
                             "spectral, infonce)")
        if self.aux.name != "none" and self.rollout_buffer_class is None:
            dict_space = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = PairDictRolloutBuffer if dict_space else PairRolloutBuffer
        super()._setup_model()
        if self.aux.name != "none" and not isinstance(self.rollout_buffer, PairsMixin):
            raise ValueError(
                f"aux={self.aux.name!r} needs a rollout buffer that finds successors (minc_rl.agents.pairs."
                f"PairRolloutBuffer or PairDictRolloutBuffer); got {type(self.rollout_buffer).__name__}"
            )

    def _aux_batch(self, rollout_data: IndexedSamples) -> AuxBatch:
        """The minibatch's pairs: its o_t whose successor is in the same episode (at most aux.batch), their actions and
        those o_t+1; for aux=selfpred its first aux.batch o_t and the K steps after each."""
        if self.aux.name == "selfpred":
            count = min(len(rollout_data.indices), self.aux.batch)
            steps = self.rollout_buffer.sequences(rollout_data.indices[:count], self._last_obs, self.aux.horizon)
            return AuxBatch(rollout_data.observations[:count], steps.next_observations,
                            th.arange(count, device=self.device), steps.actions, steps.rewards, steps.alive, steps.held)
        rows, next_obs = self.rollout_buffer.successor_pairs(rollout_data.indices, self._last_obs, self.aux.batch)
        rows_t = th.as_tensor(rows, device=self.device)
        observations = rollout_data.observations
        if isinstance(observations, dict):
            observations = {k: v[rows_t] for k, v in observations.items()}
        else:
            observations = observations[rows_t]
        return AuxBatch(observations, next_obs, rows_t, rollout_data.actions[rows_t])

    def _ppo_loss(
        self, rollout_data: Any, features: Any, clip_range: float, clip_range_vf: float | None, stats: dict[str, list]
    ) -> tuple[th.Tensor, th.Tensor]:
        """PPO's loss of one minibatch from its features (SB3 2.9's PPO.train body), and the approximate KL."""
        actions = rollout_data.actions
        if isinstance(self.action_space, spaces.Discrete):
            # Convert discrete action from float to long
            actions = rollout_data.actions.long().flatten()
        values, log_prob, entropy = evaluate_actions_from_features(self.policy, features, actions)
        values = values.flatten()
        advantages = rollout_data.advantages
        # Normalization does not make sense if mini batchsize == 1, see GH issue #325
        if self.normalize_advantage and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        # ratio between old and new policy, should be one at the first iteration
        ratio = th.exp(log_prob - rollout_data.old_log_prob)
        policy_loss_1 = advantages * ratio
        policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
        policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()
        stats["pg_losses"].append(policy_loss.item())
        stats["clip_fractions"].append(th.mean((th.abs(ratio - 1) > clip_range).float()).item())

        if clip_range_vf is None:
            values_pred = values
        else:
            # Clip the difference between old and new value. NOTE: this depends on the reward scaling
            values_pred = rollout_data.old_values + th.clamp(values - rollout_data.old_values, -clip_range_vf, clip_range_vf)
        value_loss = F.mse_loss(rollout_data.returns, values_pred)
        stats["value_losses"].append(value_loss.item())
        # Approximate entropy when no analytical form
        entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
        stats["entropy_losses"].append(entropy_loss.item())

        # Approximate reverse KL divergence for early stopping, see SB3 issue #417 and http://joschu.net/blog/kl-approx.html
        with th.no_grad():
            log_ratio = log_prob - rollout_data.old_log_prob
            approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
        return policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss, approx_kl_div

    def train(self) -> None:
        """SB3 2.9's PPO.train, with the features computed once per minibatch and the aux loss joined to the step."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = None
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
        stats: dict[str, list] = {"entropy_losses": [], "pg_losses": [], "value_losses": [], "clip_fractions": []}
        learner = self.aux_learner
        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                features = self.policy.extract_features(rollout_data.observations)
                pi_features = features if self.policy.share_features_extractor else features[0]
                rl_pi_features = pi_features if learner is None else learner.rl_view(pi_features)
                rl_features = rl_pi_features if self.policy.share_features_extractor else (rl_pi_features, features[1])
                loss, approx_kl_div = self._ppo_loss(rollout_data, rl_features, clip_range, clip_range_vf, stats)
                approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break
                if self._gradient_step(loss, pi_features, rl_pi_features, lambda: self._aux_batch(rollout_data)):
                    continue_training = False  # should_stop: end the update here, as target_kl's early stop does
                    break
            self._n_updates += 1
            if not continue_training:
                break
        self._record_train(stats, approx_kl_divs, loss, clip_range, clip_range_vf)

    def _record_train(
        self, stats: dict[str, list], approx_kl_divs: list, loss: th.Tensor, clip_range: float, clip_range_vf: float | None
    ) -> None:
        """SB3's train/* log keys (train/loss stays PPO's own loss, comparable with stock SB3 runs)."""
        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())
        self.logger.record("train/entropy_loss", np.mean(stats["entropy_losses"]))
        self.logger.record("train/policy_gradient_loss", np.mean(stats["pg_losses"]))
        self.logger.record("train/value_loss", np.mean(stats["value_losses"]))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(stats["clip_fractions"]))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
