"""MincAuxCallback: trains an auxiliary loss on the features extractor of stock SB3 algorithms (PPO, A2C, DQN, SAC,
TD3, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, ReplayBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from minc_rl.agents.auxiliary import AuxBatch, AuxConfig, AuxLearner
from minc_rl.agents.pairs import (
    check_one_step_pairs, ends_without_successor, observations_to_torch, sample_rollout_pairs, select_rows,
    successor_rows,
)
from minc_rl.common.checks import check_int


def separate_config(aux: str | AuxConfig | Mapping[str, Any]) -> AuxConfig:
    """The callback's AuxConfig: mode 'separate' unless given otherwise, which is an error."""
    if isinstance(aux, AuxConfig):
        config = aux
    else:
        config = AuxConfig.of({"mode": "separate", **({"name": aux} if isinstance(aux, str) else aux)})
    if config.mode != "separate":
        raise ValueError(
            f"MincAuxCallback takes its aux steps after the algorithm's own: aux.mode must be 'separate'; got "
            f"{config.mode!r} (joint and decoupled need MincPPO or MincDQN)"
        )
    if config.name == "none":
        raise ValueError("MincAuxCallback needs an aux loss; aux='none' leaves it nothing to train")
    if config.name == "selfpred":
        raise ValueError("aux=selfpred reads K-step sequences from the agent's own buffer (MincDQN's "
                         "SequenceReplayBuffer, MincPPO's PairRolloutBuffer): use MincDQN or MincPPO, not the callback")
    if config.linear_critic:
        raise ValueError("aux.linear_critic replaces the Q-network's last layer: use MincDQN, not the callback")
    if config.every != 1:
        raise ValueError(f"aux.every={config.every} thins MincDQN's aux steps; the callback's rate is gradient_steps")
    if config.source == "td":
        raise ValueError(f"aux.source={config.source!r} needs MincDQN's TD batch; the callback sees no TD batch and "
                         "draws aux.batch pairs of its own (leave aux.source unset, or 'replay')")
    return config


class SavedAuxState:
    """The callback's aux state as an attribute of the model (`model.minc_aux_state`): SB3's model.save pickles the
    model's attributes into its zip, and pickling this one takes the live state (settings, head, Lambda, target
    encoder, aux optimizer) at that moment; SB3's load brings it back, and the next MincAuxCallback picks it up."""

    def __init__(self, learner: AuxLearner) -> None:
        self.learner: AuxLearner | None = learner
        self.saved: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        """The settings and state dicts: the live learner's, or those unpickled from a saved model."""
        if self.learner is None:
            return self.saved  # type: ignore[return-value]
        return {"config": self.learner.config, "learner": self.learner.state_dict(),
                "optimizer": self.learner.optimizer.state_dict()}

    def __getstate__(self) -> dict[str, Any]:
        return self.state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.learner, self.saved = None, state


def trained_extractor(network: BasePolicy) -> BaseFeaturesExtractor:
    """The features extractor the aux loss trains: DQN's Q-network's, an actor-critic's (the actor's when they are
    apart), or SAC's / TD3's when the actor and critic share it; a ValueError when they do not."""
    actor, critic = getattr(network, "actor", None), getattr(network, "critic", None)
    if actor is not None and critic is not None:  # SAC, TD3 (and DDPG): policy_kwargs share_features_extractor
        if actor.features_extractor is not critic.features_extractor:
            raise ValueError(
                f"MincAuxCallback trains one features extractor, and this {type(network).__name__} has two, the "
                "actor's and the critic's (share_features_extractor=False, SAC's and TD3's default); pass "
                "policy_kwargs=dict(share_features_extractor=True) for one that both use"
            )
        return actor.features_extractor
    return getattr(network, "pi_features_extractor", None) or network.features_extractor


