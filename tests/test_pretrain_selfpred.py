"""Pretraining with latent self-prediction (loss=selfpred): the action sequences of AtariARI episodes, a real run the
probe reads, resume, the refusals, and which side of the loss the backbone's gradient comes from."""

from __future__ import annotations

import copy
import csv
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import minc_rl.envs.atariari
import minc_rl.ssl.pretraining
from minc_rl.losses.latent import LatentModel, build_latent_loss
from minc_rl.atariari.features import pretrained
from minc_rl.envs.atariari import Episodes, load_or_collect, split_episodes
from minc_rl.ssl.data import load_atari
from minc_rl.ssl.pretraining import SSLModel, _validate, compose_config, pretrain, selfpred_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES = 1100  # pong under the random agent: a 881-frame game, then part of a second (2 episodes: a held-out one)
QUIET = ["progress=false", "eval.every=1000", "eval.at_start=false", "eval.max_samples=100", "device=cpu"]


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """A frame cache holding pong's 1,100 frames of data.seed=1 (collected once for the module)."""
    cache = tmp_path_factory.mktemp("atari_frames")
    load_or_collect("pong", FRAMES, 1, cache, progress=False)
    return cache


def run(out_dir: Path, frames: Path, *overrides: str) -> dict:
    atari = ["data=atari", "data.game=pong", f"data.frames={FRAMES}", f"data.cache_dir={frames}", "loss=selfpred"]
    return pretrain(compose_config([*atari, *QUIET, *overrides]), out_dir)


def hand_built() -> Episodes:
    """Episodes of 4, 2 and 5 frames; frame i is filled with i, the action after it is i % 5 + 1, -1 after an
    episode's last frame but the data's (cut by the frame budget, its successor never seen)."""
    episode = np.repeat([0, 1, 2], [4, 2, 5])
    actions = np.arange(11) % 5 + 1
    actions[[3, 5]] = -1
    frames = np.repeat(np.arange(11, dtype=np.uint8), 6).reshape(11, 2, 3)
    return Episodes("pong", frames, np.zeros((11, 1), np.uint8), ["player_x"], episode, actions)


def test_sequences_hold_each_anchors_next_frames_and_actions_up_to_its_episodes_end(monkeypatch):
    episodes, horizon = hand_built(), 3
    monkeypatch.setattr(minc_rl.envs.atariari, "load_or_collect", lambda *args: episodes)
    data = load_atari("pong", frames=11, seed=0, val_fraction=0.33, horizon=horizon)
    train = split_episodes(3, [1 - 0.33], 0)[0]  # the 2 episodes load_atari trains on
    anchors = [t for t in range(10) if episodes.episode[t] in train and episodes.episode[t + 1] == episodes.episode[t]]
    sequences = data.sequences
    assert sequences.num_actions == 6  # pong's action set, though this data shows only actions 1..5
    assert sequences.anchors.tolist() == data.train.anchors.tolist() == anchors  # the pairs' anchors
    for i, t in enumerate(anchors):
        image, actions, successors, held = sequences[i]
        assert torch.equal(image, torch.from_numpy(episodes.frames[t])[None])
        for k in range(horizon):
            s = t + k + 1
            inside = s < 11 and episodes.episode[s] == episodes.episode[t]
            assert held[k] == inside, (t, k)
            if inside:
                assert actions[k] == episodes.actions[t + k]
                assert torch.equal(successors[k, 0], torch.from_numpy(episodes.frames[s]))
    every = [sequences[i] for i in range(len(anchors))]
    for part, batched in zip(zip(*every), sequences.__getitems__(list(range(len(anchors))))):
        assert torch.equal(torch.stack(part), batched)
    # all three episodes (val_fraction=0: all train): the ends of episode 0 (row 3), 1 (row 5) and the data (row 10)
    full = load_atari("pong", frames=11, seed=0, val_fraction=0.0, horizon=horizon).sequences
    held = {int(t): h.tolist() for t, h in zip(full.anchors, full.held)}
    assert held == {0: [True] * 3, 1: [True, True, False], 2: [True, False, False], 4: [True, False, False],
                    6: [True] * 3, 7: [True] * 3, 8: [True, True, False], 9: [True, False, False]}


@pytest.fixture(scope="module")
def selfpred_run(tmp_path_factory, frames) -> Path:
    """4 steps of loss=selfpred (defaults: mse, online target, K=5) on pong, batch 8."""
    out = tmp_path_factory.mktemp("selfpred")
    torch.set_num_threads(1)
    run(out, frames, "steps=4", "batch_size=8")
    return out


