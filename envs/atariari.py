"""AtariARI's labelled Atari frames (Anand et al., "Unsupervised State Representation Learning in Atari", NeurIPS
2019): the RAM annotations of 22 games, their five categories, and frames of a random agent with the RAM bytes that
label them, collected by ale-py's own emulator and kept in a cache keyed by their settings.

The annotations are the paper's: `atari_dict` of atariari/benchmark/ram_annotations.py at commit dacd816 of
mila-iqia/atari-representation-learning (22 games, 308 labels once the lists are split into one label per index;
later commits added labels, e.g. pong's player_x). The categories follow that commit's categorization.py: a label
belongs to a category by the words in its name, and may belong to two (asteroids' num_lives_direction).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minc_rl.common.checks import check_int
from minc_rl.common.io import atomic_write

# game -> label -> RAM index, or a list of indices (one label <name>_<i> each), as dacd816's atari_dict writes them
_ANNOTATIONS: dict[str, dict[str, int | Iterable[int]]] = {
    "asteroids": dict(enemy_asteroids_y=[3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19],
                      enemy_asteroids_x=[21, 22, 23, 24, 25, 26, 27, 30, 31, 32, 33, 34, 35, 36, 37],
                      player_x=73, player_y=74, num_lives_direction=60, player_score_high=61, player_score_low=62,
                      player_missile_x1=83, player_missile_x2=84, player_missile_y1=86, player_missile_y2=87,
                      player_missile1_direction=89, player_missile2_direction=90),
    "berzerk": dict(player_x=19, player_y=11, player_direction=14, player_missile_x=22, player_missile_y=23,
                    player_missile_direction=21, robot_missile_direction=26, robot_missile_x=29, robot_missile_y=30,
                    num_lives=90, robots_killed_count=91, game_level=92, enemy_evilOtto_x=46, enemy_evilOtto_y=89,
                    enemy_robots_x=range(65, 73), enemy_robots_y=range(56, 65), player_score=range(93, 96)),
    "bowling": dict(ball_x=30, ball_y=41, player_x=29, player_y=40, frame_number_display=36,
                    pin_existence=range(57, 67), score=33),
    "boxing": dict(player_x=32, player_y=34, enemy_x=33, enemy_y=35, enemy_score=19, clock=17, player_score=18),
    "breakout": dict(ball_x=99, ball_y=101, player_x=72, blocks_hit_count=77, block_bit_map=range(30), score=84),
    "demonattack": dict(level=62, player_x=22, enemy_x1=17, enemy_x2=18, enemy_x3=19, missile_y=21, enemy_y1=69,
                        enemy_y2=70, enemy_y3=71, num_lives=114),
    "freeway": dict(player_y=14, score=103, enemy_car_x=range(108, 118)),
    "frostbite": dict(top_row_iceflow_x=34, second_row_iceflow_x=33, third_row_iceflow_x=32, fourth_row_iceflow_x=31,
                      enemy_bear_x=104, num_lives=76, igloo_blocks_count=77, enemy_x=range(84, 88), player_x=102,
                      player_y=100, player_direction=4, score=[72, 73, 74]),
    "hero": dict(player_x=27, player_y=31, power_meter=43, room_number=28, level_number=117, dynamite_count=50,
                 score=[56, 57]),
    "montezumarevenge": dict(room_number=3, player_x=42, player_y=43, player_direction=52, enemy_skull_x=47,
                             enemy_skull_y=46, key_monster_x=44, key_monster_y=45, level=57, num_lives=58,
                             items_in_inventory_count=61, room_state=62, score_0=19, score_1=20, score_2=21),
    "mspacman": dict(enemy_sue_x=6, enemy_inky_x=7, enemy_pinky_x=8, enemy_blinky_x=9, enemy_sue_y=12, enemy_inky_y=13,
                     enemy_pinky_y=14, enemy_blinky_y=15, player_x=10, player_y=16, fruit_x=11, fruit_y=17,
                     ghosts_count=19, player_direction=56, dots_eaten_count=119, player_score=120, num_lives=123),
    "pitfall": dict(player_x=97, player_y=105, enemy_logs_x=98, enemy_scorpion_x=99, bottom_of_rope_y=18),
    "pong": dict(player_y=51, enemy_y=50, ball_x=49, ball_y=54, enemy_score=13, player_score=14),
    "privateeye": dict(agent_x=63, agent_y=86, room_number=92, clock=[67, 69], player_direction=58, score=[73, 74],
                       dove_x=48, dove_y=39),
    "qbert": dict(player_x=43, player_y=67, player_column=35, red_enemy_column=69, green_enemy_column=105),
    "riverraid": dict(player_x=51, missile_x=117, missile_y=50, fuel_meter_high=55, fuel_meter_low=56),
    "seaquest": dict(enemy_obstacle_x=range(30, 34), player_x=70, player_y=97, diver_x=range(71, 75),
                     player_direction=86, missile_direction=87, oxygen_meter_value=102, missile_x=103, score=[57, 58],
                     num_lives=59, divers_collected_count=62),
    "spaceinvaders": dict(invaders_left_count=17, player_score=104, num_lives=125, player_x=28, enemies_x=26,
                          missiles_y=9, enemies_y=24),
    "tennis": dict(enemy_x=27, enemy_y=25, enemy_score=70, ball_x=16, ball_y=17, player_x=26, player_y=24,
                   player_score=69),
    "venture": dict(sprite0_y=20, sprite1_y=21, sprite2_y=22, sprite3_y=23, sprite4_y=24, sprite5_y=25, sprite0_x=79,
                    sprite1_x=80, sprite2_x=81, sprite3_x=82, sprite4_x=83, sprite5_x=84, player_x=85, player_y=26,
                    current_room=90, num_lives=70, score_1_2=71, score_3_4=72),
    "videopinball": dict(ball_x=67, ball_y=68, player_left_paddle_y=98, player_right_paddle_y=102, score_1=48,
                         score_2=50),
    "yarsrevenge": dict(player_yar_x=32, player_yar_y=31, yar_missile_x=38, yar_missile_y=37, enemy_qotile_x=43,
                        enemy_qotile_y=42, qotile_missile_x=47, qotile_missile_y=46),
}  # fmt: skip


def _one_label_per_index(game: dict[str, int | Iterable[int]]) -> dict[str, int]:
    """{'clock': [67, 69]} -> {'clock_0': 67, 'clock_1': 69}: a list or range becomes one label per index."""
    labels = {}
    for name, index in game.items():
        if isinstance(index, int):
            labels[name] = index
        else:
            labels.update({f"{name}_{i}": ram for i, ram in enumerate(index)})
    return labels


ATARIARI_LABELS: dict[str, dict[str, int]] = {game: _one_label_per_index(d) for game, d in _ANNOTATIONS.items()}
ATARIARI_GAMES = tuple(ATARIARI_LABELS)
CATEGORIES = ("small_object_localization", "agent_localization", "other_localization", "score_clock_lives_display",
              "misc")  # fmt: skip


def label_categories(name: str) -> list[str]:
    """The categories of label `name` by the words in it, as dacd816's categorization.py sorts them."""
    localization = any(word in name for word in ("_x", "_y", "_z", "_column"))
    small_object = localization and any(word in name for word in ("ball", "missile"))
    agent = localization and not small_object and any(word in name for word in ("agent", "player"))
    display = any(word in name for word in ("score", "clock", "lives", "lifes", "meter", "display"))
    misc = any(word in name for word in ("count", "bit_map", "existence", "level", "room", "game_state", "direction"))
    found = {"small_object_localization": small_object, "agent_localization": agent,
             "other_localization": localization and not (small_object or agent),
             "score_clock_lives_display": display, "misc": misc}  # fmt: skip
    return [category for category in CATEGORIES if found[category]]