class MincAuxCallback(BaseCallback):
    """After each rollout, `gradient_steps` aux steps (aux.mode='separate': the aux optimizer over the policy's
    features extractor and a projection head) on aux.batch pairs (o_t, o_t+1) from the algorithm's buffer.

    For algorithms without a MINC subclass, and for any features extractor. On-policy algorithms (PPO, A2C) draw
    pairs from the rollout buffer (o_t+1 in the same episode; the last step pairs with the observation after the
    rollout), off-policy ones (DQN; SAC and TD3 whose actor and critic share the extractor) from the replay buffer
    once learning has started. Logs the train/aux_* keys of MincPPO / MincDQN. The head, Lambda and the aux
    optimizer live in `self.learner` (an nn.Module) and travel with the model: `model.save` writes them into the
    zip (`model.minc_aux_state`, SavedAuxState), and a callback given to `learn` of the loaded model continues from
    them (its settings must fit them: AuxConfig's check_takes_state_of).
    """

    def __init__(self, aux: str | AuxConfig | Mapping[str, Any] = "minc", gradient_steps: int = 4, verbose: int = 0) -> None:
        super().__init__(verbose)
        check_int("gradient_steps", gradient_steps, 1)
        self.config = separate_config(aux)
        self.gradient_steps = gradient_steps
        self.learner: AuxLearner | None = None
        self._after_aux: list[th.Tensor] | None = None  # aux.log_update_share: the encoder after the last aux steps
        self.successors_missing = False  # an episode ended without terminal_observation (agents.pairs.successor_rows)

    def _init_callback(self) -> None:
        network = getattr(self.model, "q_net", None)  # DQN's online Q-network holds its extractor
        network = self.model.policy if network is None else network
        extractor = trained_extractor(network)
        check_one_step_pairs(getattr(self.model, "replay_buffer", None), getattr(self.model, "n_steps", 1),
                             "or no MincAuxCallback")
        if self.learner is None:  # a second learn() keeps the head, Lambda and optimizer
            learner = AuxLearner(self.config, extractor, network.observation_space, network.normalize_images,
                                 self.model.action_space).to(self.model.device)
            saved = getattr(self.model, "minc_aux_state", None)
            if isinstance(saved, SavedAuxState):  # the model's zip (or an earlier callback) holds an aux state
                state = saved.state()
                self.config.check_takes_state_of(state["config"], "MincAuxCallback on a model with a saved aux state")
                learner.load_state_dict(state["learner"])
                learner.optimizer.load_state_dict(state["optimizer"])
            self.learner = learner
        self.model.minc_aux_state = SavedAuxState(self.learner)

    def _on_step(self) -> bool:
        buffer = getattr(self.model, "replay_buffer", None)
        if isinstance(buffer, ReplayBuffer) and not self.successors_missing:
            self.successors_missing = ends_without_successor(
                self.locals["dones"], self.locals["infos"], buffer.handle_timeout_termination
            )
        return True

    def _sample_pairs(self) -> tuple[Any, Any, th.Tensor] | None:
        """o_t, o_t+1 and a_t of up to aux.batch pairs from the algorithm's buffer, or None if there are none yet."""
        model = self.model
        buffer = getattr(model, "rollout_buffer", None)
        if isinstance(buffer, (RolloutBuffer, DictRolloutBuffer)):
            # on_rollout_end: the buffer is full and not yet flattened; _last_obs follows its last step.
            pairs = sample_rollout_pairs(buffer, model._last_obs, model._last_episode_starts, self.config.batch)
            return None if pairs is None else tuple(observations_to_torch(buffer, part) for part in pairs)
        buffer = getattr(model, "replay_buffer", None)
        if isinstance(buffer, ReplayBuffer):
            if model.num_timesteps <= getattr(model, "learning_starts", 0) or buffer.size() == 0:
                return None
            sample = buffer.sample(self.config.batch, env=model._vec_normalize_env)
            keep = successor_rows(sample, buffer, self.successors_missing)
            if keep is None:
                return sample.observations, sample.next_observations, sample.actions
            self.learner.masked += int((~keep).sum())
            return select_rows(sample.observations, keep), select_rows(sample.next_observations, keep), sample.actions[keep]
        raise ValueError(f"MincAuxCallback supports SB3's rollout and replay buffers; got {type(buffer).__name__}")

    def _on_rollout_end(self) -> None:
        policy = self.model.policy
        policy.set_training_mode(True)
        meter = self.learner.update_meter
        before_aux = meter.snapshot() if meter is not None else None
        for _ in range(self.gradient_steps):
            pairs = self._sample_pairs()
            if pairs is None:
                break
            self.learner.aux_step(AuxBatch(pairs[0], pairs[1], None, pairs[2]))
        policy.set_training_mode(False)  # rollouts are collected in evaluation mode
        if meter is not None:  # the RL part: the algorithm's updates since the last aux steps
            if self._after_aux is not None:
                self.learner.log_update(*meter.changes(self._after_aux, before_aux))
            self._after_aux = meter.snapshot()
        self.learner.record(self.logger)
