"""aux=selfpred (agents.selfpred) and the published agent's DQN options: K-step sequences from SB3's replay buffer
checked against the true ones, the loss against a hand computation, weight 1 as the sum of the losses, Double DQN,
the dueling head, the encoder's learning rate, MinAtar images of more than 10 channels."""

from __future__ import annotations

import copy

import gymnasium
import numpy as np
import pandas as pd
import pytest
import torch
from minc_rl.agents import AuxConfig, AuxLearner, MincDQN, MincPPO
from minc_rl.agents.auxiliary import AuxBatch
from minc_rl.agents.callback import separate_config
from minc_rl.agents.pairs import PairRolloutBuffer
from minc_rl.agents.selfpred import SequenceReplayBuffer
from minc_rl.envs import make_vec_env
from minc_rl.rl.extractor import MincExtractor
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv, VecTransposeImage
from torch.nn import functional as F
from train_cli import run_in_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBS_SPACE = gymnasium.spaces.Box(-1e6, 1e6, (3,), np.float32)
ACTIONS = gymnasium.spaces.Discrete(3)


def transitions(steps: int, n_envs: int, seed: int = 0) -> list[dict]:
    """`steps` vector-env steps of envs whose observation is (global step, env, episode) and whose episodes end at
    random (some as truncations), each with its true successor (the terminal observation at an episode's end)."""
    rng = np.random.default_rng(seed)
    episode = np.zeros(n_envs, dtype=int)
    rows = []
    for step in range(steps):
        obs = np.array([[step, env, episode[env]] for env in range(n_envs)], np.float32)
        done = rng.random(n_envs) < 0.3
        truncated = done & (rng.random(n_envs) < 0.5)
        next_obs = np.array([[step + 1, env, episode[env]] for env in range(n_envs)], np.float32)
        rows.append(dict(obs=obs, next_obs=next_obs, action=rng.integers(0, 3, n_envs), reward=rng.normal(size=n_envs),
                         done=done, infos=[{"TimeLimit.truncated": bool(t)} for t in truncated]))
        episode += done
    return rows


def filled(buffer_class: type, rows: list[dict], size: int, n_envs: int, memory: bool) -> ReplayBuffer:
    """A replay buffer of `size` rows holding `rows`, as an off-policy algorithm adds them (the observation after an
    episode's end is the next episode's first: step + 1 of the next episode, as transitions() numbers them)."""
    buffer = buffer_class(size, OBS_SPACE, ACTIONS, n_envs=n_envs, optimize_memory_usage=memory,
                          handle_timeout_termination=not memory)
    for row in rows:
        buffer.add(row["obs"], row["next_obs"], row["action"], row["reward"], row["done"], row["infos"])
    return buffer


@pytest.mark.parametrize("memory", [False, True], ids=["next_observations", "optimize_memory_usage"])
@pytest.mark.parametrize("successors_missing", [False, True])
def test_every_sampled_sequence_is_the_true_one(memory, successors_missing):
    """Buffer of 7 rows after 11 steps of 2 envs (wrapped around): each sampled row's K = 4 transitions are the ones
    that followed it in its env, masked from the first episode end on, past the newest row, and where the buffer does
    not hold the true successor (optimize_memory_usage, or an env without terminal observations)."""
    n_envs, horizon = 2, 4
    rows = transitions(11, n_envs)
    buffer = filled(SequenceReplayBuffer, rows, 7 * n_envs, n_envs, memory)  # SB3 splits buffer_size over the envs
    size = buffer.buffer_size
    checked = masked = 0
    for _ in range(20):
        samples = buffer.sample(16)
        steps = buffer.sequences(horizon, successors_missing)
        for b, (row, env) in enumerate(zip(*buffer.last_rows)):
            start = int(samples.observations[b, 0])  # the global step of this row
            assert start % size == row and samples.observations[b, 1] == env  # the env index is SB3's own
            for k in range(horizon):
                step = start + k
                real = step < len(rows) and not any(rows[s]["done"][env] for s in range(start, step))
                true_successor = not ((memory or successors_missing) and step < len(rows) and rows[step]["done"][env])
                assert bool(steps.alive[b, k]) == real
                assert bool(steps.held[b, k]) == (real and true_successor)
                if real:
                    assert steps.actions[b, k] == rows[step]["action"][env]
                    assert steps.rewards[b, k] == pytest.approx(rows[step]["reward"][env])
                if steps.held[b, k]:
                    np.testing.assert_array_equal(steps.next_observations[b, k].numpy(), rows[step]["next_obs"][env])
                    checked += 1
                masked += not bool(steps.held[b, k])
    assert checked > 100 and masked > 20  # both kinds of step were seen


