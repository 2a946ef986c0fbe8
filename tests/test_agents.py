"""MincPPO, MincDQN, MincExtractor and MincAuxCallback against real SB3, procgen, ALE, MinAtar and CartPole."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import ale_py
import gymnasium
import numpy as np
import pytest
import torch
from minc_rl import MincAuxCallback, MincExtractor, configs
from minc_rl.agents import AUGMENT_CHOICES, AUX_CHOICES, AUX_MODES, AuxConfig, MincDQN, MincPPO, StateActionHead
from minc_rl.agents.auxiliary import LinearCritic, UpdateShareMeter
from minc_rl.agents.pairs import (PairDictRolloutBuffer, gather_successors, rollout_successors,
                                  sample_rollout_pairs)
from minc_rl.ssl.encoders import build_encoder, save_encoder
from minc_rl.envs import make_vec_env
from omegaconf import OmegaConf
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.envs import BitFlippingEnv, FakeImageEnv, IdentityEnv
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, CombinedExtractor, FlattenExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

AUX_KEYS = {"aux_loss", "aux_scl_estimate", "aux_rankme", "aux_embedding_std", "aux_pairs", "aux_grad_share",
            "aux_grad_share_raw", "rl_step_kept"}
MINC_KEYS = {"aux_lambda_offdiag_ratio", "aux_skipped_batches"}
SMALL = dict(features_dim=32)  # smallest encoders that make the point
SMALL_AUX = dict(dim=16, head_hidden=32)


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


def hand_built_rollout(n_envs: int = 3, n_steps: int = 5, **kwargs):
    """A MincPPO whose rollout buffer holds observations (t, env, after, 0); episodes start as episode_starts says."""
    model = MincPPO("MlpPolicy", make_vec_env("gym:CartPole-v1", n_envs), n_steps=n_steps, seed=0, **kwargs)
    buffer = model.rollout_buffer
    episode_starts = np.zeros((n_steps, n_envs), np.float32)
    episode_starts[[0, 2, 4, 3], [0, 0, 1, 2]] = 1
    for t in range(n_steps):
        obs = np.stack([np.array([t, env, 0, 0], np.float32) for env in range(n_envs)])
        buffer.add(obs, np.zeros(n_envs), np.zeros(n_envs), episode_starts[t], torch.zeros(n_envs), torch.zeros(n_envs))
    model._last_obs = np.stack([np.array([n_steps, env, 1, 0], np.float32) for env in range(n_envs)])
    model._last_episode_starts = np.array([False, True, False])
    buffer.compute_returns_and_advantage(torch.zeros(n_envs), model._last_episode_starts)
    expected = {
        (t, env)
        for t in range(n_steps)
        for env in range(n_envs)
        if not (episode_starts[t + 1, env] if t + 1 < n_steps else model._last_episode_starts[env])
    }
    return model, expected


@pytest.mark.filterwarnings("ignore:You have specified a mini-batch size")  # the truncated last minibatch is wanted
def test_minibatch_pairs_on_hand_built_rollout_buffer():
    """Observations encode (t, env): each pair MincPPO draws is (t, env) -> (t+1, env) in one episode; all are drawn;
    each minibatch carries the flat indices SB3's RolloutBuffer.get drew."""
    model, expected = hand_built_rollout(batch_size=4, aux=dict(batch=1000))
    buffer = model.rollout_buffer
    pairs = set()
    for rollout_data in buffer.get(4):
        batch = model._aux_batch(rollout_data)
        np.testing.assert_array_equal(rollout_data.observations.numpy(), buffer.observations[rollout_data.indices])
        for (t, env, _, _), (t_next, env_next, after, _) in zip(batch.observations.numpy(), batch.next_observations):
            assert (t_next, env_next, after) == (t + 1, env, float(t + 1 == 5))
            pairs.add((int(t), int(env)))
    assert pairs == expected
    assert (4, 0) in pairs and (4, 1) not in pairs  # the last step: pairs with the next obs unless the env reset


def test_callback_samples_the_same_pairs_from_an_unflattened_buffer():
    """MincAuxCallback's sampler (before SB3 flattens the buffer) finds the same valid pairs as MincPPO's."""
    model, expected = hand_built_rollout(batch_size=5)
    buffer = model.rollout_buffer
    observations, following, _ = sample_rollout_pairs(buffer, model._last_obs, model._last_episode_starts, 1000)
    drawn = set()
    for (t, env, _, _), (t_next, env_next, after, _) in zip(observations, following):
        assert (t_next, env_next, after) == (t + 1, env, float(t + 1 == 5))
        drawn.add((int(t), int(env)))
    assert drawn == expected and len(observations) == len(expected)


# ------------------------------------------------------------------------------------- equal to stock SB3


