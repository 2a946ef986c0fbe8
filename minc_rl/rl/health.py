"""Encoder health of an RL agent's own features (the features extractor the agent acts from), for any aux setting:
RankMe, srank, the dormant-unit fraction of each ReLU layer and the mean feature norm, measured on a fixed probe
batch of observations from the agent's buffer by an SB3 callback, `EncoderHealth`.

The metrics follow Plasticine's (RLE-Foundation/Plasticine, plasticine_metrics/): srank with delta = 0.01 (Kumar et
al. 2021, Plasticine's "stable rank"), RankMe (Garrido et al. 2023, its "effective rank"), ReDo's dormant units with
tau = 0.025 (Sokar et al. 2023; a convolution's unit is a channel) and the mean L2 norm of the features. Plasticine is
not a PyPI package, and its dormant count takes the mean over layers without naming them; here each layer is
reported by its module name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy, BaseModel
from stable_baselines3.common.preprocessing import get_obs_shape, preprocess_obs
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn

from minc_rl.common.checks import check_int
from minc_rl.common.io import atomic_write
from minc_rl.ssl.metrics import dormant_fraction, feature_norm, rankme, srank

SRANK_DELTA = 0.01  # Kumar et al. 2021
DORMANT_TAU = 0.025  # Sokar et al. 2023 (ReDo)
Observations = np.ndarray | dict[str, np.ndarray]


def agent_encoder(model: BaseAlgorithm) -> tuple[BaseModel, BaseFeaturesExtractor]:
    """The network the agent acts from and its features extractor: DQN's online Q-network, or an actor-critic
    policy (PPO, A2C) with its actor's extractor (the shared one when shared)."""
    q_net = getattr(model, "q_net", None)
    if isinstance(q_net, BaseModel):
        return q_net, q_net.features_extractor
    if isinstance(model.policy, ActorCriticPolicy):
        return model.policy, model.policy.pi_features_extractor
    raise ValueError(
        f"EncoderHealth measures DQN-style agents (a q_net) and actor-critic policies (PPO, A2C); got "
        f"{type(model).__name__} with {type(model.policy).__name__}"
    )


def relu_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The nn.ReLU modules inside `module`, by their module name (functional relu calls are not seen)."""
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, nn.ReLU)}


@torch.no_grad()
def encoder_health(
    network: BaseModel, extractor: BaseFeaturesExtractor, observations: Observations
) -> dict[str, float]:
    """Health of `extractor`'s features of `observations` (as the buffer stores them): rankme, srank, feature_norm,
    dormant/<layer> for each ReLU layer (<layer>[i] for the i-th call of a module run more than once) and dormant,
    their mean. Runs in eval mode (no BatchNorm statistics move) and restores every module's mode."""
    fractions: dict[str, list[float]] = {}

    def keep(name: str) -> Callable[..., None]:
        """A forward hook that keeps the dormant fraction of the layer's output under `name` (not the output: a deep
        encoder's activations of the whole probe need not all be held at once)."""
        return lambda _module, _inputs, output: fractions.setdefault(name, []).append(
            dormant_fraction(output, DORMANT_TAU))

    hooks = [layer.register_forward_hook(keep(name)) for name, layer in relu_layers(extractor).items()]
    modes = {module: module.training for module in extractor.modules()}
    extractor.eval()
    try:
        inputs = preprocess_obs(obs_as_tensor(observations, network.device), network.observation_space,
                                normalize_images=network.normalize_images)  # fmt: skip
        features = extractor(inputs).flatten(1)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    metrics = {
        "rankme": rankme(features),
        "srank": srank(features, SRANK_DELTA),
        "feature_norm": feature_norm(features),
    }
    dormant = {
        name if len(calls) == 1 else f"{name}[{i}]": fraction
        for name, calls in fractions.items()
        for i, fraction in enumerate(calls)
    }
    if dormant:
        metrics["dormant"] = float(np.mean(list(dormant.values())))
        metrics.update({f"dormant/{name}": value for name, value in dormant.items()})
    return metrics


def buffer_rows(model: BaseAlgorithm) -> Observations:
    """Every observation the agent's buffer holds now, one row each: DQN's replay buffer (as SB3 samples it, with
    VecNormalize's current statistics), or PPO's rollout buffer (at the end of a rollout, or after its update)."""
    buffer = getattr(model, "replay_buffer", None)
    buffer = buffer if isinstance(buffer, ReplayBuffer) else model.rollout_buffer
    filled = buffer.buffer_size if buffer.full else buffer.pos

    def rows(array: np.ndarray) -> np.ndarray:
        """The filled part of a (buffer_size, n_envs, ...) array as rows (PPO's after its update: rows already)."""
        if getattr(buffer, "generator_ready", False):  # RolloutBuffer.get() has flattened it to (buffer_size * n_envs, ...)
            return array[: filled * buffer.n_envs]
        return array[:filled].reshape(filled * buffer.n_envs, *array.shape[2:])

    stored = buffer.observations
    observations = {key: rows(value) for key, value in stored.items()} if isinstance(stored, dict) else rows(stored)
    vec_normalize = model.get_vec_normalize_env()
    if isinstance(buffer, ReplayBuffer) and vec_normalize is not None:  # a replay buffer keeps the raw observations
        observations = vec_normalize.normalize_obs(observations)
    return observations