def game_labels(game: str) -> dict[str, int]:
    """Label name -> RAM index of an AtariARI game; ValueError naming the valid games."""
    if game not in ATARIARI_LABELS:
        raise ValueError(f"unknown AtariARI game {game!r}; valid games: {', '.join(ATARIARI_GAMES)}")
    return ATARIARI_LABELS[game]


# the protocol's fixed settings; a change here changes every cache key
PROTOCOL = {"noop_max": 30, "frame_skip": 4, "terminal_on_life_loss": True, "actions": "uniform over 1..n-1",
            "frame": "max of the last two RGB frames of a skip, cv2 RGB2GRAY, 210x160", "version": 1}  # fmt: skip


@dataclass
class Episodes:
    """Frames of consecutive agent steps with their labels: frame i belongs to episode `episode[i]` (episodes are
    contiguous and numbered from 0), `actions[i]` is the action taken after it (-1 after an episode's last frame)."""

    game: str
    frames: np.ndarray  # (N, 210, 160) uint8
    labels: np.ndarray  # (N, L) uint8: the RAM bytes of label_names when the frame was shown
    label_names: list[str]
    episode: np.ndarray  # (N,) int64
    actions: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.frames)

    def starts(self) -> np.ndarray:
        """Each episode's first row, and len(self) at the end."""
        return np.searchsorted(self.episode, np.arange(self.episode[-1] + 2))


