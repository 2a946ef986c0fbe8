"""The auxiliary loss on consecutive observations (o_t, o_t+1), shared by MincPPO, MincDQN and MincAuxCallback."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.utils import polyak_update

from minc_rl.augment import random_shift
from minc_rl.encoders import load_encoder_weights
from minc_rl.checks import check_choice, check_fraction, check_int, check_nonnegative
from minc_rl.extractor import AUX_CHOICES, ENCODER_CHOICES, MincExtractor
from minc_rl.metrics import embedding_health

AUGMENT_CHOICES = ("none", "shift")


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


def gather_successors(flat_observations: np.ndarray, after_observations: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Observations at `index` into flat_observations followed by after_observations (without concatenating them)."""
    inside = index < len(flat_observations)
    out = np.empty((len(index), *flat_observations.shape[1:]), dtype=flat_observations.dtype)
    out[inside] = flat_observations[index[inside]]
    out[~inside] = after_observations[index[~inside] - len(flat_observations)]
    return out


def scl_plugin(a: torch.Tensor, b: torch.Tensor) -> float:
    """The batch's own (unclipped) spectral contrastive loss: -(2/B) sum a_i.b_i + 1/(B(B-1)) sum_{i!=j} (a_i.b_j)^2."""
    a, b = a.detach().float(), b.detach().float()
    batch = a.shape[0]
    squares = (a @ b.T) ** 2
    off_diagonal = squares.sum() - squares.diagonal().sum()
    return float(-2.0 * (a * b).sum() / batch + off_diagonal / (batch * (batch - 1)))


def check_aux_args(
    aux: str,
    aux_coef: float,
    aux_dim: int,
    aux_batch: int,
    aux_ema: float,
    aux_augment: str,
    aux_target_tau: float | None,
    encoder: str,
) -> None:
    """Raise ValueError naming the bad value and the valid ones for any invalid aux_* / encoder argument."""
    check_choice("aux", aux, AUX_CHOICES)
    check_choice("aux_augment", aux_augment, AUGMENT_CHOICES)
    check_choice("encoder", encoder, ENCODER_CHOICES)
    check_nonnegative("aux_coef", aux_coef)
    check_int("aux_dim", aux_dim, 1)
    check_int("aux_batch", aux_batch, 2)
    check_fraction("aux_ema", aux_ema)
    if aux_target_tau is not None:
        check_fraction("aux_target_tau (None: stop-gradient online encoder)", aux_target_tau)


def minc_policy_kwargs(policy_kwargs: dict[str, Any] | None, **extractor_kwargs: Any) -> dict[str, Any]:
    """policy_kwargs with MincExtractor(**extractor_kwargs) as the features extractor, unless the user chose one.

    When MincExtractor is inserted here the policy's net_arch defaults to [] (linear policy/value/Q heads on the
    encoder features, like SB3's CnnPolicy on its NatureCNN); a user-given MincExtractor gets these settings
    under its own features_extractor_kwargs.
    """
    kwargs = dict(policy_kwargs or {})
    if "features_extractor_class" not in kwargs:
        kwargs["features_extractor_class"] = MincExtractor
        kwargs.setdefault("net_arch", [])
    extractor_class = kwargs["features_extractor_class"]
    if isinstance(extractor_class, type) and issubclass(extractor_class, MincExtractor):
        kwargs["features_extractor_kwargs"] = {**extractor_kwargs, **kwargs.get("features_extractor_kwargs", {})}
    return kwargs


def checked_extractor(extractor: Any, aux: str) -> MincExtractor | None:
    """`extractor` if it is a MincExtractor built for `aux` (None when aux='none'); ValueError otherwise."""
    if aux == "none":
        return extractor if isinstance(extractor, MincExtractor) else None
    if not isinstance(extractor, MincExtractor):
        raise ValueError(
            f"aux={aux!r} needs a MincExtractor as the policy's features extractor; got {type(extractor).__name__}"
        )
    if extractor.aux != aux:
        raise ValueError(f"aux={aux!r} but the policy's MincExtractor was built with aux={extractor.aux!r}")
    return extractor


