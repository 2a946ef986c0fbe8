"""Encoder health (minc_rl.rl.health, the srank / dormant / feature-norm metrics): hand-computed values, a probe that
leaves training bit-identical, and the health/ keys of a real training run, its summary and its resume."""

from __future__ import annotations

import json
import math
import random
import struct

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.callbacks import StopTrainingOnMaxEpisodes
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn
from torch.testing import assert_close

from minc_rl.agents import MincDQN
from minc_rl.envs import make_vec_env
from minc_rl.ssl.encoders import ImpalaCNN
from minc_rl.rl.health import EncoderHealth, agent_encoder, encoder_health, relu_layers
from minc_rl.ssl.metrics import dormant_fraction, feature_norm, rankme, srank
from train_cli import run_in_process

# --- the metrics -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        # singular values 10, 5, 3, 1, 0.5, 0.1 (sum 19.6); cumulative shares .510, .765, .918, .969, .995, 1
        (0.01, 5.0),  # 0.995 is the first share >= 0.99
        (0.05, 4.0),  # 0.969 >= 0.95
        (0.1, 3.0),  # 0.918 >= 0.90
        (0.5, 1.0),  # 0.510 >= 0.50
    ],
)
def test_srank_of_a_diagonal_matrix(delta: float, expected: float) -> None:
    z = torch.diag(torch.tensor([5.0, 10.0, 0.1, 3.0, 0.5, 1.0]))  # order does not matter: svd sorts
    assert srank(z, delta) == expected


def test_srank_of_zero_and_non_finite_features() -> None:
    assert srank(torch.zeros(4, 3)) == 0.0
    assert math.isnan(srank(torch.tensor([[1.0, float("inf")], [0.0, 1.0]])))


def test_features_of_known_rank() -> None:
    # rows 0-2 are 3 e_0, 3 e_1, 3 e_2, the other five are zero: singular values (3, 3, 3, 0, 0, 0)
    z = torch.zeros(8, 6)
    z[:3, :3] = 3 * torch.eye(3)
    assert rankme(z) == pytest.approx(3.0, rel=1e-5)  # p = (1/3, 1/3, 1/3): exp(log 3)
    assert srank(z) == 3.0
    assert feature_norm(z) == pytest.approx(3 * 3 / 8)  # three rows of norm 3 among eight


def test_dormant_fraction_of_linear_and_conv_layers() -> None:
    # unit means over the batch: 0, 0.01, 1, 2.99 (layer mean 1): 0 and 0.01 are <= 0.025 x 1
    linear = torch.tensor([[0.0, 0.02, 2.0, 5.98], [0.0, 0.0, 0.0, 0.0]])
    assert dormant_fraction(linear) == 0.5
    # a convolution's unit is a channel: means over batch and positions 0, 0.02, 2.98 (layer mean 1)
    conv = torch.zeros(2, 3, 2, 2)
    conv[0, 1, 0, 0] = 0.16  # 0.16 / 8 cells = 0.02 <= 0.025
    conv[:, 2] = 2.98
    assert dormant_fraction(conv) == pytest.approx(2 / 3)
    assert dormant_fraction(torch.zeros(5, 4)) == 1.0  # a silent layer is all dormant
    assert dormant_fraction(-linear, tau=0.0) == 0.25  # |h|: only the exactly silent unit 0 at tau 0


# --- encoder_health on a hand-built extractor ---------------------------------------------------------------------


