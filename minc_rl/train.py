"""`python -m minc_rl.train env=procgen:coinrun aux=minc`: train a Stable-Baselines3 PPO or DQN agent with an
auxiliary representation loss (MINC, spectral contrastive or InfoNCE) on consecutive observations.

A run, top to bottom: main() checks the config-group choices of the command line and starts the Hydra app
train(). train() composes the run's config (configs/train/ plus the family defaults picked from env=), checks
every value (exit code 2 and one line, before anything is built), builds the vector envs (minc_rl.envs) and the
agent (minc_rl.agents, whose train() method holds the gradient step), and runs model.learn() with callbacks for
the progress bar, evaluation, checkpoints and Ctrl-C / SIGTERM. Then it writes the last checkpoint, summary.json
and learning_curve.png; minc_rl.runs.run_io holds those file formats.
"""

from __future__ import annotations

import minc_rl.envs  # noqa: F401, I001  first: it mutes legacy gym's start-up notice, which importing SB3 would print
import hashlib
import itertools
import logging
import os
import secrets
import sys
import time
from fractions import Fraction
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import gymnasium as gym
import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat
from stable_baselines3.common.utils import LinearSchedule, check_for_correct_spaces
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

import minc_rl.configs
from minc_rl.common import cli
from minc_rl.runs import run_io
from minc_rl.common.checks import (
    check_bool, check_choice, check_int, check_nonnegative, check_positive, check_unit_interval, one_line,
)
from minc_rl.common.run_dir import (
    RunDirError, RunLock, check_fresh, check_writable, resume_argument, saved_config_with, writable_problem,
)
from minc_rl.agents import MincDQN, MincPPO
from minc_rl.agents.auxiliary import AuxConfig
from minc_rl.rl.extractor import ENCODER_CHOICES
from minc_rl.rl.health import EncoderHealth
from minc_rl.ssl.encoders import encoder_file_problem
from minc_rl.envs import make_eval_env, make_vec_env, parse_spec, validate_spec
from minc_rl.runs.run_callbacks import CheckpointError, Checkpoints, Evaluation, LatestValues, ProgressBar, StopOnSignal

CONFIG_DIR = Path(minc_rl.configs.__file__).parent / "train"
AGENTS = {"ppo": MincPPO, "dqn": MincDQN}
GROUPS = ("agent", "aux", "encoder")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("learning_rate", "clip_range", "clip_range_vf")  # agent keys that take rl-zoo3's "lin_<x>"
# the bounds of the agent keys in configs/train/agent/*.yaml, which SB3 mostly takes unchecked (gamma=1.5 trains)
AGENT_INTS = {"n_steps": 1, "n_epochs": 1, "batch_size": 1, "buffer_size": 1, "learning_starts": 0, "train_freq": 1,
              "gradient_steps": 1, "target_update_interval": 1, "exploration_steps": 1, "log_interval": 1}
AGENT_CHECKS = {
    **dict.fromkeys(("gamma", "gae_lambda", "tau", "exploration_fraction", "exploration_initial_eps",
                     "exploration_final_eps"), check_unit_interval),
    **dict.fromkeys(("clip_range", "clip_range_vf", "max_grad_norm"), check_positive),
    **dict.fromkeys(("learning_rate", "ent_coef", "vf_coef"), check_nonnegative),  # learning_rate=0: a frozen run
    "normalize_advantage": check_bool,
}
# agent keys minc_rl.train uses itself
NOT_SB3_KEYS = ("name", "n_minibatches", "log_interval", "exploration_steps", "replay_ratio")
MAX_TRAIN_FREQ = 1000  # agent.replay_ratio must be g / (f x n_envs) with whole g and f <= this
MAX_ENVS = 65_536  # per vector env
EVAL_SEED_OFFSET = 1_000_000  # the evaluation envs' seed is seed + EVAL_SEED_OFFSET: other episodes than training's
# The command line may add keys inside these dicts: the API they are passed to checks them. env_options.<option>=
# and aux.loss_kwargs.<option>= need no + (they go to ++); an SB3 keyword the agent config lacks needs +agent.<key>=
# (so that a misspelt agent key is caught). Any other key must be one the config has.
PASSED_ON = ("env_options", "aux.loss_kwargs")
OPEN_KEYS = ("agent", *PASSED_ON)
# The files that mark a directory as holding a run of minc_rl.train (Hydra's .hydra/ and train.log do not).
RUN_FILES = ("config.yaml", "checkpoints", "progress.csv", "evaluations.csv", "summary.json")

log = logging.getLogger("minc_rl.train")

# hydra.run.dir in config.yaml: a resumed run writes into the run directory it continues.
OmegaConf.register_new_resolver("minc_rl.run_dir", lambda resume, fresh: resume or fresh, replace=True)
# hydra.sweep.subdir: a job's directory name, shortened (with a hash of the whole) where the file system would refuse it
OmegaConf.register_new_resolver("minc_rl.dirname", lambda name: short_dirname(str(name)), replace=True)
MAX_DIRNAME = 200  # bytes; file systems allow 255 per name, and the job number and Hydra's prefix come first


def short_dirname(name: str) -> str:
    """`name`, or for one longer than MAX_DIRNAME bytes its start and a hash of the whole (sweeps with many overrides)."""
    if len(name.encode()) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return name.encode()[: MAX_DIRNAME - 11].decode(errors="ignore") + "-" + digest


def fail(message: str) -> NoReturn:
    """Print one line naming the bad value and the valid ones, and exit with code 2 (a usage error)."""
    cli.fail("minc_rl.train", message)