def test_a_selfpred_run_writes_a_checkpoint_and_metrics_that_the_probe_reads(selfpred_run):
    (row,) = csv.DictReader(open(selfpred_run / "metrics.csv"))
    assert int(row["step"]) == 4 and np.isfinite(float(row["loss"])) and row["probe_acc"] != ""
    checkpoint = torch.load(selfpred_run / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 4 and checkpoint["skipped"] == 0
    assert {key.split(".")[0] for key in checkpoint["model"]} == {"backbone", "latent"}  # no projection head
    assert checkpoint["model"]["latent.latent_action.weight"].shape == (6, 256)  # pong's 6 actions, 256 hidden units
    name, encode = pretrained(str(selfpred_run), progress=False)
    episodes = hand_built()
    episodes.frames = np.zeros((2, 210, 160), np.uint8)
    assert name == "selfpred" and encode(episodes, np.arange(2)).shape == (2, 256)


def test_a_stopped_selfpred_run_resumes_to_the_weights_of_an_unstopped_one(tmp_path, frames, monkeypatch):
    """MINC as the latent loss and an EMA target: Lambda, the latent model and the target resume too."""
    common = ["steps=6", "batch_size=8", "loss.latent_loss=minc", "loss.target=ema", "target_momentum=0.9"]
    run(tmp_path / "full", frames, *common)
    real_step = minc_rl.ssl.pretraining.train_step

    def signal_at_step_3(run_, *args):
        result = real_step(run_, *args)
        if run_.step == 2:  # the 3rd step: as if SIGTERM came during it
            run_.stop.signum = signal.SIGTERM
        return result

    monkeypatch.setattr(minc_rl.ssl.pretraining, "train_step", signal_at_step_3)
    summary = run(tmp_path / "stopped", frames, *common)
    monkeypatch.undo()
    assert (summary["interrupted"], summary["steps"]) == ("SIGTERM", 3)
    run(tmp_path / "stopped", frames, *common, f"resume={tmp_path / 'stopped'}")
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == full["step"] == 6
    assert any(key.startswith("latent.") for key in full["model"]) and int(full["loss"]["steps"]) == 6
    for part in ("model", "target", "loss", "optimizer"):
        torch.testing.assert_close(resumed[part], full[part], rtol=0, atol=0)


@pytest.mark.parametrize("data", ["digits", "procgen", "cifar10", "imagefolder"])
def test_selfpred_on_data_without_actions_is_refused_before_anything_is_loaded(tmp_path, monkeypatch, data):
    def load_data(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(minc_rl.ssl.pretraining, "load_data", load_data)
    cfg = compose_config([f"data={data}", "loss=selfpred", *QUIET])
    with pytest.raises(ValueError) as refused:
        pretrain(cfg, tmp_path)
    assert str(refused.value) == ("loss=selfpred rolls its latent model along the data's actions: it needs "
                                  f"data=atari; data={data} has no actions")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["loss.target=ema"], 1, "loss.target=ema and target_momentum=None: an EMA target needs its momentum"),
        (["target_momentum=0.99"], 1, "loss.target=online and target_momentum=0.99: an EMA target needs"),
        (["loss.target=q_target"], 1, "loss.target='q_target' is not valid; choose one of 'online', 'ema', 'none'"),
        (["loss.latent_loss=l1"], 1, "loss.latent_loss='l1' is not valid; choose one of 'mse', 'cosine', 'minc'"),
        (["loss.horizon=0"], 1, "loss.horizon must be an integer >= 1; got 0"),
        ([], 2, "loss=selfpred runs in one process .*got 2 torchrun processes"),
    ],
)
def test_bad_selfpred_options_and_torchrun_are_refused(overrides, world, message):
    cfg = compose_config(["data=atari", "loss=selfpred", "batch_size=64", *overrides])
    with pytest.raises(ValueError, match=message):
        _validate(cfg, world)


def tiny_run(target: str) -> SimpleNamespace:
    """What selfpred_loss reads of a Run, for 2x3 frames: a linear backbone to 4 features, the latent model, MSE."""
    overrides = [f"loss.target={target}", *(["target_momentum=0.5"] if target == "ema" else []), "device=cpu"]
    cfg = compose_config(["data=atari", "loss=selfpred", "loss.horizon=3", *overrides])
    torch.manual_seed(0)
    model = SSLModel(nn.Sequential(nn.Flatten(), nn.Linear(6, 4)), nn.Identity(), LatentModel(4, 6, 5, reward=False))
    target_model = copy.deepcopy(model).requires_grad_(False) if target == "ema" else None
    if target_model is not None:
        nn.init.normal_(target_model.backbone[1].weight)  # an EMA copy that has drifted from the online weights
    return SimpleNamespace(cfg=cfg, device=torch.device("cpu"), model=model, train_model=model, target=target_model,
                           loss_fn=build_latent_loss("mse", 4, 4, 0.2, target_has_gradient=target == "none"))


@pytest.mark.parametrize("target", ["online", "none", "ema"])
def test_the_backbones_gradient_comes_from_the_target_side_only_with_target_none(monkeypatch, target):
    """The backbone's gradient against a hand computation: predictions from o_t's features; the targets o_t+k (and o_t
    under ema) detached for online and ema, through the backbone for none."""
    monkeypatch.setattr(minc_rl.envs.atariari, "load_or_collect", lambda *args: hand_built())
    sequences = load_atari("pong", frames=11, seed=0, val_fraction=0.0, horizon=3).sequences
    images, actions, successors, held = batch = sequences.__getitems__([0, 2, 3, 7])  # one ends at once, one runs on
    tiny = tiny_run(target)
    loss, features = selfpred_loss(tiny, *batch)
    weight = tiny.model.backbone[1].weight
    (gradient,) = torch.autograd.grad(loss, weight)

    backbone, float_images, float_successors = tiny.model.backbone, images.float() / 255, successors[held].float() / 255
    z = backbone(float_images)
    predictions = tiny.model.latent.rollout(z, actions)[held]
    if target == "ema":
        predictions = torch.cat([z, predictions])
        targets = tiny.target.backbone(torch.cat([float_images, float_successors]))
    else:
        targets = backbone(float_successors)
    (online_side,) = torch.autograd.grad((predictions - targets.detach()).pow(2).mean(), weight, retain_graph=True)
    (both_sides,) = torch.autograd.grad((predictions - targets).pow(2).mean(), weight)
    torch.testing.assert_close(gradient, both_sides if target == "none" else online_side)
    if target != "ema":  # through the online backbone, the target side has a gradient of its own
        assert not torch.allclose(online_side, both_sides)
    torch.testing.assert_close(features, z)
