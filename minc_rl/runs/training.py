"""The run of `python -m minc_rl.train env=procgen:coinrun aux=minc`: a Stable-Baselines3 PPO or DQN agent with an
auxiliary representation loss on consecutive observations, trained in its run directory.

A run, top to bottom: minc_rl.train checks the command line and, inside its Hydra app, the run's config
(minc_rl.runs.train_config: configs/train/ plus the family defaults picked from env=, every value checked, exit
code 2 and one line, before torch is imported), then calls run(). run() owns the run directory (a lock), skips a
finished sweep job or resumes a stopped one, builds the vector envs (minc_rl.envs) and the agent (minc_rl.agents,
whose train() method holds the gradient step), and runs model.learn() with callbacks for the progress bar,
evaluation, checkpoints and Ctrl-C / SIGTERM. Then it writes the last checkpoint, summary.json and
learning_curve.png; minc_rl.runs.run_io holds those file formats, minc_rl.runs.run_state what a checkpoint adds to
SB3's so that a resumed run repeats the run that was never stopped (random streams, env states).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat
from stable_baselines3.common.utils import LinearSchedule, check_for_correct_spaces
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from minc_rl.agents import MincDQN, MincPPO
from minc_rl.common.checks import one_line
from minc_rl.common.run_dir import RunDirError, RunLock, check_fresh, resume_argument
from minc_rl.envs import make_eval_env, make_vec_env, parse_spec
from minc_rl.rl.health import EncoderHealth
from minc_rl.rl.settings import AuxConfig
from minc_rl.runs import run_io
from minc_rl.runs.run_callbacks import (
    CheckpointError, Checkpoints, Evaluation, LatestValues, ProgressBar, StopOnSignal, Stopped,
)
from minc_rl.runs.run_state import RunState
from minc_rl.runs.train_config import (
    EVAL_SEED_OFFSET, GROUPS, RUN_FILES, SCHEDULES, aux_config, fail, ppo_batch_size, resume_hint, resumed_config,
    schedule_start,
)

AGENTS = {"ppo": MincPPO, "dqn": MincDQN}  # train_config.AGENT_NAMES names them without importing them
# agent keys minc_rl.train uses itself
NOT_SB3_KEYS = ("name", "n_minibatches", "log_interval", "exploration_steps", "replay_ratio")

log = logging.getLogger("minc_rl.train")


def schedule(key: str, value: Any) -> Any:
    """rl-zoo3's "lin_<x>" (linear decay from x to 0 over the run) as an SB3 schedule; numbers pass through."""
    return LinearSchedule(schedule_start(key, value), 0.0, 1.0) if isinstance(value, str) else value


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


def env_settings(cfg: DictConfig) -> dict[str, Any]:
    """What build_envs and normalized_rewards build the envs with (a resume restores saved envs only into the same)."""
    return {"env": cfg.env, "env_options": OmegaConf.to_container(cfg.env_options), "n_envs": cfg.n_envs,
            "seed": cfg.seed, "normalize_reward": cfg.normalize_reward, "eval.n_envs": cfg.eval.n_envs}


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


def run(cfg: DictConfig, run_dir: Path, started: float) -> dict[str, Any]:
    """One training run of a checked config (minc_rl.runs.train_config.checked_config) in Hydra's run directory,
    which it holds alone (a lock) and which holds no other run; returns the summary (a finished run's, untouched)."""
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
    latest = set_logger(model, run_dir, resumed=checkpoint is not None)
    saved, stop, speed = learn(cfg, model, eval_envs, run_dir, checkpoint)

    summary = run_summary(cfg, model, run_dir, latest.values, time.time() - started, speed, stop.signum is not None)
    run_io.write_summary(run_dir / "summary.json", summary)
    try:
        run_io.plot_learning_curve(run_dir, f"{cfg.env} {cfg.agent.name} aux={cfg.aux.name} seed={cfg.seed}")
    except OSError as error:  # a full disk: the checkpoint and summary.json are written already
        print(f"minc_rl.train: warning: {run_dir / 'learning_curve.png'} was not written ({one_line(error)}); the "
              "checkpoint and summary.json were written, so the run is complete without its plot", file=sys.stderr,
              flush=True)
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
    try:
        run_io.truncate_evaluations(run_dir / "evaluations.csv", model.num_timesteps)
    except OSError as error:
        fail(f"resume={cfg.resume!r}: {run_dir / 'evaluations.csv'} cannot be replaced by its rows up to step "
             f"{model.num_timesteps} ({one_line(error)}); make the run dir and its files writable (or free disk space), "
             "then resume again")
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
    cfg: DictConfig, model: BaseAlgorithm, eval_envs: dict[str, VecEnv], run_dir: Path, checkpoint: Path | None
) -> tuple[Path, StopOnSignal, float]:
    """model.learn() up to cfg.total_steps with evaluations, checkpoints, the progress bar and a stop on Ctrl-C /
    SIGTERM (a resumed run first gets the random streams and env states of its `checkpoint` back); then the last
    checkpoint and, unless stopped, the last evaluation. Returns the last checkpoint, the stop callback (its signum
    says whether a signal stopped the run) and this session's steps per second."""
    deterministic = cfg.eval.deterministic if cfg.eval.deterministic is not None else cfg.agent.name == "dqn"
    run_state = RunState(eval_envs, env_settings(cfg))
    stop = StopOnSignal(run_state)
    evaluation = Evaluation(eval_envs, cfg.eval.every, cfg.eval.episodes, deterministic, run_dir / "evaluations.csv", stop)
    checkpoints = Checkpoints(run_dir, cfg.checkpoint.every, cfg.checkpoint.replay_buffer, run_state)
    # at a rollout start: the due evaluation, a stop (before anything is written after a signal), the checkpoint
    callbacks = [evaluation, stop, checkpoints] + ([ProgressBar(cfg.total_steps)] if cfg.progress_bar else [])
    if cfg.get("health") is not None and cfg.health.every > 0:
        callbacks.append(EncoderHealth(cfg.health.every, cfg.health.probe, cfg.seed, run_dir / "health_probe.npz"))
    callback = CallbackList(callbacks)
    if checkpoint is not None:  # last: nothing may draw from the random streams between this and learn()
        continue_run_state(run_state, model, checkpoint)
    start_step = model.num_timesteps
    stop.install()
    learn_started = time.time()
    try:
        try:
            model.learn(
                total_timesteps=max(cfg.total_steps - start_step, 0),
                callback=callback,
                log_interval=cfg.agent.log_interval,
                reset_num_timesteps=not cfg.resume,
            )
        except Stopped:  # at a rollout start, where SB3's learn() does not end on its own
            callback.on_training_end()
        stop.roll_back()
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


def continue_run_state(run_state: RunState, model: BaseAlgorithm, checkpoint: Path) -> None:
    """The random streams and env states saved with `checkpoint` back in the run; one logged line where the resume
    is not exact (a checkpoint without them, written before exact resume, or an env that could not give its state)."""
    saved = run_io.read_run_state(checkpoint)
    if saved is None:
        log.warning("%s has no run state (it was written before exact resume): the random streams restart from the "
                    "run's seed and the episodes in progress restart", checkpoint.name)  # fmt: skip
        return
    missing = run_state.restore(model, saved)
    if missing:
        log.warning("resuming %s, not exactly: the episodes of %s restart", checkpoint.name, "; ".join(missing))


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

