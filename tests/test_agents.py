"""MincPPO, MincDQN, MincExtractor and MincAuxCallback against real SB3, procgen, ALE, MinAtar and CartPole."""

from __future__ import annotations

import subprocess
import sys

import ale_py
import gymnasium
import numpy as np
import pytest
import torch
from minc_rl import MincAuxCallback, MincExtractor
from minc_rl.agents import AUGMENT_CHOICES, AUX_CHOICES, MincDQN, MincPPO
from minc_rl.agents.auxiliary import gather_successors, rollout_successors
from minc_rl.encoders import build_encoder, save_encoder
from minc_rl.envs import make_vec_env
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.torch_layers import FlattenExtractor

AUX_KEYS = {"aux_loss", "aux_scl_estimate", "aux_rankme", "aux_embedding_std", "aux_pairs"}
MINC_KEYS = {"aux_lambda_offdiag_ratio", "aux_skipped_batches"}
SMALL = dict(features_dim=32)  # smallest encoders that make the point


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


@pytest.mark.filterwarnings("ignore:You have specified a mini-batch size")  # the truncated last minibatch is wanted
def test_minibatch_pairs_on_hand_built_rollout_buffer():
    """Observations encode (t, env): each pair MincPPO draws is (t, env) -> (t+1, env) in one episode; all are drawn."""
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


# ------------------------------------------------------------------------------------ stock SB3 + callback


def breakout_ppo(aux_coef: float, seed: int = 0) -> list[float]:
    """Stock PPO + MincExtractor + MincAuxCallback on SB3's own Atari pipeline; the aux loss of each rollout."""
    gymnasium.register_envs(ale_py)
    env = make_atari_env("BreakoutNoFrameskip-v4", n_envs=2, seed=seed)
    model = PPO("CnnPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=seed,
                policy_kwargs=dict(features_extractor_class=MincExtractor, features_extractor_kwargs=SMALL))
    recorder = recorded(model)
    model.learn(512, callback=MincAuxCallback(gradient_steps=16, aux_batch=64, aux_coef=aux_coef))
    assert isinstance(model.policy.features_extractor.encoder.conv[0], torch.nn.Conv2d)
    return logged(recorder, "train/aux_loss")


def test_stock_ppo_with_callback_on_atari_lowers_the_aux_loss():
    """512 env steps, 64 aux steps. With aux_coef=0 the callback only measures the loss on the same first rollout
    (same seed, nothing trained by it yet), which gives the loss at initialisation and what PPO alone does to it.
    (Breakout, not Pong: Pong's first rollouts are near-identical frames where no pair loss can fall.)"""
    trained, untouched = breakout_ppo(1.0), breakout_ppo(0.0)
    assert len(trained) == len(untouched) == 4
    assert np.mean(trained) < 0.9 * untouched[0]  # below its value at initialisation, over the whole run
    assert trained[-1] < untouched[-1]  # and below what the same PPO run without the aux gradient has


@pytest.mark.parametrize("algo", ["a2c", "dqn"])
def test_callback_trains_stock_a2c_and_dqn(algo):
    kwargs = dict(features_extractor_class=MincExtractor, features_extractor_kwargs=dict(aux="minc", **SMALL))
    if algo == "a2c":
        model = A2C("MlpPolicy", make_vec_env("gym:CartPole-v1", 2), n_steps=8, seed=0, policy_kwargs=kwargs)
        extractor = model.policy.features_extractor
    else:
        model = DQN("CnnPolicy", make_vec_env("minatar:breakout", 2), learning_starts=64, batch_size=32,
                    buffer_size=1000, seed=0, policy_kwargs={**kwargs, "features_extractor_kwargs": dict(
                        encoder="impala", **kwargs["features_extractor_kwargs"])})
        extractor = model.q_net.features_extractor
    before = extractor.encoder.state_dict()["fc.0.weight" if algo == "dqn" else "net.1.weight"].clone()
    recorder = recorded(model)
    callback = MincAuxCallback(gradient_steps=2, aux_batch=16)
    model.learn(256, callback=callback)
    model.logger.dump(model.num_timesteps)
    for key in AUX_KEYS | MINC_KEYS:
        assert logged(recorder, f"train/{key}"), key
    steps = int(extractor.aux_loss.steps)  # 2 gradient steps per rollout (DQN: once learning has started)
    rollouts = 256 // (2 * (8 if algo == "a2c" else 4))
    assert steps == 2 * rollouts if algo == "a2c" else 0 < steps < 2 * rollouts and steps % 2 == 0
    assert torch.isfinite(extractor.aux_loss.cov).all() and extractor.aux_loss.cov.abs().sum() > 0
    after = extractor.encoder.state_dict()["fc.0.weight" if algo == "dqn" else "net.1.weight"]
    assert not torch.equal(before, after)


