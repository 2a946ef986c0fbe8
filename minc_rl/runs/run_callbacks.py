"""The callbacks of a training run (minc_rl.train): the progress bar, periodic evaluation and checkpoints, and a
prompt stop on Ctrl-C / SIGTERM at a point that a resumed run repeats exactly; and LatestValues, the logger output
that keeps the last value of every key."""

from __future__ import annotations

import copy
import logging
import signal
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import KVWriter
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv
from tqdm import tqdm

from minc_rl.common.checks import one_line
from minc_rl.common.run_dir import STOP_SIGNALS
from minc_rl.runs import run_io
from minc_rl.runs.run_state import RunState

log = logging.getLogger("minc_rl.train")


class LatestValues(KVWriter):
    """Keeps the last logged value of every key, for summary.json."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        self.values.update(key_values)

    def close(self) -> None:
        pass


class ProgressBar(BaseCallback):
    """A tqdm bar over the step budget with steps/s and the return of the latest finished training episode."""

    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.total_steps = total_steps

    def _on_training_start(self) -> None:
        self.bar = tqdm(total=self.total_steps, initial=self.num_timesteps, unit="step", unit_scale=True, mininterval=1.0)

    def _on_step(self) -> bool:
        self.bar.update(self.num_timesteps - self.bar.n)
        returns = [info["episode"]["r"] for info in self.locals["infos"] if "episode" in info]
        if returns:
            self.bar.set_postfix(episode_return=f"{returns[-1]:.2f}", refresh=False)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


class Stopped(Exception):
    """Raised by StopOnSignal at a rollout start after a signal: learn() ends there, before the rollout's first step."""


class StopOnSignal(BaseCallback):
    """Ctrl-C (SIGINT), SIGTERM or SIGUSR2 stop the run where a resumed run repeats it bit for bit. At a rollout start
    (the last update complete) learn() ends at once (Stopped is raised). An off-policy agent (DQN) gets there by
    finishing its collection (train_freq steps) and its update; an on-policy agent's rollout (PPO) can take minutes,
    so it stops at the next environment step, or inside an update after the current gradient step (MincPPO's
    `should_stop`), and `roll_back` returns it to the latest rollout start, which this callback keeps in memory (its
    parameters and RunState). A second signal acts as usual (Ctrl-C twice: KeyboardInterrupt)."""

    def __init__(self, run_state: RunState) -> None:
        super().__init__()
        self.run_state = run_state
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.cut = False  # whether the stop cut a rollout or an update, so that roll_back has to undo it
        self.snapshot: tuple[dict[str, Any], bytes] | None = None

    def install(self) -> None:
        """Catch STOP_SIGNALS from now on."""
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self.previous[signum])

    def _init_callback(self) -> None:
        self.rolls_back = isinstance(self.model, OnPolicyAlgorithm)
        if self.rolls_back:
            self.model.should_stop = self._stop_update  # MincPPO checks it after every gradient step

    def _stop_update(self) -> bool:
        if self.signum is not None and not self.cut:
            self.cut = True
            log.warning("%s: the update stops after its current gradient step", signal.Signals(self.signum).name)
        return self.signum is not None

    def _on_rollout_start(self) -> None:
        if self.signum is not None:
            log.warning("%s: stopping and writing a checkpoint", signal.Signals(self.signum).name)
            raise Stopped
        if self.rolls_back:
            self.snapshot = copy.deepcopy(self.model.get_parameters()), self.run_state.capture(self.model)

    def _on_step(self) -> bool:
        if self.signum is None or not self.rolls_back:
            return True
        self.cut = True
        log.warning("%s: stopping and writing a checkpoint", signal.Signals(self.signum).name)
        return False

    def roll_back(self) -> None:
        """After a stop that cut a rollout or an update: the run as it was at the latest rollout start."""
        if not self.cut:
            return
        parameters, state = self.snapshot
        self.model.set_parameters(parameters, exact_match=True)
        self.run_state.restore(self.model, state)
        log.warning("rolled back to step %d, the start of the rollout the stop cut (a resumed run repeats it)",
                    self.model.num_timesteps)