def group_choices(group: str) -> list[str]:
    """The options of a config group: the YAML files in configs/train/<group>/ (aux: minc_rl.configs' ConfigStore)."""
    if group == "aux":
        return sorted(minc_rl.configs.AUX_GROUP_OPTIONS)
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


def check_command_line(args: list[str]) -> list[str]:
    """Exit 2 on an unknown agent / aux / encoder, a family= override, a resume= without a run, a misspelt key, or a
    run directory that is read-only or already holds a run, before Hydra starts (Hydra's own messages are several
    lines, exit code 1, and would advise +key=value for a misspelt key, which then goes unused). Returns the
    command line for Hydra: env_options.<option>=value as ++env_options.<option>=value, and so for the other
    PASSED_ON dicts (their options are not all listed in the config)."""
    arguments = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
    except OverrideParseException:
        return args  # Hydra reports syntax errors itself
    for override in overrides:
        key = override.key_or_group
        if key in ("family", "family_agent"):
            fail(f"{key} is picked from env= (env=procgen:coinrun uses family/procgen.yaml); set env= instead of {key}=")
        if key in GROUPS and not override.is_delete():
            values = override.sweep_string_iterator() if override.is_discrete_sweep() else [override.get_value_element_as_str()]
            for value in values:
                if value not in group_choices(key):
                    fail(f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, group_choices(key)))}")
        if key == "resume" and not override.is_sweep_override() and override.value() is not None:
            if not Path(str(override.value())).is_dir():
                fail(f"resume={override.value()!r}: no such directory (give the run directory to continue)")
            if not (Path(str(override.value())) / "config.yaml").is_file():
                fail(f"resume={override.value()!r} is not a run directory of minc_rl.train (it has no config.yaml)")
    config_dirs = [Path(args[i + 1]).resolve() for i, a in enumerate(args[:-1]) if a in ("-cd", "--config-dir")]
    check_keys(overrides, config_dirs)
    multirun = any(a in ("-m", "--multirun") for a in args)
    check_run_dir_argument(overrides, multirun)
    if multirun:
        check_sweep_jobs(overrides, config_dirs)
    return [f"++{a}" if a.startswith(tuple(f"{k}." for k in PASSED_ON)) else a for a in args]


def check_keys(overrides: list[Any], config_dirs: list[Path]) -> None:
    """Exit 2 with the closest valid key on a key=value (or +key=value) whose key the config does not have, except
    inside OPEN_KEYS. With resume= the saved config decides (resumed_config)."""
    if any(o.key_or_group == "resume" and o.value() is not None for o in overrides):
        return
    valid = valid_keys(overrides, study_overrides(overrides, config_dirs))
    for override in overrides:
        key = override.key_or_group
        if key.startswith("hydra") or key in (*GROUPS, "family", "family_agent", "resume", "study") or key in valid:
            continue
        if any(key.startswith(f"{open_key}.") for open_key in OPEN_KEYS) and (
            override.is_add() or override.is_force_add() or key.startswith(tuple(f"{k}." for k in PASSED_ON))
        ):
            continue
        plus = f" (to give SB3 another keyword argument, write +{key}=<value>)" if key.startswith("agent.") else ""
        fail(cli.unknown_key_message(key, valid, "minc_rl.train") + plus)


def study_overrides(overrides: list[Any], config_dirs: list[Path]) -> list[str]:
    """The command line's +study=<name> (and the --config-dir it is found in) as compose() overrides, when the study
    file exists (check_sweep_jobs names a missing one): a study's defaults (agent=dqn) count for the keys."""
    studies = [o for o in overrides if o.key_or_group == "study" and not o.is_sweep_override()]
    found = [d for d in (*config_dirs, CONFIG_DIR) for o in studies if (d / "study" / f"{o.value()}.yaml").is_file()]
    if not found:
        return []
    return [*searchpath_override(config_dirs), *(o.input_line for o in studies)]


def searchpath_override(config_dirs: list[Path]) -> list[str]:
    """The --config-dir folders as a compose() override of Hydra's search path (none: [])."""
    return [f"hydra.searchpath=[{','.join(f'file://{d}' for d in config_dirs)}]"] if config_dirs else []


def valid_keys(overrides: list[Any], extra: list[str]) -> set[str]:
    """Every key (dotted, nodes and leaves) of the config composed for each env, agent, aux and encoder choice the
    command line names, with the family defaults of the env and the `extra` overrides (a +study)."""
    choices = {"env": [], **{group: [] for group in GROUPS}}
    for override in overrides:
        if override.key_or_group in choices and not override.is_delete():
            sweep = override.is_discrete_sweep()
            choices[override.key_or_group] += override.sweep_string_iterator() if sweep else [override.get_value_element_as_str()]
    variants = [[]] + [[f"{group}={value}"] for group in GROUPS for value in choices[group]]
    keys: set[str] = set()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for env in choices["env"] or [compose("config", overrides=extra).env]:
            try:
                family = [f"family={parse_spec(env)[0]}"]
            except ValueError:
                family = []  # check_config names the bad env
            for variant in variants:
                keys |= cli.dotted_keys(OmegaConf.to_container(compose("config", overrides=[*variant, *family, *extra])))
    GlobalHydra.instance().clear()
    return keys