def test_every_rollout_sequence_is_the_true_one():
    """MincPPO's rollout buffer (6 steps of 3 envs, episodes ending at random): every minibatch row's K = 4 transitions
    are the ones that followed it in its env, masked from the episode's end and past the rollout; the last successor
    of an episode is masked (the rollout holds no terminal observation), the one after the rollout is read from
    the observations that follow it."""
    n_steps, n_envs, horizon = 6, 3, 4
    rng = np.random.default_rng(0)
    buffer = PairRolloutBuffer(n_steps, OBS_SPACE, ACTIONS, n_envs=n_envs)
    episode, starts = np.zeros(n_envs, dtype=int), np.ones(n_envs, dtype=bool)
    table = {}  # (step, env) -> (observation, action, reward, starts a new episode)
    for step in range(n_steps + 1):
        obs = np.array([[step, env, episode[env]] for env in range(n_envs)], np.float32)
        for env in range(n_envs):
            table[step, env] = (obs[env], rng.integers(0, 3), rng.normal(), bool(starts[env]))
        if step == n_steps:
            break
        buffer.add(obs, np.array([table[step, e][1] for e in range(n_envs)]),
                   np.array([table[step, e][2] for e in range(n_envs)]), starts, torch.zeros(n_envs), torch.zeros(n_envs))
        starts = rng.random(n_envs) < 0.3
        episode += starts
    buffer.compute_returns_and_advantage(torch.zeros(n_envs), starts)
    after = np.stack([table[n_steps, env][0] for env in range(n_envs)])
    checked = masked = 0
    for minibatch in buffer.get(7):
        steps = buffer.sequences(minibatch.indices, after, horizon)
        for b, observation in enumerate(minibatch.observations):
            start, env = int(observation[0]), int(observation[1])
            for k in range(horizon):
                step = start + k
                real = step < n_steps and not any(table[s, env][3] for s in range(start + 1, step + 1))
                assert bool(steps.alive[b, k]) == real
                assert bool(steps.held[b, k]) == (real and not table[step + 1, env][3])
                if real:
                    assert steps.actions[b, k] == table[step, env][1]
                    assert steps.rewards[b, k] == pytest.approx(table[step, env][2])
                if steps.held[b, k]:
                    np.testing.assert_array_equal(steps.next_observations[b, k].numpy(), table[step + 1, env][0])
                    checked += 1
                masked += not bool(steps.held[b, k])
    assert checked > 20 and masked > 20


def test_mincppo_learns_with_selfpred_on_minatar():
    """aux=selfpred on MincPPO: a short MinAtar run logs the latent and reward losses and moves the encoder."""
    env = make_vec_env("minatar:breakout", 2, seed=0)
    model = MincPPO("CnnPolicy", env, aux=dict(name="selfpred", batch=32), n_steps=64, batch_size=64, n_epochs=2,
                    seed=0, encoder="minatar")
    weights = copy.deepcopy(model.aux_extractor.state_dict())
    model.set_logger(configure(None, ["csv"]))
    recorded = {}
    model.logger.record = lambda key, value, exclude=None: recorded.setdefault(key, []).append(value)
    model.learn(256)
    for key in ("train/aux_loss", "train/aux_latent_loss", "train/aux_reward_loss", "train/aux_rankme"):
        assert recorded[key] and np.isfinite(recorded[key]).all(), key
    assert any(not torch.equal(weights[name], value) for name, value in model.aux_extractor.state_dict().items())