def test_aux_none_ppo_matches_stock_ppo():
    extractor = dict(features_extractor_class=MincExtractor, net_arch=[])
    stock = cartpole_ppo(PPO, policy_kwargs=extractor).learn(192)
    ours = cartpole_ppo(aux="none").learn(192)
    assert type(ours.policy.features_extractor) is MincExtractor and ours.aux_learner is None
    for (name, theirs), mine in zip(stock.policy.state_dict().items(), ours.policy.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_zero_share_leaves_the_ppo_update_unchanged(mode):
    """Joint with share 0 routes only PPO's own gradient into the encoder (through the detached features and back),
    so PPO's update is SB3's; decoupled with the aux loss dropped leaves the encoder where it was."""
    extractor = dict(features_extractor_class=MincExtractor, net_arch=[])
    stock = cartpole_ppo(PPO, policy_kwargs=extractor).learn(192)
    ours = cartpole_ppo(aux=dict(mode=mode, share=0.0, **SMALL_AUX))
    before = {k: v.clone() for k, v in ours.policy.state_dict().items()}
    if mode == "decoupled":
        with torch.no_grad():
            ours.aux_learner.head.net[3].weight[0, 0] = float("nan")  # every aux loss is dropped
    ours.learn(192)
    assert int(ours.aux_learner.loss.steps) > 0 or mode == "decoupled"  # the aux loss ran ...
    for (name, theirs), mine in zip(stock.policy.state_dict().items(), ours.policy.state_dict().values()):
        if mode == "joint":
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
        elif name.startswith(("features_extractor", "pi_features", "vf_features")):
            torch.testing.assert_close(mine, before[name], rtol=0, atol=0, msg=name)  # no RL gradient reached it


def test_aux_none_dqn_matches_stock_dqn():
    def run(cls, **kwargs):
        env = make_vec_env("gym:CartPole-v1", 1)
        return cls("MlpPolicy", env, learning_starts=50, batch_size=32, train_freq=2, target_update_interval=50,
                   seed=0, **kwargs).learn(250)

    extractor = dict(features_extractor_class=MincExtractor, net_arch=[])
    stock, ours = run(DQN, policy_kwargs=extractor), run(MincDQN, aux="none")
    assert ours._n_updates == stock._n_updates > 50
    for (name, theirs), mine in zip(stock.policy.state_dict().items(), ours.policy.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["joint", "separate", "decoupled"])
def test_dqn_aux_every_takes_the_aux_loss_on_every_kth_td_step_and_the_rest_are_sb3s(mode):
    """aux.every=3 puts the aux loss on TD steps 3, 6, ...; with no step due, MincDQN's update is SB3's (joint and
    separate: the TD gradient reaches the encoder as without an aux loss; decoupled: it never does)."""
    def run(aux, spy=False):
        env = make_vec_env("gym:CartPole-v1", 1)
        model = MincDQN("MlpPolicy", env, aux=aux, learning_starts=50, batch_size=32, train_freq=2,
                        target_update_interval=50, seed=0)
        before = {k: v.clone() for k, v in model.policy.state_dict().items()}
        batches = spy_on_aux_batches(model) if spy else []
        return model.learn(250), before, batches

    thinned, _, batches = run(dict(mode=mode, every=3, **SMALL_AUX), spy=True)
    assert len(batches) == thinned._n_updates > 50
    taken = [i + 1 for i, batch in enumerate(batches) if batch is not None]
    assert taken == list(range(3, thinned._n_updates + 1, 3))
    assert int(thinned.aux_learner.loss.steps) == len(taken)  # Lambda updated once per aux step

    plain, _, _ = run("none")
    never, before, _ = run(dict(mode=mode, every=10**9, **SMALL_AUX))
    assert int(never.aux_learner.loss.steps) == 0
    for (name, theirs), mine in zip(plain.policy.state_dict().items(), never.policy.state_dict().values()):
        if mode == "decoupled":  # the Q-heads learn on other features than plain DQN's
            if "features_extractor" in name:
                torch.testing.assert_close(mine, before[name], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------- short learn() runs


def make_agent(agent: str, spec: str, aux: dict, **kwargs):
    if agent == "ppo":
        env = make_vec_env(spec, 4 if spec.startswith("procgen") else 2)
        return MincPPO("CnnPolicy" if spec.startswith("procgen") else "MlpPolicy", env, aux=dict(batch=32, **aux),
                       n_steps=32, batch_size=64, n_epochs=1, seed=0, **kwargs)
    env = make_vec_env(spec, 2)
    return MincDQN("CnnPolicy", env, aux=aux, encoder="impala", learning_starts=64, batch_size=32,
                   buffer_size=2000, train_freq=4, seed=0, **kwargs)


@pytest.mark.parametrize(
    "agent, spec, aux",
    [
        ("ppo", "procgen:coinrun", dict(name="minc", augment="shift", target_tau=0.05)),
        ("ppo", "gym:CartPole-v1", dict(name="spectral", mode="separate", target_tau=0.5)),
        ("ppo", "gym:CartPole-v1", dict(name="infonce", mode="decoupled", loss_kwargs=dict(temperature=0.2))),
        ("dqn", "minatar:breakout", dict(name="minc", share=0.3, log_update_share=True)),
        ("dqn", "minatar:breakout", dict(name="spectral", augment="shift", mode="separate", source="replay", batch=48)),
        ("dqn", "minatar:breakout", dict(name="minc", mode="decoupled")),
    ],
)
def test_short_learn_trains_the_encoder_and_logs(agent, spec, aux):
    model = make_agent(agent, spec, aux, policy_kwargs=dict(features_extractor_kwargs=SMALL))
    extractor, learner = model.aux_extractor, model.aux_learner
    before = {k: v.clone() for k, v in extractor.state_dict().items()}
    recorder = recorded(model)
    model.learn(384)

    for key in AUX_KEYS | (MINC_KEYS if aux["name"] == "minc" else set()):
        values = logged(recorder, f"train/{key}")
        assert values and np.all(np.isfinite(values)), key
    pairs = logged(recorder, "train/aux_pairs")
    assert min(pairs) >= 2 and (agent == "ppo" or set(pairs) == {aux.get("batch", model.batch_size)})  # DQN: the TD
    # batch's 32 pairs (its default), or replay pairs of their own
    assert min(logged(recorder, "train/aux_rankme")) > 1.0  # no collapse to a constant embedding
    shares = logged(recorder, "train/aux_grad_share")
    if aux.get("mode", "joint") == "joint":  # the aux share of the encoder's update is the setting, every step
        np.testing.assert_allclose(shares, aux.get("share", AuxConfig.share), rtol=1e-4)
    elif aux["mode"] == "decoupled":
        np.testing.assert_allclose(shares, 1.0)
    assert all(0 < kept <= 1 for kept in logged(recorder, "train/rl_step_kept"))
    if aux.get("log_update_share"):
        assert all(0 < share < 1 for share in logged(recorder, "train/aux_update_share"))
    changed = [not torch.equal(before[k], v) for k, v in extractor.state_dict().items()]
    assert all(changed)
    if aux["name"] == "minc":
        cov = learner.loss.cov
        assert torch.isfinite(cov).all() and cov.abs().sum() > 0
        minibatches = 1 if agent == "dqn" else model.n_steps * model.n_envs // model.batch_size
        assert int(learner.loss.steps) == model._n_updates * minibatches  # one Lambda step per gradient step
        torch.testing.assert_close(cov, cov.T)
        torch.testing.assert_close(torch.trace(cov), torch.tensor(1.0))  # the second moment of unit rows
        assert int(learner.loss.skipped) == 0
    if aux.get("target_tau"):
        target = learner.target.state_dict()
        online = extractor.state_dict()
        assert all(not torch.equal(target[k], before[k]) and not torch.equal(target[k], online[k]) for k in online)


def test_optimizers_follow_the_mode():
    """joint: the aux optimizer holds the head only, the encoder moves with the RL optimizer; separate and
    decoupled: the aux optimizer holds encoder and head, with aux.lr."""
    for mode in AUX_MODES:
        model = cartpole_ppo(aux=dict(mode=mode, lr=1e-3, **SMALL_AUX))
        held = {id(p) for group in model.aux_learner.optimizer.param_groups for p in group["params"]}
        encoder = {id(p) for p in model.aux_extractor.parameters()}
        head = {id(p) for p in model.aux_learner.head.parameters()}
        assert head <= held and (encoder.isdisjoint(held) if mode == "joint" else encoder <= held), mode
        assert model.aux_learner.optimizer.param_groups[0]["lr"] == 1e-3
        assert encoder <= {id(p) for p in model.policy.optimizer.param_groups[0]["params"]}


# ------------------------------------------------------------------------------- the aux share of the update


def test_update_share_meter_splits_adams_step_by_gradient_source():
    """Hand-computed: Adam(lr 0.1, betas (0.9, 0.999)) on one parameter with g_rl = [1, 0], g_aux = [0, 1], then
    g_rl = [-1, 0], g_aux = [0, 1]. Step 1: m = 0.1 [1, 1], v_hat = [1, 1], parts [0, 0.1] and [0.1, 0], share 0.5.
    Step 2: m_aux = [0, 0.19], m_rl = [-0.01, 0], v_hat = [1, 1]: share 0.95 although each gradient was half aux."""
    parameter = torch.nn.Parameter(torch.zeros(2))
    adam = torch.optim.Adam([parameter], lr=0.1, eps=1e-8)
    meter = UpdateShareMeter([parameter])
    expected = [(0.5, 0.0, [0.0, 0.1]), (0.95, 0.0, [0.0, 0.19])]
    for (g_rl, g_aux), (share, cosine, aux_moment) in zip(
        [([1.0, 0.0], [0.0, 1.0]), ([-1.0, 0.0], [0.0, 1.0])], expected
    ):
        before = parameter.detach().clone()
        parameter.grad = torch.tensor(g_rl) + torch.tensor(g_aux)
        adam.step()
        measured = meter.joint(adam, [torch.tensor(g_aux)], 1.0)
        torch.testing.assert_close(torch.stack(measured), torch.tensor([share, cosine]), atol=1e-6, rtol=0)
        torch.testing.assert_close(meter.aux_moment[0], torch.tensor(aux_moment))
        # the split holds for Adam's actual step: -lr / (1 - beta1^t) * (u_aux + u_rl), u = m / (sqrt(v_hat) + eps)
        state = adam.state[parameter]
        steps = float(state["step"])
        u = state["exp_avg"] / ((state["exp_avg_sq"] / (1 - 0.999**steps)).sqrt() + 1e-8)
        torch.testing.assert_close(parameter.detach() - before, -0.1 / (1 - 0.9**steps) * u)


def test_update_share_meter_counts_the_clipped_aux_gradient():
    """A clip that keeps half the step halves the aux gradient that enters Adam's first moment."""
    parameter = torch.nn.Parameter(torch.zeros(2))
    adam = torch.optim.Adam([parameter], lr=0.1)
    meter = UpdateShareMeter([parameter])
    parameter.grad = 0.5 * (torch.tensor([2.0, 0.0]) + torch.tensor([0.0, 2.0]))
    adam.step()
    meter.joint(adam, [torch.tensor([0.0, 2.0])], 0.5)
    torch.testing.assert_close(meter.aux_moment[0], torch.tensor([0.0, 0.1]))
    torch.testing.assert_close(adam.state[parameter]["exp_avg"] - meter.aux_moment[0], torch.tensor([0.1, 0.0]))


@pytest.mark.parametrize("mode, share", [("joint", 0.3), ("joint", 0.0), ("separate", 0.1), ("decoupled", 0.1)])
def test_update_share_is_logged_and_leaves_training_as_it_is(mode, share):
    """aux.log_update_share logs the aux share of the encoder's update (0 at share 0, 1 in decoupled mode, where the
    RL gradient never reaches the encoder) and the cosine of the two parts, and trains the same parameters."""
    aux = dict(mode=mode, share=share, **SMALL_AUX)
    plain = cartpole_ppo(aux=aux)  # each model is built right before it learns: the seed sets the global RNG
    plain_recorder = recorded(plain)
    plain.learn(192)
    measured = cartpole_ppo(aux=dict(log_update_share=True, **aux))
    recorder = recorded(measured)
    measured.learn(192)
    shares, cosines = logged(recorder, "train/aux_update_share"), logged(recorder, "train/aux_update_cos")
    assert shares and cosines and not logged(plain_recorder, "train/aux_update_share")
    assert all(0.0 <= value <= 1.0 for value in shares) and all(-1.0 <= value <= 1.0 for value in cosines)
    if mode == "decoupled":
        np.testing.assert_allclose(shares, 1.0)
    elif share == 0.0:
        np.testing.assert_allclose(shares, 0.0)
    else:
        assert 0.0 < min(shares) and max(shares) < 1.0
    for (name, mine), theirs in zip(measured.policy.state_dict().items(), plain.policy.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6, msg=name)


def test_callback_logs_the_update_share_between_the_algorithms_steps_and_its_own():
    model = cartpole_ppo(PPO, policy_kwargs=dict(features_extractor_class=MincExtractor, net_arch=[]))
    recorder = recorded(model)
    model.learn(256, callback=MincAuxCallback(dict(log_update_share=True, **SMALL_AUX), gradient_steps=2))
    shares = logged(recorder, "train/aux_update_share")
    assert len(shares) == 256 // 64 - 1 and all(0.0 < value < 1.0 for value in shares)  # from the second rollout


def test_update_share_needs_adam_in_joint_mode():
    with pytest.raises(ValueError, match="aux.log_update_share in joint mode reads the RL optimizer's Adam moments; "
                                         "it needs torch.optim.Adam or AdamW without amsgrad or maximize, got RMSprop"):
        cartpole_ppo(aux=dict(log_update_share=True), policy_kwargs=dict(optimizer_class=torch.optim.RMSprop))
    cartpole_ppo(aux=dict(log_update_share=True, mode="separate"), policy_kwargs=dict(optimizer_class=torch.optim.RMSprop))
    with pytest.raises(ValueError, match="aux.log_update_share must be true or false; got 'yes'"):
        AuxConfig(log_update_share="yes")


# ------------------------------------------------------------------------------------ state-action pairs


def test_state_action_head_embeds_the_taken_action():
    """Discrete: the taken action's d of the head's |A| x d outputs (actions as SB3's buffers hold them: float
    (B, 1) in rollouts, long (B, 1) in replay); Box: the head over features and action."""
    features = torch.randn(5, 4)
    head = StateActionHead(4, gymnasium.spaces.Discrete(3), dim=2, hidden=8).eval()
    actions = torch.tensor([0, 2, 1, 2, 0])
    per_action = head.net(features).view(5, 3, 2)
    expected = torch.stack([per_action[i, a] for i, a in enumerate(actions)])
    torch.testing.assert_close(head(features, actions[:, None].float()), expected)
    torch.testing.assert_close(head(features, actions[:, None]), expected)
    box = StateActionHead(4, gymnasium.spaces.Box(-1, 1, (2,)), dim=2, hidden=8).eval()
    box_actions = torch.randn(5, 2)
    torch.testing.assert_close(box(features, box_actions), box.net(torch.cat([features, box_actions], dim=1)))
    with pytest.raises(ValueError, match=r"aux.pairs='state_action' takes Discrete or Box actions; the action space "
                                         r"is MultiDiscrete"):
        StateActionHead(4, gymnasium.spaces.MultiDiscrete([2, 3]), 2, 8)


@pytest.mark.parametrize(
    "algo, spec, mode",
    [("ppo", "gym:CartPole-v1", "joint"), ("ppo", "gym:Pendulum-v1", "separate"),
     ("dqn", "minatar:breakout", "decoupled"), ("a2c", "gym:CartPole-v1", "separate")],
)
def test_state_action_pairs_train_phi_mu_and_the_encoder_in_every_agent(algo, spec, mode):
    """phi(o_t, a_t) against mu(o_t+1): both heads and the encoder learn, MINC keeps one Lambda per view (each the
    second moment of its view's unit rows), the logs are those of state pairs."""
    aux = dict(mode=mode, pairs="state_action", **SMALL_AUX, **({} if algo == "dqn" else {"batch": 32}))
    env = make_vec_env(spec, 2)
    if algo == "a2c":
        callback = MincAuxCallback(aux, gradient_steps=2)
        model = A2C("MlpPolicy", env, n_steps=8, seed=0, policy_kwargs=dict(features_extractor_class=MincExtractor))
        callback.init_callback(model)
        extractor, learner = model.policy.features_extractor, callback.learner
    else:
        policy_kwargs = dict(features_extractor_kwargs=SMALL)
        model = small_model(MincPPO if algo == "ppo" else MincDQN, "CnnPolicy" if algo == "dqn" else "MlpPolicy",
                            env, aux=aux, policy_kwargs=policy_kwargs)
        callback, extractor, learner = None, model.aux_extractor, model.aux_learner
    assert isinstance(learner.head, StateActionHead) and learner.loss.asymmetric
    before = {name: p.detach().clone() for name, p in [*learner.named_parameters(), *extractor.named_parameters()]}
    recorder = recorded(model)
    model.learn(256, callback=callback)
    model.logger.dump(model.num_timesteps)
    assert np.all(np.isfinite(logged(recorder, "train/aux_loss"))) and logged(recorder, "train/aux_loss")
    assert 1.0 < min(logged(recorder, "train/aux_rankme")) <= SMALL_AUX["dim"]  # phi's alone: at most d
    after = dict([*learner.named_parameters(), *extractor.named_parameters()])
    assert all(not torch.equal(before[name], after[name]) for name in before if "target" not in name)
    for cov in (learner.loss.cov, learner.loss.cov_b):
        assert torch.isfinite(cov).all()
        torch.testing.assert_close(torch.trace(cov), torch.tensor(1.0))
    assert not torch.allclose(learner.loss.cov, learner.loss.cov_b)  # phi's and mu's moments differ


def test_state_action_pairs_refuse_other_action_spaces():
    env = DummyVecEnv([lambda: IdentityEnv(space=gymnasium.spaces.MultiDiscrete([2, 3]))])
    with pytest.raises(ValueError, match=r"takes Discrete or Box actions; the action space is MultiDiscrete"):
        MincPPO("MlpPolicy", env, aux=dict(pairs="state_action"), n_steps=8, batch_size=8)
    with pytest.raises(ValueError, match=r"aux.pairs='action' is not valid; choose one of 'state', 'state_action'"):
        AuxConfig(pairs="action")


def linear_critic_dqn(mode: str = "decoupled", **kwargs):
    aux = dict(mode=mode, pairs="state_action", linear_critic=True, **SMALL_AUX)
    return small_model(MincDQN, "CnnPolicy", make_vec_env("minatar:breakout", 2), aux=aux,
                       policy_kwargs=dict(features_extractor_kwargs=SMALL), **kwargs)


@pytest.mark.parametrize("mode", ["separate", "decoupled"])
def test_linear_critic_is_linear_in_phi_and_the_td_loss_trains_only_w(mode, tmp_path):
    """Q(s, a) = phi(s, a)^T w + c with the aux head's phi; the RL optimizer holds w and c, the aux loss trains phi
    and the encoder; the target network's critic is a copy that SB3's target update keeps in step."""
    model = linear_critic_dqn(mode, target_update_interval=100)
    critic, head = model.q_net.q_net, model.aux_learner.head
    assert isinstance(critic, LinearCritic) and critic.phi is head and model.q_net_target.q_net.phi is not head
    rl_held = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert rl_held == {id(p) for p in model.q_net.parameters()} - {id(p) for p in head.parameters()}
    observations = torch.as_tensor(np.stack([model.env.observation_space.sample() for _ in range(5)]))
    model.q_net.set_training_mode(False)
    features = model.q_net.extract_features(observations, model.q_net.features_extractor)
    phi = head.every_action(features)  # (5, |A|, d)
    expected = phi @ critic.weight.weight[0] + critic.weight.bias[0]
    torch.testing.assert_close(model.q_net(observations), expected)
    q = model.q_net(observations)
    q[:, 0].sum().backward()  # the TD loss's path: gradient into w and c only
    assert critic.weight.weight.grad is not None
    assert all(p.grad is None for p in [*head.parameters(), *model.aux_extractor.parameters()])
    model.policy.zero_grad()

    before = {name: p.detach().clone() for name, p in model.q_net.named_parameters()}
    target_phi = model.q_net_target.q_net.phi.net.net[0].weight.detach().clone()
    model.learn(300)
    assert all(not torch.equal(before[name], p) for name, p in model.q_net.named_parameters())  # w, phi, encoder
    online_names = [name for name, _ in model.q_net.named_parameters()]
    assert [name for name, _ in model.q_net_target.named_parameters()] == online_names  # SB3's zip-wise update
    assert not torch.equal(model.q_net_target.q_net.phi.net.net[0].weight, target_phi)  # it reached the copy
    model.save(tmp_path / "model.zip")
    loaded = MincDQN.load(tmp_path / "model.zip", env=model.env)
    assert loaded.q_net.q_net.phi is loaded.aux_learner.head
    torch.testing.assert_close(loaded.q_net(observations), model.q_net(observations))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AuxConfig(pairs="state_action", linear_critic=True), r"aux.mode 'separate' or 'decoupled'; got "
         r"aux='minc', aux.pairs='state_action', aux.mode='joint'"),
        (lambda: AuxConfig(mode="decoupled", linear_critic=True), r"aux.pairs='state'"),
        (lambda: AuxConfig(linear_critic=1), r"aux.linear_critic must be true or false; got 1"),
        (lambda: cartpole_ppo(aux=dict(mode="separate", pairs="state_action", linear_critic=True)),
         r"aux.linear_critic is built for MincDQN .* MincPPO has no Q-function"),
        (lambda: MincAuxCallback(dict(pairs="state_action", linear_critic=True)), r"use MincDQN, not the callback"),
    ],
)
def test_linear_critic_settings_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ------------------------------------------------------------------------------------ stock SB3 + callback


