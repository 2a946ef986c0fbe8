"""A run's state beside its agent: every random stream it draws from and the state of its envs with the episodes in
progress, saved with each checkpoint (<checkpoint>.run_state.pkl), so that a resumed run repeats the run that was
never stopped bit for bit.

SB3's load reseeds python's, numpy's and torch's generators, the action space and the training envs with the run's
seed, and resets the envs; the checkpoint's .zip keeps the agent (weights, optimizers, Lambda, step counters) and the
replay buffer file the transitions. What else a run continues from is captured here, as one pickle:
- the generators: python's `random`, numpy's global one, torch's (and CUDA's, where initialised), the action space's;
- the agent's counters and episode statistics, and the observation it acts on next (with the training env's state);
- every VecEnv, the training one and each evaluation split's, layer by layer (VecNormalize's running return,
  VecMonitor's episode counters, a DummyVecEnv's envs pickled whole: MinAtar, gymnasium's classic control; procgen's
  games through its get_state; an ALE emulator through cloneState with its RNG).
An env that cannot give its state (it does not pickle, or pickles only its constructor arguments: gymnasium's
EzPickle, e.g. Box2D and MuJoCo envs) is left out with a warning; a run resumed from it restarts that env's episodes.
"""

from __future__ import annotations

import io
import logging
import pickle
import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium.utils import EzPickle
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from minc_rl.common.checks import one_line
from minc_rl.envs.procgen_vec_env import ProcgenVecEnv

log = logging.getLogger("minc_rl.train")

TRAINING_ENV = "training env"
# what the agent changes as it collects and learns; the .zip holds them too, but a rollback (StopOnSignal) needs them
COUNTERS = ("num_timesteps", "_n_updates", "_episode_num", "_current_progress_remaining", "ep_info_buffer",
            "ep_success_buffer")  # fmt: skip
# the observation the agent acts on next: it belongs with the training env's state (SB3's load drops it: env reset)
ROLLOUT = ("_last_obs", "_last_episode_starts", "_last_original_obs")
NOT_STATE = ("venv", "class_attributes")  # a wrapper's layer below, and SB3's table of its class's members


class InMemoryOrder(NamedTuple):
    """An array as the C-contiguous array of its axes in memory order and the axes that give it back: pickling keeps
    the memory layout of a transposed view that way (SB3's VecTransposeImage makes channels-last images), on which
    torch's CPU convolutions round differently than on a contiguous copy."""

    array: np.ndarray
    axes: tuple[int, ...]


def keep_layout(value: Any) -> Any:
    """`value` with each array (itself, or in a dict of them) as an InMemoryOrder."""
    if isinstance(value, dict):
        return {key: keep_layout(item) for key, item in value.items()}
    if not isinstance(value, np.ndarray):
        return value
    order = np.argsort(value.strides, kind="stable")[::-1]
    return InMemoryOrder(np.ascontiguousarray(value.transpose(order)), tuple(np.argsort(order).tolist()))


def layout_back(value: Any) -> Any:
    """What keep_layout was given, each array with its memory layout."""
    if isinstance(value, dict):
        return {key: layout_back(item) for key, item in value.items()}
    return value.array.transpose(value.axes) if isinstance(value, InMemoryOrder) else value


class EnvStateUnavailable(Exception):
    """An env that cannot give its state; the message says why."""


def layers(venv: VecEnv) -> Iterator[VecEnv]:
    """A VecEnv and the ones it wraps, outermost first."""
    yield venv
    while isinstance(venv, VecEnvWrapper):
        venv = venv.venv
        yield venv


def emulators(venv: VecEnv) -> list[Any]:
    """The innermost envs of a DummyVecEnv (at the bottom of `venv`) that are ALE emulators ([] for none)."""
    return [env.unwrapped for env in getattr(venv.unwrapped, "envs", []) if hasattr(env.unwrapped, "clone_state")]


