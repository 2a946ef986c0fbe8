"""`python -m minc_rl.train env=procgen:coinrun aux=minc`: train a Stable-Baselines3 PPO or DQN agent with an
auxiliary representation loss (MINC, spectral contrastive or InfoNCE) on consecutive observations.

A run, top to bottom: main() checks the config-group choices of the command line and starts the Hydra app
train(). train() composes the run's config (configs/train/ plus the family defaults picked from env=), checks
every value (exit code 2 and one line, before anything is built), builds the vector envs (minc_rl.envs) and the
agent (minc_rl.agents, whose train() method holds the gradient step), and runs model.learn() with callbacks for
the progress bar, evaluation, checkpoints and Ctrl-C / SIGTERM. Then it writes the last checkpoint, summary.json
and learning_curve.png; minc_rl.run_io holds those file formats.
"""

from __future__ import annotations

import minc_rl.envs  # noqa: F401, I001  first: it mutes legacy gym's start-up notice, which importing SB3 would print
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import gymnasium as gym
import hydra
import numpy as np
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

import minc_rl.configs
from minc_rl import run_io
from minc_rl.agents import MincDQN, MincPPO
from minc_rl.agents.auxiliary import AuxConfig
from minc_rl.checks import check_choice
from minc_rl.extractor import ENCODER_CHOICES
from minc_rl.envs import make_eval_env, make_vec_env, parse_spec, validate_spec
from minc_rl.run_callbacks import Checkpoints, Evaluation, LatestValues, ProgressBar, StopOnSignal

CONFIG_DIR = Path(minc_rl.configs.__file__).parent / "train"
AGENTS = {"ppo": MincPPO, "dqn": MincDQN}
GROUPS = ("agent", "aux", "encoder")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("learning_rate", "clip_range", "clip_range_vf")  # agent keys that take rl-zoo3's "lin_<x>"
NOT_SB3_KEYS = ("name", "n_minibatches", "log_interval", "exploration_steps")  # agent keys minc_rl.train uses itself

log = logging.getLogger("minc_rl.train")

# hydra.run.dir in config.yaml: a resumed run writes into the run directory it continues.
OmegaConf.register_new_resolver("minc_rl.run_dir", lambda resume, fresh: resume or fresh, replace=True)