class HandBuilt(BaseFeaturesExtractor):
    """features = relu(W2 relu(W1 x + b1) + b2), the same nn.ReLU module run twice, a BatchNorm beside it."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=4)
        relu = nn.ReLU()
        self.net = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
        self.norm = nn.BatchNorm1d(4)  # its statistics move if forward() runs in training mode
        with torch.no_grad():
            self.net[0].weight.copy_(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0])))
            self.net[0].bias.copy_(torch.tensor([0.0, 0.0, -1.0, 0.0]))  # units 2 and 3 are always 0
            self.net[2].weight.copy_(torch.eye(4))
            self.net[2].bias.copy_(torch.tensor([0.0, -5.0, 0.0, 0.0]))  # unit 1 goes silent too

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """The features; the BatchNorm sees them too, but its output is not used."""
        features = self.net(observations)
        self.norm(features)
        return features


def hand_built_dqn() -> DQN:
    env = make_vec_env("gym:CartPole-v1", 1, seed=0)
    return DQN("MlpPolicy", env, policy_kwargs=dict(features_extractor_class=HandBuilt), buffer_size=100, seed=0,
               device="cpu")


def test_encoder_health_of_a_hand_built_extractor() -> None:
    model = hand_built_dqn()
    network, extractor = agent_encoder(model)
    observations = np.array([[1.0, 2.0, 0.0, 0.0], [3.0, -2.0, 0.0, 0.0]], dtype=np.float32)
    metrics = encoder_health(network, extractor, observations)
    # first ReLU: rows (1, 2, 0, 0), (3, 0, 0, 0): unit means 2, 1, 0, 0 (layer mean 0.75): 2 of 4 dormant;
    # second: rows (1, 0, 0, 0), (3, 0, 0, 0): means 2, 0, 0, 0 (layer mean 0.5): 3 of 4 dormant.
    # features: rank one (singular value sqrt(10)), row norms 1 and 3.
    expected = {"rankme": 1.0, "srank": 1.0, "feature_norm": 2.0, "dormant": 0.625,
                "dormant/net.1[0]": 0.5, "dormant/net.1[1]": 0.75}  # fmt: skip
    assert metrics.keys() == expected.keys()
    assert_close(torch.tensor([metrics[k] for k in expected]), torch.tensor([expected[k] for k in expected]))


def test_every_relu_of_the_impala_cnn_is_measured_and_its_blocks_compute_the_same() -> None:
    """The residual blocks' ReLUs are modules (hooks see them): 2 per block, 6 blocks, then the last stack's and the
    fc layer's; a block still computes x + conv1(relu(conv0(relu(x)))) and holds the same parameters."""
    encoder = ImpalaCNN(3)
    blocks = [f"conv.{i}" for i in (2, 3, 6, 7, 10, 11)]
    assert list(relu_layers(encoder)) == [f"{b}.relu{k}" for b in blocks for k in (0, 1)] + ["conv.12", "fc.1"]
    assert not any("relu" in key for key in encoder.state_dict())  # checkpoints of earlier runs load unchanged
    block, x = encoder.conv[2], torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x + block.conv1(torch.relu(block.conv0(torch.relu(x)))))


def test_the_probe_moves_no_mode_no_batchnorm_statistics_and_no_global_rng() -> None:
    model = hand_built_dqn()
    network, extractor = agent_encoder(model)
    extractor.train()
    extractor.net[0].eval()  # a mixed state comes back as it was
    modes = [module.training for module in extractor.modules()]
    statistics = {k: v.clone() for k, v in extractor.norm.state_dict().items()}
    rng_states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    encoder_health(network, extractor, np.ones((6, 4), dtype=np.float32))
    assert [module.training for module in extractor.modules()] == modes
    for key, value in extractor.norm.state_dict().items():
        assert torch.equal(value, statistics[key]), key
    assert torch.equal(torch.get_rng_state(), rng_states[0])
    assert np.array_equal(np.random.get_state()[1], rng_states[1]) and random.getstate() == rng_states[2]


def test_an_agent_without_a_known_encoder_is_refused() -> None:
    model = SAC("MlpPolicy", make_vec_env("gym:Pendulum-v1", 1, seed=0), device="cpu")
    with pytest.raises(ValueError, match=r"EncoderHealth measures DQN-style agents .* got SAC with SACPolicy"):
        agent_encoder(model)
    with pytest.raises(ValueError, match=r"every must be an integer >= 1; got 0"):
        EncoderHealth(every=0)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0; got -1"):
        EncoderHealth(seed=-1)


# --- the callback in training ---------------------------------------------------------------------------------------


def short_dqn(callback: EncoderHealth | None) -> MincDQN:
    """MincDQN with the MINC aux loss on MinAtar breakout, 300 steps, one gradient step per step from step 100."""
    env = make_vec_env("minatar:breakout", 1, seed=0)
    model = MincDQN("CnnPolicy", env, aux="minc", learning_starts=100, train_freq=1,
                    buffer_size=1000, batch_size=16, seed=0, device="cpu")  # fmt: skip
    model.learn(300, callback=callback)
    return model


