"""Environment spec strings ('family:name') and their options, checked without building anything."""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any

FAMILIES = ("procgen", "atari", "minatar", "gym")

PROCGEN_GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)  # fmt: skip
MINATAR_GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")

# procgen aborts the whole process (a C++ fassert) on a mode a game lacks, so the support table lives here.
PROCGEN_MODE_GAMES = {
    "easy": PROCGEN_GAMES,
    "hard": PROCGEN_GAMES,
    "extreme": ("chaser", "dodgeball", "leaper", "starpilot"),
    "memory": ("caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"),
    "exploration": ("caveflyer", "climber", "coinrun", "heist", "jumper", "leaper", "maze", "ninja"),
}

Check = tuple[Callable[[Any], bool], str]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_at_least(low: int) -> Check:
    return (lambda v: _is_int(v) and v >= low), f"an int >= {low}"


def _one_of(*choices: Any) -> Check:
    return (lambda v: any(v is c or (v == c and type(v) is type(c)) for c in choices)), f"one of {choices!r}"


BOOL: Check = (lambda v: isinstance(v, bool), "True or False")
PROBABILITY: Check = (
    lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and 0.0 <= v <= 1.0,
    "a number in [0, 1]",
)

PROCGEN_DEFAULTS = {"num_levels": 200, "start_level": 0, "distribution_mode": "easy"}
PROCGEN_OPTIONS: dict[str, Check] = {
    "num_levels": _int_at_least(0),
    "start_level": _int_at_least(0),
    "distribution_mode": _one_of(*PROCGEN_MODE_GAMES),
    "num_threads": _int_at_least(0),
    "render_mode": _one_of(None, "rgb_array"),
    "use_backgrounds": BOOL,
    "center_agent": BOOL,
    "paint_vel_info": BOOL,
    "use_sequential_levels": BOOL,
    "restrict_themes": BOOL,
    "use_monochrome_assets": BOOL,
    "use_generated_assets": BOOL,
}
# AtariWrapper's own arguments, plus the frame stack on top.
ATARI_OPTIONS: dict[str, Check] = {
    "noop_max": _int_at_least(0),
    "frame_skip": _int_at_least(1),
    "screen_size": _int_at_least(1),
    "terminal_on_life_loss": BOOL,
    "clip_reward": BOOL,
    "action_repeat_probability": PROBABILITY,
    "frame_stack": _int_at_least(1),
}
# Families without an episode step limit of their own (MinAtar; gymnasium ids registered without one) end an episode
# after this many agent steps, as a truncation (SB3 keeps bootstrapping through it): the Atari convention of 108,000
# frames at frame skip 4. Without it an episode can last forever (MinAtar seaquest: a sub that never dives).
EPISODE_STEP_LIMIT = 27_000
MINATAR_OPTIONS: dict[str, Check] = {
    "max_episode_steps": _int_at_least(1),
    "sticky_action_prob": PROBABILITY,
    "difficulty_ramping": BOOL,
    "minimal_action_set": BOOL,
}
GYM_OPTIONS: dict[str, Check] = {"max_episode_steps": _int_at_least(1)}
# env option `distractors` (envs/distractors.py): MinAtar {channels: k, p: p}, gym vectors {dims: k}; k = 0 is off,
# k = "same" as many as the env's own (MinAtar: the game's channels; a vector: its length).
# p's default, 0.08, is the mean share of occupied cells per channel of MinAtar breakout (0.082) and space_invaders
# (0.077) under random actions (benchmarks/minatar_density.py): a distractor channel is as busy as an average one.
DISTRACTOR_COUNT: Check = (
    lambda v: v == "same" or (_is_int(v) and v >= 0),
    "an int >= 0 or 'same' (as many as the env's own)",
)
DISTRACTOR_OPTIONS: dict[str, dict[str, Check]] = {
    "minatar": {"channels": DISTRACTOR_COUNT, "p": PROBABILITY},
    "gym": {"dims": DISTRACTOR_COUNT},
}
DISTRACTOR_DEFAULTS = {"minatar": {"p": 0.08}, "gym": {}}


def parse_spec(spec: str) -> tuple[str, str]:
    """Split 'family:name' into (family, name); ValueError on a malformed spec or an unknown family."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"Bad environment spec {spec!r}: expected 'family:name' with family one of {', '.join(FAMILIES)} "
            "(e.g. 'procgen:coinrun', 'atari:Pong', 'minatar:breakout', 'gym:CartPole-v1')."
        )
    family, name = spec.split(":", 1)
    if family not in FAMILIES:
        raise ValueError(
            f"Unknown environment family {family!r} in spec {spec!r}; valid families: {', '.join(FAMILIES)}."
        )
    if not name:
        raise ValueError(f"Environment spec {spec!r} names no environment after '{family}:'.")
    return family, name


def check_n_envs(n_envs: int) -> None:
    """ValueError unless n_envs is an int >= 1."""
    if not _is_int(n_envs) or n_envs < 1:
        raise ValueError(f"n_envs must be an int >= 1, got {n_envs!r}.")


def check_seed(seed: int) -> None:
    """ValueError unless seed fits procgen's and ALE's 31-bit seeds."""
    if not _is_int(seed) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}.")


def check_options(family: str, options: dict[str, Any], allowed: dict[str, Check], extra: tuple[str, ...] = ()) -> None:
    """ValueError for an option name neither in `allowed` nor in `extra` (names passed on unchecked) or a bad value."""
    for key, value in options.items():
        if key in allowed:
            is_valid, expected = allowed[key]
            if not is_valid(value):
                raise ValueError(f"Bad value for {family} option {key}: {value!r}; expected {expected}.")
        elif key not in extra:
            valid = ", ".join(sorted({*allowed, *extra}))
            raise ValueError(f"Unknown option {key!r} for {family} environments; valid options: {valid}.")


def resolve_procgen(game: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ProcgenGym3Env keyword arguments for `game`: `options` over PROCGEN_DEFAULTS."""
    if game not in PROCGEN_GAMES:
        raise ValueError(f"Unknown procgen game {game!r}; valid games: {', '.join(PROCGEN_GAMES)}.")
    check_options("procgen", options, PROCGEN_OPTIONS)
    kwargs = {**PROCGEN_DEFAULTS, **options}
    mode = kwargs["distribution_mode"]
    if game not in PROCGEN_MODE_GAMES[mode]:
        raise ValueError(
            f"procgen game {game!r} has no distribution_mode {mode!r}; "
            f"{mode!r} exists for: {', '.join(PROCGEN_MODE_GAMES[mode])}."
        )
    if mode == "exploration":  # procgen pins exploration mode to one level of its own choosing
        pinned = sorted({"num_levels", "start_level"} & options.keys())
        if pinned:
            raise ValueError(f"procgen distribution_mode 'exploration' fixes the level; drop {', '.join(pinned)}.")
        del kwargs["num_levels"], kwargs["start_level"]
    return kwargs


