"""Latent self-prediction's model and losses (aux=selfpred in the agents, loss=selfpred in pretraining): an
action-conditioned latent model rolled out K steps, the distance of its predictions to a target's embeddings (MSE as
Voelcker et al. 2024, cosine with projection and predictor as SPR, or MINC), and the mask of the K steps that stay in
o_t's episode. Torch and numpy only: the SB3 side (the replay and rollout buffers' sequences) is minc_rl.agents."""

from __future__ import annotations

import numpy as np
import torch as th
from torch import nn
from torch.nn import functional as F

from minc_rl.losses.minc import MINCLoss

LATENT_LOSSES = ("mse", "cosine", "minc")  # minc_rl.rl.settings keeps a torch-free copy


def sequence_masks(in_buffer: np.ndarray, ends: np.ndarray, end_successor_missing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sequences' `alive` and `held` (B, K) from whether transition t+k is in the buffer and whether it ends an
    episode: alive up to the first end; at an end the successor is held unless the buffer keeps none there."""
    ended_before = np.cumsum(ends, axis=1) - ends > 0  # an episode end among t..t+k-1
    alive = in_buffer & ~ended_before
    return alive, alive & ~ends if end_successor_missing else alive


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
