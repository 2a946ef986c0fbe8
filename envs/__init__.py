"""minc_rl.envs: SB3 vector envs for procgen, Atari, MinAtar and gymnasium ids from one 'family:name' spec."""

from .distractors import Distractors
from .factory import MinAtarImage, make_eval_env, make_vec_env, validate_spec
from .procgen_vec_env import ProcgenVecEnv
from .spec import FAMILIES, MINATAR_GAMES, PROCGEN_GAMES, parse_spec

__all__ = [
    "Distractors",
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