def test_callback_needs_a_minc_extractor_with_a_loss():
    with pytest.raises(ValueError, match="MincAuxCallback needs .*features extractor is NatureCNN"):
        model = PPO("CnnPolicy", make_vec_env("procgen:coinrun", 1), n_steps=8, batch_size=8)
        model.learn(8, callback=MincAuxCallback())
    model = PPO("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), n_steps=8, batch_size=8,
                policy_kwargs=dict(features_extractor_class=MincExtractor, features_extractor_kwargs=dict(aux="none")))
    with pytest.raises(ValueError, match=r"MincExtractor\(aux='none'\)"):
        model.learn(8, callback=MincAuxCallback())


# ----------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
def test_save_load_round_trip_keeps_lambda_optimizer_target_and_continues(cls, tmp_path):
    env = make_vec_env("gym:CartPole-v1", 2)
    common = dict(aux_batch=16, aux_target_tau=0.1, seed=0)
    if cls is MincPPO:
        model = cls("MlpPolicy", env, n_steps=16, batch_size=16, n_epochs=1, **common)
    else:
        model = cls("MlpPolicy", env, learning_starts=32, batch_size=16, train_freq=4, **common)
    model.learn(128)
    model.save(tmp_path / "model.zip")
    loaded = cls.load(tmp_path / "model.zip", env=env)

    for (name, saved), restored in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        torch.testing.assert_close(restored, saved, rtol=0, atol=0, msg=name)
    lam, lam_loaded = model.minc_extractor.aux_loss, loaded.minc_extractor.aux_loss
    assert int(lam_loaded.steps) == int(lam.steps) > 0
    torch.testing.assert_close(lam_loaded.ema_sum, lam.ema_sum, rtol=0, atol=0)
    for (name, saved), restored in zip(model.aux_target_encoder.state_dict().items(),
                                       loaded.aux_target_encoder.state_dict().values()):
        torch.testing.assert_close(restored, saved, rtol=0, atol=0, msg=name)
    saved_state = model.policy.optimizer.state_dict()["state"]
    loaded_state = loaded.policy.optimizer.state_dict()["state"]
    assert saved_state.keys() == loaded_state.keys() and len(saved_state) > 0
    for key in saved_state:
        torch.testing.assert_close(loaded_state[key]["exp_avg"], saved_state[key]["exp_avg"], rtol=0, atol=0)
    assert (loaded.aux, loaded.aux_batch, loaded.aux_target_tau) == ("minc", 16, 0.1)

    steps, encoder = int(lam_loaded.steps), loaded.minc_extractor.encoder.state_dict()
    encoder = {k: v.clone() for k, v in encoder.items()}
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 256
    assert int(lam_loaded.steps) > steps
    assert any(not torch.equal(encoder[k], v) for k, v in loaded.minc_extractor.encoder.state_dict().items())


