"""The auxiliary loss on (o_t, o_t+1) pairs, or ((o_t, a_t), o_t+1) pairs, and how it joins the RL update; shared by
MincPPO, MincDQN and MincAuxCallback.

`AuxConfig` (minc_rl.rl.settings, light enough for the command line's checks) holds every setting. `AuxLearner`
holds the projection head, the loss (MINC's Lambda), an optional EMA target encoder and the aux optimizer, attached
to the features of any SB3 features extractor. Its `update` takes one gradient step of the RL loss and the aux loss
together, in one of three modes:

- joint: one step of the RL optimizer; at the encoder's output the aux gradient is rescaled to `share` of the sum
  of the two gradients' norms there: g = g_rl + s g_aux with ||s g_aux|| / (||g_rl|| + ||s g_aux||) = share, so
  neither loss's scale decides the balance. This is a gradient-norm share at the encoder's output, not a share of
  the encoder's parameter update: backpropagation through the encoder and Adam's momentum change it (measure the
  update share with aux.log_update_share). The projection head learns with the aux optimizer.
- separate: the RL step as SB3 takes it, then an aux step of encoder and head with the aux optimizer and its own
  clip, on the encoder as the RL step left it (CURL, CTRL).
- decoupled: the RL heads see detached features; the encoder learns from the aux loss alone (ATC).

`aux.pairs` picks the views: "state" embeds o_t and o_t+1 with one head (phi against phi); "state_action" embeds
(o_t, a_t) with phi(s, a) and o_t+1 with its own head mu(s'), the factorisation P(s'|s, a) = <phi(s, a), mu(s')>
of the spectral RL papers (docs/losses.md, "Asymmetric views"), with MINC's Lambda for each view.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.preprocessing import is_image_space_channels_first, preprocess_obs
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.save_util import load_from_zip_file
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, CombinedExtractor
from stable_baselines3.common.utils import polyak_update
from stable_baselines3.common.vec_env import VecEnv, VecTransposeImage
from torch import nn
from torch.nn import functional as F

from minc_rl.agents.selfpred import latent_model
from minc_rl.losses.latent import build_latent_loss
from minc_rl.ssl.augment import random_shift
from minc_rl.common.checks import check_choice
from minc_rl.ssl.encoders import ProjectionHead, load_encoder_weights
from minc_rl.rl.settings import AUGMENT_CHOICES, AUX_CHOICES, AUX_MODES, PAIR_CHOICES, AuxConfig  # noqa: F401  re-exported
from minc_rl.rl.extractor import ENCODER_CHOICES, MincExtractor
from minc_rl.losses import spectral_contrastive_loss
from minc_rl.ssl.metrics import embedding_health

Route = tuple[th.Tensor, th.Tensor]  # an encoder output with its graph, and the detached copy the loss saw


class AuxBatch(NamedTuple):
    """The pairs of one gradient step: o_t, o_t+1, where o_t's features are in the step's features tensor, and a_t.
    For aux=selfpred the K steps after o_t (agents.selfpred.Sequences): o_t+1..o_t+K and a_t..a_t+K-1 (B, K, ...),
    r_t..r_t+K-1 and the masks of real transitions (`alive`) and true successors (`held`)."""

    observations: th.Tensor | dict[str, th.Tensor]
    next_observations: th.Tensor | dict[str, th.Tensor]
    rows: th.Tensor | None
    actions: th.Tensor
    rewards: th.Tensor | None = None
    alive: th.Tensor | None = None
    held: th.Tensor | None = None


class StateActionHead(nn.Module):
    """phi(s, a) from the encoder's features of s: for Discrete actions a projection head with |A| x d outputs, of
    which the taken action's d; for Box actions a projection head over the features and the action, concatenated."""

    def __init__(self, features_dim: int, action_space: gym.Space | None, dim: int, hidden: int) -> None:
        super().__init__()
        if isinstance(action_space, gym.spaces.Discrete):
            self.actions: int | None = int(action_space.n)
            self.net = ProjectionHead(features_dim, self.actions * dim, hidden)
        elif isinstance(action_space, gym.spaces.Box):
            self.actions = None
            self.net = ProjectionHead(features_dim + gym.spaces.flatdim(action_space), dim, hidden)
        else:
            raise ValueError(
                f"aux.pairs='state_action' takes Discrete or Box actions; the action space is {action_space}"
            )
        self.dim = dim

    def forward(self, features: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """Embeddings phi(s_i, a_i) of features (B, features_dim) and actions (B,) or (B, 1) indices, or (B, ...) Box."""
        if self.actions is None:
            return self.net(th.cat([features, actions.float().reshape(len(features), -1)], dim=1))
        rows = th.arange(len(features), device=features.device)
        return self.every_action(features)[rows, actions.long().reshape(-1)]

    def every_action(self, features: th.Tensor) -> th.Tensor:
        """phi(s_i, a) for every discrete action a: (B, |A|, d)."""
        return self.net(features).view(len(features), self.actions, self.dim)


class LinearCritic(nn.Module):
    """Q(s, a) = phi(s, a)^T w + c over a StateActionHead's phi (aux.linear_critic): Q is linear in phi, as in the
    spectral RL papers, and the TD loss trains w and c only (phi is held fixed for it; the aux loss trains phi)."""

    def __init__(self, phi: StateActionHead) -> None:
        super().__init__()
        if phi.actions is None:
            raise ValueError("aux.linear_critic needs Discrete actions (Q over every action); the action space is a Box")
        self.phi = phi
        self.weight = nn.Linear(phi.dim, 1)

    def forward(self, features: th.Tensor) -> th.Tensor:
        """Q-values (B, |A|) of encoder features."""
        return self.weight(self.phi.every_action(features).detach()).squeeze(-1)


class UpdateShareMeter:
    """The aux share of the encoder's parameter update in one gradient step, ||u_aux|| / (||u_aux|| + ||u_rl||), and
    the cosine of the two parts (aux.log_update_share). In joint mode one Adam step moves the encoder; given Adam's
    second moment the step is linear in its first moment, so the meter keeps the aux part of that moment (the EMA
    of the aux gradients, clipped as SB3 clipped the step) and splits the step with it. Adam's momentum sums the
    aux gradient, which keeps its direction from step to step, faster than the noisy RL gradient, so this share
    can be far above the gradient share at the encoder's output. In separate and decoupled mode the RL step's and
    the aux step's parameter changes are the two parts."""

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.parameters = parameters
        self.aux_moment = [th.zeros_like(p) for p in parameters]

    def gradients(self) -> list[th.Tensor]:
        """The parameters' gradients now (zeros where there are none)."""
        return [th.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.parameters]

    def snapshot(self) -> list[th.Tensor]:
        """The parameters' values now."""
        return [p.detach().clone() for p in self.parameters]

    def changes(self, start: list[th.Tensor], middle: list[th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
        """Share and cosine of two consecutive steps: the RL step from `start` to `middle`, the aux step from
        `middle` to now."""
        now = self.snapshot()
        return _part_share([b - a for a, b in zip(middle, now)], [b - a for a, b in zip(start, middle)])

    def joint(
        self, optimizer: th.optim.Optimizer, aux_gradients: list[th.Tensor], kept: float | th.Tensor
    ) -> tuple[th.Tensor, th.Tensor]:
        """Share and cosine of the aux and RL parts of the Adam step just taken, whose gradient held
        `aux_gradients` (before the clip kept `kept` of it)."""
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        aux_parts, rl_parts = [], []
        for parameter, moment, gradient in zip(self.parameters, self.aux_moment, aux_gradients):
            state = optimizer.state.get(parameter, {})
            if parameter.grad is None or "exp_avg" not in state:
                continue  # Adam did not move it
            group = groups[id(parameter)]
            beta1, beta2 = group["betas"]
            moment.lerp_(gradient * kept, 1 - beta1)
            bias_correction2 = 1 - beta2 ** float(state["step"])
            denominator = (state["exp_avg_sq"] / bias_correction2).sqrt() + group["eps"]
            aux_parts.append(moment / denominator)
            rl_parts.append((state["exp_avg"] - moment) / denominator)
        return _part_share(aux_parts, rl_parts)


def check_update_share_optimizer(optimizer: th.optim.Optimizer) -> None:
    """aux.log_update_share in joint mode splits Adam's first moment: the RL optimizer must be Adam (or AdamW)."""
    if not isinstance(optimizer, (th.optim.Adam, th.optim.AdamW)) or any(
        group.get("amsgrad") or group.get("maximize") for group in optimizer.param_groups
    ):
        raise ValueError(
            "aux.log_update_share in joint mode reads the RL optimizer's Adam moments; it needs torch.optim.Adam or "
            f"AdamW without amsgrad or maximize, got {type(optimizer).__name__}"
        )


def _part_share(aux: list[th.Tensor], rl: list[th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
    """||aux|| / (||aux|| + ||rl||) and the cosine of the two, each list flattened into one vector."""
    aux_vector, rl_vector = th.cat([t.flatten() for t in aux]), th.cat([t.flatten() for t in rl])
    aux_norm, rl_norm = aux_vector.norm(), rl_vector.norm()
    cosine = aux_vector @ rl_vector / (aux_norm * rl_norm).clamp_min(1e-30)
    return aux_norm / (aux_norm + rl_norm).clamp_min(1e-30), cosine


class AuxLearner(nn.Module):
    """Projection head, loss and (optional) EMA target encoder over one SB3 features extractor, and the aux
    optimizer. Statistics accumulate between `record` calls; the embedding-health metrics are computed only there."""

    def __init__(
        self, config: AuxConfig, extractor: BaseFeaturesExtractor, observation_space: gym.Space, normalize_images: bool,
        action_space: gym.Space | None = None, target_extractor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if config.augment == "shift" and not (
            isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 3
        ):
            raise ValueError(f"aux.augment='shift' needs image observations; the observation space is {observation_space}")
        self.config = config
        self.observation_space = observation_space
        self.normalize_images = normalize_images
        self.channels_last = config.augment == "shift" and (
            extractor.channels_last if isinstance(extractor, MincExtractor)
            else not is_image_space_channels_first(observation_space)
        )
        object.__setattr__(self, "extractor", extractor)  # the policy's module: not a submodule of this one
        if not any(p.requires_grad for p in extractor.parameters()):
            warnings.warn(
                f"the features extractor {type(extractor).__name__} has no trainable parameters: the aux loss trains "
                "its projection head only and leaves the policy's representation as it is; give the policy an "
                "extractor that learns (MincExtractor, the default of MlpPolicy / CnnPolicy, or your own)",
                stacklevel=2,
            )
        if config.target_kind == "q_target" and target_extractor is None:
            raise ValueError("aux.target='q_target' embeds o_t+k with the target Q-network's encoder: MincDQN's; this "
                             "agent has none (choose stop_gradient, ema or none)")
        with th.random.fork_rng(devices=[]):  # the seed's RL run stays as it is without the aux loss
            size = (extractor.features_dim, config.dim, config.head_hidden)
            self.next_head: nn.Module | None = None
            if config.name == "selfpred":
                self.head: nn.Module = latent_model(extractor.features_dim, action_space, config)
                self.loss = build_latent_loss(config.latent_loss, extractor.features_dim, config.dim, config.ema,
                                              target_has_gradient=config.target_kind == "none")
            else:
                if config.pairs == "state":  # phi for both views; no mu
                    self.head = ProjectionHead(*size)
                else:
                    self.head = StateActionHead(extractor.features_dim, action_space, config.dim, config.head_hidden)
                    self.next_head = ProjectionHead(*size)
                self.loss = config.build_loss()
        self.target = copy.deepcopy(extractor).requires_grad_(False) if config.target_kind == "ema" else None
        object.__setattr__(self, "q_target", target_extractor if config.target_kind == "q_target" else None)
        heads = [*self.head.parameters(), *(self.next_head.parameters() if self.next_head is not None else []),
                 *self.loss.parameters()]
        trained = [*heads, *(extractor.parameters() if config.mode != "joint" else [])]
        # fused: one kernel for every parameter, 1.7x faster than foreach on the CPU head (docs/benchmarks.md)
        self.optimizer = th.optim.Adam(trained, lr=config.lr, fused=True)
        encoder = [p for p in extractor.parameters() if p.requires_grad]
        self.update_meter = UpdateShareMeter(encoder) if config.log_update_share and encoder else None
        self._reset_statistics()

    def _reset_statistics(self) -> None:
        self.losses: list[th.Tensor] = []
        self.pairs: list[int] = []
        self.shares: list[th.Tensor] = []
        self.raw_shares: list[th.Tensor] = []
        self.rl_step_kept: list[th.Tensor] = []
        self.update_shares: list[th.Tensor] = []
        self.update_cosines: list[th.Tensor] = []
        self.dropped = 0
        self.masked = 0  # pairs left out because the buffer does not hold their successor (agents.pairs.successor_rows)
        self.last_pair: tuple[th.Tensor, th.Tensor] | None = None
        self.latent_losses: list[th.Tensor] = []
        self.reward_losses: list[th.Tensor] = []

    def features(self, observations: th.Tensor | dict[str, th.Tensor], encoder: nn.Module | None = None) -> th.Tensor:
        """Features of raw observations by the online extractor (or `encoder`), after SB3's preprocessing and the
        augmentation."""
        inputs = preprocess_obs(observations, self.observation_space, normalize_images=self.normalize_images)
        if self.config.augment == "shift":
            inputs = inputs.permute(0, 3, 1, 2) if self.channels_last else inputs
            inputs = random_shift(inputs)
            inputs = inputs.permute(0, 2, 3, 1) if self.channels_last else inputs
        return (encoder or self.extractor)(inputs)

    def embed(self, features: th.Tensor, actions: th.Tensor, next_features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """The two views' embeddings: phi(o_t) and phi(o_t+1) (one BatchNorm batch for both), or phi(o_t, a_t) and
        mu(o_t+1)."""
        if self.next_head is None:
            return self.head(th.cat([features, next_features])).tensor_split(2)
        return self.head(features, actions), self.next_head(next_features)

    def pair_loss(
        self, features: th.Tensor, next_observations: th.Tensor | dict[str, th.Tensor], actions: th.Tensor
    ) -> th.Tensor | None:
        """The aux loss of o_t's `features` (and a_t) against o_t+1 (encoded without gradient, by the target if there
        is one); None (counted as dropped) when non-finite or fewer than 2 pairs."""
        self.pairs.append(len(features))
        if len(features) < 2:
            return None
        with th.no_grad():
            next_features = self.features(next_observations, self.target)
        a, b = self.embed(features, actions, next_features)
        loss = self.loss(a, b)
        if not th.isfinite(loss):
            self.dropped += 1
            return None
        self.losses.append(loss.detach())
        self.last_pair = (a.detach(), b.detach())
        return loss

    def batch_loss(self, features: th.Tensor, batch: AuxBatch) -> tuple[th.Tensor | None, list[Route]]:
        """The aux loss of the step's batch from o_t's `features` (pair_loss, or selfpred_loss for aux=selfpred), and
        the routes of any other gradient into the encoder (the targets' of aux.target='none')."""
        if self.config.name == "selfpred":
            return self.selfpred_loss(features, batch)
        return self.pair_loss(features, batch.next_observations, batch.actions), []

    def selfpred_loss(self, features: th.Tensor, batch: AuxBatch) -> tuple[th.Tensor | None, list[Route]]:
        """Latent self-prediction: the model rolled out K steps from o_t's `features` along a_t..a_t+K-1, each
        prediction against the target's embedding of o_t+k where `held` (and of o_t itself, k = 0, when the target
        is a network of its own: ema or q_target, as Voelcker et al.), plus the rewards where `alive`; None (dropped)
        when non-finite or no step is valid. The targets are embedded in one forward of all K steps."""
        batch_size = len(features)
        actions = batch.actions.long()
        rollout = self.head.rollout(features, actions)  # (B, K, features): z_t+1..z_t+K
        kind, routes = self.config.target_kind, []
        own_network = kind in ("ema", "q_target")
        observations = batch.next_observations.flatten(0, 1)  # (B K, ...): o_t+1..o_t+K of every row
        if own_network:
            observations = th.cat([batch.observations, observations])  # o_t first
        if kind == "none":
            embedded = self.features(observations)
            targets = embedded.detach().requires_grad_(True)
            routes.append((embedded, targets))
        else:
            with th.no_grad():
                targets = self.features(observations, self.target if kind == "ema" else self.q_target)
        predictions, held = rollout.flatten(0, 1), batch.held.reshape(-1)
        if own_network:
            predictions, held = th.cat([features, predictions]), th.cat([held.new_ones(batch_size), held])
        self.pairs.append(int(held.sum()))
        if self.pairs[-1] < 2:
            self.dropped += 1
            return None, []
        predicted, target = predictions[held], targets[held]
        latent = self.loss(predicted, target)
        loss = latent
        if self.config.reward:
            latents = th.cat([features[:, None], rollout[:, :-1]], dim=1)  # z_t, then the predictions z_t+1..z_t+K-1
            reward = (self.head.rewards(latents, actions) - batch.rewards)[batch.alive].pow(2).mean()
            loss = latent + reward
        if not th.isfinite(loss):
            self.dropped += 1
            return None, []
        self.losses.append(loss.detach())
        self.latent_losses.append(latent.detach())
        if self.config.reward:
            self.reward_losses.append(reward.detach())
        self.last_pair = (predicted.detach(), target.detach())
        return loss, routes

    def rl_view(self, features: th.Tensor) -> th.Tensor:
        """The features the RL heads see: in joint and decoupled mode a detached copy, whose gradient `update`
        routes into the encoder itself."""
        return features if self.config.mode == "separate" else features.detach().requires_grad_(True)

    def update(
        self, rl_loss: th.Tensor, features: th.Tensor, rl_features: th.Tensor, batch: AuxBatch | None,
        optimizer: th.optim.Optimizer, parameters: list[nn.Parameter], max_grad_norm: float | None,
    ) -> None:
        """One gradient step of the RL loss (RL optimizer over `parameters`, clipped at max_grad_norm as SB3 does)
        and of the aux loss, as the mode says. `features` are the encoder's output with their graph, `rl_features`
        what `rl_view` gave the RL heads. Without a `batch` (aux.every) it is the RL step alone, the encoder moved
        by the RL gradient as the mode says (in decoupled mode not at all)."""
        optimizer.zero_grad()
        self.optimizer.zero_grad()
        if batch is None:
            rl_loss.backward()
            if self.config.mode == "joint" and rl_features.grad is not None:
                _backward_into_encoder([features], [rl_features.grad])
            self._rl_step(optimizer, parameters, max_grad_norm)
            return
        meter = self.update_meter
        if self.config.mode == "separate":
            rl_norm = _output_grad_norm(features)
            rl_loss.backward()
            start, middle = self._measured_rl_step(optimizer, parameters, max_grad_norm)
            aux_norm = self.aux_step(batch)
            if aux_norm is not None:
                self._log_share(rl_norm[0], aux_norm, rl_norm[0], aux_norm)
            if meter is not None:
                self.log_update(*meter.changes(start, middle))
            return
        aux_features = self.features(batch.observations) if self.config.augment != "none" else features[batch.rows]
        aux_input = aux_features.detach().requires_grad_(True)
        aux_loss, routes = self.batch_loss(aux_input, batch)
        # one backward pass into the RL heads and the aux head (their graphs start at detached features):
        # rl_features.grad is g_rl at the encoder's output, aux_input.grad g_aux (and each route's leaf its gradient)
        th.autograd.backward([rl_loss] if aux_loss is None else [rl_loss, aux_loss])
        g_rl = rl_features.grad if rl_features.grad is not None else th.zeros_like(features)
        aux_outputs = [aux_features, *(output for output, _ in routes)]
        aux_grads = [leaf.grad if leaf.grad is not None else th.zeros_like(leaf) for leaf in
                     (aux_input, *(leaf for _, leaf in routes))]
        g_aux = aux_grads[0] if not routes else th.cat([grad.flatten() for grad in aux_grads])
        if self.config.mode == "joint":
            scale = self._joint_scale(g_rl, g_aux)
            if meter is None:
                _backward_into_encoder([features, *aux_outputs], [g_rl, *(scale * grad for grad in aux_grads)])
            else:  # the aux part first, for the meter to keep apart; the graph stays for the RL part
                start = meter.gradients()
                _backward_into_encoder(aux_outputs, [scale * grad for grad in aux_grads], retain_graph=True)
                aux_gradients = [after - before for after, before in zip(meter.gradients(), start)]
                _backward_into_encoder([features], [g_rl])
            self._rl_step(optimizer, parameters, max_grad_norm)
            if meter is not None:
                self.log_update(*meter.joint(optimizer, aux_gradients, self.rl_step_kept[-1] if max_grad_norm else 1.0))
        else:  # decoupled: the RL step leaves the encoder alone (its gradient is None), then the aux step moves it
            start, middle = self._measured_rl_step(optimizer, parameters, max_grad_norm)
            _backward_into_encoder(aux_outputs, aux_grads)
            self._log_share(th.zeros(()), g_aux.norm(), g_rl.norm(), g_aux.norm())
        if aux_loss is not None:
            self._aux_step()
        if meter is not None and self.config.mode == "decoupled":
            self.log_update(*meter.changes(start, middle))

    def aux_step(self, batch: AuxBatch) -> th.Tensor | None:
        """One step of the aux optimizer on fresh features of the batch's o_t; the norm of the aux gradient at the
        encoder's output, or None when the loss was dropped."""
        self.optimizer.zero_grad()
        features = self.features(batch.observations)
        norm = _output_grad_norm(features)
        loss, routes = self.batch_loss(features, batch)
        if loss is None:
            return None
        loss.backward()
        _backward_into_encoder([output for output, _ in routes], [leaf.grad for _, leaf in routes])
        self._aux_step()
        return norm[0]

    def _joint_scale(self, g_rl: th.Tensor, g_aux: th.Tensor) -> th.Tensor:
        """s with ||s g_aux|| = share / (1 - share) ||g_rl||, so that the aux gradient is `share` of the sum of norms
        (or s = aux.weight when set)."""
        share, weight = self.config.share, self.config.weight
        rl_norm, aux_norm = g_rl.norm(), g_aux.norm()
        if weight is not None:  # a fixed weight, as a sum of the two losses would give (Voelcker et al.: 1)
            scale = th.tensor(float(weight), device=aux_norm.device)
        else:
            scale = share / (1.0 - share) * rl_norm / aux_norm.clamp_min(1e-12)
        self._log_share(rl_norm, scale * aux_norm, rl_norm, aux_norm)
        return scale

    def _log_share(self, rl_applied: th.Tensor, aux_applied: th.Tensor, rl_norm: th.Tensor, aux_norm: th.Tensor) -> None:
        """Log the aux share of the gradient norms at the encoder's output: as applied to the encoder, and as the
        two losses give them, ||g_aux|| / (||g_aux|| + ||g_rl||)."""
        self.shares.append(aux_applied / (aux_applied + rl_applied).clamp_min(1e-12))
        self.raw_shares.append(aux_norm / (aux_norm + rl_norm).clamp_min(1e-12))

    def log_update(self, share: th.Tensor, cosine: th.Tensor) -> None:
        """Keep one step's aux share of the encoder's update and the cosine of its two parts (UpdateShareMeter)."""
        self.update_shares.append(share)
        self.update_cosines.append(cosine)

    def _measured_rl_step(
        self, optimizer: th.optim.Optimizer, parameters: list[nn.Parameter], max_grad_norm: float | None
    ) -> tuple[list[th.Tensor], list[th.Tensor]]:
        """The RL step, and the encoder's values before and after it for the update meter (empty without one)."""
        meter = self.update_meter
        start = meter.snapshot() if meter is not None else []
        self._rl_step(optimizer, parameters, max_grad_norm)
        return start, meter.snapshot() if meter is not None else []

    def _rl_step(self, optimizer: th.optim.Optimizer, parameters: list[nn.Parameter], max_grad_norm: float | None) -> None:
        if max_grad_norm is not None:
            total = th.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            self.rl_step_kept.append((max_grad_norm / (total + 1e-6)).clamp(max=1.0))  # as clip_grad_norm_ scales
        optimizer.step()

    def _aux_step(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        th.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        if self.target is not None:
            polyak_update(self.extractor.parameters(), self.target.parameters(), self.config.target_tau)
            polyak_update(self.extractor.buffers(), self.target.buffers(), 1.0)

    def record(self, logger: Logger) -> None:
        """Log the statistics since the last call under train/aux_* (and the embedding health of the last pair
        batch), then start over; nothing before the first aux step."""
        if not self.pairs:
            return
        logger.record("train/aux_pairs", float(np.mean(self.pairs)))
        logger.record("train/aux_dropped", self.dropped)
        logger.record("train/aux_masked", self.masked)
        for key, values in (("aux_loss", self.losses), ("aux_latent_loss", self.latent_losses),
                            ("aux_reward_loss", self.reward_losses), ("aux_grad_share", self.shares),
                            ("aux_grad_share_raw", self.raw_shares), ("rl_step_kept", self.rl_step_kept),
                            ("aux_update_share", self.update_shares), ("aux_update_cos", self.update_cosines)):
            if values:
                logger.record(f"train/{key}", float(th.stack(values).mean()))
        if self.last_pair is not None:
            a, b = (F.normalize(z.float(), dim=1) for z in self.last_pair)
            logger.record("train/aux_scl_estimate", float(spectral_contrastive_loss(a, b)))
            # state-action pairs: phi's health, not mu's; selfpred: the predictions' (a collapse shows there)
            views = a if self.next_head is not None or self.config.name == "selfpred" else th.cat([a, b])
            for key, value in embedding_health(views, self.loss).items():
                logger.record(f"train/aux_{key}", value)
        self._reset_statistics()


def with_foreach(optimizer: th.optim.Optimizer) -> th.optim.Optimizer:
    """`optimizer` set to foreach=True (one kernel per operation over every parameter) where torch's optimizer takes
    it and none was chosen: on a CPU the same update bit for bit as the per-parameter loop SB3's Adam runs there,
    in less time; the aux step's share of the agent's cost (docs/benchmarks.md, issue 40)."""
    if "foreach" in optimizer.defaults and optimizer.defaults["foreach"] is None:
        optimizer.defaults["foreach"] = True
        for group in optimizer.param_groups:
            group["foreach"] = True
    return optimizer


def declares_channels_first(env: Any) -> bool:
    """Whether a VecEnv's image observations say they are channel-first (`channels_first`, MinAtar's): then its
    layout is not guessed from the smallest axis, as SB3 guesses it."""
    return isinstance(env, VecEnv) and env.has_attr("channels_first") and all(env.get_attr("channels_first"))


def _backward_into_encoder(outputs: list[th.Tensor], grads: list[th.Tensor], retain_graph: bool = False) -> None:
    """Backpropagate these gradients at the encoder's outputs into the encoder; an encoder without trainable
    parameters (SB3's FlattenExtractor, a CombinedExtractor of vectors) has no graph to take them."""
    taken = [(output, grad) for output, grad in zip(outputs, grads) if output.requires_grad]
    if taken:
        th.autograd.backward([output for output, _ in taken], [grad for _, grad in taken], retain_graph=retain_graph)


def _output_grad_norm(tensor: th.Tensor) -> list[th.Tensor]:
    """A list that receives the norm of `tensor`'s gradient when backward reaches it (zero until then)."""
    norm = [th.zeros((), device=tensor.device)]
    if tensor.requires_grad:
        tensor.register_hook(lambda grad: norm.__setitem__(0, grad.norm()))
    return norm


class MincAuxMixin:
    """What MincPPO and MincDQN share: the AuxConfig, the AuxLearner over the policy's features extractor (saved
    with the model: head, Lambda, target encoder, aux optimizer), loading pretrained encoder weights and logging
    the aux statistics when SB3 writes its logs. Subclasses define `aux_extractor` and `_aux_network` (the network
    whose observation space and image normalisation the extractor sees)."""

    has_linear_critic = False  # whether aux.linear_critic is built for this agent (MincDQN)
    takes_td_settings = False  # whether aux.every and aux.source apply to this agent's TD steps (MincDQN)

    @staticmethod
    def _wrap_env(env: Any, verbose: int = 0, monitor_wrapper: bool = True) -> VecEnv:
        """SB3's _wrap_env, without the VecTransposeImage that SB3 adds to images it takes for channel-last when
        the env says they are channel-first (a 10 x 10 MinAtar image with more than 10 channels)."""
        with warnings.catch_warnings():
            if declares_channels_first(env):  # SB3's guess, which the next line undoes
                warnings.filterwarnings("ignore", message="Treating image space as channels-last")
            wrapped = BaseAlgorithm._wrap_env(env, verbose, monitor_wrapper)
        if isinstance(wrapped, VecTransposeImage) and declares_channels_first(wrapped.venv):
            return wrapped.venv
        return wrapped

    def _init_aux(
        self, policy: str | type[BasePolicy], aux: str | AuxConfig | Mapping[str, Any], encoder: str,
        sb3_kwargs: dict[str, Any], env: Any = None,
    ) -> dict[str, Any]:
        """Check and store the aux settings; return sb3_kwargs with MincExtractor(encoder) as the default extractor
        of single-observation policies (MlpPolicy, CnnPolicy), told the image layout when `env` declares it.
        MultiInputPolicy keeps SB3's CombinedExtractor."""
        self.aux = self.aux_config(aux)
        if self.aux.linear_critic and not self.has_linear_critic:
            raise ValueError(f"aux.linear_critic is built for MincDQN (Q(s, a) = phi(s, a)^T w); {type(self).__name__} "
                             "has no Q-function to put on phi")
        if self.aux.every != 1 and not self.takes_td_settings:
            raise ValueError(f"aux.every={self.aux.every} thins MincDQN's aux steps; {type(self).__name__} takes one on "
                             "every gradient step (aux.every=1)")
        if self.aux.source is not None and not self.takes_td_settings:
            raise ValueError(f"aux.source={self.aux.source!r} picks where MincDQN's pairs come from (its TD batch or "
                             f"the replay buffer); {type(self).__name__} takes them from its own minibatch (leave "
                             "aux.source unset)")
        self.should_stop: Callable[[], bool] | None = None  # checked after every gradient step (a prompt Ctrl-C)
        check_choice("encoder", encoder, ENCODER_CHOICES)
        kwargs = dict(sb3_kwargs.get("policy_kwargs") or {})
        policy_class = self._get_policy_from_name(policy) if isinstance(policy, str) else policy  # type: ignore
        default = getattr(inspect.signature(policy_class).parameters.get("features_extractor_class"), "default", None)
        multi_input = isinstance(default, type) and issubclass(default, CombinedExtractor)
        extractor_class = kwargs.get("features_extractor_class")
        if extractor_class is None and not multi_input:
            extractor_class = kwargs["features_extractor_class"] = MincExtractor
            layout = {"channels_first": True} if declares_channels_first(env) else {}
            kwargs["features_extractor_kwargs"] = {"encoder": encoder, **layout,
                                                   **kwargs.get("features_extractor_kwargs", {})}
            kwargs.setdefault("net_arch", [])  # linear heads on the encoder, like SB3's CnnPolicy on NatureCNN
        elif encoder != "auto":
            chosen = (f"policy_kwargs sets features_extractor_class={extractor_class.__name__}" if extractor_class
                      else f"{policy_class.__name__} keeps SB3's {default.__name__} for dict observations")
            raise ValueError(f"encoder={encoder!r} picks MincExtractor's encoder, but {chosen}; drop one")
        if isinstance(extractor_class, type) and issubclass(extractor_class, MincExtractor) and (
            kwargs.get("normalize_images") is False
        ):  # SB3's rule for NatureCNN and CombinedExtractor (BasePolicy.__init__): images the policy does not
            # scale are taken as normalised already, so the image dtype and bounds checks are off
            extractor_kwargs = kwargs.get("features_extractor_kwargs", {})
            kwargs["features_extractor_kwargs"] = {"normalized_image": True, **extractor_kwargs}
        return {**sb3_kwargs, "policy_kwargs": kwargs}

    @classmethod
    def aux_config(cls, aux: str | AuxConfig | Mapping[str, Any]) -> AuxConfig:
        """AuxConfig.of(aux), an unset aux.source made MincDQN's default: its TD batch's own pairs (issue 24's rule)."""
        config = AuxConfig.of(aux)
        if cls.takes_td_settings and config.source is None:
            return dataclasses.replace(config, source="td")
        return config

    @classmethod
    def load(cls, path: Any, env: Any = None, device: Any = "auto", custom_objects: dict[str, Any] | None = None,
             print_system_info: bool = False, force_reset: bool = True, **kwargs: Any) -> Any:
        """SB3's load; `aux=` may change the settings that the saved aux state does not depend on (share, lr, every,
        source, ...), and a change of one it does (the loss, dim, mode, pairs, ...) is a ValueError naming it. A file
        of the other algorithm (a PPO model into MincDQN) is a ValueError too, where SB3 fails inside its setup."""
        data, _, _ = load_from_zip_file(path, device=device, custom_objects=custom_objects)
        policy_class, base = data.get("policy_class"), cls.policy_aliases["MlpPolicy"]
        if isinstance(policy_class, type) and not issubclass(policy_class, base):
            raise ValueError(f"{cls.__name__}.load({str(path)!r}): the file's policy class {policy_class.__name__} is "
                             f"not a {base.__name__}, so it holds another algorithm's model; load it with that class")
        if "aux" in kwargs:
            kwargs["aux"] = cls.aux_config(kwargs["aux"])
            kwargs["aux"].check_takes_state_of(AuxConfig.of(data["aux"]), f"{cls.__name__}.load({str(path)!r}, aux=...)")
        return super().load(path, env=env, device=device, custom_objects=custom_objects,  # type: ignore[misc]
                            print_system_info=print_system_info, force_reset=force_reset, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()  # type: ignore[misc]
        self.aux_learner: AuxLearner | None = None
        if self.aux.name != "none":
            network = self._aux_network
            learner = AuxLearner(self.aux, self.aux_extractor, network.observation_space, network.normalize_images,
                                 self.action_space, self.aux_target_extractor)  # type: ignore[attr-defined]
            self.aux_learner = learner.to(self.device)  # type: ignore[attr-defined]
            with_foreach(self.policy.optimizer)  # type: ignore[attr-defined]
            if self.aux.log_update_share and self.aux.mode == "joint":
                check_update_share_optimizer(self.policy.optimizer)  # type: ignore[attr-defined]

    @property
    def aux_extractor(self) -> BaseFeaturesExtractor:
        raise NotImplementedError

    @property
    def _aux_network(self) -> Any:
        raise NotImplementedError

    @property
    def aux_target_extractor(self) -> nn.Module | None:
        """The encoder of the agent's own target network (aux.target='q_target'), or None where it has none."""
        return None

    def load_pretrained_encoder(self, path: str) -> None:
        """Load an `encoder.pt` (minc_rl.ssl.encoders.save_encoder) into the MincExtractor's encoder and its target."""
        extractor = self.aux_extractor
        if not isinstance(extractor, MincExtractor):
            raise ValueError(f"encoder.init needs a MincExtractor as the features extractor; got {type(extractor).__name__}")
        load_encoder_weights(path, extractor.encoder, extractor.encoder_name, extractor.input_shape)
        if self.aux_learner is not None and self.aux_learner.target is not None:
            self.aux_learner.target.load_state_dict(extractor.state_dict())

    def _gradient_step(self, loss: th.Tensor, features: th.Tensor, rl_features: th.Tensor, batch: Any) -> bool:
        """One optimizer step: SB3's own on the RL loss when there is no aux loss, else the AuxLearner's step of
        both losses as aux.mode says. `batch` is a callable giving the step's AuxBatch (built only when needed), or
        None on a step without the aux loss (aux.every).
        Returns whether `should_stop` asks the update to end here."""
        policy = self.policy  # type: ignore[attr-defined]
        if self.aux_learner is None:
            policy.optimizer.zero_grad()
            loss.backward()
            # Clip grad norm
            th.nn.utils.clip_grad_norm_(policy.parameters(), self.max_grad_norm)  # type: ignore[attr-defined]
            policy.optimizer.step()
        else:
            parameters = [p for group in policy.optimizer.param_groups for p in group["params"]]
            self.aux_learner.update(loss, features, rl_features, batch(), policy.optimizer, parameters,
                                    self.max_grad_norm)  # type: ignore[attr-defined]
        return self.should_stop is not None and self.should_stop()

    def learn(self, *args: Any, **kwargs: Any) -> Any:
        model = super().learn(*args, **kwargs)  # type: ignore[misc]
        if self.aux_learner is not None:  # the last train() comes after SB3's last dump_logs
            self.aux_learner.record(self.logger)  # type: ignore[attr-defined]
        return model

    def dump_logs(self, *args: Any) -> None:
        if self.aux_learner is not None:
            self.aux_learner.record(self.logger)  # type: ignore[attr-defined]
        super().dump_logs(*args)  # type: ignore[misc]

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "aux_learner", "should_stop"]  # type: ignore[misc]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        # The aux state is saved beside the policy's, so that save / load, get_parameters / set_parameters and a
        # resumed run keep it. Its counters (MINC's step and skip counts, the head's BatchNorm num_batches_tracked)
        # are float64, so every entry is a float tensor, as SB3's test_save_load expects.
        state_dicts, variables = super()._get_torch_save_params()  # type: ignore[misc]
        if self.aux.name != "none":
            state_dicts = [*state_dicts, "aux_learner", "aux_learner.optimizer"]
        return state_dicts, variables
