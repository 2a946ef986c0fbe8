"""Third-party set-up without start-up banners (ALE's version line; legacy gym's notice is muted in minc_rl/__init__)."""

from __future__ import annotations

import functools
from typing import Any


def register_ale_envs() -> None:
    """Register ale-py's gymnasium ids and mute ALE's per-environment version banner."""
    import ale_py
    import gymnasium

    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    gymnasium.register_envs(ale_py)


@functools.cache
def atari_game_ids() -> dict[str, str]:
    """Lower-case game name -> '<Game>NoFrameskip-v4' for every ALE game registered in that classic form."""
    import gymnasium

    register_ale_envs()
    suffix = "NoFrameskip-v4"
    return {
        env_id.removesuffix(suffix).lower(): env_id
        for env_id in gymnasium.registry
        if env_id.endswith(suffix) and "/" not in env_id
    }


def make_gymnasium_env(env_id: str, **kwargs: Any) -> Any:
    """gymnasium.make with ALE's ids registered, rendering rgb_array frames where the env can (for videos)."""
    import gymnasium

    register_ale_envs()
    try:
        return gymnasium.make(env_id, **{"render_mode": "rgb_array", **kwargs})
    except TypeError:  # the env takes no render_mode (SB3's make_vec_env falls back the same way)
        return gymnasium.make(env_id, **kwargs)
