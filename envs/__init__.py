"""minc_rl.envs: SB3 vector envs for procgen, Atari, MinAtar and gymnasium ids from one 'family:name' spec."""

from .quiet import mute_legacy_gym

mute_legacy_gym()  # before stable_baselines3 (imported below) imports legacy gym and prints its notice

from .factory import MinAtarImage, make_eval_env, make_vec_env, validate_spec  # noqa: E402
from .procgen_vec_env import ProcgenVecEnv  # noqa: E402
from .spec import FAMILIES, MINATAR_GAMES, PROCGEN_GAMES, parse_spec  # noqa: E402

__all__ = [
    "FAMILIES",
    "MINATAR_GAMES",
    "PROCGEN_GAMES",
    "MinAtarImage",
    "ProcgenVecEnv",
    "make_eval_env",
    "make_vec_env",
    "parse_spec",
    "validate_spec",
]