def check_sweep_jobs(overrides: list[Any], config_dirs: list[Path]) -> None:
    """A sweep checked whole before its first job: each job's config (every combination of the command line's and a
    +study's sweep values; a study found here or in --config-dir) as the job itself would check it, so a bad value
    exits 2 before anything trains."""
    if any(o.key_or_group == "resume" for o in overrides):
        return
    fixed, sweeps = searchpath_override(config_dirs), []
    for override in overrides:
        if override.key_or_group.startswith("hydra"):
            continue
        if override.is_discrete_sweep():
            sweeps.append([f"{override.key_or_group}={v}" for v in override.sweep_string_iterator()])
        else:
            fixed.append(override.input_line)
        if override.key_or_group == "study":
            found = [d / "study" / f"{override.value()}.yaml" for d in (*config_dirs, CONFIG_DIR)]
            path = next((p for p in found if p.is_file()), None)
            if path is None:
                fail(f"study={override.value()!r}: no study/{override.value()}.yaml in {', '.join(str(d) for d in (CONFIG_DIR, *config_dirs))}")
            params = OmegaConf.load(path).hydra.sweeper.params
            for study_override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
                values = study_override.sweep_string_iterator() if study_override.is_discrete_sweep() else [
                    study_override.get_value_element_as_str()]
                sweeps.append([f"{study_override.key_or_group}={v}" for v in values])
    check_jobs([*fixed, *combination] for combination in itertools.product(*sweeps))


def check_jobs(jobs: Iterable[list[str]]) -> None:
    """Each job's key=value overrides composed and checked as the job itself would check them (not resume=): a bad
    value exits 2 before anything trains."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for job in jobs:
            cfg = with_family_defaults(compose(config_name="config", overrides=job).env, job)
            apply_replay_ratio(cfg, job)
            check_config(cfg)
    GlobalHydra.instance().clear()


def resume_hint(run_dir: Path) -> str | None:
    """How to continue the run in run_dir (resume=...), or None when it has no checkpoint to continue from."""
    return resume_argument(run_dir) if run_io.latest_checkpoint(run_dir) is not None else None


def check_run_dir_argument(overrides: list[Any], multirun: bool) -> None:
    """Exit 2 if the run directory the command line names cannot be written, or (for a fresh run) holds a run."""
    values = {o.key_or_group: o.value() for o in overrides if not o.is_sweep_override()}
    resume, run_dir = values.get("resume"), values.get("hydra.sweep.dir" if multirun else "hydra.run.dir")
    try:
        if resume is not None:
            if run_dir is not None and Path(str(run_dir)).resolve() != Path(str(resume)).resolve():
                raise RunDirError(f"resume={resume} continues in its own run dir; drop hydra.run.dir={run_dir} (to "
                                  "continue elsewhere, copy the run dir there and resume that copy)")
            if writable_problem(Path(str(resume))) is not None:
                raise RunDirError(f"resume={resume}: the run dir cannot be written ({writable_problem(Path(str(resume)))}); "
                                  "copy it to a writable place and resume the copy")
        elif run_dir is not None and "${" not in str(run_dir):
            check_writable(Path(str(run_dir)))
            if not multirun:
                check_fresh(Path(str(run_dir)), RUN_FILES, resume_hint(Path(str(run_dir))))
        else:
            check_writable(Path("outputs" if not multirun else "multirun"))
    except RunDirError as error:
        fail(str(error))


def run_config(cfg: DictConfig) -> DictConfig:
    """This run's config: the command line composed with the family defaults of env=, or, with resume=, the saved one."""
    overrides = list(HydraConfig.get().overrides.task)
    if cfg.resume is not None:
        return resumed_config(Path(cfg.resume), overrides)
    return with_family_defaults(cfg.env, overrides)


def with_family_defaults(env: str, overrides: list[str]) -> DictConfig:
    """configs/train/config.yaml composed again with family/<family>.yaml and family_agent/<family>_<agent>.yaml
    of `env`, under the command line's `overrides` (Hydra's defaults list cannot pick a file from a value)."""
    try:
        family, _ = parse_spec(env)
    except ValueError as error:
        fail(str(error))
    return compose(config_name="config", overrides=[*overrides, f"family={family}"])


def resumed_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The config saved in run_dir with this command line's key=value overrides on top (e.g. a larger total_steps);
    env, agent, aux and encoder cannot change, since the checkpoint holds their networks."""
    if not (run_dir / "config.yaml").is_file():
        fail(f"resume={run_dir}: it holds no config.yaml, so the run's settings are unknown: it is not a run directory "
             "of minc_rl.train, or its run stopped before it started (start a new run in another directory)")
    try:
        cfg = saved_config_with(OmegaConf.load(run_dir / "config.yaml"), run_dir, overrides,
                                {"env": "env", **{group: f"{group}.name" for group in GROUPS}})
    except RunDirError as error:
        fail(str(error))
    cfg.resume = str(run_dir)
    return cfg


def apply_replay_ratio(cfg: DictConfig, overrides: list[str]) -> None:
    """Set DQN's train_freq and gradient_steps from agent.replay_ratio when it is given; exit 2 when the command line
    also gives either of them, or the ratio is not valid."""
    ratio = cfg.agent.get("replay_ratio")
    if ratio is None:
        return
    keys = {override.key_or_group for override in OverridesParser.create().parse_overrides(overrides)}
    explicit = sorted(keys & {"agent.train_freq", "agent.gradient_steps"})
    if explicit:
        fail(f"agent.replay_ratio={ratio} sets agent.train_freq and agent.gradient_steps; drop "
             f"{' and '.join(explicit)}, or set agent.replay_ratio=null to give them yourself")
    check(check_int, "n_envs", cfg.n_envs, 1)
    try:
        cfg.agent.train_freq, cfg.agent.gradient_steps = replay_ratio_schedule(ratio, cfg.n_envs)
    except ValueError as error:
        fail(str(error))


def replay_ratio_schedule(ratio: Any, n_envs: int) -> tuple[int, int]:
    """SB3's (train_freq, gradient_steps) for `ratio` gradient steps per environment step: gradient_steps updates
    every train_freq vector steps of n_envs envs, so ratio = gradient_steps / (train_freq x n_envs), in lowest terms
    (1 -> (1, 1), 4 -> (1, 4), 0.25 -> (4, 1)); ValueError naming the ratio when no such whole numbers exist."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < float("inf"):
        raise ValueError(f"agent.replay_ratio={ratio!r} is not valid; give a number > 0 of gradient steps per "
                         "environment step (1: the MinAtar paper's protocol; 0.25: SB3's train_freq=4, "
                         "gradient_steps=1)")
    per_vector_step = Fraction(ratio * n_envs).limit_denominator(MAX_TRAIN_FREQ)
    if per_vector_step == 0 or abs(float(per_vector_step) - ratio * n_envs) > 1e-9 * ratio * n_envs:
        raise ValueError(f"agent.replay_ratio={ratio!r} with n_envs={n_envs} is not g / (f x n_envs) gradient steps "
                         f"per environment step with whole g >= 1 and 1 <= f <= {MAX_TRAIN_FREQ}")
    return per_vector_step.denominator, per_vector_step.numerator