def make_ale_env(game: str, seed: int) -> Any:
    """`<Game>NoFrameskip-v4` under SB3's AtariWrapper stages but WarpFrame and ClipReward: noop reset (30), max-pool
    frame skip 4, a lost life ends the episode, FIRE at reset where the game has it. Observations are RGB 210x160."""
    from stable_baselines3.common.atari_wrappers import EpisodicLifeEnv, FireResetEnv, MaxAndSkipEnv, NoopResetEnv

    from .quiet import make_gymnasium_env
    from .spec import resolve_atari

    env = make_gymnasium_env(resolve_atari(game, {}))
    env = EpisodicLifeEnv(MaxAndSkipEnv(NoopResetEnv(env, PROTOCOL["noop_max"]), PROTOCOL["frame_skip"]))
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireResetEnv(env)
    env.action_space.seed(seed)
    return env


def grayscale(frame: np.ndarray) -> np.ndarray:
    """An RGB frame as one 8-bit channel, as SB3's WarpFrame converts it before resizing (cv2 RGB2GRAY)."""
    import cv2

    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def collect(game: str, frames: int, seed: int, progress: bool = True) -> Episodes:
    """`frames` frames of a uniformly random agent over actions 1..n-1 (the paper's), each labelled by the RAM
    bytes of the moment it is shown."""
    from tqdm.auto import tqdm

    indices = game_labels(game)
    check_int("frames", frames, 1)
    env = make_ale_env(game, seed)
    rng = np.random.default_rng(seed)
    ram_index = np.fromiter(indices.values(), dtype=np.int64)
    shown = np.empty((frames, 210, 160), np.uint8)
    labels = np.empty((frames, len(indices)), np.uint8)
    episode, actions = np.empty(frames, np.int64), np.empty(frames, np.int64)
    observation, _ = env.reset(seed=seed)
    number = 0
    for i in tqdm(range(frames), desc=f"collecting {game}", unit="frame", disable=not progress, leave=False):
        shown[i], labels[i], episode[i] = grayscale(observation), env.unwrapped.ale.getRAM()[ram_index], number
        actions[i] = int(rng.integers(1, env.action_space.n))
        observation, _, terminated, truncated, _ = env.step(actions[i])
        if terminated or truncated:
            observation, _ = env.reset()
            actions[i], number = -1, number + 1
    env.close()
    return Episodes(game, shown, labels, list(indices), episode, actions)


def cache_key(game: str, frames: int, seed: int) -> dict[str, Any]:
    """Everything the collected frames depend on: the request, the protocol and the emulator's version."""
    import ale_py

    return {"game": game, "frames": frames, "seed": seed, "labels": game_labels(game), "protocol": PROTOCOL,
            "ale_py": ale_py.__version__}  # fmt: skip


def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    """<cache_dir>/<game>-<frames>-seed<seed>-<hash of the whole key>.npz: another setting is another file."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{key['game']}-{key['frames']}-seed{key['seed']}-{digest}.npz"


def load_or_collect(game: str, frames: int, seed: int, cache_dir: str | Path | None, progress: bool = True) -> Episodes:
    """The episodes of (game, frames, seed) from the cache when it holds them under the same key, else collected and
    written there atomically (no cache_dir: collected, nothing written)."""
    key = cache_key(game, frames, seed)
    if cache_dir is None:
        return collect(game, frames, seed, progress)
    path = cache_path(cache_dir, key)
    if path.is_file():
        with np.load(path) as saved:
            if json.loads(str(saved["key"])) == key:
                return Episodes(game, saved["frames"], saved["labels"], list(key["labels"]), saved["episode"],
                                saved["actions"])  # fmt: skip
    episodes = collect(game, frames, seed, progress)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as file:  # a file object: np.savez would add .npz to the temporary name
            np.savez_compressed(file, key=json.dumps(key, sort_keys=True), frames=episodes.frames,
                                labels=episodes.labels, episode=episodes.episode, actions=episodes.actions)

    atomic_write(path, write)
    return episodes


def split_episodes(count: int, fractions: Iterable[float], seed: int) -> list[np.ndarray]:
    """Episode numbers 0..count-1 shuffled by `seed` and cut into consecutive parts of these fractions (the last part
    takes the rest), so that no episode is in two parts."""
    order = np.random.default_rng(seed).permutation(count)
    cuts = np.cumsum([int(fraction * count) for fraction in fractions])
    return np.split(order, cuts)