def fail(message: str) -> NoReturn:
    """Print one line naming the bad value and the valid ones, and exit with code 2 (a usage error)."""
    print(f"minc_rl.train: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def group_choices(group: str) -> list[str]:
    """The options of a config group: the YAML files in configs/train/<group>/ (aux: minc_rl.configs' ConfigStore)."""
    if group == "aux":
        return sorted(minc_rl.configs.AUX_GROUP_OPTIONS)
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


def check_command_line(args: list[str]) -> None:
    """Exit 2 on an unknown agent / aux / encoder, a family= override or a resume= without a run, before Hydra starts
    (Hydra's own message for an unknown group option is several lines and exit code 1)."""
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except OverrideParseException:
        return  # Hydra reports syntax errors itself
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
            if not (Path(str(override.value())) / "config.yaml").is_file():
                fail(f"resume={override.value()!r} is not a run directory of minc_rl.train (it has no config.yaml)")


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
    cfg = OmegaConf.load(run_dir / "config.yaml")
    for override in OverridesParser.create().parse_overrides(overrides):
        key, value = override.key_or_group, override.value()
        if key == "resume":
            continue
        if key in (*GROUPS, "env"):
            saved = cfg[key].name if key in GROUPS else cfg[key]
            if value != saved:
                fail(f"resume: the run in {run_dir} has {key}={saved}; it cannot continue with {key}={value}")
            continue
        if override.is_sweep_override() or override.is_delete() or OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            fail(f"resume: {override.input_line!r} is not a key=value override of a key in {run_dir / 'config.yaml'}")
        OmegaConf.update(cfg, key, value, merge=False)
    cfg.resume = str(run_dir)
    return cfg


def schedule(key: str, value: Any) -> Any:
    """rl-zoo3's "lin_<x>" (linear decay from x to 0 over the run) as an SB3 schedule; numbers pass through."""
    if not isinstance(value, str):
        return value
    try:
        if value.startswith("lin_"):
            return LinearSchedule(float(value[4:]), 0.0, 1.0)
    except ValueError:
        pass
    fail(f"agent.{key}={value!r} is not valid; give a number or 'lin_<number>' (linear decay to 0)")


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
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(f"{key} must be an integer >= 1; got {value!r}")
    if cfg.torch_threads is not None and (not isinstance(cfg.torch_threads, int) or cfg.torch_threads < 1):
        fail(f"torch_threads must be null (torch's default) or an integer >= 1; got {cfg.torch_threads!r}")
    if cfg.device not in DEVICES:
        fail(f"device={cfg.device!r} is not valid; choose one of {', '.join(map(repr, DEVICES))}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("device='cuda' but torch finds no CUDA device; use device=auto or device=cpu")
    for key in SCHEDULES:
        schedule(key, cfg.agent.get(key))
    if cfg.agent.name == "ppo":
        ppo_batch_size(cfg)
    if cfg.agent.name == "dqn":
        actions = action_space(cfg.env)
        if not isinstance(actions, gym.spaces.Discrete):
            fail(f"agent=dqn needs a discrete action space; {cfg.env} has {actions}; use agent=ppo")
    if cfg.encoder.init is not None and not Path(cfg.encoder.init).is_file():
        fail(f"encoder.init={cfg.encoder.init!r}: no such file (give an encoder.pt written by minc_rl.pretrain)")


def aux_config(cfg: DictConfig) -> AuxConfig:
    """The run's AuxConfig from cfg.aux (ValueError naming a bad value)."""
    return AuxConfig.of(OmegaConf.to_container(cfg.aux, resolve=True))


def build_envs(cfg: DictConfig, checkpoint: Path | None) -> tuple[VecEnv, dict[str, VecEnv]]:
    """The training vector env and the evaluation envs by split (procgen: training levels and unseen levels).
    minc_rl.envs reports finished episodes in info['episode'] (Monitor), which evaluate_policy and the logs use."""
    options = OmegaConf.to_container(cfg.env_options)
    env = make_vec_env(cfg.env, cfg.n_envs, seed=cfg.seed, **options)
    if cfg.normalize_reward:
        saved = checkpoint and run_io.vecnormalize_path(checkpoint)
        if saved and saved.exists():
            env = VecNormalize.load(str(saved), env)
        else:
            env = VecNormalize(env, norm_obs=False, norm_reward=True, gamma=cfg.agent.gamma)
    eval_seed = cfg.seed + 1_000_000  # other episodes than the training envs'
    if parse_spec(cfg.env)[0] == "procgen":
        eval_envs = {
            "train_levels": make_vec_env(cfg.env, cfg.eval.n_envs, seed=eval_seed, **options),
            "unseen_levels": make_eval_env(cfg.env, cfg.eval.n_envs, seed=eval_seed, **options),
        }
    else:
        eval_envs = {"test": make_eval_env(cfg.env, cfg.eval.n_envs, seed=eval_seed, **options)}
    return env, eval_envs


def build_model(cfg: DictConfig, env: VecEnv) -> BaseAlgorithm:
    """MincPPO or MincDQN (every agent key but NOT_SB3_KEYS goes to SB3 as is) with cfg.aux's loss on cfg.encoder."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.agent).items() if k not in NOT_SB3_KEYS}
    kwargs.update({key: schedule(key, kwargs[key]) for key in SCHEDULES if key in kwargs})
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
    """The resolved config as config.yaml, also over Hydra's .hydra/config.yaml (composed before the family defaults)."""
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.parent.is_dir():
            run_io.atomic_write(path, lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def train(cfg: DictConfig) -> dict[str, Any]:
    """One training run in Hydra's run directory; returns the summary."""
    started = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    cfg = run_config(cfg)
    check_config(cfg)
    checkpoint = run_io.latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        fail(f"resume={cfg.resume!r} has no checkpoint in {run_dir / 'checkpoints'}")
    start_run(cfg, run_dir)

    wandb_run = start_wandb(cfg, run_dir) if cfg.wandb.enabled else None  # before SB3's TensorBoard writer exists
    env, eval_envs = build_envs(cfg, checkpoint)
    model = build_model(cfg, env) if checkpoint is None else load_model(cfg, env, checkpoint, run_dir)
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
        print(f"minc_rl.train: interrupted; continue with: python -m minc_rl.train resume={run_dir}", flush=True)
        raise SystemExit(128 + stop.signum)
    return summary


def start_run(cfg: DictConfig, run_dir: Path) -> None:
    """Save the resolved config (with a new wandb id, so that resume= continues the same wandb run), set torch's
    thread count and log where the config came from."""
    if cfg.wandb.enabled and cfg.wandb.id is None:
        cfg.wandb.id = secrets.token_hex(4)
    save_config(cfg, run_dir)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    family = parse_spec(cfg.env)[0]
    files = [f"{group}/{cfg[group].name}.yaml" for group in GROUPS]
    files += [f"family/{family}.yaml", f"family_agent/{family}_{cfg.agent.name}.yaml"]
    log.info("config: %s + the command line; resolved in %s", ", ".join(files), run_dir / "config.yaml")


def load_model(cfg: DictConfig, env: VecEnv, checkpoint: Path, run_dir: Path) -> BaseAlgorithm:
    """The agent of `checkpoint` (its step count, optimizer and Lambda) on `env`, with DQN's replay buffer; the rows
    of evaluations.csv after its step are dropped, since the resumed run redoes them."""
    model = AGENTS[cfg.agent.name].load(checkpoint, env=env, device=cfg.device)
    if cfg.checkpoint.replay_buffer and run_io.replay_buffer_path(run_dir).exists():
        model.load_replay_buffer(run_io.replay_buffer_path(run_dir))
    run_io.truncate_evaluations(run_dir / "evaluations.csv", model.num_timesteps)
    log.info("resuming %s at step %d", checkpoint, model.num_timesteps)
    return model


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
    (training episodes: the last 100; evaluation: the last one of each split) and its final aux metrics."""
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
        "aux_metrics": {k.removeprefix("train/aux_"): float(v) for k, v in logged.items() if k.startswith("train/aux_")},
        "run_dir": str(run_dir),
    }


def main() -> None:
    """Console entry point."""
    check_command_line(sys.argv[1:])
    train()


if __name__ == "__main__":
    main()