def breakout_ppo(aux: dict, seed: int = 0) -> list[float]:
    """Stock PPO + MincExtractor + MincAuxCallback on SB3's own Atari pipeline; the aux loss of each rollout."""
    gymnasium.register_envs(ale_py)
    env = make_atari_env("BreakoutNoFrameskip-v4", n_envs=2, seed=seed)
    model = PPO("CnnPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=seed,
                policy_kwargs=dict(features_extractor_class=MincExtractor, features_extractor_kwargs=SMALL))
    recorder = recorded(model)
    model.learn(512, callback=MincAuxCallback(dict(batch=64, **aux), gradient_steps=16))
    assert isinstance(model.policy.features_extractor.encoder.conv[0], torch.nn.Conv2d)
    return logged(recorder, "train/aux_loss")


def test_stock_ppo_with_callback_on_atari_lowers_the_aux_loss():
    """512 env steps, 64 aux steps. With a tiny aux.lr the callback only measures the loss on the same first rollout
    (same seed), which gives the loss at initialisation and what PPO alone does to it.
    (Breakout, not Pong: Pong's first rollouts are near-identical frames where no pair loss can fall.)"""
    trained, untouched = breakout_ppo(dict(lr=1e-3)), breakout_ppo(dict(lr=1e-12))
    assert len(trained) == len(untouched) == 4
    assert np.mean(trained) < untouched[0] - 0.1  # below its value at initialisation, over the whole run
    assert trained[-1] < untouched[-1]  # and below what the same PPO run without the aux steps has