def take_rows(observations: Observations, index: np.ndarray) -> Observations:
    """observations[index], for arrays and dicts of arrays."""
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def row_count(observations: Observations) -> int:
    """How many observations `observations` holds."""
    return len(next(iter(observations.values())) if isinstance(observations, dict) else observations)


class EncoderHealth(BaseCallback):
    """Logs encoder_health of the agent's own features extractor under health/ every `every` environment steps (at
    the first rollout end at or past each multiple) and at the end of training, also when `every` is past it (not
    when learn() stops before its total_timesteps).

    The probe batch is `probe` observations drawn once, without replacement, from the agent's buffer at the first
    measurement (PPO: the rollout just collected; DQN: the replay buffer so far), with a numpy Generator of its
    own seeded by `seed`, and then kept fixed. With `path` (minc_rl.train: <run dir>/health_probe.npz) it is
    written there atomically and a resumed run reloads it, so every value of a run is measured on the same batch.
    Nothing here draws from a global RNG, computes a gradient or moves BatchNorm statistics: training with the
    callback is bit-identical to training without it. `latest` holds the last values, `seconds` the time spent.
    """

    def __init__(self, every: int = 5_000, probe: int = 512, seed: int = 0, path: str | Path | None = None) -> None:
        super().__init__()
        check_int("every", every, 1)
        check_int("probe", probe, 1)
        check_int("seed", seed, 0)
        self.every, self.probe_size, self.path = every, probe, None if path is None else Path(path)
        self.rng = np.random.default_rng(seed)
        self.probe: Observations | None = None
        self.latest: dict[str, float] = {}
        self.seconds = 0.0
        self.measured_step = -1

    def _on_training_start(self) -> None:
        self.next_step = (self.num_timesteps // self.every + 1) * self.every
        if self.probe is None and self.path is not None and self.path.exists():
            self.probe = self.load(self.path)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.num_timesteps < self.next_step:
            return
        started = time.perf_counter()
        if self.probe is None:
            self.draw_probe()
        self.measure()
        self.seconds += time.perf_counter() - started
        self.next_step = (self.num_timesteps // self.every + 1) * self.every

    def _on_training_end(self) -> None:
        """The final measurement, also of a run shorter than `every` (its probe is drawn now); none when learn() stopped
        before its total_timesteps (a signal in minc_rl.train: the run goes on later, with the probe it would draw)."""
        if self.measured_step == self.num_timesteps or self.num_timesteps < self.model._total_timesteps:
            return
        started = time.perf_counter()
        if self.probe is None and row_count(buffer_rows(self.model)) > 0:
            self.draw_probe()
        if self.probe is not None:
            self.measure()
        self.seconds += time.perf_counter() - started

    def draw_probe(self) -> None:
        """The fixed probe batch from the buffer (all of it when it holds fewer than `probe`), saved to `path`."""
        observations = buffer_rows(self.model)
        count = row_count(observations)
        index = np.sort(self.rng.choice(count, size=min(self.probe_size, count), replace=False))
        self.probe = take_rows(observations, index)
        if self.path is not None:
            atomic_write(self.path, self.save)

    def save(self, path: str) -> None:
        """The probe batch as an .npz file: its arrays by key for dict observations, else one named observations."""
        arrays = self.probe if isinstance(self.probe, dict) else {"observations": self.probe}
        with open(path, "wb") as file:
            np.savez(file, **arrays)

    def load(self, path: Path) -> Observations:
        """A probe batch written by save; ValueError if it does not fit the agent's observations."""
        with np.load(path) as saved:
            arrays = {key: saved[key] for key in saved.files}
        expected = get_obs_shape(self.model.observation_space)
        probe = arrays if isinstance(expected, dict) else arrays.get("observations", np.empty((0, 0)))
        found = {k: v.shape[1:] for k, v in probe.items()} if isinstance(probe, dict) else probe.shape[1:]
        if found != expected:
            raise ValueError(f"{path} holds probe observations of shape {found}; the agent's are {expected}")
        return probe

    def measure(self) -> None:
        """encoder_health of the probe batch, logged under health/."""
        self.latest = encoder_health(*agent_encoder(self.model), self.probe)
        for key, value in self.latest.items():
            self.logger.record(f"health/{key}", value)
        self.measured_step = self.num_timesteps