def schedule(key: str, value: Any) -> Any:
    """rl-zoo3's "lin_<x>" (linear decay from x to 0 over the run) as an SB3 schedule; numbers pass through."""
    return LinearSchedule(schedule_start(key, value), 0.0, 1.0) if isinstance(value, str) else value


def schedule_start(key: str, value: Any) -> Any:
    """The value a schedule key starts from: x of "lin_<x>", a number as it is; exit 2 on any other string."""
    if not isinstance(value, str):
        return value
    try:
        if value.startswith("lin_"):
            return float(value[4:])
    except ValueError:
        pass
    fail(f"agent.{key}={value!r} is not valid; give a number or 'lin_<number>' (linear decay to 0)")


def check_agent(agent: DictConfig) -> None:
    """Exit 2 on an agent key out of its bounds (AGENT_INTS, AGENT_CHECKS; null keeps SB3's default)."""
    for key, value in agent.items():
        if value is None or (key == "gradient_steps" and value == -1):  # SB3: -1, as many steps as were collected
            continue
        if key == "train_freq" and OmegaConf.is_list(value):  # SB3's (n, "step" | "episode"), checked by SB3
            continue
        if key in AGENT_INTS:
            check(check_int, f"agent.{key}", value, AGENT_INTS[key])
        elif key in AGENT_CHECKS:
            check(AGENT_CHECKS[key], f"agent.{key}", schedule_start(key, value) if key in SCHEDULES else value)


def ppo_batch_size(cfg: DictConfig) -> int:
    """PPO's minibatch size: the rollout (n_envs x n_steps) split into agent.n_minibatches."""
    n_minibatches = cfg.agent.n_minibatches
    if not isinstance(n_minibatches, int) or n_minibatches < 1:
        fail(f"agent.n_minibatches must be an integer >= 1; got {n_minibatches!r}")
    batch_size = cfg.n_envs * cfg.agent.n_steps // n_minibatches
    if batch_size < 2:
        fail(
            f"agent.n_minibatches={n_minibatches} splits a rollout of n_envs x agent.n_steps = "
            f"{cfg.n_envs} x {cfg.agent.n_steps} into minibatches of {batch_size}; SB3's PPO needs at least 2"
        )
    return batch_size


def action_space(spec: str) -> gym.Space:
    """The action space of env `spec`. procgen, atari and minatar games have discrete actions; for a gymnasium id one
    environment is made (not the vector env) to read it, since gymnasium's registry does not record spaces."""
    family, name = parse_spec(spec)
    if family != "gym":
        return gym.spaces.Discrete(2)  # the number of actions does not matter here
    env = gym.make(name)
    try:
        return env.action_space
    finally:
        env.close()


def check_config(cfg: DictConfig) -> None:
    """Exit 2 with one line on any bad value, before an environment or a network is built."""
    try:
        validate_spec(cfg.env, n_envs=cfg.n_envs, **cfg.env_options)
    except ValueError as error:
        fail(str(error))
    try:
        aux_config(cfg)
        check_choice("encoder", cfg.encoder.name, ENCODER_CHOICES)
    except ValueError as error:
        fail(str(error))
    if cfg.agent.name not in AGENTS:
        fail(f"agent={cfg.agent.name!r} is not valid; choose one of {', '.join(map(repr, AGENTS))}")
    for key in ("total_steps", "n_envs", "eval.every", "eval.episodes", "eval.n_envs", "checkpoint.every"):
        check(check_int, key, OmegaConf.select(cfg, key), 1)
    if cfg.torch_threads is not None:
        check(check_int, "torch_threads", cfg.torch_threads, 1)
    if cfg.get("health") is not None:  # a run saved before the health settings existed has none
        check(check_int, "health.every", cfg.health.every, 0)
        check(check_int, "health.probe", cfg.health.probe, 1)
    check(check_choice, "device", cfg.device, DEVICES)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("device='cuda' but torch finds no CUDA device; use device=auto or device=cpu")
    check_agent(cfg.agent)
    for key in ("normalize_reward", "progress_bar", "checkpoint.replay_buffer"):
        check(check_bool, key, OmegaConf.select(cfg, key))
    if cfg.eval.deterministic is not None:
        check(check_bool, "eval.deterministic", cfg.eval.deterministic)
    if cfg.agent.name == "ppo":
        ppo_batch_size(cfg)
    if cfg.agent.name == "dqn":
        actions = action_space(cfg.env)
        if not isinstance(actions, gym.spaces.Discrete):
            fail(f"agent=dqn needs a discrete action space; {cfg.env} has {actions}; use agent=ppo")
    if cfg.encoder.init is not None and not Path(cfg.encoder.init).is_file():
        fail(f"encoder.init={cfg.encoder.init!r}: no such file (give an encoder.pt written by minc_rl.pretrain)")
    check_seed(cfg)
    if cfg.encoder.init is not None:
        problem = encoder_file_problem(Path(cfg.encoder.init), cfg.encoder.name)
        if problem is not None:
            fail(f"encoder.init={cfg.encoder.init!r}: {problem}")