@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
def test_load_pretrained_encoder_syncs_targets(cls, tmp_path):
    rollout = dict(n_steps=8, batch_size=8) if cls is MincPPO else {}
    model = cls("CnnPolicy", make_vec_env("minatar:breakout", 1), encoder="impala", aux_target_tau=0.05,
                policy_kwargs=dict(features_extractor_kwargs=SMALL), **rollout)
    extractor = model.minc_extractor
    pretrained = type(extractor.encoder)(4, (10, 10), features_dim=32)
    save_encoder(str(tmp_path / "encoder.pt"), pretrained, "impala", extractor.input_shape)
    model.load_pretrained_encoder(str(tmp_path / "encoder.pt"))
    copies = [extractor.encoder, model.aux_target_encoder]
    if cls is MincDQN:
        copies.append(model.q_net_target.features_extractor.encoder)
    for copy in copies:
        for name, value in pretrained.state_dict().items():
            torch.testing.assert_close(copy.state_dict()[name], value, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(aux="barlow"), r"aux='barlow' is not valid; choose one of 'none', 'minc', 'spectral', 'infonce'"),
        (dict(aux_augment="crop"), r"aux_augment='crop' is not valid; choose one of 'none', 'shift'"),
        (dict(encoder="resnet"), r"encoder='resnet' is not valid; choose one of 'auto', 'impala', 'nature', 'minatar', 'mlp'"),
        (dict(aux_coef=-1.0), r"aux_coef must be a finite number >= 0; got -1.0"),
        (dict(aux_coef=float("nan")), r"aux_coef must be a finite number >= 0; got nan"),
        (dict(aux_dim=0), r"aux_dim must be an integer >= 1; got 0"),
        (dict(aux_batch=1), r"aux_batch must be an integer >= 2; got 1"),
        (dict(aux_batch=64.0), r"aux_batch must be an integer >= 2; got 64.0"),
        (dict(aux_ema=0.0), r"aux_ema must be in \(0, 1\]; got 0.0"),
        (dict(aux_ema=1.5), r"aux_ema must be in \(0, 1\]; got 1.5"),
        (dict(aux_target_tau=0.0), r"aux_target_tau .* must be in \(0, 1\]; got 0.0"),
        (dict(aux_loss_kwargs=dict(temperature=0.1)), r"aux loss 'minc' does not take \['temperature'\]"),
        (dict(aux_loss_kwargs=dict(ema=0.1)), r"may not set 'ema' .*set MINC's ema with aux_ema"),
        (dict(aux="none", aux_loss_kwargs=dict(mu=2.0)), r"aux='none' has no loss to pass them to"),
        (dict(aux_augment="shift"), r"aux_augment='shift' needs image observations; the encoder input is \(4,\)"),
    ],
)
@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
def test_bad_aux_arguments_raise_clear_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), **kwargs)


def test_minatar_encoder_is_young_and_tians_network():
    encoder = build_encoder("minatar", (4, 10, 10))
    # conv 3x3 4->16 (valid padding: 10x10 -> 8x8), then linear 16*8*8 -> 128
    assert sum(p.numel() for p in encoder.parameters()) == (4 * 9 * 16 + 16) + (16 * 8 * 8 * 128 + 128)
    assert encoder(torch.rand(5, 4, 10, 10)).shape == (5, 128) and encoder.features_dim == 128


def test_extractor_and_policy_mismatches_raise_clear_errors():
    with pytest.raises(ValueError, match=r"encoder 'nature' needs images of at least 36x36; the observations are "
                                         r"10x10 .* use encoder='minatar', 'impala' or 'mlp'"):
        MincPPO("CnnPolicy", make_vec_env("minatar:breakout", 1), encoder="nature")
    assert MincPPO("CnnPolicy", make_vec_env("minatar:breakout", 1)).minc_extractor.encoder_name == "minatar"
    env = make_vec_env("gym:CartPole-v1", 1)
    with pytest.raises(ValueError, match=r"aux='minc' needs a MincExtractor .* got FlattenExtractor"):
        MincPPO("MlpPolicy", env, policy_kwargs=dict(features_extractor_class=FlattenExtractor))
    with pytest.raises(ValueError, match=r"aux='spectral' but the policy's MincExtractor was built with aux='minc'"):
        MincPPO("MlpPolicy", env, aux="spectral",
                policy_kwargs=dict(features_extractor_class=MincExtractor, features_extractor_kwargs=dict(aux="minc")))
    with pytest.raises(ValueError, match="head_hidden must be a positive integer; got 0"):
        MincExtractor(env.observation_space, head_hidden=0)
    with pytest.raises(ValueError, match="aux_dim must be a positive integer; got -3"):
        MincExtractor(env.observation_space, aux_dim=-3)
    with pytest.raises(ValueError, match="needs a Box observation space"):
        MincExtractor(gymnasium.spaces.Discrete(3))


