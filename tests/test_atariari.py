"""AtariARI (issue 41): the paper's label dictionary and categories, labels against the rendered frame, the probe
protocol on a hand-built set, the batched probes against one probe per label, the scores against a hand computation,
the frame cache, and a whole probe run (pretrained and agent encoders) on real ALE frames."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minc_rl.atariari.probes import LinearProbes, label_scores, summarize
from minc_rl.atariari.protocol import prepare
from minc_rl.atariari.run import compose_config, method_names, probe
from minc_rl.envs.atariari import (
    ATARIARI_LABELS, Episodes, cache_path, cache_key, collect, game_labels, label_categories, load_or_collect,
)  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parent.parent


def test_the_label_dictionary_is_the_papers():
    """dacd816's atari_dict: 22 games, 308 labels once lists are split, a few entries checked by hand."""
    assert len(ATARIARI_LABELS) == 22
    assert sum(map(len, ATARIARI_LABELS.values())) == 308
    assert game_labels("pong") == {"player_y": 51, "enemy_y": 50, "ball_x": 49, "ball_y": 54, "enemy_score": 13,
                                   "player_score": 14}  # fmt: skip
    assert game_labels("breakout")["block_bit_map_29"] == 29
    assert game_labels("berzerk")["player_score_2"] == 95 and game_labels("privateeye")["clock_1"] == 69
    with pytest.raises(ValueError, match="unknown AtariARI game 'pongg'; valid games: asteroids, berzerk"):
        game_labels("pongg")


def test_categories_follow_the_papers_rules():
    """categorization.py's word rules: missiles and balls are small objects, player/agent the agent, other
    coordinates other objects; a name may fall into two categories."""
    assert label_categories("ball_x") == ["small_object_localization"]
    assert label_categories("player_missile_x1") == ["small_object_localization"]
    assert label_categories("player_y") == ["agent_localization"]
    assert label_categories("agent_x") == ["agent_localization"]
    assert label_categories("enemy_car_x_3") == ["other_localization"]
    assert label_categories("player_score") == ["score_clock_lives_display"]
    assert label_categories("block_bit_map_0") == ["misc"]
    assert label_categories("num_lives_direction") == ["score_clock_lives_display", "misc"]
    assert all(label_categories(name) for labels in ATARIARI_LABELS.values() for name in labels)


def test_pongs_enemy_paddle_label_is_where_the_frame_shows_it():
    """RAM byte 50 (enemy_y) is the last row of the left paddle (gray 148 in columns 16-19) in every frame that shows
    it whole (16 rows; a moving paddle is longer under the max-pool); checked on a random agent's frames."""
    episodes = collect("pong", 300, seed=0, progress=False)
    enemy_y = episodes.labels[:, episodes.label_names.index("enemy_y")]
    checked = 0
    for frame, label in zip(episodes.frames, enemy_y):
        rows = np.flatnonzero((frame[34:194, 16:20] == 148).all(axis=1)) + 34
        if len(rows) == 16 and rows[-1] - rows[0] == 15:
            assert rows[-1] == label
            checked += 1
    assert checked > 100


