"""MincPPO, MincDQN, MincExtractor and MincAuxCallback against real SB3, procgen, ALE, MinAtar and CartPole."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from minc_rl import MincAuxCallback, MincExtractor
from minc_rl.agents import AUGMENT_CHOICES, AUX_CHOICES, MincDQN, MincPPO
from minc_rl.agents.aux import PairLoss, gather_successors, rollout_successors
from minc_rl.encoders import save_encoder
from minc_rl.envs import make_vec_env
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.torch_layers import NatureCNN

AUX_KEYS = {"aux_loss", "aux_scl_estimate", "aux_rankme", "aux_embedding_std", "aux_pairs"}
MINC_KEYS = {"aux_lambda_offdiag_ratio", "aux_skipped_batches"}
SMALL = dict(features_dim=32)  # smallest encoders that make the point


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny networks on a shared 2-core machine: one thread avoids oversubscription (3-4x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(KVWriter):
    """An SB3 logger output that keeps every dump."""

    def __init__(self) -> None:
        self.dumps: list[dict] = []

    def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
        self.dumps.append({key: value for key, value in key_values.items()})


def recorded(model) -> Recorder:
    """Attach a Recorder as the model's only logger output."""
    recorder = Recorder()
    model.set_logger(Logger(folder=None, output_formats=[recorder]))
    return recorder


def logged(recorder: Recorder, key: str) -> list[float]:
    return [dump[key] for dump in recorder.dumps if key in dump]


def cartpole_ppo(cls=MincPPO, seed: int = 0, **kwargs):
    env = make_vec_env("gym:CartPole-v1", 2, seed=seed)
    return cls("MlpPolicy", env, n_steps=32, batch_size=16, n_epochs=2, seed=seed, **kwargs)


# ----------------------------------------------------------------------------------------------- pairs


def test_rollout_successors_hand_computed():
    # n_steps=3, n_envs=2; env 0 starts an episode at t=2, env 1 at t=1; after the rollout env 0 resets.
    episode_starts = np.array([[1, 1], [0, 1], [1, 0]], dtype=np.float32)
    last_episode_starts = np.array([True, False])
    successor, valid = rollout_successors(episode_starts, last_episode_starts)
    # flat index = env * n_steps + t; successors of the last step point past the buffer (6 + env)
    np.testing.assert_array_equal(successor, [1, 2, 6, 4, 5, 7])
    np.testing.assert_array_equal(valid, [True, False, False, False, True, True])


def test_rollout_successors_single_step_rollout():
    successor, valid = rollout_successors(np.zeros((1, 3), np.float32), np.array([False, True, False]))
    np.testing.assert_array_equal(successor, [3, 4, 5])
    np.testing.assert_array_equal(valid, [True, False, True])


def test_gather_successors_reads_after_rollout_rows():
    flat = np.arange(6)[:, None] * 10
    after = np.array([[100], [101]])
    np.testing.assert_array_equal(gather_successors(flat, after, np.array([7, 1, 6, 5])), [[101], [10], [100], [50]])


def test_minibatch_pairs_on_hand_built_rollout_buffer():
    """Observations encode (t, env): every pair MincPPO draws is (t, env) -> (t+1, env) in one episode, all are drawn."""
    n_steps, n_envs = 5, 3
    model = MincPPO(
        "MlpPolicy", make_vec_env("gym:CartPole-v1", n_envs), n_steps=n_steps, batch_size=4, aux_batch=1000, seed=0
    )
    buffer = model.rollout_buffer
    episode_starts = np.zeros((n_steps, n_envs), np.float32)
    episode_starts[[0, 2, 4, 3], [0, 0, 1, 2]] = 1
    for t in range(n_steps):
        obs = np.stack([np.array([t, env, 0, 0], np.float32) for env in range(n_envs)])
        buffer.add(obs, np.zeros(n_envs), np.zeros(n_envs), episode_starts[t], torch.zeros(n_envs), torch.zeros(n_envs))
    model._last_obs = np.stack([np.array([n_steps, env, 1, 0], np.float32) for env in range(n_envs)])
    model._last_episode_starts = np.array([False, True, False])
    model._successors = rollout_successors(buffer.episode_starts, model._last_episode_starts)

    pairs = set()
    for batch_inds, rollout_data in model._minibatches():
        rows, next_obs = model._minibatch_pairs(batch_inds)
        np.testing.assert_array_equal(rollout_data.observations.numpy(), buffer.observations[batch_inds])
        for (t, env, _, _), (t_next, env_next, after, _) in zip(rollout_data.observations[rows].numpy(), next_obs):
            assert (t_next, env_next, after) == (t + 1, env, float(t + 1 == n_steps))
            pairs.add((int(t), int(env)))
    expected = {
        (t, env)
        for t in range(n_steps)
        for env in range(n_envs)
        if not (episode_starts[t + 1, env] if t + 1 < n_steps else model._last_episode_starts[env])
    }
    assert pairs == expected
    assert (4, 0) in pairs and (4, 1) not in pairs  # the last step: pairs with the next obs unless the env reset


# ------------------------------------------------------------------------------------- equal to stock SB3


