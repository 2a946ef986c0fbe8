"""MincDQN's aux pairs: from the TD batch (aux.source="td") or drawn apart ("replay"), and only true successors."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from minc_rl import MincAuxCallback, MincExtractor
from minc_rl.agents import AuxConfig, MincDQN, MincPPO
from minc_rl.envs import make_vec_env
from stable_baselines3 import DQN
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import DummyVecEnv
from test_agents import spy_on_aux_batches

SMALL_AUX = dict(dim=16, head_hidden=32)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingEnv(gymnasium.Env):
    """Observation (t, episode): t counts the episode's steps, episodes end (terminate) after `length` steps."""

    observation_space = gymnasium.spaces.Box(-1e6, 1e6, (2,), np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def __init__(self, length: int = 3) -> None:
        self.length, self.episode, self.t = length, -1, 0

    def _obs(self) -> np.ndarray:
        return np.array([self.t, self.episode], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        return self._obs(), float(action), self.t == self.length, False, {}


class NoTerminalObservation(DummyVecEnv):
    """A VecEnv that, like procgen's, keeps no terminal_observation at an episode's end."""

    def step_wait(self):  # noqa: ANN201
        observations, rewards, dones, infos = super().step_wait()
        for info in infos:
            info.pop("terminal_observation", None)
        return observations, rewards, dones, infos


def counting_dqn(aux: dict | str, vec_env_class: type = DummyVecEnv, **kwargs) -> MincDQN:
    aux = aux if isinstance(aux, str) else {**SMALL_AUX, **aux}
    return MincDQN("MlpPolicy", vec_env_class([CountingEnv]), aux=aux, learning_starts=24, batch_size=16,
                   buffer_size=1000, train_freq=4, seed=0, **kwargs)


def spy_on_samples(model: MincDQN) -> list:
    """Record every replay sample the model draws."""
    samples, sample = [], model.replay_buffer.sample

    def spy(*args, **kwargs):
        samples.append(sample(*args, **kwargs))
        return samples[-1]

    model.replay_buffer.sample = spy
    return samples


def quiet(model: MincDQN) -> MincDQN:
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def test_td_pairs_are_exactly_the_td_batchs_transitions():
    """A replay buffer filled by hand with o_t = (t, 0), o_t+1 = (t + 1, 0): each aux batch is the TD sample itself,
    rows 0..B-1 of the Q forward, and nothing else is drawn."""
    model = quiet(counting_dqn(dict(source="td")))
    for t in range(50):
        model.replay_buffer.add(np.array([[t, 0]], np.float32), np.array([[t + 1, 0]], np.float32),
                                np.array([[t % 2]]), np.array([1.0]), np.array([False]), [{}])
    samples, batches = spy_on_samples(model), spy_on_aux_batches(model)
    model.train(gradient_steps=3, batch_size=16)

    assert len(samples) == len(batches) == 3  # one draw per gradient step: the TD batch
    for sample, batch in zip(samples, batches):
        torch.testing.assert_close(batch.observations, sample.observations, rtol=0, atol=0)
        torch.testing.assert_close(batch.next_observations, sample.next_observations, rtol=0, atol=0)
        torch.testing.assert_close(batch.actions, sample.actions, rtol=0, atol=0)
        torch.testing.assert_close(batch.rows, torch.arange(16))
        torch.testing.assert_close(batch.next_observations[:, 0] - batch.observations[:, 0], torch.ones(16))
    assert model.aux_learner.pairs == [16, 16, 16] and model.aux_learner.masked == 0


def test_td_pairs_at_share_zero_are_plain_dqn_update_for_update():
    """No extra draw from numpy's RNG, and a zero aux gradient: the same seed gives the same run as aux='none' (so
    same-seed arms are paired runs)."""
    def run(aux):
        env = make_vec_env("gym:CartPole-v1", 1)
        return MincDQN("MlpPolicy", env, aux=aux, learning_starts=50, batch_size=32, train_freq=2,
                       target_update_interval=50, seed=0).learn(300)

    plain, td = run("none"), run(dict(source="td", share=0.0, **SMALL_AUX))
    assert td._n_updates == plain._n_updates > 100 and int(td.aux_learner.loss.steps) == td._n_updates
    for (name, theirs), mine in zip(plain.policy.state_dict().items(), td.policy.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(td.replay_buffer.actions, plain.replay_buffer.actions)


@pytest.mark.parametrize("source, grad_rows", [("td", [16]), ("replay", [16 + 24])])
def test_td_pairs_take_no_extra_forward_with_gradient(source, grad_rows):
    """The online encoder runs once with gradient per step (td: the TD batch alone) and once without (o_t+1)."""
    aux = dict(source=source, **({"batch": 24} if source == "replay" else {}))
    model = quiet(counting_dqn(aux))
    model.learn(64)
    calls = []
    model.aux_extractor.register_forward_hook(lambda m, i, o: calls.append((torch.is_grad_enabled(), len(o))))
    model.train(gradient_steps=1, batch_size=16)
    assert [rows for grad, rows in calls if grad] == grad_rows
    assert [rows for grad, rows in calls if not grad] == [16 if source == "td" else 24]


def pairs_are_successors(batch) -> torch.Tensor:
    """Whether each pair's o_t+1 follows its o_t in the same episode (CountingEnv)."""
    o, n = batch.observations, batch.next_observations
    return (n[:, 0] == o[:, 0] + 1) & (n[:, 1] == o[:, 1])


@pytest.mark.parametrize(
    "source, vec_env_class, memory, masks",
    [
        ("td", DummyVecEnv, True, True),  # the next episode's first observation overwrote the successor's slot
        ("replay", DummyVecEnv, True, True),
        ("td", NoTerminalObservation, False, True),  # procgen: the buffer stored the next episode's first frame
        ("td", DummyVecEnv, False, False),  # terminal_observation is the true successor: the end's pair is kept
    ],
)
def test_pairs_whose_successor_the_buffer_lacks_are_left_out(source, vec_env_class, memory, masks):
    kwargs = dict(optimize_memory_usage=True, replay_buffer_kwargs=dict(handle_timeout_termination=False)) if memory else {}
    model = counting_dqn(dict(source=source), vec_env_class, **kwargs)
    samples, batches = spy_on_samples(model), spy_on_aux_batches(model)
    model.learn(120)
    aux_samples = samples[1::2] if source == "replay" else samples
    ends = sum(int(sample.dones.sum()) for sample in aux_samples)
    assert ends > 10 and model.successors_missing == (vec_env_class is NoTerminalObservation)
    assert all(bool(pairs_are_successors(batch).all()) for batch in batches)  # what reaches the loss is true
    kept = sum(len(batch.rows) for batch in batches)
    assert kept == sum(len(sample.dones) for sample in aux_samples) - (ends if masks else 0)


def test_callback_leaves_out_pairs_across_episode_ends_too():
    model = DQN("MlpPolicy", DummyVecEnv([CountingEnv]), learning_starts=24, batch_size=16, buffer_size=1000,
                optimize_memory_usage=True, replay_buffer_kwargs=dict(handle_timeout_termination=False), seed=0,
                policy_kwargs=dict(features_extractor_class=MincExtractor, net_arch=[]))
    callback = MincAuxCallback(dict(batch=32, **SMALL_AUX), gradient_steps=2)
    model.learn(120, callback=callback)
    o, n, _ = callback._sample_pairs()
    assert bool(((n[:, 0] == o[:, 0] + 1) & (n[:, 1] == o[:, 1])).all()) and len(o) < 32
    assert callback.learner.masked > 0


def test_a_resumed_td_pairs_model_continues_identically(tmp_path):
    """save + load_replay_buffer restore every piece of state the next updates read (given the same RNG state)."""
    model = quiet(counting_dqn(dict(source="td", target_tau=0.1), NoTerminalObservation))
    model.learn(96)
    model.save(tmp_path / "model.zip")
    model.save_replay_buffer(tmp_path / "replay.pkl")
    loaded = quiet(MincDQN.load(tmp_path / "model.zip", env=NoTerminalObservation([CountingEnv])))
    loaded.load_replay_buffer(tmp_path / "replay.pkl")
    assert loaded.aux == AuxConfig(source="td", target_tau=0.1, **SMALL_AUX) and loaded.successors_missing
    for agent in (model, loaded):
        np.random.seed(1)
        torch.manual_seed(1)
        agent.train(gradient_steps=5, batch_size=16)
    assert loaded.aux_learner.masked == model.aux_learner.masked > 0
    for (name, before), after in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        torch.testing.assert_close(after, before, rtol=0, atol=0, msg=name)
    for (name, before), after in zip(model.aux_learner.state_dict().items(), loaded.aux_learner.state_dict().values()):
        torch.testing.assert_close(after, before, rtol=0, atol=0, msg=name)


def test_aux_source_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"aux.source='batch' is not valid; choose one of 'replay', 'td'"):
        AuxConfig(source="batch")
    with pytest.raises(ValueError, match=r"aux.batch=64 sets the count of replay pairs; with aux.source='td'"):
        AuxConfig(source="td", batch=64)
    for source in ("td", "replay"):  # PPO's pairs come from its own minibatch: no setting of aux.source applies
        with pytest.raises(ValueError, match=rf"aux.source='{source}' picks where MincDQN's pairs come from \(its TD "
                                             r"batch or the replay buffer\); MincPPO takes them from its own minibatch"):
            MincPPO("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), aux=dict(source=source))
    with pytest.raises(ValueError, match=r"aux.source='td' needs MincDQN's TD batch; the callback"):
        MincAuxCallback(dict(source="td"))
    with pytest.raises(ValueError, match=r"n_steps=3: the n-step buffer's next_observations are o_t\+n"):
        MincDQN("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), aux=dict(source="td"), n_steps=3)
    MincDQN("MlpPolicy", make_vec_env("gym:CartPole-v1", 1), aux="none", n_steps=3)  # plain n-step DQN stays SB3's


def test_td_pairs_are_dqns_default_and_the_other_agents_keep_their_own(tmp_path):
    """Issue 24's rule made aux.source='td' MincDQN's default: an unset source becomes 'td' in MincDQN (at
    construction and in load(aux=...)), and stays unset for MincPPO and the callback, which take pairs of their own."""
    env = make_vec_env("gym:CartPole-v1", 1)
    dqn = MincDQN("MlpPolicy", env, aux=dict(SMALL_AUX), learning_starts=16, batch_size=16, seed=0)
    assert AuxConfig().source is None and dqn.aux == AuxConfig(source="td", **SMALL_AUX)
    batches = spy_on_aux_batches(quiet(dqn))
    dqn.learn(48)
    assert batches and all(len(batch.rows) == 16 for batch in batches)  # the TD batch's own rows
    assert MincPPO("MlpPolicy", env, aux="minc").aux.source is None
    assert MincAuxCallback("minc").config.source is None
    assert MincDQN("MlpPolicy", env, aux=dict(source="replay", batch=64)).aux.source == "replay"
    dqn.save(tmp_path / "model.zip")
    assert MincDQN.load(tmp_path / "model.zip", aux=dict(SMALL_AUX, share=0.1)).aux.source == "td"
    with pytest.raises(ValueError, match=r"aux.batch=64 sets the count of replay pairs; with aux.source='td' \(MincDQN's "
                                         r"default\) .* or set aux.source='replay'"):
        MincDQN("MlpPolicy", env, aux=dict(batch=64))