class BatchNormDropoutExtractor(BaseFeaturesExtractor):
    """A user's own extractor, with BatchNorm and Dropout (the layers whose train/eval modes matter)."""

    def __init__(self, observation_space: gymnasium.Space, features_dim: int = 24) -> None:
        super().__init__(observation_space, features_dim)
        size = int(np.prod(observation_space.shape))
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size, 32), torch.nn.BatchNorm1d(32),
                                       torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, features_dim))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations)


@pytest.mark.parametrize("algo", ["a2c", "dqn"])
def test_callback_trains_stock_a2c_and_dqn_on_any_extractor(algo):
    if algo == "a2c":
        kwargs = dict(features_extractor_class=BatchNormDropoutExtractor)
        model = A2C("MlpPolicy", make_vec_env("gym:CartPole-v1", 2), n_steps=8, seed=0, policy_kwargs=kwargs)
        extractor = model.policy.features_extractor
    else:
        kwargs = dict(features_extractor_class=MincExtractor, features_extractor_kwargs=dict(encoder="impala", **SMALL))
        model = DQN("CnnPolicy", make_vec_env("minatar:breakout", 2), learning_starts=64, batch_size=32,
                    buffer_size=1000, seed=0, policy_kwargs=kwargs)
        extractor = model.q_net.features_extractor
    before = {k: v.clone() for k, v in extractor.state_dict().items()}
    recorder = recorded(model)
    callback = MincAuxCallback(dict(batch=16), gradient_steps=2)
    model.learn(256, callback=callback)
    model.logger.dump(model.num_timesteps)
    for key in AUX_KEYS - {"rl_step_kept", "aux_grad_share", "aux_grad_share_raw"} | MINC_KEYS:  # no RL step here
        assert logged(recorder, f"train/{key}"), key
    steps = int(callback.learner.loss.steps)  # 2 gradient steps per rollout (DQN: once learning has started)
    rollouts = 256 // (2 * (8 if algo == "a2c" else 4))
    assert steps == 2 * rollouts if algo == "a2c" else 0 < steps < 2 * rollouts and steps % 2 == 0
    assert torch.isfinite(callback.learner.loss.cov).all() and callback.learner.loss.cov.abs().sum() > 0
    assert any(not torch.equal(before[k], v) for k, v in extractor.state_dict().items())