class EverySteps(BaseCallback):
    """Calls run() at the first rollout start at or past each multiple of `every` steps: a rollout starts right after
    the latest update (PPO's epochs, DQN's gradient steps), so run() sees the model trained on every step so far."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every

    def _on_training_start(self) -> None:
        self.next_step = (self.model.num_timesteps // self.every + 1) * self.every

    def _on_rollout_start(self) -> None:
        if self.model.num_timesteps >= self.next_step:
            self.run()
            self.next_step = (self.model.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        return True

    def run(self) -> Any:
        raise NotImplementedError


class EvaluationAbandoned(Exception):
    """Raised inside evaluate_policy when Ctrl-C or SIGTERM arrives, so that the run stops without waiting for it."""


class Evaluation(EverySteps):
    """evaluate_policy on each split's env; logged under eval/ and appended to evaluations.csv. An evaluation that a
    signal abandons gives back what it drew (the random streams and the envs are as before it), so that the run
    stops as if it had not started."""

    def __init__(
        self, envs: dict[str, VecEnv], every: int, episodes: int, deterministic: bool, path: Path, stop: StopOnSignal
    ) -> None:
        super().__init__(every)
        self.envs, self.episodes, self.deterministic, self.path, self.stop = envs, episodes, deterministic, path, stop

    def _on_training_start(self) -> None:
        super()._on_training_start()
        due = self.model.num_timesteps // self.every * self.every
        done = {row["split"] for row in run_io.read_evaluations(self.path) if int(row["step"]) >= due}
        if due > 0 and done != set(self.envs):  # a stop abandoned the evaluation due then: a resumed run makes it up
            run_io.truncate_evaluations(self.path, due - 1)
            if self.num_timesteps < self.model._total_timesteps:  # else the run's final evaluation is at this step
                self.run()

    def run(self) -> None:
        """One evaluation of every split at the model's current step; abandoned (no row) on Ctrl-C or SIGTERM."""
        before = self.stop.run_state.capture(self.model)
        for split, env in self.envs.items():
            try:
                returns, lengths = evaluate_policy(
                    self.model,
                    env,
                    self.episodes,
                    deterministic=self.deterministic,
                    return_episode_rewards=True,
                    callback=self._abandon_on_signal,
                )
            except EvaluationAbandoned:
                self.stop.run_state.restore(self.model, before)
                log.warning("evaluation at step %d abandoned", self.model.num_timesteps)
                return
            row = {
                "step": self.model.num_timesteps,
                "split": split,
                "return_mean": float(np.mean(returns)),
                "return_std": float(np.std(returns)),
                "length_mean": float(np.mean(lengths)),
                "episodes": len(returns),
            }
            run_io.append_evaluation(self.path, row)
            self.logger.record(f"eval/{split}_return", row["return_mean"])
            self.logger.record(f"eval/{split}_length", row["length_mean"])
            log.info("step %d, %s: return %.2f +- %.2f over %d episodes", row["step"], split, row["return_mean"],
                     row["return_std"], row["episodes"])  # fmt: skip

    def _abandon_on_signal(self, locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        if self.stop.signum is not None:
            raise EvaluationAbandoned


class CheckpointError(RuntimeError):
    """A checkpoint that was not written (non-finite parameters, a full disk); the message is one line."""


class Checkpoints(EverySteps):
    """An atomic checkpoint: model with optimizer and Lambda, step count, reward statistics, the run state (random
    streams and env states), DQN's replay buffer."""

    def __init__(self, run_dir: Path, every: int, replay_buffer: bool, run_state: RunState) -> None:
        super().__init__(every)
        self.run_dir, self.replay_buffer, self.run_state = run_dir, replay_buffer, run_state

    def run(self) -> Path:
        """Write the checkpoint of the current step; a model with non-finite parameters is never saved."""
        if not run_io.parameters_finite(self.model):
            raise CheckpointError(
                f"non-finite parameters at step {self.model.num_timesteps}: not checkpointed; "
                f"the last good checkpoint is {run_io.latest_checkpoint(self.run_dir)}"
            )
        try:
            state = self.run_state.capture(self.model)
            return run_io.save_checkpoint(self.model, self.run_dir, self.replay_buffer, state)
        except OSError as error:
            raise CheckpointError(
                f"the checkpoint of step {self.model.num_timesteps} was not written ({one_line(error)}); "
                f"the last checkpoint, {run_io.latest_checkpoint(self.run_dir)}, is intact"
            ) from error