class PairLoss:
    """The auxiliary loss of (o_t, o_t+1) pairs for one MincExtractor, and its statistics since the last record().

    o_t is encoded with gradient (its features are usually the policy's own forward pass), o_t+1 under
    stop-gradient by the online encoder or, when given, an EMA target encoder. Both views' features go through
    the projection head together (one BatchNorm batch). A non-finite loss is counted and dropped.
    """

    def __init__(
        self,
        extractor: MincExtractor,
        policy: Any,
        augment: str = "none",
        target_encoder: torch.nn.Module | None = None,
    ) -> None:
        if augment == "shift" and len(extractor.input_shape) != 3:
            raise ValueError(
                f"aux_augment='shift' needs image observations; the encoder input is {extractor.input_shape}"
            )
        self.extractor = extractor
        self.policy = policy
        self.augment = augment
        self.target_encoder = target_encoder
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.scl_estimates: list[float] = []
        self.pairs: list[int] = []
        self.dropped = 0
        self.last_embeddings: torch.Tensor | None = None

    def _inputs(self, observations: torch.Tensor) -> torch.Tensor:
        inputs = self.extractor.encoder_inputs(
            preprocess_obs(observations, self.policy.observation_space, normalize_images=self.policy.normalize_images)
        )
        return random_shift(inputs) if self.augment == "shift" else inputs

    def __call__(
        self,
        observations: torch.Tensor,
        next_observations: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Loss of the pairs (observations[i], next_observations[i]); `features` = the encoder's features of
        `observations` when already computed (reused unless augmenting). None when fewer than 2 pairs or non-finite."""
        self.pairs.append(len(observations))
        if len(observations) < 2:
            return None
        if features is None or self.augment != "none":
            features = self.extractor.encoder(self._inputs(observations))
        with torch.no_grad():
            encoder = self.extractor.encoder if self.target_encoder is None else self.target_encoder
            next_features = encoder(self._inputs(next_observations))
        embeddings = self.extractor.embed(torch.cat([features, next_features]))
        a, b = embeddings.tensor_split(2)
        loss = self.extractor.aux_loss(a, b)
        if not torch.isfinite(loss):
            self.dropped += 1
            return None
        self.losses.append(loss.item())
        self.scl_estimates.append(scl_plugin(a, b))
        self.last_embeddings = embeddings.detach()
        return loss

    def record(self, logger: Logger) -> None:
        """Log the statistics under train/aux_* and start over."""
        logger.record("train/aux_pairs", float(np.mean(self.pairs)) if self.pairs else 0.0)
        logger.record("train/aux_dropped", self.dropped)
        if self.losses:
            logger.record("train/aux_loss", float(np.mean(self.losses)))
            logger.record("train/aux_scl_estimate", float(np.mean(self.scl_estimates)))
            for key, value in embedding_health(self.last_embeddings, self.extractor.aux_loss).items():
                logger.record(f"train/aux_{key}", value)
        self._reset()


class MincAuxMixin:
    """What MincPPO and MincDQN share: the aux_* settings, the MincExtractor in the policy, the EMA target
    encoder (saved with the model) and loading pretrained encoder weights. Subclasses define `minc_extractor`
    and `_aux_policy` (the network whose observation space and preprocessing the extractor sees)."""

    def _init_aux(
        self,
        aux: str,
        aux_coef: float,
        aux_dim: int,
        aux_batch: int,
        aux_ema: float,
        aux_augment: str,
        aux_target_tau: float | None,
        encoder: str,
        aux_loss_kwargs: dict[str, Any] | None,
        sb3_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """Check and store the aux settings; return sb3_kwargs with MincExtractor in policy_kwargs."""
        check_aux_args(aux, aux_coef, aux_dim, aux_batch, aux_ema, aux_augment, aux_target_tau, encoder)
        self.aux = aux
        self.aux_coef = float(aux_coef)
        self.aux_batch = int(aux_batch)
        self.aux_augment = aux_augment
        self.aux_target_tau = aux_target_tau
        policy_kwargs = minc_policy_kwargs(
            sb3_kwargs.get("policy_kwargs"),
            encoder=encoder,
            aux=aux,
            aux_dim=aux_dim,
            aux_ema=aux_ema,
            aux_loss_kwargs=aux_loss_kwargs,
        )
        return {**sb3_kwargs, "policy_kwargs": policy_kwargs}

    def _setup_model(self) -> None:
        super()._setup_model()  # type: ignore[misc]
        extractor = checked_extractor(self.minc_extractor, self.aux)
        self.aux_target_encoder = None
        self.pair_loss = None
        if self.aux != "none":
            extractor.reset_head()
            if self.aux_target_tau is not None:
                self.aux_target_encoder = copy.deepcopy(extractor.encoder).requires_grad_(False)
            self.pair_loss = PairLoss(extractor, self._aux_policy, self.aux_augment, self.aux_target_encoder)

    @property
    def minc_extractor(self) -> MincExtractor:
        raise NotImplementedError

    @property
    def _aux_policy(self) -> Any:
        raise NotImplementedError

    def _aux_step_done(self) -> None:
        """After each optimizer step: move the EMA target encoder towards the online one."""
        if self.aux_target_encoder is not None:
            online, target = self.minc_extractor.encoder.parameters(), self.aux_target_encoder.parameters()
            polyak_update(online, target, self.aux_target_tau)

    def load_pretrained_encoder(self, path: str) -> None:
        """Load an `encoder.pt` (minc_rl.encoders.save_encoder) into the encoder, and into its target copies."""
        extractor = self.minc_extractor
        load_encoder_weights(path, extractor.encoder, extractor.encoder_name, extractor.input_shape)
        if self.aux_target_encoder is not None:
            self.aux_target_encoder.load_state_dict(extractor.encoder.state_dict())

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "pair_loss", "aux_target_encoder"]  # type: ignore[misc]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, variables = super()._get_torch_save_params()  # type: ignore[misc]
        if self.aux_target_encoder is not None:
            state_dicts = [*state_dicts, "aux_target_encoder"]
        return state_dicts, variables
