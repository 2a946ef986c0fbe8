"""The joint aux step's gradients (issue 40): one backward pass through the heads and one through the encoder give
what two backward passes and the rescaled sum gave, for every pair kind and both agents."""

from __future__ import annotations

import copy

import pytest
import torch
from minc_rl.agents import MincDQN, MincPPO
from minc_rl.agents.auxiliary import AuxBatch
from minc_rl.envs import make_vec_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_gradients(learner, extractor, q_head, batch, observations, share):
    """The two-backward reference: g_rl and g_aux at the encoder's output, s = share / (1 - share) ||g_rl|| / ||g_aux||,
    and the encoder's gradient of g_rl + s g_aux; the heads' gradients from their own losses."""
    features = extractor(observations)
    rl_features = features.detach().requires_grad_(True)
    q_head(rl_features).pow(2).mean().backward()
    aux_input = features[batch.rows].detach().requires_grad_(True)
    learner.pair_loss(aux_input, batch.next_observations, batch.actions).backward()
    scale = share / (1 - share) * rl_features.grad.norm() / aux_input.grad.norm()
    parameters = list(extractor.parameters())
    rl_part = torch.autograd.grad(features, parameters, rl_features.grad, retain_graph=True)
    aux_part = torch.autograd.grad(features[batch.rows], parameters, scale * aux_input.grad)
    return [a + b for a, b in zip(rl_part, aux_part)]


@pytest.mark.parametrize("agent", [MincDQN, MincPPO])
@pytest.mark.parametrize("pairs", ["state", "state_action"])
def test_joint_step_gradients_equal_the_two_backward_reference(agent, pairs):
    env = make_vec_env("gym:CartPole-v1", 1, seed=0)
    extra = dict(buffer_size=100) if agent is MincDQN else dict(n_steps=16, batch_size=16)
    model = agent("MlpPolicy", env, aux=dict(pairs=pairs, share=0.3, dim=8, head_hidden=16, max_grad_norm=1e9),
                  seed=0, **extra)
    learner, extractor = model.aux_learner, model.aux_extractor
    learner.train()
    q_head = torch.nn.Linear(extractor.features_dim, 2)
    generator = torch.Generator().manual_seed(0)
    observations = torch.randn(24, 4, generator=generator)
    batch = AuxBatch(observations[4:20], torch.randn(16, 4, generator=generator), torch.arange(4, 20),
                     torch.randint(0, 2, (16, 1), generator=generator))
    reference = copy.deepcopy((learner, extractor, q_head))
    expected_encoder = reference_gradients(*reference, batch, observations, share=0.3)

    features = extractor(observations)
    rl_features = learner.rl_view(features)
    rl_loss = q_head(rl_features).pow(2).mean()
    frozen = torch.optim.SGD([*extractor.parameters(), *q_head.parameters()], lr=0.0)
    learner.update(rl_loss, features, rl_features, batch, frozen, list(extractor.parameters()), None)
    for ours, expected in zip(extractor.parameters(), expected_encoder):
        torch.testing.assert_close(ours.grad, expected, rtol=1e-6, atol=1e-6)
    for ours, expected in zip([*learner.parameters(), *q_head.parameters()],
                              [*reference[0].parameters(), *reference[2].parameters()]):
        if expected.grad is not None:
            torch.testing.assert_close(ours.grad, expected.grad, rtol=1e-6, atol=1e-6)
