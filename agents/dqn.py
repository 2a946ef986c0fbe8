"""MincDQN: SB3's DQN with an auxiliary loss on (observation, next observation) pairs from its replay buffer."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, create_mlp
from stable_baselines3.common.utils import get_parameters_by_name
from stable_baselines3.dqn.policies import DQNPolicy, QNetwork
from torch import nn
from torch.nn import functional as F

from minc_rl.agents.auxiliary import AuxBatch, AuxConfig, LinearCritic, MincAuxMixin, with_foreach
from minc_rl.agents.pairs import check_one_step_pairs, ends_without_successor, select_rows, successor_rows
from minc_rl.agents.selfpred import SequenceReplayBuffer
from minc_rl.common.checks import check_bool, check_choice, check_positive

TD_LOSSES = {"huber": F.smooth_l1_loss, "mse": F.mse_loss}


def concat_observations(first: Any, second: Any) -> Any:
    """Two observation batches (tensors or dicts of tensors) as one."""
    if isinstance(first, dict):
        return {key: th.cat([first[key], second[key]]) for key in first}
    return th.cat([first, second])


class DuelingHead(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a' A(s, a') (Wang et al. 2016): two MLPs (SB3's create_mlp with the policy's
    net_arch and activation_fn) on the encoder's features."""

    def __init__(self, features_dim: int, actions: int, net_arch: list[int], activation_fn: type[nn.Module]) -> None:
        super().__init__()
        self.value = nn.Sequential(*create_mlp(features_dim, 1, net_arch, activation_fn))
        self.advantage = nn.Sequential(*create_mlp(features_dim, actions, net_arch, activation_fn))

    def forward(self, features: th.Tensor) -> th.Tensor:
        """Q-values (B, |A|) of encoder features."""
        advantage = self.advantage(features)
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


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

    With aux="selfpred" the replay buffer is a SequenceReplayBuffer and each aux step rolls the latent model out
    aux.horizon steps from the batch's o_t (agents.selfpred). Options beyond SB3's DQN, all off by default (SB3's DQN):
    `double_q` (Double DQN: the online network picks the next action, the target network values it), `dueling`
    (DuelingHead on the policy's net_arch), `td_loss` ("huber", SB3's, or "mse"), `encoder_lr` (the encoder's Adam
    learning rate, its own parameter group; None: learning_rate; a schedule scales both alike).
    """

    has_linear_critic = True
    takes_td_settings = True

    def __init__(
        self,
        policy: str | type[DQNPolicy],
        env: Any,
        aux: str | AuxConfig | Mapping[str, Any] = "minc",
        encoder: str = "auto",
        double_q: bool = False,
        dueling: bool = False,
        td_loss: str = "huber",
        encoder_lr: float | None = None,
        **sb3_kwargs: Any,
    ) -> None:
        self.successors_missing = False  # whether an episode ended without its terminal_observation (successor_rows)
        check_bool("double_q", double_q)
        check_bool("dueling", dueling)
        check_choice("td_loss", td_loss, tuple(TD_LOSSES))
        if encoder_lr is not None:
            check_positive("encoder_lr (None: learning_rate)", encoder_lr)
        self.double_q, self.dueling, self.td_loss, self.encoder_lr = double_q, dueling, td_loss, encoder_lr
        super().__init__(policy, env, **self._init_aux(policy, aux, encoder, sb3_kwargs, env))

    def _setup_model(self) -> None:
        selfpred = self.aux.name == "selfpred"
        if selfpred and self.replay_buffer_class not in (None, SequenceReplayBuffer):
            raise ValueError(f"aux=selfpred reads K-step sequences from a SequenceReplayBuffer; replay_buffer_class="
                             f"{self.replay_buffer_class.__name__} holds none (leave replay_buffer_class unset)")
        if selfpred:
            self.replay_buffer_class = SequenceReplayBuffer
        super()._setup_model()
        if self.aux.name != "none":
            check_one_step_pairs(self.replay_buffer, self.n_steps, "or aux='none'")
        if self.dueling:
            network = self.q_net
            self.q_net.q_net = DuelingHead(network.features_dim, int(self.action_space.n), network.net_arch,
                                           network.activation_fn).to(self.device)
            self.q_net_target.q_net = copy.deepcopy(self.q_net.q_net)
        if self.aux.linear_critic:
            self._use_linear_critic()
        if self.dueling or self.aux.linear_critic or self.encoder_lr is not None:
            self._rebuild_optimizer()

    def _rebuild_optimizer(self) -> None:
        """The RL optimizer over the online Q-network as it is now (dueling or linear-critic head), without the aux
        head's phi (the aux loss trains it); the encoder in a parameter group of its own when encoder_lr is set."""
        excluded = {id(p) for p in self.aux_learner.head.parameters()} if self.aux.linear_critic else set()
        parameters = [p for p in self.q_net.parameters() if id(p) not in excluded]
        groups = [{"params": parameters}]
        if self.encoder_lr is not None:
            encoder = {id(p) for p in self.q_net.features_extractor.parameters()}
            groups = [{"params": [p for p in parameters if id(p) in encoder], "lr": self.encoder_lr},
                      {"params": [p for p in parameters if id(p) not in encoder]}]
        policy = self.policy
        policy.optimizer = policy.optimizer_class(groups, lr=self.lr_schedule(1), **policy.optimizer_kwargs)
        if self.aux_learner is not None:
            with_foreach(policy.optimizer)

    def _update_learning_rate(self, optimizers: Any) -> None:
        super()._update_learning_rate(optimizers)
        if self.encoder_lr is not None:  # the encoder's group keeps its own rate, scaled as the schedule scales
            scale = self.lr_schedule(self._current_progress_remaining) / self.lr_schedule(1)
            self.policy.optimizer.param_groups[0]["lr"] = self.encoder_lr * scale

    def _store_transition(self, replay_buffer: ReplayBuffer, buffer_action: np.ndarray, new_obs: Any,
                          reward: np.ndarray, dones: np.ndarray, infos: list[dict[str, Any]]) -> None:
        if self.aux_learner is not None and not self.successors_missing:
            self.successors_missing = ends_without_successor(dones, infos, replay_buffer.handle_timeout_termination)
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)

    def _use_linear_critic(self) -> None:
        """Replace the Q-networks' last layer by LinearCritic over the aux head's phi (the target network gets a
        copy, updated as SB3 updates the rest of it); the RL optimizer holds w and c, not phi (_rebuild_optimizer)."""
        self.q_net.q_net = LinearCritic(self.aux_learner.head)
        self.q_net_target.q_net = copy.deepcopy(self.q_net.q_net)
        self.q_net_target.set_training_mode(False)
        self.batch_norm_stats = get_parameters_by_name(self.q_net, ["running_"])  # the head's BatchNorm, too
        self.batch_norm_stats_target = get_parameters_by_name(self.q_net_target, ["running_"])

    @property
    def aux_extractor(self) -> BaseFeaturesExtractor:
        """The online Q-network's features extractor (the target Q-network holds a copy)."""
        return self.q_net.features_extractor

    @property
    def _aux_network(self) -> QNetwork:
        return self.q_net

    @property
    def aux_target_extractor(self) -> nn.Module:
        """The target Q-network's encoder, copied from the online one with the Q target (aux.target='q_target')."""
        return self.q_net_target.features_extractor

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
        if self.aux.name == "selfpred":
            steps = self.replay_buffer.sequences(self.aux.horizon, self.successors_missing, self._vec_normalize_env)
            return AuxBatch(pairs.observations, steps.next_observations, rows, steps.actions, steps.rewards,
                            steps.alive, steps.held)
        keep = successor_rows(pairs, self.replay_buffer, self.successors_missing)
        if keep is None:
            return AuxBatch(pairs.observations, pairs.next_observations, rows, pairs.actions)
        self.aux_learner.masked += int((~keep).sum())
        return AuxBatch(select_rows(pairs.observations, keep), select_rows(pairs.next_observations, keep), rows[keep],
                        pairs.actions[keep])

    def next_q_values(self, next_observations: Any) -> th.Tensor:
        """The bootstrap values (B, 1) of the next observations: the target network's max (SB3's DQN), or with
        double_q its value of the online network's greedy action (van Hasselt et al. 2016)."""
        next_q_values = self.q_net_target(next_observations)
        if self.double_q:
            next_actions = self.q_net(next_observations).argmax(dim=1, keepdim=True)
            return next_q_values.gather(1, next_actions)
        return next_q_values.max(dim=1)[0].reshape(-1, 1)

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
                next_q_values = self.next_q_values(replay_data.next_observations)
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
            loss = TD_LOSSES[self.td_loss](current_q_values, target_q_values)
            losses.append(loss.item())

            done_steps += 1
            first_row = 0 if self.aux.source == "td" else batch_size
            if self._gradient_step(loss, features, rl_features, lambda: self._aux_batch(pairs, first_row)):
                break  # should_stop

        self._n_updates += done_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", np.mean(losses))