def check(function: Callable[..., None], *args: Any) -> None:
    """A check of minc_rl.common.checks; its ValueError becomes fail()'s one line."""
    try:
        function(*args)
    except ValueError as error:
        fail(str(error))


def check_seed(cfg: DictConfig) -> None:
    """Every seed the run derives fits procgen's and ALE's 31-bit seeds: the training envs use seed + i and the
    evaluation envs seed + EVAL_SEED_OFFSET + i, one per env."""
    check(check_int, "seed", cfg.seed, 0)
    for key in ("n_envs", "eval.n_envs"):
        if OmegaConf.select(cfg, key) > MAX_ENVS:
            fail(f"{key}={OmegaConf.select(cfg, key)} is more environments than one process runs; give at most {MAX_ENVS:,}")
    largest = 2**31 - 1 - EVAL_SEED_OFFSET - (max(cfg.n_envs, cfg.eval.n_envs) - 1)
    if cfg.seed > largest:
        fail(
            f"seed={cfg.seed} is too large: the evaluation envs use seed + {EVAL_SEED_OFFSET:,} + i (one per env), "
            f"which must stay below 2**31; give a seed in [0, {largest}]"
        )


def aux_config(cfg: DictConfig) -> AuxConfig:
    """The run's AuxConfig from cfg.aux, an unset aux.source made the agent's own (ValueError naming a bad value)."""
    config = AuxConfig.of(OmegaConf.to_container(cfg.aux, resolve=True))
    return AGENTS[cfg.agent.name].aux_config(config) if cfg.agent.name in AGENTS else config


def build_envs(cfg: DictConfig) -> tuple[VecEnv, dict[str, VecEnv]]:
    """The training vector env and the evaluation envs by split (procgen: training levels and unseen levels).
    minc_rl.envs reports finished episodes in info['episode'] (Monitor), which evaluate_policy and the logs use."""
    options = OmegaConf.to_container(cfg.env_options)
    env = make_vec_env(cfg.env, cfg.n_envs, seed=cfg.seed, **options)
    eval_seed = cfg.seed + EVAL_SEED_OFFSET  # other episodes than the training envs'
    if parse_spec(cfg.env)[0] == "procgen":
        eval_envs = {
            "train_levels": make_vec_env(cfg.env, cfg.eval.n_envs, seed=eval_seed, **options),
            "unseen_levels": make_eval_env(cfg.env, cfg.eval.n_envs, seed=eval_seed, **options),
        }
    else:
        eval_envs = {"test": make_eval_env(cfg.env, cfg.eval.n_envs, seed=eval_seed, **options)}
    return env, eval_envs


def normalized_rewards(cfg: DictConfig, env: VecEnv, checkpoint: Path | None) -> VecEnv:
    """With normalize_reward, env under SB3's VecNormalize of rewards, its statistics from `checkpoint` if saved."""
    if not cfg.normalize_reward:
        return env
    saved = checkpoint and run_io.vecnormalize_path(checkpoint)
    if saved and saved.exists():
        return VecNormalize.load(str(saved), env)
    return VecNormalize(env, norm_obs=False, norm_reward=True, gamma=cfg.agent.gamma)


def checkpoint_fits(cfg: DictConfig, env: VecEnv) -> Callable[[dict[str, Any]], str | None]:
    """A check of a checkpoint's SB3 data against this run: its agent's policy, env=`s spaces and an aux state
    that cfg.aux can take (a checkpoint of another run, or a hand-edited config.yaml, is named, not loaded)."""
    agent, aux = AGENTS[cfg.agent.name], aux_config(cfg)

    def fits(data: dict[str, Any]) -> str | None:
        policy = data.get("policy_class")
        if policy not in agent.policy_aliases.values():
            return f"it holds a {getattr(policy, '__name__', policy)}, not a policy of agent={cfg.agent.name}"
        try:
            check_for_correct_spaces(agent._wrap_env(env, verbose=0), data["observation_space"], data["action_space"])
            aux.check_takes_state_of(AuxConfig.of(data.get("aux", "none")), "this run's aux")
        except ValueError as error:
            return f"it does not fit this run (env={cfg.env}): {one_line(error)}"
        return None

    return fits