@pytest.mark.parametrize("algo", [SAC, TD3])
def test_callback_trains_sac_and_td3_through_their_shared_extractor_and_refuses_two(algo):
    """SAC's and TD3's policies hold no `features_extractor` of their own: the callback failed with an
    AttributeError on None. With share_features_extractor=True it trains the one the actor and critic use, here on
    state-action pairs with Box actions."""
    env = gymnasium.make("Pendulum-v1")
    with pytest.raises(ValueError, match=rf"MincAuxCallback trains one features extractor, and this {algo.__name__}"
                                         r"Policy has two, the actor's and the critic's \(share_features_extractor="):
        algo("MlpPolicy", env, learning_starts=0, seed=0).learn(2, callback=MincAuxCallback())
    kwargs = dict(features_extractor_class=MincExtractor, share_features_extractor=True)
    model = algo("MlpPolicy", env, learning_starts=50, batch_size=32, seed=0, policy_kwargs=kwargs)
    callback = MincAuxCallback(dict(batch=16, pairs="state_action"), gradient_steps=2)
    model.learn(100, callback=callback)
    assert callback.learner.extractor is model.policy.actor.features_extractor is model.policy.critic.features_extractor
    steps = int(callback.learner.loss.steps)  # 2 aux steps after each env step once learning has started
    assert 0 < steps <= 2 * 50 and steps % 2 == 0
    assert torch.isfinite(callback.learner.loss.cov_b).all() and callback.learner.loss.cov_b.abs().sum() > 0


def test_callback_settings_raise_clear_errors():
    with pytest.raises(ValueError, match=r"aux.mode must be 'separate'; got 'joint' \(joint and decoupled need"):
        MincAuxCallback(AuxConfig(mode="joint"))
    with pytest.raises(ValueError, match=r"aux='none' leaves it nothing to train"):
        MincAuxCallback("none")
    with pytest.raises(ValueError, match=r"gradient_steps must be an integer >= 1; got 0"):
        MincAuxCallback(gradient_steps=0)
    with pytest.raises(ValueError, match=r"aux.every=4 thins MincDQN's aux steps; the callback's rate is gradient_steps"):
        MincAuxCallback(dict(every=4))


@pytest.mark.parametrize("build", [
    lambda env: MincDQN("MlpPolicy", env, n_steps=3),
    lambda env: DQN("MlpPolicy", env, n_steps=3, learning_starts=0).learn(8, callback=MincAuxCallback()),
])
def test_n_step_replay_is_refused_with_an_aux_loss(build):
    """SB3's n-step buffer serves o_t+n as the next observation: pairs of it would train on the wrong successor."""
    with pytest.raises(ValueError, match=r"n_steps=3: the n-step buffer's next_observations are o_t\+n, not o_t\+1; the "
                                         r"aux loss needs one-step pairs \(n_steps=1\), or (aux='none'|no MincAuxCallback)"):
        build(make_vec_env("gym:CartPole-v1", 1))
    MincDQN("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), aux="none", n_steps=3)  # plain n-step DQN is SB3's


# ----------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("cls, pairs", [(MincPPO, "state"), (MincDQN, "state_action")])
def test_save_load_round_trip_keeps_lambda_optimizer_target_and_continues(cls, pairs, tmp_path):
    env = make_vec_env("gym:CartPole-v1", 2)
    aux = dict(target_tau=0.1, mode="separate", pairs=pairs, **({"batch": 16} if cls is MincPPO else {}))
    common = dict(aux=aux, seed=0)
    if cls is MincPPO:
        model = cls("MlpPolicy", env, n_steps=16, batch_size=16, n_epochs=1, **common)
    else:
        model = cls("MlpPolicy", env, learning_starts=32, batch_size=16, train_freq=4, **common)
    model.learn(128)
    model.save(tmp_path / "model.zip")
    loaded = cls.load(tmp_path / "model.zip", env=env)

    for (name, saved), restored in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        torch.testing.assert_close(restored, saved, rtol=0, atol=0, msg=name)
    for (name, saved), restored in zip(model.aux_learner.state_dict().items(),
                                       loaded.aux_learner.state_dict().values()):
        torch.testing.assert_close(restored, saved, rtol=0, atol=0, msg=name)  # heads, Lambdas, target encoder
    assert ("next_head.net.0.weight" in model.aux_learner.state_dict()) == (pairs == "state_action")
    lam, lam_loaded = model.aux_learner.loss, loaded.aux_learner.loss
    assert int(lam_loaded.steps) == int(lam.steps) > 0
    for optimizer, restored in ((model.policy.optimizer, loaded.policy.optimizer),
                                (model.aux_learner.optimizer, loaded.aux_learner.optimizer)):
        saved_state, loaded_state = optimizer.state_dict()["state"], restored.state_dict()["state"]
        assert saved_state.keys() == loaded_state.keys() and len(saved_state) > 0
        for key in saved_state:
            torch.testing.assert_close(loaded_state[key]["exp_avg"], saved_state[key]["exp_avg"], rtol=0, atol=0)
    assert loaded.aux == model.aux == AuxConfig(**aux, **({} if cls is MincPPO else {"source": "td"}))

    steps, encoder = int(lam_loaded.steps), loaded.aux_extractor.state_dict()
    encoder = {k: v.clone() for k, v in encoder.items()}
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 256
    assert int(lam_loaded.steps) > steps
    assert any(not torch.equal(encoder[k], v) for k, v in loaded.aux_extractor.state_dict().items())


@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
def test_load_pretrained_encoder_syncs_targets(cls, tmp_path):
    rollout = dict(n_steps=8, batch_size=8) if cls is MincPPO else {}
    model = cls("CnnPolicy", make_vec_env("minatar:breakout", 1), encoder="impala", aux=dict(target_tau=0.05),
                policy_kwargs=dict(features_extractor_kwargs=SMALL), **rollout)
    extractor = model.aux_extractor
    pretrained = type(extractor.encoder)(4, (10, 10), features_dim=32)
    save_encoder(str(tmp_path / "encoder.pt"), pretrained, "impala", extractor.input_shape)
    model.load_pretrained_encoder(str(tmp_path / "encoder.pt"))
    copies = [extractor.encoder, model.aux_learner.target.encoder]
    if cls is MincDQN:
        copies.append(model.q_net_target.features_extractor.encoder)
    for copy in copies:
        for name, value in pretrained.state_dict().items():
            torch.testing.assert_close(copy.state_dict()[name], value, rtol=0, atol=0)


def test_callback_aux_state_travels_in_the_models_zip(tmp_path):
    """Stock PPO + MincAuxCallback: model.save writes the head, Lambda and aux optimizer into the zip, and a callback
    on the loaded model starts from them; settings the state does not fit are refused in one line."""
    env = make_vec_env("gym:CartPole-v1", 2)
    extractor = dict(features_extractor_class=MincExtractor, net_arch=[])
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, policy_kwargs=extractor, seed=0)
    aux = dict(batch=16, **SMALL_AUX)
    callback = MincAuxCallback(aux, gradient_steps=2)
    model.learn(128, callback=callback)
    model.save(tmp_path / "ppo.zip")
    saved = {k: v.clone() for k, v in callback.learner.state_dict().items()}
    assert float(callback.learner.loss.steps) == 2 * 2  # two rollouts of 32 x 2 steps, two aux steps each

    loaded = PPO.load(tmp_path / "ppo.zip", env=env)
    resumed = MincAuxCallback(dict(aux, lr=1e-4), gradient_steps=2)  # lr may change; the state's shape may not
    resumed.init_callback(loaded)
    for (name, value), restored in zip(saved.items(), resumed.learner.state_dict().values()):
        torch.testing.assert_close(restored, value, rtol=0, atol=0, msg=name)
    assert resumed.learner.optimizer.state_dict()["state"]  # Adam's moments came back too
    loaded.learn(64, callback=resumed, reset_num_timesteps=False)
    assert float(resumed.learner.loss.steps) == 4 + 2
    with pytest.raises(ValueError, match=r"aux.dim=8 \(saved: 16\)"):
        MincAuxCallback(dict(aux, dim=8)).init_callback(PPO.load(tmp_path / "ppo.zip", env=env))