def test_constants_and_defaults():
    assert AUX_CHOICES == ("none", "minc", "spectral", "infonce") and AUGMENT_CHOICES == ("none", "shift")
    extractor = MincExtractor(make_vec_env("procgen:coinrun", 1).observation_space)  # every argument has a default
    assert (extractor.encoder_name, extractor.input_shape, extractor.features_dim) == ("nature", (3, 64, 64), 512)
    assert extractor.head.out_dim == 64 and extractor.aux_loss.ema == 0.2
    assert MincExtractor(gymnasium.spaces.Box(-1, 1, (5,))).encoder_name == "mlp"
    channels_last = MincExtractor(gymnasium.spaces.Box(0, 1, (10, 10, 4)), encoder="impala", features_dim=8)
    assert channels_last.input_shape == (4, 10, 10)
    assert channels_last(torch.rand(2, 10, 10, 4)).shape == (2, 8)


# ------------------------------------------------------------------------------------ non-finite aux loss


def test_non_finite_aux_loss_is_dropped_not_backpropagated():
    model = cartpole_ppo(aux="minc")
    head = model.minc_extractor.head
    with torch.no_grad():
        head.net[3].weight[0, 0] = float("nan")  # every embedding batch is now non-finite
    recorder = recorded(model)
    model.learn(128)
    model.logger.dump(model.num_timesteps)
    lam = model.minc_extractor.aux_loss
    assert int(lam.steps) == 0 and int(lam.skipped) == model._n_updates * 64 // 16
    assert all(torch.isfinite(p).all() for p in model.minc_extractor.encoder.parameters())
    assert all(torch.isfinite(p).all() for name, p in model.policy.named_parameters() if ".head." not in name)
    assert sum(logged(recorder, "train/aux_dropped")) == int(lam.skipped)
    assert not logged(recorder, "train/aux_loss")


def test_pair_loss_uses_the_target_encoder_for_successors():
    """x' goes through the EMA target encoder (no gradient), x through the online encoder."""
    model = cartpole_ppo(aux="spectral", aux_target_tau=0.5)
    pair_loss, extractor = model.pair_loss, model.minc_extractor
    with torch.no_grad():
        for p in model.aux_target_encoder.parameters():
            p.add_(torch.randn_like(p))
    obs, next_obs = torch.randn(8, 4), torch.randn(8, 4)
    extractor.train()
    loss = pair_loss(obs, next_obs)
    extractor.zero_grad()
    loss.backward()
    online = extractor.encoder(obs)
    target = model.aux_target_encoder(next_obs)
    a, b = extractor.embed(torch.cat([online, target])).tensor_split(2)
    torch.testing.assert_close(loss, extractor.aux_loss(a, b))
    assert all(p.grad is None for p in model.aux_target_encoder.parameters())
    assert all(p.grad is not None for p in extractor.encoder.parameters())


def test_import_minc_rl_is_light_and_exports_lazily():
    code = ("import sys, minc_rl; assert 'torch' not in sys.modules and 'stable_baselines3' not in sys.modules; "
            "from minc_rl import MincExtractor, MincAuxCallback; "
            "assert MincExtractor.__module__ == 'minc_rl.extractor' and MincAuxCallback.__module__ == 'minc_rl.callback'")
    subprocess.run([sys.executable, "-c", code], check=True)