def build_model(cfg: DictConfig, env: VecEnv) -> BaseAlgorithm:
    """MincPPO or MincDQN (every agent key but NOT_SB3_KEYS goes to SB3 as is) with cfg.aux's loss on cfg.encoder."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.agent).items() if k not in NOT_SB3_KEYS}
    kwargs.update({key: schedule(key, kwargs[key]) for key in SCHEDULES if key in kwargs})
    if isinstance((kwargs.get("policy_kwargs") or {}).get("activation_fn"), str):
        kwargs["policy_kwargs"]["activation_fn"] = activation(kwargs["policy_kwargs"]["activation_fn"])
    if cfg.agent.name == "ppo":
        kwargs["batch_size"] = ppo_batch_size(cfg)
    if cfg.agent.get("exploration_steps") is not None:  # SB3 takes the epsilon anneal as a fraction of the run
        kwargs["exploration_fraction"] = min(1.0, cfg.agent.exploration_steps / cfg.total_steps)
    policy = "CnnPolicy" if len(env.observation_space.shape) == 3 else "MlpPolicy"
    try:
        model = AGENTS[cfg.agent.name](
            policy,
            env,
            aux=aux_config(cfg),
            encoder=cfg.encoder.name,
            seed=cfg.seed,
            device=cfg.device,
            verbose=0,
            **kwargs,
        )
    except (ValueError, TypeError) as error:  # what only the spaces can refute (encoder=nature on 10 x 10 MinAtar), a
        fail(str(error))
    if cfg.encoder.init is not None:
        try:
            model.load_pretrained_encoder(cfg.encoder.init)
        except ValueError as error:
            fail(str(error))
    return model


def activation(name: str) -> type[torch.nn.Module]:
    """The torch.nn activation class `name` names (agent.policy_kwargs.activation_fn: ELU, ReLU, Tanh, ...)."""
    found = getattr(torch.nn, name, None)
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module) and found.__module__.endswith("activation")):
        valid = sorted(n for n, c in vars(torch.nn).items() if isinstance(c, type) and c.__module__.endswith("activation"))
        fail(f"agent.policy_kwargs.activation_fn={name!r} is not a torch.nn activation; valid: {', '.join(valid)}")
    return found


def start_wandb(cfg: DictConfig, run_dir: Path) -> Any:
    """A wandb run that mirrors the TensorBoard logs: online if logged in, else offline (WANDB_MODE decides if set)."""
    import wandb

    mode = cfg.wandb.mode or os.environ.get("WANDB_MODE") or ("online" if wandb.login(verify=False, prompt=False) else "offline")
    (run_dir / "tensorboard").mkdir(exist_ok=True)
    wandb.tensorboard.patch(root_logdir=str(run_dir / "tensorboard"))  # wandb mirrors SB3's TensorBoard events
    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        tags=list(cfg.wandb.tags),
        name=f"{cfg.env}-{cfg.agent.name}-{cfg.aux.name}-seed{cfg.seed}",
        id=cfg.wandb.id,
        resume="allow",
        config=OmegaConf.to_container(cfg, resolve=True),
        dir=str(run_dir),
        mode=mode,
    )


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config as config.yaml and .hydra/config.yaml, and for a fresh run the command line as
    .hydra/overrides.yaml (Hydra's own output_subdir is off: it would write before the run dir is owned)."""
    (run_dir / ".hydra").mkdir(exist_ok=True)
    if cfg.resume is None:
        overrides = list(HydraConfig.get().overrides.task)
        run_io.atomic_write(run_dir / ".hydra" / "overrides.yaml", lambda tmp: OmegaConf.save(OmegaConf.create(overrides), tmp))
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        run_io.atomic_write(path, lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def train(cfg: DictConfig) -> dict[str, Any]:
    """One training run in Hydra's run directory, which it holds alone (a lock) and which holds no other run;
    returns the summary."""
    started = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    cfg = run_config(cfg)
    apply_replay_ratio(cfg, list(HydraConfig.get().overrides.task))
    check_config(cfg)
    cfg.aux.source = aux_config(cfg).source  # config.yaml names the pairs DQN takes (its default: td)
    try:
        lock = RunLock(run_dir).acquire()
        cfg = rerun_sweep_job(cfg, run_dir)
        if cfg is not None and cfg.resume is not None and not resume_has_work(cfg, run_dir):
            cfg = None  # a finished run stays as it is
        if cfg is not None and cfg.resume is None:
            check_fresh(run_dir, RUN_FILES, resume_hint(run_dir))
    except RunDirError as error:
        fail(str(error))
    try:
        return run_training(cfg, run_dir, started) if cfg is not None else run_io.read_summary(run_dir / "summary.json")
    finally:
        lock.release()


def rerun_sweep_job(cfg: DictConfig, run_dir: Path) -> DictConfig | None:
    """A sweep (-m) rerun into its sweep dir, on any launcher: None for a job whose directory holds a finished run
    (summary.json: not interrupted, at cfg.total_steps or more), which is skipped; for a job with a checkpoint, the
    saved config with the job's overrides, which resumes it (up to cfg.total_steps); else cfg (a fresh run)."""
    if HydraConfig.get().mode != RunMode.MULTIRUN or cfg.resume is not None:
        return cfg
    if run_finished(run_dir, cfg.total_steps):
        print(f"minc_rl.train: {run_dir} holds a finished run; skipped", flush=True)
        return None
    if run_io.latest_checkpoint(run_dir) is None:
        if any((run_dir / name).exists() for name in RUN_FILES):
            fail(f"{run_dir} holds a sweep job that stopped before its first checkpoint, so nothing to resume; "
                 "move it away and rerun the sweep to start that job afresh")
        return cfg
    overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+").split("=")[0] != "study"]
    return resumed_config(run_dir, [*overrides, f"total_steps={cfg.total_steps}"])


def resume_has_work(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether resume= has steps to train: False (with a note) for a run that finished at cfg.total_steps or more,
    which is left untouched; exit 2 when total_steps is below the steps a stopped run has done (at them, the run
    takes its final evaluation and finishes)."""
    if run_finished(run_dir, cfg.total_steps):
        done = run_io.read_summary(run_dir / "summary.json")["steps"]
        print(f"minc_rl.train: {run_dir} holds a finished run of {done} steps; nothing to do (its files are left as "
              f"they are); to train it further: python -m minc_rl.train {resume_argument(run_dir)} "
              f"total_steps=<more than {done}>", flush=True)
        return False
    latest = run_io.latest_checkpoint(run_dir)
    if latest is not None and run_io.checkpoint_step(latest) > cfg.total_steps:
        fail(f"resume={cfg.resume!r}: total_steps={cfg.total_steps} is below the {run_io.checkpoint_step(latest)} "
             "steps of its newest checkpoint; give at least that many")
    return True


def run_finished(run_dir: Path, total_steps: int) -> bool:
    """Whether run_dir's summary.json says its run reached total_steps without being interrupted (damaged: no)."""
    try:
        summary = run_io.read_summary(run_dir / "summary.json")
    except ValueError:
        return False  # resume_checkpoint names the damaged file
    return bool(summary) and not summary.get("interrupted", True) and summary.get("steps", 0) >= total_steps


def run_training(cfg: DictConfig, run_dir: Path, started: float) -> dict[str, Any]:
    """Build the envs and the agent (or load its checkpoint, after checking every file of the run), learn, and
    write the summary and the learning curve. Nothing is written before the inputs are known to be good."""
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    env, eval_envs = build_envs(cfg)
    checkpoint = resume_checkpoint(cfg, run_dir, env) if cfg.resume else None
    env = normalized_rewards(cfg, env, checkpoint)
    model = build_model(cfg, env) if checkpoint is None else load_model(cfg, env, checkpoint, run_dir)
    start_run(cfg, run_dir)
    wandb_run = start_wandb(cfg, run_dir) if cfg.wandb.enabled else None  # before SB3's TensorBoard writer exists
    start_step = model.num_timesteps
    latest = set_logger(model, run_dir, resumed=checkpoint is not None)
    saved, stop, speed = learn(cfg, model, eval_envs, run_dir, start_step)

    summary = run_summary(cfg, model, run_dir, latest.values, time.time() - started, speed, stop.signum is not None)
    run_io.write_summary(run_dir / "summary.json", summary)
    run_io.plot_learning_curve(run_dir, f"{cfg.env} {cfg.agent.name} aux={cfg.aux.name} seed={cfg.seed}")
    if wandb_run is not None:
        wandb_run.summary.update(run_io.finite_or_none(summary))
        wandb_run.finish()
    for vec_env in (env, *eval_envs.values()):
        vec_env.close()
    print(f"minc_rl.train: step {model.num_timesteps}; checkpoint {saved}; outputs in {run_dir}", flush=True)
    if stop.signum is not None:
        print(f"minc_rl.train: interrupted; continue with: python -m minc_rl.train {resume_argument(run_dir)}", flush=True)
        raise SystemExit(128 + stop.signum)
    return summary


def resume_checkpoint(cfg: DictConfig, run_dir: Path, env: VecEnv) -> Path:
    """The newest checkpoint that loads and fits this run (a damaged or foreign newer one is named and skipped),
    after checking that progress.csv, evaluations.csv and summary.json can be continued; exit 2 with one line
    otherwise."""
    checkpoint, damaged = run_io.valid_checkpoint(run_dir, cfg.normalize_reward, checkpoint_fits(cfg, env))
    if checkpoint is None and not damaged:
        fail(f"resume={cfg.resume!r}: the run stopped before its first checkpoint, so there is nothing to resume; "
             "move the directory away or delete it, and start the run again")
    if checkpoint is None:
        fail(f"resume={cfg.resume!r}: no checkpoint in {run_dir / 'checkpoints'} can be loaded: {'; '.join(damaged)}")
    if damaged:
        log.warning("resuming from %s: the newer %s", checkpoint.name, "; ".join(f"{d} is skipped" for d in damaged))
    problem = run_io.readable_run_files(run_dir)
    if problem is not None:
        fail(f"resume={cfg.resume!r}: {problem}; repair it or move it away, then resume again")
    return checkpoint


def start_run(cfg: DictConfig, run_dir: Path) -> None:
    """Save the resolved config (with a new wandb id, so that resume= continues the same wandb run) and log where
    the config came from."""
    if cfg.wandb.enabled and cfg.wandb.id is None:
        cfg.wandb.id = secrets.token_hex(4)
    save_config(cfg, run_dir)
    family = parse_spec(cfg.env)[0]
    files = [f"{group}/{cfg[group].name}.yaml" if group != "aux" else f"aux={cfg.aux.name}" for group in GROUPS]
    files += [f"family/{family}.yaml", f"family_agent/{family}_{cfg.agent.name}.yaml"]
    log.info("config: %s + the command line; resolved in %s", ", ".join(files), run_dir / "config.yaml")


def load_model(cfg: DictConfig, env: VecEnv, checkpoint: Path, run_dir: Path) -> BaseAlgorithm:
    """The agent of `checkpoint` (its step count, optimizer and Lambda) on `env`, with DQN's replay buffer; the rows
    of evaluations.csv after its step are dropped, since the resumed run redoes them."""
    model = AGENTS[cfg.agent.name].load(checkpoint, env=env, device=cfg.device, aux=aux_config(cfg))
    replay = replay_buffer_of(cfg, checkpoint, run_dir) if hasattr(model, "replay_buffer") else None
    if replay is not None:
        try:
            model.load_replay_buffer(replay)
        except Exception as error:  # noqa: BLE001  a damaged pickle raises anything
            fail(f"resume={cfg.resume!r}: {replay} cannot be read ({one_line(error)}); "
                 "move it away to resume with an empty replay buffer")  # fmt: skip
    run_io.truncate_evaluations(run_dir / "evaluations.csv", model.num_timesteps)
    log.info("resuming %s at step %d", checkpoint, model.num_timesteps)
    return model


def replay_buffer_of(cfg: DictConfig, checkpoint: Path, run_dir: Path) -> Path | None:
    """The replay buffer saved with `checkpoint` (None without one, or with checkpoint.replay_buffer=false); exit 2
    when only a newer checkpoint's is there (the resume fell back past it): a buffer of later steps than the
    agent is never mixed in."""
    if not cfg.checkpoint.replay_buffer:
        return None
    legacy = run_dir / "checkpoints" / run_io.LEGACY_REPLAY_BUFFER  # written beside the newest checkpoint only
    for path in (run_io.replay_buffer_path(checkpoint), legacy if checkpoint == run_io.latest_checkpoint(run_dir) else None):
        if path is not None and path.exists():
            return path
    newer = [*(run_dir / "checkpoints").glob("*.replay_buffer.pkl"), *([legacy] if legacy.exists() else [])]
    if newer:
        fail(f"resume={cfg.resume!r}: {checkpoint.name} is resumed (a newer checkpoint was skipped), but the replay "
             f"buffer there ({newer[0].name}) is the newer checkpoint's; resume with checkpoint.replay_buffer=false to "
             "continue with an empty replay buffer, or repair the newer checkpoint")
    return None


def set_logger(model: BaseAlgorithm, run_dir: Path, resumed: bool) -> LatestValues:
    """SB3's logger writes progress.csv (on resume: after its rows up to the checkpoint), TensorBoard events, and
    the latest values (returned) for summary.json."""
    latest = LatestValues()
    progress = run_io.open_progress_csv(run_dir / "progress.csv", model.num_timesteps if resumed else None)
    model.set_logger(Logger(str(run_dir), [progress, TensorBoardOutputFormat(str(run_dir / "tensorboard")), latest]))
    return latest


def learn(
    cfg: DictConfig, model: BaseAlgorithm, eval_envs: dict[str, VecEnv], run_dir: Path, start_step: int
) -> tuple[Path, StopOnSignal, float]:
    """model.learn() up to cfg.total_steps with evaluations, checkpoints, the progress bar and a stop on Ctrl-C /
    SIGTERM; then the last checkpoint and, unless stopped, the last evaluation. Returns the last checkpoint, the
    stop callback (its signum says whether a signal stopped the run) and this session's steps per second."""
    deterministic = cfg.eval.deterministic if cfg.eval.deterministic is not None else cfg.agent.name == "dqn"
    stop = StopOnSignal()
    evaluation = Evaluation(eval_envs, cfg.eval.every, cfg.eval.episodes, deterministic, run_dir / "evaluations.csv", stop)
    checkpoints = Checkpoints(run_dir, cfg.checkpoint.every, cfg.checkpoint.replay_buffer)
    callbacks = [evaluation, checkpoints, stop] + ([ProgressBar(cfg.total_steps)] if cfg.progress_bar else [])
    if cfg.get("health") is not None and cfg.health.every > 0:
        callbacks.append(EncoderHealth(cfg.health.every, cfg.health.probe, cfg.seed, run_dir / "health_probe.npz"))
    stop.install()
    learn_started = time.time()
    try:
        model.learn(
            total_timesteps=max(cfg.total_steps - start_step, 0),
            callback=CallbackList(callbacks),
            log_interval=cfg.agent.log_interval,
            reset_num_timesteps=not cfg.resume,
        )
        learn_time = time.time() - learn_started
        saved = checkpoints.run()
        if stop.signum is None:
            evaluation.run()
        model.logger.record("time/total_timesteps", model.num_timesteps)
        model.logger.dump(model.num_timesteps)  # also the last train() metrics, which SB3 only dumps before the next
    except CheckpointError as error:  # a full disk, or a model gone non-finite: the last checkpoint is intact
        print(f"minc_rl.train: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        stop.restore()
    return saved, stop, (model.num_timesteps - start_step) / learn_time


def run_summary(
    cfg: DictConfig,
    model: BaseAlgorithm,
    run_dir: Path,
    logged: dict[str, Any],
    wall_time: float,
    steps_per_s: float,
    interrupted: bool,
) -> dict[str, Any]:
    """What summary.json holds: the run's identity, its wall time (summed over resumed sessions), its speed (this
    session's steps over its learn() time, periodic evaluations and checkpoints included), its final returns
    (training episodes: the last 100; evaluation: the last one of each split), its final aux metrics and its
    final encoder health (minc_rl.rl.health)."""
    previous = run_io.read_summary(run_dir / "summary.json") if cfg.resume else {}
    final_eval: dict[str, float] = {}
    for row in run_io.read_evaluations(run_dir / "evaluations.csv"):
        final_eval[row["split"]] = float(row["return_mean"])  # rows are in step order: the last one wins
    episodes = [info["r"] for info in model.ep_info_buffer or []]
    return {
        "env": cfg.env,
        "agent": cfg.agent.name,
        "aux": cfg.aux.name,
        "encoder": cfg.encoder.name,
        "seed": cfg.seed,
        "steps": model.num_timesteps,
        "total_steps": cfg.total_steps,
        "interrupted": interrupted,
        "wall_time_s": previous.get("wall_time_s", 0.0) + wall_time,
        "steps_per_s": steps_per_s,
        "final_train_return": float(np.mean(episodes)) if episodes else None,
        "final_test_return": final_eval.get("unseen_levels", final_eval.get("test")),
        "final_eval": final_eval,
        "aux_metrics": logged_under(logged, "train/aux_"),
        "health": logged_under(logged, "health/"),
        "run_dir": str(run_dir),
    }


def logged_under(logged: dict[str, Any], prefix: str) -> dict[str, float]:
    """The logged values whose key starts with `prefix`, by the rest of their key."""
    return {key.removeprefix(prefix): float(value) for key, value in logged.items() if key.startswith(prefix)}


def main() -> None:
    """Console entry point."""
    sys.argv[1:] = check_command_line(sys.argv[1:])
    train()


if __name__ == "__main__":
    main()