def resolve_atari(game: str, options: dict[str, Any]) -> str:
    """The '<Game>NoFrameskip-v4' id (the one SB3's AtariWrapper expects) of `game`, matched ignoring case and '_'."""
    from .quiet import atari_game_ids

    ids = atari_game_ids()
    key = game.replace("_", "").lower()
    if key not in ids:
        names = {k: v.removesuffix("NoFrameskip-v4") for k, v in ids.items()}
        close = [names[k] for k in difflib.get_close_matches(key, names, n=3)]
        hint = f"close matches: {', '.join(close)}; " if close else ""
        raise ValueError(f"Unknown Atari game {game!r}; {hint}valid games: {', '.join(sorted(names.values()))}.")
    check_options("atari", options, ATARI_OPTIONS)
    return ids[key]


def resolve_distractors(family: str, options: dict[str, Any]) -> tuple[int | str, float | None] | None:
    """The (count, p) of option `distractors` in `options` (None when absent or count 0; count may be "same"; p None
    for gym ids, whose distractors are N(0, 1) dimensions);
    ValueError naming a bad key or value and the valid ones."""
    if "distractors" not in options:
        return None
    value, allowed = options["distractors"], DISTRACTOR_OPTIONS[family]
    count_key = next(iter(allowed))
    if not isinstance(value, Mapping) or count_key not in value or not set(value) <= set(allowed):
        example = "{channels: 4, p: 0.08}" if family == "minatar" else "{dims: 4}"
        raise ValueError(f"Bad value for {family} option distractors: {value!r}; expected a dict with keys "
                         f"{', '.join(allowed)} ({count_key} required), e.g. {example}.")  # fmt: skip
    check_options(f"{family} distractors", dict(value), allowed)
    settings = {**DISTRACTOR_DEFAULTS[family], **value}
    return (settings[count_key], settings.get("p")) if settings[count_key] != 0 else None


def resolve_minatar(game: str, options: dict[str, Any]) -> tuple[int | str, float | None] | None:
    """ValueError for an unknown MinAtar game or option; the distractors' (count, p) or None."""
    if game not in MINATAR_GAMES:
        raise ValueError(f"Unknown MinAtar game {game!r}; valid games: {', '.join(MINATAR_GAMES)}.")
    check_options("minatar", options, MINATAR_OPTIONS, extra=("distractors",))
    return resolve_distractors("minatar", options)


def resolve_gym(env_id: str, options: dict[str, Any]) -> tuple[int | str, float | None] | None:
    """ValueError for an unregistered gymnasium id (with close matches) or an option its constructor does not take;
    the distractors' (count, p) or None."""
    import gymnasium

    from .quiet import register_ale_envs

    register_ale_envs()
    if env_id not in gymnasium.registry:
        close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=5, cutoff=0.6)
        hint = (
            f"close matches: {', '.join(close)}" if close else "no close match (gymnasium.pprint_registry() lists all)"
        )
        raise ValueError(f"Unknown gymnasium id {env_id!r}; {hint}.")
    entry_point = gymnasium.spec(env_id).entry_point
    try:
        creator = (
            gymnasium.envs.registration.load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
        )
    except (ImportError, gymnasium.error.Error) as err:
        raise ValueError(f"gymnasium id {env_id!r} cannot be loaded: {err}") from err
    parameters = inspect.signature(creator).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = tuple(options)
    else:
        accepted = tuple(name for name in parameters if name not in ("self", "render_mode"))
    check_options(f"gym:{env_id}", options, GYM_OPTIONS, extra=(*accepted, "distractors"))
    return resolve_distractors("gym", options)


def validate_spec(spec: str, n_envs: int = 1, **options: Any) -> None:
    """Raise the ValueError make_vec_env would raise for these arguments, without building an environment."""
    resolve_spec(spec, n_envs, options)


def resolve_spec(spec: str, n_envs: int, options: dict[str, Any]) -> tuple[str, str, Any]:
    """(family, name, the family's resolved options) of a spec, checked as make_vec_env checks it (ValueError)."""
    family, name = parse_spec(spec)
    check_n_envs(n_envs)
    resolved = {
        "procgen": resolve_procgen,
        "atari": resolve_atari,
        "minatar": resolve_minatar,
        "gym": resolve_gym,
    }[family](name, options)
    return family, name, resolved