def test_a_sequence_buffer_samples_as_sb3s_draw_for_draw():
    rows = transitions(11, 3)
    ours, sb3 = (filled(cls, rows, 21, 3, False) for cls in (SequenceReplayBuffer, ReplayBuffer))
    np.random.seed(5)
    first = ours.sample(32)
    state = np.random.get_state()[1].copy()
    np.random.seed(5)
    second = sb3.sample(32)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    np.testing.assert_array_equal(state, np.random.get_state()[1])  # and leaves the generator where SB3 does


def small_learner(**aux) -> tuple[AuxLearner, MincExtractor]:
    extractor = MincExtractor(OBS_SPACE, encoder="mlp", features_dim=8)
    config = AuxConfig(name="selfpred", head_hidden=16, horizon=3, **aux)
    return AuxLearner(config, extractor, OBS_SPACE, False, ACTIONS), extractor


def random_batch(batch: int = 6, horizon: int = 3, seed: int = 0) -> AuxBatch:
    generator = torch.Generator().manual_seed(seed)
    held = torch.rand(batch, horizon, generator=generator) > 0.3
    alive = held | (torch.rand(batch, horizon, generator=generator) > 0.5)
    alive[:, 0] = True
    return AuxBatch(torch.randn(batch, 3, generator=generator), torch.randn(batch, horizon, 3, generator=generator),
                    torch.arange(batch), torch.randint(0, 3, (batch, horizon), generator=generator),
                    torch.randn(batch, horizon, generator=generator), alive, held)