def test_dqn_training_with_the_health_callback_is_bit_identical(tmp_path, one_torch_thread) -> None:
    plain = short_dqn(None)
    callback = EncoderHealth(every=100, probe=64, seed=0, path=tmp_path / "probe.npz")
    probed = short_dqn(callback)
    for name, value in plain.policy.state_dict().items():
        assert torch.equal(value, probed.policy.state_dict()[name]), name
    for name, value in plain.aux_learner.state_dict().items():
        assert torch.equal(value, probed.aux_learner.state_dict()[name]), name
    assert np.array_equal(plain.replay_buffer.actions, probed.replay_buffer.actions)
    # probed at steps 100, 200 and 300, on 64 observations saved to disk
    assert callback.measured_step == 300 and callback.probe.shape == (64, 4, 10, 10)
    assert set(callback.latest) == {"rankme", "srank", "feature_norm", "dormant", "dormant/encoder.conv.1",
                                    "dormant/encoder.fc.1"}  # fmt: skip
    assert 1 <= callback.latest["srank"] <= 64 and 0 <= callback.latest["dormant"] <= 1
    reloaded = EncoderHealth(every=100, path=tmp_path / "probe.npz")
    reloaded.init_callback(probed)
    reloaded.on_training_start({}, {})
    assert np.array_equal(reloaded.probe, callback.probe)


def test_stock_ppo_probes_its_rollout_buffer(one_torch_thread) -> None:
    model = PPO("MlpPolicy", make_vec_env("gym:CartPole-v1", 2, seed=0), n_steps=32, batch_size=32, seed=0, device="cpu")
    callback = EncoderHealth(every=64, probe=100, seed=0)
    model.learn(128, callback=callback)
    # SB3's MlpPolicy has no ReLU in its features extractor (Flatten): no dormant keys; a rollout holds 64 rows
    assert callback.probe.shape == (64, 4) and set(callback.latest) == {"rankme", "srank", "feature_norm"}
    assert callback.latest["srank"] <= 4


def test_every_longer_than_the_run_still_measures_at_the_end(one_torch_thread) -> None:
    """health.every past the run's steps: the probe is drawn and measured once, at the end (the docs' promise)."""
    model = PPO("MlpPolicy", make_vec_env("gym:CartPole-v1", 2, seed=0), n_steps=32, batch_size=32, seed=0, device="cpu")
    callback = EncoderHealth(every=1_000_000, probe=100, seed=0)
    model.learn(128, callback=callback)
    assert callback.measured_step == 128 and callback.probe.shape == (64, 4)
    assert set(callback.latest) == {"rankme", "srank", "feature_norm"}


def test_a_learn_stopped_before_its_budget_takes_no_final_measurement(one_torch_thread) -> None:
    """A stop (minc_rl.train's on a signal) draws no probe from a part of a rollout: the resumed run draws the probe
    that the run that was never stopped draws."""
    model = PPO("MlpPolicy", make_vec_env("gym:CartPole-v1", 2, seed=0), n_steps=32, batch_size=32, seed=0, device="cpu")
    callback = EncoderHealth(every=1_000_000, probe=100, seed=0)
    model.learn(128, callback=[callback, StopTrainingOnMaxEpisodes(max_episodes=1)])
    assert model.num_timesteps < 64 and callback.probe is None and callback.latest == {}


def test_a_short_training_run_logs_health_and_keeps_its_probe_on_resume(tmp_path, monkeypatch, one_torch_thread):
    run_dir = tmp_path / "run"
    args = ["env=minatar:breakout", "agent=dqn", "aux=none", "agent.learning_starts=100", "agent.buffer_size=1000",
            "eval.episodes=1", "eval.n_envs=1", "eval.every=300", "checkpoint.every=300", "progress_bar=false",
            "health.every=100", "health.probe=32"]  # fmt: skip
    run_in_process(monkeypatch, *args, "total_steps=300", f"hydra.run.dir={run_dir}")
    progress = pd.read_csv(run_dir / "progress.csv")
    health = {"health/rankme", "health/srank", "health/feature_norm", "health/dormant",
              "health/dormant/encoder.conv.1", "health/dormant/encoder.fc.1"}  # fmt: skip
    assert health <= set(progress.columns) and progress["health/srank"].notna().any()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["health"]) == {key.removeprefix("health/") for key in health}
    assert summary["health"]["srank"] == progress["health/srank"].dropna().iloc[-1]
    height = struct.unpack(">I", (run_dir / "learning_curve.png").read_bytes()[20:24])[0]
    assert height > 600  # the return and, below it, the health panel: 7.5 inches at 100 dpi (the return alone: 4.5)
    probe = (run_dir / "health_probe.npz").read_bytes()

    run_in_process(monkeypatch, f"resume={run_dir}", "total_steps=400")
    assert (run_dir / "health_probe.npz").read_bytes() == probe  # reloaded, not drawn again
    progress = pd.read_csv(run_dir / "progress.csv")
    assert progress.loc[progress["time/total_timesteps"] == 400, "health/srank"].notna().any()