class _EnvPickler(pickle.Pickler):
    """A pickler of env layers that keeps an ALE emulator as its cloned state (with its RNG) and refuses an object
    that pickles only its constructor arguments, which would come back as a new env."""

    def __init__(self, file: io.BytesIO, ale: list[Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.ale = ale

    def persistent_id(self, obj: Any) -> Any:
        for index, env in enumerate(self.ale):
            if obj is env:
                return index, env.clone_state(include_rng=True), env.np_random.bit_generator.state
        if isinstance(obj, EzPickle):
            raise EnvStateUnavailable(f"{type(obj).__name__} pickles its constructor arguments, not its state")
        return None


class _EnvUnpickler(pickle.Unpickler):
    """Loads what _EnvPickler wrote, restoring each ALE emulator's state into the live one it came from."""

    def __init__(self, file: io.BytesIO, ale: list[Any]) -> None:
        super().__init__(file)
        self.ale = ale

    def persistent_load(self, pid: Any) -> Any:
        index, state, generator = pid
        env = self.ale[index]
        env.restore_state(state)
        env.np_random.bit_generator.state = generator
        return env


def vec_env_state(venv: VecEnv) -> bytes:
    """Every layer of `venv` as (class name, attributes), pickled; procgen's games by their get_state."""
    found = []
    for layer in layers(venv):
        state = {key: value for key, value in vars(layer).items() if key not in NOT_STATE}
        if isinstance(layer, ProcgenVecEnv):
            state["gym3_env"] = layer.gym3_env.get_state()
        found.append((type(layer).__name__, state))
    file = io.BytesIO()
    _EnvPickler(file, emulators(venv)).dump(found)
    return file.getvalue()


def restore_vec_env(venv: VecEnv, saved: bytes) -> None:
    """Put a state from vec_env_state back into the live `venv`, layer by layer (a DummyVecEnv gets the saved envs)."""
    found = _EnvUnpickler(io.BytesIO(saved), emulators(venv)).load()
    live = list(layers(venv))
    if [name for name, _ in found] != [type(layer).__name__ for layer in live]:
        raise EnvStateUnavailable(f"its saved layers {[name for name, _ in found]} are not this run's")
    for layer, (_, state) in zip(live, found):
        if isinstance(layer, ProcgenVecEnv):
            layer.gym3_env.set_state(state.pop("gym3_env"))
        vars(layer).update(state)


class RunState:
    """Captures and restores the state of a run's agent, its training env and its evaluation envs (the module's
    docstring lists what); an env that cannot give its state is named in one warning, once. `settings` are those the
    envs were built with (env options, counts, seed): saved envs come back only into envs built the same way."""

    def __init__(self, eval_envs: dict[str, VecEnv], settings: dict[str, Any]) -> None:
        self.eval_envs, self.settings = eval_envs, settings
        self.warned: set[str] = set()

    def envs(self, model: BaseAlgorithm) -> dict[str, VecEnv]:
        """The run's envs by name: the training env and each evaluation split's."""
        evaluation = {f"evaluation env {split}": env for split, env in self.eval_envs.items()}
        return {TRAINING_ENV: model.get_env(), **evaluation}

    def capture(self, model: BaseAlgorithm) -> bytes:
        """The run's state now, pickled."""
        envs = {name: self._env_state(name, venv) for name, venv in self.envs(model).items()}
        state = {
            "step": model.num_timesteps,
            "settings": self.settings,
            "random": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "action_space": model.action_space.np_random.bit_generator.state,
            "counters": {name: getattr(model, name) for name in COUNTERS},
            "rollout": keep_layout({name: getattr(model, name) for name in ROLLOUT}) if envs[TRAINING_ENV] else None,
            "envs": envs,
        }
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    def _env_state(self, name: str, venv: VecEnv) -> bytes | None:
        """vec_env_state of the run's env `name`; None, with a warning the first time, when it cannot give it."""
        try:
            return vec_env_state(venv)
        except Exception as error:  # noqa: BLE001  whatever an env that does not pickle raises
            if name not in self.warned:
                self.warned.add(name)
                log.warning("the %s cannot give its state (%s): a run resumed from this run's checkpoints restarts its "
                            "episodes and is not exact", name, one_line(error))  # fmt: skip
            return None

    def restore(self, model: BaseAlgorithm, saved: bytes) -> list[str]:
        """Put a captured state back into the run; returns the envs it could not restore (with why), whose
        episodes restart (the training env: SB3 resets it when learn() starts)."""
        state = pickle.loads(saved)
        random.setstate(state["random"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        model.action_space.np_random.bit_generator.state = state["action_space"]
        for name, value in state["counters"].items():
            setattr(model, name, value)
        changed = sorted(key for key in {*self.settings, *state["settings"]}
                         if self.settings.get(key) != state["settings"].get(key))  # fmt: skip
        missing = {}
        for name, venv in self.envs(model).items():
            try:
                if changed:
                    raise EnvStateUnavailable(f"it was saved with other {', '.join(changed)}")
                if state["envs"].get(name) is None:
                    raise EnvStateUnavailable("its state was not saved")
                restore_vec_env(venv, state["envs"][name])
            except Exception as error:  # noqa: BLE001  a state that does not fit this env raises anything
                missing[name] = one_line(error)
        model._last_obs = None  # learn() resets the training env, unless its state and the rollout's come back
        if TRAINING_ENV not in missing:
            for name, value in layout_back(state["rollout"]).items():
                setattr(model, name, value)
        return [f"the {name} ({why})" for name, why in missing.items()]