def hand_rollout(model, latent: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Voelcker et al.'s model written out: MLPs on [z, one-hot(a)]; predicted latents (B, K, d) and rewards (B, K)."""
    def mlp(first, action_columns, last, z, a):
        weight = torch.cat([first.weight, action_columns.weight.T], dim=1)  # the one-hot's columns
        return last(F.elu(torch.cat([z, F.one_hot(a, 3).float()], dim=1) @ weight.T + first.bias))

    latents, rewards = [], []
    for k in range(actions.shape[1]):
        if model.reward_out is not None:
            rewards.append(mlp(model.reward_in, model.reward_action, model.reward_out, latent, actions[:, k]).squeeze(1))
        latent = mlp(model.latent_in, model.latent_action, model.latent_out, latent, actions[:, k])
        latents.append(latent)
    return torch.stack(latents, 1), torch.stack(rewards, 1) if rewards else None


def test_selfpred_mse_loss_is_the_hand_computed_one():
    """MSE of the rollout against the stop-gradient online encoder's embeddings on the held steps, plus the reward
    error on the real transitions."""
    learner, extractor = small_learner()
    batch = random_batch()
    features = extractor(batch.observations)
    loss, routes = learner.batch_loss(features, batch)
    predicted, rewards = hand_rollout(learner.head, features, batch.actions)
    targets = extractor(batch.next_observations.flatten(0, 1)).view(6, 3, -1)
    expected = ((predicted - targets) ** 2).mean(-1)[batch.held].mean()
    expected = expected + ((rewards - batch.rewards) ** 2)[batch.alive].mean()
    torch.testing.assert_close(loss, expected)
    assert routes == []  # no gradient into the targets


def test_a_target_network_adds_the_k0_term():
    """With a target network of its own (EMA here), o_t's online features are pulled toward its embedding of o_t."""
    learner, extractor = small_learner(reward=False, target="ema", target_tau=0.5)
    with torch.no_grad():
        for p in learner.target.parameters():
            p.add_(torch.randn_like(p))
    batch = random_batch()
    features = extractor(batch.observations)
    loss, _ = learner.batch_loss(features, batch)
    predicted, _ = hand_rollout(learner.head, features, batch.actions)
    with torch.no_grad():
        own = learner.target(batch.observations)
        targets = learner.target(batch.next_observations.flatten(0, 1)).view(6, 3, -1)
    rows = torch.cat([(features - own).pow(2).mean(-1), ((predicted - targets) ** 2).mean(-1)[batch.held]])
    torch.testing.assert_close(loss, rows.mean())


@pytest.mark.parametrize("target", ["stop_gradient", "none"])
def test_joint_weight_one_is_the_sum_of_the_losses(target):
    """aux.weight=1 in joint mode moves the encoder by the gradient of RL loss + aux loss, as one backward of their
    sum would (Voelcker et al.); with aux.target='none' the targets' gradient reaches the encoder too."""
    learner, extractor = small_learner(weight=1.0, target=target)
    q_head = torch.nn.Linear(8, 3)
    batch = random_batch()
    reference_extractor, reference_model = copy.deepcopy(extractor), copy.deepcopy(learner.head)

    features = reference_extractor(batch.observations)
    predicted, rewards = hand_rollout(reference_model, features, batch.actions)
    targets = reference_extractor(batch.next_observations.flatten(0, 1)).view(6, 3, -1)
    targets = targets if target == "none" else targets.detach()
    aux = ((predicted - targets) ** 2).mean(-1)[batch.held].mean() + ((rewards - batch.rewards) ** 2)[batch.alive].mean()
    (q_head(features).pow(2).mean() + aux).backward()

    features = extractor(batch.observations)
    rl_features = learner.rl_view(features)
    rl_loss = q_head(rl_features).pow(2).mean()
    frozen = torch.optim.SGD([*extractor.parameters(), *q_head.parameters()], lr=0.0)
    learner.update(rl_loss, features, rl_features, batch, frozen, list(extractor.parameters()), None)
    for ours, reference in zip(extractor.parameters(), reference_extractor.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-6)


def test_selfpred_minc_uses_the_prediction_as_phi_and_logs_its_rank():
    learner, extractor = small_learner(latent_loss="minc", reward=False)
    learner.train()
    batch = random_batch(batch=32)
    loss, _ = learner.batch_loss(extractor(batch.observations), batch)
    assert torch.isfinite(loss) and learner.loss.asymmetric and not learner.loss.symmetric
    assert int(learner.loss.steps) == 1
    free, extractor = small_learner(latent_loss="minc", target="none")
    assert free.loss.symmetric  # gradient on both sides: both directions of MINC
    recorded = {}

    class Recorder:
        def record(self, key, value):
            recorded[key] = value

    learner.record(Recorder())
    assert 1.0 <= recorded["train/aux_rankme"] <= 8 and "train/aux_lambda_eig_max" in recorded


def test_double_q_values_the_online_argmax_with_the_target_network():
    env = make_vec_env("gym:CartPole-v1", 1, seed=0)
    model = MincDQN("MlpPolicy", env, aux="none", double_q=True, buffer_size=100, seed=0)
    with torch.no_grad():
        for p in model.q_net_target.parameters():
            p.copy_(torch.randn_like(p))
    observations = torch.randn(64, 4)
    with torch.no_grad():
        online, target = model.q_net(observations), model.q_net_target(observations)
        assert (online.argmax(1) != target.argmax(1)).any()  # the two rules differ on this batch
        torch.testing.assert_close(model.next_q_values(observations), target.gather(1, online.argmax(1, keepdim=True)))
        model.double_q = False
        torch.testing.assert_close(model.next_q_values(observations), target.max(1, keepdim=True)[0])


def test_dueling_head_and_the_encoders_learning_rate():
    env = make_vec_env("gym:CartPole-v1", 1, seed=0)
    model = MincDQN("MlpPolicy", env, aux="none", dueling=True, encoder_lr=1e-4, learning_rate=3e-4, buffer_size=100,
                    policy_kwargs=dict(net_arch=[16]), seed=0)
    head = model.q_net.q_net
    features = torch.randn(5, model.q_net.features_dim)
    value, advantage = head.value(features), head.advantage(features)
    torch.testing.assert_close(head(features), value + advantage - advantage.mean(1, keepdim=True))
    torch.testing.assert_close(model.q_net_target.q_net(features), head(features))  # the target starts as a copy
    encoder_group, head_group = model.policy.optimizer.param_groups
    assert {id(p) for p in encoder_group["params"]} == {id(p) for p in model.q_net.features_extractor.parameters()}
    assert {id(p) for p in head_group["params"]} == {id(p) for p in head.parameters()}
    model.lr_schedule = lambda progress: 3e-4 * progress
    model._current_progress_remaining = 0.5
    model.set_logger(configure(None, []))
    model._update_learning_rate(model.policy.optimizer)
    assert encoder_group["lr"] == pytest.approx(0.5e-4) and head_group["lr"] == pytest.approx(1.5e-4)


def test_minatar_images_of_more_than_10_channels_keep_their_layout():
    """14 distractor channels make space_invaders 20 x 10 x 10: SB3 would guess channel-last and transpose it."""
    env = make_vec_env("minatar:space_invaders", 1, seed=0, distractors={"channels": 14, "p": 0.1})
    model = MincDQN("CnnPolicy", env, aux="none", buffer_size=100)
    assert not isinstance(model.env, VecTransposeImage)
    assert model.observation_space.shape == (20, 10, 10) == model.q_net.features_extractor.input_shape
    assert model.q_net.features_extractor.encoder.conv[0].in_channels == 20
    model.predict(env.reset())


def test_selfpred_settings_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="aux.latent_loss='l1' is not valid; choose one of 'mse', 'cosine', 'minc'"):
        AuxConfig(name="selfpred", latent_loss="l1")
    with pytest.raises(ValueError, match="aux.target='none'.*built for aux=selfpred"):
        AuxConfig(name="minc", target="none")
    with pytest.raises(ValueError, match="EMA target needs its rate"):
        AuxConfig(name="selfpred", target="ema")
    with pytest.raises(ValueError, match="aux.horizon"):
        AuxConfig(name="selfpred", horizon=0)
    env = make_vec_env("gym:CartPole-v1", 1, seed=0)
    dict_env = DummyVecEnv([lambda: gymnasium.wrappers.TransformObservation(
        gymnasium.make("CartPole-v1"), lambda obs: {"state": obs}, gymnasium.spaces.Dict({"state": OBS_SPACE}))])
    with pytest.raises(ValueError, match=r"aux=selfpred rolls its latent model over image or vector observations; "
                                         r"the observation space is a Dict \(state\)"):
        MincPPO("MultiInputPolicy", dict_env, aux="selfpred")
    with pytest.raises(ValueError, match="use MincDQN or MincPPO, not the callback"):
        separate_config("selfpred")
    with pytest.raises(ValueError, match="aux.target='q_target'.*MincDQN's"):
        MincPPO("MlpPolicy", env, aux=dict(name="minc", target="q_target"))
    with pytest.raises(ValueError, match="replay_buffer_class=ReplayBuffer"):
        MincDQN("MlpPolicy", env, aux="selfpred", replay_buffer_class=ReplayBuffer)


def test_the_published_agent_trains_from_its_study_file(tmp_path, monkeypatch):
    """+study=selfpred_replication at a small size: the aux loss, its two parts and the predictions' rank are logged."""
    run_dir = tmp_path / "run"
    run_in_process(monkeypatch, "+study=selfpred_replication", "aux=selfpred", "total_steps=700",
                   "agent.learning_starts=300", "agent.batch_size=32", "agent.buffer_size=1000", "eval.every=700",
                   "eval.episodes=1", "progress_bar=false", f"hydra.run.dir={run_dir}")
    progress = pd.read_csv(run_dir / "progress.csv")
    logged = progress[["train/aux_loss", "train/aux_latent_loss", "train/aux_reward_loss", "train/aux_rankme"]]
    assert np.isfinite(logged.dropna().to_numpy()).all() and len(logged.dropna()) >= 1
    model = MincDQN.load(run_dir / "checkpoints" / "step_000000000700.zip", device="cpu")
    assert model.double_q and model.dueling and model.td_loss == "mse" and model.aux.target == "q_target"
    assert model.aux_learner.q_target is model.q_net_target.features_extractor