def test_aux_state_dicts_hold_float_tensors_only():
    """MINC's counters and the head's BatchNorm counter are floats: SB3's save/load tests draw rand_like of each."""
    model = small_model(MincDQN, "MlpPolicy", make_vec_env("gym:CartPole-v1", 1)).learn(64)
    parameters = model.get_parameters()
    assert float(model.aux_learner.loss.steps) > 0
    assert all(value.is_floating_point() for state in parameters.values() if isinstance(state, dict)
               for value in state.values() if isinstance(value, torch.Tensor))


def test_load_takes_aux_settings_the_saved_state_fits(tmp_path):
    small_model(MincPPO, "MlpPolicy", make_vec_env("gym:CartPole-v1", 1)).learn(64).save(tmp_path / "m.zip")
    loaded = MincPPO.load(tmp_path / "m.zip", aux=dict(batch=16, share=0.1, **SMALL_AUX))
    assert loaded.aux == AuxConfig(batch=16, share=0.1, **SMALL_AUX) and loaded.aux_learner is not None
    with pytest.raises(ValueError, match=r"aux=...\): the saved aux state .* aux.name='spectral' \(saved: 'minc'\)"):
        MincPPO.load(tmp_path / "m.zip", aux="spectral")
    with pytest.raises(ValueError, match=r"MincDQN.load\('.*m.zip'\): the file's policy class ActorCriticPolicy is not "
                                         r"a DQNPolicy, so it holds another algorithm's model"):
        MincDQN.load(tmp_path / "m.zip")  # SB3's own DQN.load fails with "'ActorCriticPolicy' object has no attribute 'q_net'"


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(aux="barlow"), r"aux='barlow' is not valid; choose one of 'none', 'minc', 'spectral', 'infonce', 'selfpred'"),
        (dict(aux=dict(mode="phase")), r"aux.mode='phase' is not valid; choose one of 'joint', 'separate', 'decoupled'"),
        (dict(aux=dict(augment="crop")), r"aux.augment='crop' is not valid; choose one of 'none', 'shift'"),
        (dict(encoder="resnet"), r"encoder='resnet' is not valid; choose one of 'auto', 'impala', 'nature', 'minatar', 'mlp'"),
        (dict(aux=dict(share=1.0)), r"aux.share must be in \[0, 1\); got 1.0"),
        (dict(aux=dict(share=-0.1)), r"aux.share must be in \[0, 1\); got -0.1"),
        (dict(aux=dict(lr=0.0)), r"aux.lr must be a finite number > 0; got 0.0"),
        (dict(aux=dict(lr=float("nan"))), r"aux.lr must be a finite number > 0; got nan"),
        (dict(aux=dict(max_grad_norm=-1)), r"aux.max_grad_norm must be a finite number > 0; got -1"),
        (dict(aux=dict(dim=0)), r"aux.dim must be an integer >= 1; got 0"),
        (dict(aux=dict(batch=1)), r"aux.batch must be an integer >= 2; got 1"),
        (dict(aux=dict(batch=64.0)), r"aux.batch must be an integer >= 2; got 64.0"),
        (dict(aux=dict(every=0)), r"aux.every must be an integer >= 1; got 0"),
        (dict(aux=dict(every=2, log_update_share=True)), r"aux.log_update_share .* needs aux.every=1, got 2"),
        (dict(aux=dict(ema=0.0)), r"aux.ema must be in \(0, 1\]; got 0.0"),
        (dict(aux=dict(ema=1.5)), r"aux.ema must be in \(0, 1\]; got 1.5"),
        (dict(aux=dict(head_hidden=0)), r"aux.head_hidden must be an integer >= 1; got 0"),
        (dict(aux=dict(target_tau=0.0)), r"aux.target_tau .* must be in \(0, 1\]; got 0.0"),
        (dict(aux=dict(loss_kwargs=dict(temperature=0.1))), r"aux.loss_kwargs: aux loss 'minc' does not take \['temperature'\]"),
        (dict(aux=dict(loss_kwargs=dict(ema=0.1))), r"may not set 'ema' .*set aux.ema"),
        (dict(aux=dict(name="none", loss_kwargs=dict(mu=2.0))), r"aux='none' has no loss"),
        (dict(aux=dict(coef=1.0)), r"unknown aux settings \['coef'\]; valid: \['name', 'mode', 'share'"),
        (dict(aux=dict(augment="shift")), r"aux.augment='shift' needs image observations; the observation space is Box"),
        (dict(aux=None), r"aux must be a loss name \(none, minc, spectral, infonce, selfpred\), an AuxConfig or a mapping of its "
                         r"settings; got None"),
        (dict(aux=dict(loss_kwargs=["mu", 2.0])), r"aux.loss_kwargs must be a mapping of the loss's options; got \['mu'"),
        (dict(aux=dict(loss_kwargs=dict(symmetric="no"))), r"MINCLoss symmetric must be true or false; got 'no'"),
    ],
)
@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
def test_bad_aux_arguments_raise_clear_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), **kwargs)