def hand_built() -> Episodes:
    """12 episodes: two of 3 frames (dropped by min_episode_length=4), ten of 10; every episode starts with the same
    frame (a duplicate wherever it lands), the other frames are distinct. Labels: `steady` one value (entropy 0),
    `rare` a 9:1 split (0.33 nats), `busy` 4 values equally often (ln 4)."""
    lengths = [3, 10, 10, 3, *[10] * 8]
    episode = np.repeat(np.arange(len(lengths)), lengths)
    frames = np.zeros((len(episode), 210, 160), np.uint8)
    for row in range(len(episode)):
        if row and episode[row] == episode[row - 1]:
            frames[row].flat[:2] = (row % 256, row // 256 + 1)
    rows = np.arange(len(episode))
    labels = np.stack([np.full(len(episode), 7), (rows % 10 == 0) * 3, rows % 4], axis=1).astype(np.uint8)
    return Episodes("hand", frames, labels, ["steady", "rare", "busy"], episode, -np.ones(len(episode), np.int64))


def test_the_protocol_on_a_hand_built_set():
    """Short episodes and low-entropy labels are dropped, the 70/10/20 split keeps episodes whole, and the test frames
    that train or validation also show are removed."""
    episodes = hand_built()
    data = prepare(episodes, seed=0, min_episode_length=4, entropy_threshold=0.6)
    assert data.labels == ["busy"]
    assert data.entropy["steady"] == 0.0 and math.isclose(data.entropy["busy"], math.log(4))
    assert 0.3 < data.entropy["rare"] < 0.6
    parts = [set(episodes.episode[rows]) for rows in (data.train, data.val)]
    assert data.episodes == {"train": 7, "val": 1, "test": 2} and list(map(len, parts)) == [7, 1]
    assert len(data.train) == 70 and len(data.val) == 10
    assert data.duplicates == 2 and len(data.test) == 18  # each test episode's first frame is also in train
    test = set(episodes.episode[data.test])
    assert len(test) == 2 and not test & (parts[0] | parts[1]) and not {0, 3} & (test | parts[0] | parts[1])
    with pytest.raises(ValueError, match="longer than min_episode_length=10"):
        prepare(episodes, seed=0, min_episode_length=10, entropy_threshold=0.6)


def test_weighted_f1_and_the_category_means_against_a_hand_computation():
    """F1 per class (0: 1/2, 1: 2/3, 2: 1) weighted by support (2, 3, 1) is 2/3; the game's score is the mean of its
    category means, a label counting in each of its categories (num_lives_direction in two)."""
    true = np.array([[0, 5], [0, 5], [1, 5], [1, 6], [1, 6], [2, 6]])
    predicted = np.array([[0, 5], [1, 5], [1, 5], [1, 5], [0, 6], [2, 6]])
    scores = label_scores(predicted, true, ["player_x", "num_lives_direction"])
    assert math.isclose(scores["player_x"]["f1"], 2 / 3) and math.isclose(scores["player_x"]["accuracy"], 4 / 6)
    lives = (3 * 6 / 7 + 3 * 0.8) / 6  # class 5: p 3/4, r 1, F1 6/7; class 6: p 1, r 2/3, F1 0.8
    assert math.isclose(scores["num_lives_direction"]["f1"], lives)
    scores["ball_y"] = {"f1": 0.1, "accuracy": 0.2}
    summary = summarize(scores)
    assert set(summary["categories"]) == {"small_object_localization", "agent_localization",
                                          "score_clock_lives_display", "misc"}  # fmt: skip
    assert math.isclose(summary["f1"], (0.1 + 2 / 3 + lives + lives) / 4)
    assert math.isclose(summary["label_mean_f1"], (0.1 + 2 / 3 + lives) / 3)


def test_the_batched_probes_train_as_one_probe_per_label():
    """Two labels with their own learning rates, the second stopped after three steps: every block of the batched
    weights equals an nn.Linear trained by its own torch Adam (eps 1e-5) on the same batches."""
    generator = torch.Generator().manual_seed(0)
    probes = LinearProbes(5, 2, 1e-2, generator)
    probes.lr = torch.tensor([1e-2, 3e-3])
    separate = []
    for label in range(2):
        linear = nn.Linear(5, 256)
        columns = slice(label * 256, (label + 1) * 256)
        with torch.no_grad():
            linear.weight.copy_(probes.weight[:, columns].T)
            linear.bias.copy_(probes.bias[columns])
        separate.append((linear, torch.optim.Adam(linear.parameters(), lr=float(probes.lr[label]), eps=1e-5)))
    for step in range(6):
        x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 256, (8, 2), generator=generator)
        active = torch.tensor([1.0, float(step < 3)])
        probes.step(x, y, active)
        for label, (linear, optimizer) in enumerate(separate):
            if active[label]:
                optimizer.zero_grad()
                nn.functional.cross_entropy(linear(x), y[:, label]).backward()
                optimizer.step()
    for label, (linear, _) in enumerate(separate):
        columns = slice(label * 256, (label + 1) * 256)
        torch.testing.assert_close(probes.weight[:, columns].T, linear.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probes.bias[columns], linear.bias, rtol=1e-5, atol=1e-6)