def test_aux_none_ppo_matches_stock_ppo():
    extractor = dict(features_extractor_class=MincExtractor, features_extractor_kwargs=dict(aux="none"), net_arch=[])
    stock = cartpole_ppo(PPO, policy_kwargs=extractor).learn(192)
    ours = cartpole_ppo(aux="none").learn(192)
    assert type(ours.policy.features_extractor) is MincExtractor and ours.policy.features_extractor.head is None
    for (name, theirs), mine in zip(stock.policy.state_dict().items(), ours.policy.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)


def test_aux_coef_zero_leaves_the_ppo_update_unchanged():
    """Reusing the minibatch features for the aux loss changes nothing in PPO's own update."""
    kwargs = dict(aux="minc", aux_dim=16, head_hidden=32)
    extractor = dict(features_extractor_class=MincExtractor, features_extractor_kwargs=kwargs, net_arch=[])
    stock = cartpole_ppo(PPO, policy_kwargs=extractor).learn(192)
    ours = cartpole_ppo(aux_coef=0.0, aux_dim=16, policy_kwargs=dict(features_extractor_kwargs=dict(head_hidden=32)))
    ours.learn(192)
    assert int(ours.minc_extractor.aux_loss.steps) > 0  # the aux loss ran ...
    compared = 0
    for (name, theirs), mine in zip(stock.policy.state_dict().items(), ours.policy.state_dict().values()):
        if ".head." not in name and ".aux_loss." not in name:  # ... and only its own modules differ
            # not bit-equal: the head's zero gradients enter clip_grad_norm_'s sum of squares
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
            compared += 1
    assert compared >= 8


def test_aux_none_dqn_matches_stock_dqn():
    def run(cls, **kwargs):
        env = make_vec_env("gym:CartPole-v1", 1)
        return cls("MlpPolicy", env, learning_starts=50, batch_size=32, train_freq=2, target_update_interval=50,
                   seed=0, **kwargs).learn(250)

    extractor = dict(features_extractor_class=MincExtractor, features_extractor_kwargs=dict(aux="none"), net_arch=[])
    stock, ours = run(DQN, policy_kwargs=extractor), run(MincDQN, aux="none")
    assert ours._n_updates == stock._n_updates > 50
    for (name, theirs), mine in zip(stock.policy.state_dict().items(), ours.policy.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------- short learn() runs


def make_agent(agent: str, spec: str, aux: str, **kwargs):
    if agent == "ppo":
        env = make_vec_env(spec, 4 if spec.startswith("procgen") else 2)
        return MincPPO("CnnPolicy" if spec.startswith("procgen") else "MlpPolicy", env, aux=aux, n_steps=32,
                       batch_size=64, n_epochs=1, aux_batch=32, seed=0, **kwargs)
    env = make_vec_env(spec, 2)
    return MincDQN("CnnPolicy", env, aux=aux, encoder="impala", learning_starts=64, batch_size=32, aux_batch=32,
                   buffer_size=2000, train_freq=4, seed=0, **kwargs)


@pytest.mark.parametrize(
    "agent, spec, aux, options",
    [
        ("ppo", "procgen:coinrun", "minc", dict(aux_augment="shift", aux_target_tau=0.05)),
        ("ppo", "gym:CartPole-v1", "spectral", dict(aux_target_tau=0.5)),
        ("ppo", "gym:CartPole-v1", "infonce", dict(aux_loss_kwargs=dict(temperature=0.2))),
        ("dqn", "minatar:breakout", "minc", dict()),
        ("dqn", "minatar:breakout", "spectral", dict(aux_augment="shift")),
    ],
)
def test_short_learn_trains_the_encoder_and_logs(agent, spec, aux, options):
    model = make_agent(agent, spec, aux, policy_kwargs=dict(features_extractor_kwargs=SMALL), **options)
    extractor = model.minc_extractor
    before = {k: v.clone() for k, v in extractor.encoder.state_dict().items()}
    recorder = recorded(model)
    model.learn(384)
    model.logger.dump(model.num_timesteps)

    for key in AUX_KEYS | (MINC_KEYS if aux == "minc" else set()):
        values = logged(recorder, f"train/{key}")
        assert values and np.all(np.isfinite(values)), key
    assert min(logged(recorder, "train/aux_pairs")) >= 2
    assert min(logged(recorder, "train/aux_rankme")) > 1.0  # no collapse to a constant embedding
    changed = [not torch.equal(before[k], v) for k, v in extractor.encoder.state_dict().items()]
    assert all(changed)
    if aux == "minc":
        cov = extractor.aux_loss.cov
        assert torch.isfinite(cov).all() and cov.abs().sum() > 0
        minibatches = 1 if agent == "dqn" else model.n_steps * model.n_envs // model.batch_size
        assert int(extractor.aux_loss.steps) == model._n_updates * minibatches  # one Lambda step per gradient step
        torch.testing.assert_close(cov, cov.T)
        assert int(extractor.aux_loss.skipped) == 0
    if options.get("aux_target_tau"):
        target = model.aux_target_encoder.state_dict()
        online = extractor.encoder.state_dict()
        assert all(not torch.equal(target[k], before[k]) and not torch.equal(target[k], online[k]) for k in online)