def test_aux_every_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match=r"aux.every=2 thins MincDQN's aux steps; MincPPO takes one on every gradient"):
        MincPPO("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), aux=dict(every=2))


def test_minatar_encoder_is_young_and_tians_network():
    encoder = build_encoder("minatar", (4, 10, 10))
    # conv 3x3 4->16 (valid padding: 10x10 -> 8x8), then linear 16*8*8 -> 128
    assert sum(p.numel() for p in encoder.parameters()) == (4 * 9 * 16 + 16) + (16 * 8 * 8 * 128 + 128)
    assert encoder(torch.rand(5, 4, 10, 10)).shape == (5, 128) and encoder.features_dim == 128


def test_extractor_and_policy_mismatches_raise_clear_errors():
    with pytest.raises(ValueError, match=r"encoder 'nature' needs images of at least 36x36; the observations are "
                                         r"10x10 .* use encoder='minatar', 'impala' or 'mlp'"):
        MincPPO("CnnPolicy", make_vec_env("minatar:breakout", 1), encoder="nature")
    assert MincPPO("CnnPolicy", make_vec_env("minatar:breakout", 1)).aux_extractor.encoder_name == "minatar"
    env = make_vec_env("gym:CartPole-v1", 1)
    with pytest.raises(ValueError, match=r"encoder='impala' picks MincExtractor's encoder, but policy_kwargs sets "
                                         r"features_extractor_class=FlattenExtractor; drop one"):
        MincPPO("MlpPolicy", env, encoder="impala", policy_kwargs=dict(features_extractor_class=FlattenExtractor))
    with pytest.raises(ValueError, match=r"MincExtractor encodes a single observation; got Dict\(.*\)\. For Dict "
                                         r"observations use MultiInputPolicy \(SB3's CombinedExtractor"):
        MincExtractor(gymnasium.spaces.Dict({"a": gymnasium.spaces.Discrete(3)}))
    for space in (gymnasium.spaces.Tuple((gymnasium.spaces.Discrete(3),)), gymnasium.spaces.Text(5)):
        with pytest.raises(ValueError, match=r"MincExtractor encodes Box, Discrete, MultiDiscrete or MultiBinary "
                                             r"observations \(those SB3's preprocessing knows\); got (Tuple|Text)\("):
            MincExtractor(space, encoder="mlp")
    float_images = gymnasium.spaces.Box(-5.0, 5.0, (3, 36, 36), np.float32)  # e.g. VecNormalize'd observations
    with pytest.raises(ValueError, match=r"encoder='nature' is a CNN for images, but Box\(-5.0, 5.0, \(3, 36, 36\)"
                                         r", float32\) is not an image space as SB3 defines it"):
        MincExtractor(float_images)
    assert MincExtractor(float_images, normalized_image=True).encoder_name == "nature"


def test_constants_and_defaults():
    assert AUX_CHOICES == ("none", "minc", "spectral", "infonce", "selfpred") and AUGMENT_CHOICES == ("none", "shift")
    assert AUX_MODES == ("joint", "separate", "decoupled")
    extractor = MincExtractor(make_vec_env("procgen:coinrun", 1).observation_space)  # every argument has a default
    assert (extractor.encoder_name, extractor.input_shape, extractor.features_dim) == ("nature", (3, 64, 64), 512)
    config = AuxConfig()
    assert (config.name, config.mode, config.share, config.dim, config.batch, config.ema) == (
        "minc", "joint", 0.01, 64, 256, 0.2)  # share: the calibration's choice (benchmarks/README_rl_evidence.md)
    entry_point = OmegaConf.to_container(OmegaConf.load(Path(configs.__file__).parent / "train" / "config.yaml").aux)
    assert entry_point == {k: v for k, v in dataclasses.asdict(config).items() if k != "name"}  # one set of defaults
    assert AuxConfig.of("spectral") == AuxConfig(name="spectral") and AuxConfig.of(config) is config
    assert MincExtractor(gymnasium.spaces.Box(-1, 1, (5,))).encoder_name == "mlp"
    channels_last = MincExtractor(gymnasium.spaces.Box(0, 255, (10, 10, 4), np.uint8), encoder="impala", features_dim=8)
    assert channels_last.input_shape == (4, 10, 10)
    assert channels_last(torch.rand(2, 10, 10, 4)).shape == (2, 8)


# ------------------------------------------------------------------------------------ non-finite aux loss


def test_non_finite_aux_loss_is_dropped_not_backpropagated():
    model = cartpole_ppo(aux="minc")
    head = model.aux_learner.head
    with torch.no_grad():
        head.net[3].weight[0, 0] = float("nan")  # every embedding batch is now non-finite
    recorder = recorded(model)
    model.learn(128)
    model.logger.dump(model.num_timesteps)  # learn() records the statistics of its last train() at the end
    lam = model.aux_learner.loss
    assert int(lam.steps) == 0 and int(lam.skipped) == model._n_updates * 64 // 16
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())
    assert sum(logged(recorder, "train/aux_dropped")) == int(lam.skipped)
    assert not logged(recorder, "train/aux_loss")


def test_pair_loss_uses_the_target_encoder_for_successors():
    """x' goes through the EMA target encoder (no gradient), x through the online encoder."""
    model = cartpole_ppo(aux=dict(name="spectral", target_tau=0.5))
    learner, extractor = model.aux_learner, model.aux_extractor
    with torch.no_grad():
        for p in learner.target.parameters():
            p.add_(torch.randn_like(p))
    obs, next_obs = torch.randn(8, 4), torch.randn(8, 4)
    learner.train()
    loss = learner.pair_loss(learner.features(obs), next_obs, None)
    extractor.zero_grad()
    loss.backward()
    a, b = learner.head(torch.cat([extractor(obs), learner.target(next_obs)])).tensor_split(2)
    torch.testing.assert_close(loss, learner.loss(a, b))
    assert all(p.grad is None for p in learner.target.parameters())
    assert all(p.grad is not None for p in extractor.parameters())