def test_the_frame_cache_is_reused_and_invalidated_by_a_setting(tmp_path):
    """The same settings read the cache; other settings are another file; a file whose stored settings differ from
    its name's (an older protocol) is collected again and replaced."""
    first = load_or_collect("pong", 40, 0, tmp_path, progress=False)
    path = cache_path(tmp_path, cache_key("pong", 40, 0))
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    written = path.stat().st_mtime_ns
    again = load_or_collect("pong", 40, 0, tmp_path, progress=False)
    assert path.stat().st_mtime_ns == written and np.array_equal(again.frames, first.frames)
    load_or_collect("pong", 40, 1, tmp_path, progress=False)
    assert len(list(tmp_path.glob("pong-40-seed1-*.npz"))) == 1
    with open(path, "wb") as file:
        np.savez(file, key=json.dumps({"protocol": "older"}), frames=first.frames[:1], labels=first.labels[:1],
                 episode=first.episode[:1], actions=first.actions[:1])  # fmt: skip
    renewed = load_or_collect("pong", 40, 0, tmp_path, progress=False)
    assert len(renewed) == 40 and np.array_equal(renewed.labels, first.labels)
    with np.load(path) as saved:
        assert json.loads(str(saved["key"])) == cache_key("pong", 40, 0)


def test_a_bad_setting_is_one_line_before_anything_is_collected(tmp_path):
    with pytest.raises(ValueError, match="unknown AtariARI game 'pongg'; valid games: asteroids"):
        probe(compose_config(["game=pongg"]), tmp_path)
    with pytest.raises(ValueError, match="frames must be an integer >= 1"):
        probe(compose_config(["frames=0"]), tmp_path)
    with pytest.raises(ValueError, match="encoder=.*no pretraining checkpoint"):
        probe(compose_config([f"encoder={tmp_path / 'none'}"]), tmp_path)
    with pytest.raises(ValueError, match="name= names the one probed encoder; this run probes 2"):
        probe(compose_config([f"agent=[{tmp_path / 'a'},{tmp_path / 'b'}]", "name=mine"]), tmp_path)
    with pytest.raises(ValueError, match=r"agent=\[\] must be a run dir or a list of run dirs"):
        probe(compose_config(["agent=[]"]), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_probed_encoders_are_named_by_their_loss_and_told_apart_by_their_folder():
    named = [("runs/a/seed0", "agent-none"), ("runs/b/seed0", "agent-minc"), ("runs/c/seed1", "agent-minc")]
    assert method_names(named) == ["agent-none", "agent-minc (seed0)", "agent-minc (seed1)"]
    assert method_names([("runs/a", "minc")], "mine") == ["mine"]
    assert method_names([("runs/x/minc", "random-cnn")]) == ["random-cnn (minc)"]  # never a baseline's column
    with pytest.raises(ValueError, match=r"both called 'minc \(seed0\)' \(one is other/seed0\)"):
        method_names([("runs/seed0", "minc"), ("other/seed0", "minc")])


def tiny_probe(tmp_path: Path, *overrides: str) -> dict:
    """A probe run on 1,200 breakout frames (short lives: many episodes), two epochs."""
    cfg = compose_config(["game=breakout", "frames=1200", "min_episode_length=0", "probe.epochs=2", "progress=false",
                          f"cache_dir={tmp_path / 'frames'}", *overrides])  # fmt: skip
    return probe(cfg, tmp_path / "probe")


@pytest.mark.slow
def test_a_tiny_probe_run_writes_its_table_and_json(tmp_path):
    """The baselines and a pretrained encoder (minc_rl.pretrain data=atari, the paper's encoder, 2 steps) in one run:
    probe.json's methods, labels and data, and table.md's layout."""
    from minc_rl.ssl.pretraining import compose_config as pretrain_config, pretrain

    pretrain(pretrain_config(["data=atari", "data.game=breakout", "data.frames=1200", f"data.cache_dir={tmp_path / 'frames'}",
                              "loss=minc", "steps=2", "eval.at_start=false", "eval.max_samples=64", "progress=false",
                              "device=cpu"]), tmp_path / "pretrain")  # fmt: skip
    summary = tiny_probe(tmp_path, f"encoder={tmp_path / 'pretrain'}")
    written = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert list(written["methods"]) == ["majority", "random-cnn", "minc"]
    assert written["data"]["frames"] == 1200 and written["data"]["labels"] == summary["data"]["labels"]
    for result in written["methods"].values():
        assert set(result["labels"]) == set(written["data"]["labels"]) and 0 <= result["f1"] <= 1
    assert set(written["data"]["dropped_labels"]) | set(written["data"]["labels"]) == set(game_labels("breakout"))
    table = (tmp_path / "probe" / "table.md").read_text()
    assert "| category | majority | random-cnn | minc |" in table and "**breakout** (mean of categories)" in table
    # minc_rl.linear_eval on the same checkpoint: its crops are the whole 210x160 frame, not a 160x160 square
    done = subprocess.run([sys.executable, "-m", "minc_rl.linear_eval", f"checkpoint={tmp_path / 'pretrain'}", "epochs=1",
                           "progress=false", "device=cpu", f"hydra.run.dir={tmp_path / 'linear_eval'}"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert 0 <= json.loads((tmp_path / "linear_eval" / "linear_eval.json").read_text())["val_top1"] <= 1


@pytest.mark.slow
def test_an_agents_encoder_is_probed_through_its_own_preprocessing(tmp_path):
    """A tiny minc_rl.train PPO run on atari:Breakout (a greedy DQN at its first steps may never serve the ball, so
    its evaluation episode would not end), probed with agent=<run dir>; and the agent's observations built
    from the stored frames equal SB3's AtariWrapper's on the same actions."""
    import cv2
    from stable_baselines3.common.atari_wrappers import AtariWrapper

    from minc_rl.atariari.features import agent_observations
    from minc_rl.envs.atariari import grayscale, make_ale_env
    from minc_rl.envs.quiet import make_gymnasium_env

    ours, theirs = make_ale_env("breakout", 3), AtariWrapper(make_gymnasium_env("BreakoutNoFrameskip-v4"), clip_reward=False)
    frame, observation = ours.reset(seed=3)[0], theirs.reset(seed=3)[0]
    for action in [1, 2, 3, 1, 2, 2, 3]:
        assert np.array_equal(cv2.resize(grayscale(frame), (84, 84), interpolation=cv2.INTER_AREA), observation[..., 0])
        frame, observation = ours.step(action)[0], theirs.step(action)[0]
    stacked = agent_observations(np.arange(5)[:, None, None].repeat(210, 1).repeat(160, 2).astype(np.uint8),
                                 np.array([0, 0, 1, 1, 1]), np.array([1, 4]), 84, 4)  # fmt: skip
    assert [stacked[0, :, 0, 0].tolist(), stacked[1, :, 0, 0].tolist()] == [[0, 0, 0, 1], [0, 2, 3, 4]]
    run_dir = tmp_path / "agent"
    command = [sys.executable, "-m", "minc_rl.train", "env=atari:Breakout", "agent=ppo", "aux=none", "total_steps=32",
               "n_envs=1", "agent.n_steps=32", "agent.n_minibatches=2", "agent.n_epochs=1", "eval.episodes=1",
               "health.every=0", "progress_bar=false", "device=cpu", "torch_threads=1", f"hydra.run.dir={run_dir}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    written = tiny_probe(tmp_path, f"agent={run_dir}")
    assert list(written["methods"]) == ["majority", "random-cnn", "agent-none"]
    assert written["methods"]["agent-none"]["source"] == str(run_dir)
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)  # the same weights under another folder: probed side by side, scored alike
    both = tiny_probe(tmp_path, f"agent=[{run_dir},{twin}]")["methods"]
    assert list(both) == ["majority", "random-cnn", "agent-none (agent)", "agent-none (twin)"]
    assert both["agent-none (agent)"]["labels"] == both["agent-none (twin)"]["labels"]
    with pytest.raises(ValueError, match="trained on env=atari:Breakout; this probe's game is pong"):
        probe(compose_config(["game=pong", f"agent={run_dir}"]), tmp_path / "other")