def test_import_minc_rl_is_light_and_exports_lazily():
    code = ("import sys, minc_rl; assert 'torch' not in sys.modules and 'stable_baselines3' not in sys.modules; "
            "from minc_rl import MincExtractor, MincAuxCallback; "
            "assert MincExtractor.__module__ == 'minc_rl.rl.extractor' and MincAuxCallback.__module__ == 'minc_rl.agents.callback'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------- SB3 compatibility
# SB3's own PPO/DQN tests are the yardstick (benchmarks/sb3_yardstick.sh); these pin the cases of issue 13.


class CountingDictEnv(gymnasium.Env):
    """Dict observations {"image": uint8 (1, 36, 36) filled with 10 t, "t": Discrete(9) = t} at step t of an
    8-step episode: every pair (o_t, o_t+1) can be read off its observations."""

    observation_space = gymnasium.spaces.Dict({"image": gymnasium.spaces.Box(0, 255, (1, 36, 36), np.uint8),
                                               "t": gymnasium.spaces.Discrete(9)})
    action_space = gymnasium.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observation(), {}

    def step(self, action):
        self.t += 1
        return self._observation(), float(action == self.t % 2), self.t == 8, False, {}

    def _observation(self):
        return {"image": np.full((1, 36, 36), 10 * self.t, np.uint8), "t": self.t}


def small_model(cls, policy, env, aux=None, **kwargs):
    """A MincPPO / MincDQN with small rollouts, replay and aux batches (DQN's: its TD batch of 16)."""
    aux = dict(SMALL_AUX, **({"batch": 16} if cls is MincPPO else {})) if aux is None else aux
    if cls is MincPPO:
        return cls(policy, env, aux=aux, n_steps=32, batch_size=16, n_epochs=2, seed=0, **kwargs)
    return cls(policy, env, aux=aux, learning_starts=32, batch_size=16, buffer_size=500, train_freq=4, seed=0,
               **kwargs)


def spy_on_aux_batches(model) -> list:
    """Record the AuxBatch of every aux update."""
    batches, update = [], model.aux_learner.update

    def spy(rl_loss, features, rl_features, batch, *args):
        batches.append(batch)
        return update(rl_loss, features, rl_features, batch, *args)

    model.aux_learner.update = spy
    return batches


@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
def test_aux_loss_on_a_users_extractor_with_batchnorm_and_dropout(cls):
    model = small_model(cls, "MlpPolicy", make_vec_env("gym:CartPole-v1", 2),
                        policy_kwargs=dict(features_extractor_class=BatchNormDropoutExtractor))
    extractor, learner = model.aux_extractor, model.aux_learner
    assert type(extractor) is BatchNormDropoutExtractor and learner.head.net[0].in_features == extractor.features_dim
    if cls is MincDQN:  # SB3's invariant: the target Q-network starts as the online one, BatchNorm buffers included
        targets = model.q_net_target.state_dict()
        for name, online in model.q_net.state_dict().items():
            torch.testing.assert_close(targets[name], online, rtol=0, atol=0, msg=name)
    batch_norm, weights = extractor.net[2], extractor.net[1].weight.detach().clone()
    recorder = recorded(model)
    model.learn(256)
    model.logger.dump(model.num_timesteps)
    assert int(learner.loss.steps) > 0 and torch.isfinite(learner.loss.cov).all()
    assert not torch.equal(extractor.net[1].weight, weights)
    shares = logged(recorder, "train/aux_grad_share")
    assert shares and all(share == pytest.approx(AuxConfig.share, abs=1e-4) for share in shares)  # joint: aux.share
    # predict runs in eval mode: Dropout off (deterministic actions) and BatchNorm statistics left alone
    statistics = batch_norm.running_mean.clone(), int(batch_norm.num_batches_tracked)
    observations = model.env.reset()
    actions = [model.predict(observations, deterministic=True)[0] for _ in range(5)]
    assert all(np.array_equal(action, actions[0]) for action in actions)
    assert torch.equal(batch_norm.running_mean, statistics[0]) and int(batch_norm.num_batches_tracked) == statistics[1]


@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
def test_dict_observations_through_combined_extractor_pair_each_step_with_its_successor(cls):
    env = DummyVecEnv([CountingDictEnv] * 2)
    model = small_model(cls, "MultiInputPolicy", env,
                        policy_kwargs=dict(features_extractor_kwargs=dict(cnn_output_dim=16)))
    assert type(model.aux_extractor) is CombinedExtractor
    if cls is MincPPO:
        assert type(model.rollout_buffer) is PairDictRolloutBuffer
    image_encoder = model.aux_extractor.extractors["image"]
    before = {k: v.clone() for k, v in image_encoder.state_dict().items()}
    batches = spy_on_aux_batches(model)
    model.learn(128)
    assert batches and int(model.aux_learner.loss.steps) > 0
    for batch in batches:
        assert len(batch.rows) >= 2
        step = batch.observations["t"].flatten().long()
        assert torch.equal(batch.next_observations["t"].flatten().long(), step + 1)  # o_t+1 follows o_t
        assert torch.equal(batch.observations["image"][:, 0, 0, 0].long(), 10 * step)
        assert torch.equal(batch.next_observations["image"][:, 0, 0, 0].long(), 10 * (step + 1))
    assert any(not torch.equal(before[k], v) for k, v in image_encoder.state_dict().items())
    with pytest.raises(ValueError, match=r"encoder='impala' picks MincExtractor's encoder, but \w+ keeps SB3's "
                                         r"CombinedExtractor for dict observations; drop one"):
        cls("MultiInputPolicy", env, encoder="impala")


def test_extractor_without_parameters_warns_and_ppo_stays_sb3s():
    """A CombinedExtractor of vectors has no parameters: the aux loss cannot move the representation, says so, and
    PPO's update is SB3's own (the head learns aside)."""
    def ppo(cls, **aux):
        env = DummyVecEnv([lambda: BitFlippingEnv(n_bits=4)] * 2)
        return cls("MultiInputPolicy", env, n_steps=32, batch_size=16, n_epochs=2, seed=0, **aux)

    with pytest.warns(UserWarning, match=r"the features extractor CombinedExtractor has no trainable parameters: "
                                         r"the aux loss trains its projection head only"):
        ours = ppo(MincPPO, aux=dict(batch=16, **SMALL_AUX))
    head = {k: v.clone() for k, v in ours.aux_learner.head.state_dict().items()}
    ours.learn(128)
    stock = ppo(PPO).learn(128)  # seeded at construction: each run starts from the same random state
    for (name, theirs), mine in zip(stock.policy.state_dict().items(), ours.policy.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    assert int(ours.aux_learner.loss.steps) > 0
    assert any(not torch.equal(head[k], v) for k, v in ours.aux_learner.head.state_dict().items())


@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
def test_discrete_observations_go_through_sb3s_one_hot(cls):
    model = small_model(cls, "MlpPolicy", DummyVecEnv([lambda: IdentityEnv(10)] * 2))
    extractor = model.aux_extractor
    assert (type(extractor), extractor.encoder_name, extractor.input_shape) == (MincExtractor, "mlp", (10,))
    model.learn(128)
    assert int(model.aux_learner.loss.steps) > 0 and torch.isfinite(model.aux_learner.loss.cov).all()
    observations = torch.tensor([[3], [7]])  # as SB3's buffers store Discrete observations
    torch.testing.assert_close(model.aux_learner.features(observations),
                               extractor(torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()))
    for space, size in ((gymnasium.spaces.MultiDiscrete([3, 4]), 7), (gymnasium.spaces.MultiBinary(5), 5)):
        assert MincExtractor(space).input_shape == (size,)


def test_successors_of_discrete_observations_after_the_rollout():
    """SB3 stores Discrete observations as (n, 1) but the VecEnv hands the ones after the rollout as (n_envs,)."""
    flat = np.array([[0], [1], [2], [3]])  # 2 envs x 2 steps, env-major
    np.testing.assert_array_equal(gather_successors(flat, np.array([8, 9]), np.array([1, 4, 5])), [[1], [8], [9]])


def test_dqn_target_equals_online_network_at_construction_with_aux_on():
    kwargs = dict(features_extractor_class=MincExtractor, features_extractor_kwargs=dict(encoder="impala", **SMALL),
                  net_arch=[])
    stock = DQN("CnnPolicy", make_vec_env("minatar:breakout", 1), seed=0, buffer_size=100, policy_kwargs=kwargs)
    for aux in ("minc", dict(target_tau=0.05), dict(mode="decoupled")):
        model = MincDQN("CnnPolicy", make_vec_env("minatar:breakout", 1), aux=aux, encoder="impala", seed=0,
                        buffer_size=100, policy_kwargs=dict(features_extractor_kwargs=SMALL))
        online = model.q_net.state_dict()
        for name, value in online.items():
            torch.testing.assert_close(model.q_net_target.state_dict()[name], value, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(stock.q_net.state_dict()[name], value, rtol=0, atol=0, msg=name)  # as SB3's
        if model.aux_learner.target is not None:
            for name, value in model.aux_extractor.state_dict().items():
                torch.testing.assert_close(model.aux_learner.target.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
def test_cnn_policy_on_a_non_image_box_is_refused_as_sb3_refuses_it(cls):
    image_env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, channel_first=True)
    env = VecNormalize(DummyVecEnv([lambda: image_env]))  # float observations
    replay = {} if cls is MincPPO else dict(buffer_size=100)
    with pytest.raises(ValueError, match=r"encoder='nature' is a CNN for images, but Box\(-10.0, 10.0, "
                                         r"\(1, 36, 36\), float32\) is not an image space as SB3 defines it") as error:
        cls("CnnPolicy", env, **replay)
    assert isinstance(error.value, AssertionError)  # what SB3's NatureCNN raises, which SB3 users catch
    with pytest.raises(AssertionError):
        (PPO if cls is MincPPO else DQN)("CnnPolicy", env, **replay)
    # as for SB3's NatureCNN, normalize_images=False means the images are normalised already
    model = small_model(cls, "CnnPolicy", env, policy_kwargs=dict(normalize_images=False,
                                                                    features_extractor_kwargs=SMALL))
    assert model.policy.features_extractor_kwargs["normalized_image"] is True
    model.learn(64)
    assert int(model.aux_learner.loss.steps) > 0


@pytest.mark.parametrize("cls", [MincPPO, MincDQN])
@pytest.mark.parametrize("observations", ["dict", "vector"])
def test_shift_augmentation_needs_image_observations(cls, observations):
    policy, env = (("MultiInputPolicy", DummyVecEnv([CountingDictEnv])) if observations == "dict"
                   else ("MlpPolicy", make_vec_env("gym:CartPole-v1", 1)))
    space = r"Dict\(" if observations == "dict" else r"Box\("
    with pytest.raises(ValueError, match=rf"aux.augment='shift' needs image observations; the observation space is "
                                         rf"{space}"):
        small_model(cls, policy, env, aux=dict(augment="shift"))


@pytest.mark.parametrize("aux", ["none", "minc"])
def test_should_stop_ends_a_dqn_update_after_its_current_gradient_step(aux):
    """minc_rl.train's Ctrl-C / SIGTERM hook: DQN's train() returns after the step at which should_stop says so."""
    model = MincDQN("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), aux=aux, learning_starts=40, batch_size=16,
                    gradient_steps=-1, seed=0)
    model.learn(64)
    updates = model._n_updates
    asked = []
    model.should_stop = lambda: asked.append(True) or len(asked) >= 2
    model.train(gradient_steps=10, batch_size=16)
    assert model._n_updates == updates + 2 and len(asked) == 2
