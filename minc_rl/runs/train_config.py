"""The checks of `python -m minc_rl.train`'s command line and config, read before torch, SB3 or the agents are
imported: a typo, a bad value, a bad group choice or a run directory that cannot be used exits with code 2 and
one line in a fraction of a second. minc_rl.train calls check_command_line before Hydra starts and checked_config
inside its Hydra app; a sweep (-m) is checked whole, job by job, before its first job trains.

What is imported here is light (Hydra, OmegaConf, numpy, minc_rl.common, minc_rl.envs.spec, minc_rl.rl.settings);
torch, gymnasium or the encoders only for the settings that need them (device=cuda, a gym: id with agent=dqn,
encoder.init=, a run directory named on the command line).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

import minc_rl.configs
from minc_rl.common import cli
from minc_rl.common.checks import (
    check_bool, check_choice, check_int, check_nonnegative, check_positive, check_unit_interval, one_line,
)
from minc_rl.common.run_dir import RunDirError, check_fresh, check_writable, resume_argument, saved_config_with, writable_problem
from minc_rl.configs import config_dir
from minc_rl.envs.spec import parse_spec, validate_spec
from minc_rl.rl.settings import ENCODER_CHOICES, AuxConfig

if TYPE_CHECKING:
    import gymnasium

for _name in minc_rl.configs.AUX_GROUP_OPTIONS:  # the train command's aux group (minc_rl.configs says why not YAML)
    ConfigStore.instance().store(group="aux", name=_name, node={"name": _name})

CONFIG_DIR = config_dir("train")
AGENT_NAMES = ("ppo", "dqn")  # minc_rl.runs.training.AGENTS: MincPPO, MincDQN
TD_PAIR_AGENTS = ("dqn",)  # the agents whose aux pairs default to their TD batch (MincDQN.takes_td_settings)
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

# hydra.run.dir in config.yaml: a resumed run writes into the run directory it continues.
OmegaConf.register_new_resolver("minc_rl.run_dir", lambda resume, fresh: resume or fresh, replace=True)
# hydra.sweep.subdir: a job's directory named by its settings, not its job number, so that a sweep rerun with its
# values reordered or an arm added finds each job's run where it left it (job_dirname)
OmegaConf.register_new_resolver("minc_rl.job_dirname", lambda name, task: job_dirname(str(name), list(task)), replace=True)
MAX_DIRNAME = 200  # bytes; file systems allow 255 per name
# keys left out of hydra.job.override_dirname (config.yaml's exclude_keys) for their characters (paths, lists), not
# because the job stays the same without them: a hash of their values tells such jobs apart
NAMELESS_SETTINGS = ("encoder.init", "wandb.tags")


def job_dirname(override_dirname: str, task: list[str]) -> str:
    """A sweep job's directory name from its settings: Hydra's override_dirname (the job's overrides sorted, less the
    keys that leave the job the same: total_steps, torch_threads, progress_bar, resume), with a hash of the
    NAMELESS_SETTINGS it gives, shortened by short_dirname; "defaults" for a job with no setting of its own."""
    nameless = sorted(o for o in task if o.lstrip("+").split("=", 1)[0] in NAMELESS_SETTINGS)
    name = override_dirname or "defaults"
    if nameless:
        name += "-" + hashlib.sha1("\n".join(nameless).encode()).hexdigest()[:10]
    return short_dirname(name)


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
    for override in overrides:
        if override.key_or_group == "study" and not override.is_sweep_override():
            path = study_path(str(override.value()), config_dirs)
            if path is not None:
                check_study(path)
    check_keys(overrides, config_dirs)
    multirun = any(a in ("-m", "--multirun") for a in args)
    check_run_dir_argument(overrides, multirun)
    passed_on = [f"++{a}" if a.startswith(tuple(f"{k}." for k in PASSED_ON)) else a for a in args]
    if multirun:
        check_sweep_jobs(overrides, config_dirs)
    elif not any(a in cli.HELP_FLAGS for a in args):
        check_single_job(overrides, passed_on, config_dirs)
    return passed_on


def check_keys(overrides: list[Any], config_dirs: list[Path]) -> None:
    """Exit 2 with the closest valid key on a key=value (or +key=value) whose key the config does not have, except
    inside OPEN_KEYS. With resume= the saved config decides (resumed_config)."""
    if any(o.key_or_group == "resume" and o.value() is not None for o in overrides):
        return
    checked = [o for o in overrides if not passes_key_check(o)]
    valid = valid_keys(overrides, study_overrides(overrides, config_dirs)) if checked else set()  # composing costs
    for override in checked:
        key = override.key_or_group
        if key in valid:
            continue
        plus = f" (to give SB3 another keyword argument, write +{key}=<value>)" if key.startswith("agent.") else ""
        fail(cli.unknown_key_message(key, valid, "minc_rl.train") + plus)


def passes_key_check(override: Any) -> bool:
    """Whether an override needs no composed config to be checked: hydra.*, a group, family, resume or study, a key
    of config.yaml itself (every composition has it: group files add keys, none removes one), or a key inside
    OPEN_KEYS added with + (or inside PASSED_ON)."""
    key = override.key_or_group
    if key.startswith("hydra") or key in (*GROUPS, "family", "family_agent", "resume", "study") or key in base_keys():
        return True
    return any(key.startswith(f"{open_key}.") for open_key in OPEN_KEYS) and (
        override.is_add() or override.is_force_add() or key.startswith(tuple(f"{k}." for k in PASSED_ON))
    )


@functools.cache
def base_keys() -> frozenset[str]:
    """The dotted keys of configs/train/config.yaml as written (its defaults list aside), read without composing."""
    base = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))
    return frozenset(key for key in cli.dotted_keys(base) if not key.startswith(("defaults", "hydra")))


def study_path(name: str, config_dirs: list[Path]) -> Path | None:
    """study/<name>.yaml in the --config-dir folders or configs/train (the first found), or None."""
    return next((p for d in (*config_dirs, CONFIG_DIR) if (p := d / "study" / f"{name}.yaml").is_file()), None)


SWEEPER_KEYS = ("params", "max_batch_size")  # Hydra's basic sweeper


def check_study(path: Path) -> DictConfig:
    """A study file read and checked before Hydra composes it (its errors are tracebacks): exit 2 with one line for
    YAML it cannot parse, a defaults-list override of a group or option that does not exist, or a hydra.sweeper key
    Hydra's sweeper does not have (hydra.sweeper.parms would leave the study without its grid)."""
    try:
        study = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001  YAML's errors and OmegaConf's
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}" if mark is not None else one_line(error)
        fail(f"study file {path} is not valid YAML ({where}); fix it")
    if not isinstance(study, DictConfig):
        fail(f"study file {path} holds no mapping of settings (see configs/train/study/ for examples)")
    for entry in study.get("defaults") or []:
        for key, value in (entry.items() if isinstance(entry, DictConfig) else ()):
            group = key.removeprefix("override").strip().lstrip("/")
            if group not in GROUPS:
                fail(f"study file {path}: its defaults list sets {group!r}, which is not a config group; valid groups: "
                     f"{', '.join(GROUPS)} (e.g. 'override /agent: dqn')")
            if value not in group_choices(group):
                fail(f"study file {path}: its defaults list sets {group}={value!r}, which is not valid; choose one of "
                     f"{', '.join(map(repr, group_choices(group)))}")
    sweeper = OmegaConf.select(study, "hydra.sweeper")
    for key in sweeper if isinstance(sweeper, DictConfig) else ():
        if key not in SWEEPER_KEYS:
            valid = {f"hydra.sweeper.{k}" for k in SWEEPER_KEYS}
            fail(f"study file {path}: {cli.unknown_key_message(f'hydra.sweeper.{key}', valid, 'minc_rl.train')}")
    return study


def study_overrides(overrides: list[Any], config_dirs: list[Path]) -> list[str]:
    """The command line's +study=<name> (and the --config-dir it is found in) as compose() overrides, when the study
    file exists (check_sweep_jobs names a missing one): a study's defaults (agent=dqn) count for the keys."""
    studies = [o for o in overrides if o.key_or_group == "study" and not o.is_sweep_override()]
    if not any(study_path(str(o.value()), config_dirs) for o in studies):
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
        default_env = compose("config", overrides=extra).env if extra else OmegaConf.load(CONFIG_DIR / "config.yaml").env
        for env in choices["env"] or [default_env]:
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
            path = study_path(str(override.value()), config_dirs)
            if path is None:
                fail(f"study={override.value()!r}: no study/{override.value()}.yaml in {', '.join(str(d) for d in (CONFIG_DIR, *config_dirs))}")
            params = OmegaConf.select(check_study(path), "hydra.sweeper.params", default=None) or {}
            for study_override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
                values = study_override.sweep_string_iterator() if study_override.is_discrete_sweep() else [
                    study_override.get_value_element_as_str()]
                sweeps.append([f"{study_override.key_or_group}={v}" for v in values])
    jobs = [[*fixed, *combination] for combination in itertools.product(*sweeps)]
    check_job_dirs(jobs)
    check_jobs(jobs)


def check_job_dirs(jobs: list[list[str]]) -> None:
    """Exit 2 for two jobs that differ only in keys that do not name a job's directory (total_steps, torch_threads,
    progress_bar): they would share one run directory (job_dirname)."""
    excluded = set(OmegaConf.load(CONFIG_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
    unnamed = excluded - {*NAMELESS_SETTINGS, "resume"}  # resume= is no sweep
    seen: dict[tuple[str, ...], list[str]] = {}
    for job in jobs:
        name = tuple(sorted(o for o in job if o.lstrip("+").split("=", 1)[0] not in unnamed))
        if name in seen and seen[name] != job:
            differ = sorted(set(job) ^ set(seen[name]))
            fail(f"the sweep's jobs {', '.join(differ)} would share one directory: {', '.join(sorted(unnamed))} do "
                 "not name a job's directory (a rerun with a larger total_steps continues its jobs there); sweep "
                 "them in separate sweeps (hydra.sweep.dir=<dir> each)")
        seen[name] = job


def check_single_job(overrides: list[Any], args: list[str], config_dirs: list[Path]) -> None:
    """A single run's config checked as the run will check it, before Hydra starts (whose start-up with its
    launcher plugins would otherwise come first): a bad value exits 2 at once. Not resume= (the saved config
    decides), and not what Hydra reports itself (a config it cannot compose)."""
    if any(o.key_or_group == "resume" for o in overrides):
        return
    job = [a for a in args if "=" in a and not a.startswith(("-", "hydra."))]
    try:
        check_jobs([[*searchpath_override(config_dirs), *job]])
    except HydraException:
        GlobalHydra.instance().clear()


def check_jobs(jobs: Iterable[list[str]]) -> None:
    """Each job's key=value overrides composed and checked as the job itself would check them (not resume=): a bad
    value exits 2 before anything trains."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for job in jobs:
            cfg = with_family_defaults(job_env(job), job)
            apply_replay_ratio(cfg, job)
            check_config(cfg)
    GlobalHydra.instance().clear()


def job_env(job: list[str]) -> str:
    """The env= a job's overrides compose to: the command line's, else config.yaml's when no +study may set it,
    else (a study) the composed config's. Inside initialize_config_dir."""
    given = [o.split("=", 1)[1] for o in job if o.lstrip("+").startswith("env=")]
    if given:
        return given[-1]
    if not any(o.lstrip("+").startswith(("study=", "hydra.searchpath=")) for o in job):
        return OmegaConf.load(CONFIG_DIR / "config.yaml").env
    return compose(config_name="config", overrides=job).env


def resume_hint(run_dir: Path) -> str | None:
    """How to continue the run in run_dir (resume=...), or None when it has no checkpoint to continue from."""
    from minc_rl.runs.run_io import latest_checkpoint  # torch and SB3: only where a run directory is named

    return resume_argument(run_dir) if latest_checkpoint(run_dir) is not None else None


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
        saved = OmegaConf.load(run_dir / "config.yaml")
    except Exception as error:  # noqa: BLE001  YAML's and OmegaConf's errors alike
        fail(f"resume={run_dir}: its config.yaml cannot be read ({one_line(error)}); repair that file (it is the run's "
             f"resolved config) and resume again")
    check_saved_keys(saved, run_dir)
    try:
        cfg = saved_config_with(saved, run_dir, overrides, {"env": "env", **{group: f"{group}.name" for group in GROUPS}})
    except RunDirError as error:
        fail(str(error))
    cfg.resume = str(run_dir)
    return cfg


def check_saved_keys(saved: Any, run_dir: Path) -> None:
    """Exit 2 for a key of a run's saved config.yaml (edited by hand) that minc_rl.train's config lacks, as the command
    line refuses it: a run would ignore it. The groups' and env_options' own keys are checked when the run is."""
    if not isinstance(saved, DictConfig):
        fail(f"resume={run_dir}: its config.yaml holds no mapping of settings; repair that file and resume again")
    open_tops = (*GROUPS, "env_options")
    valid = base_keys() | set(GROUPS)
    for key in sorted(cli.dotted_keys(OmegaConf.to_container(saved))):
        if key.split(".")[0] not in open_tops or "." not in key:
            if key not in valid:
                fail(f"resume={run_dir}: in its config.yaml, {cli.unknown_key_message(key, valid, 'minc_rl.train')} "
                     f"(a run would ignore it: fix or remove it in {run_dir / 'config.yaml'})")


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


def action_space(spec: str) -> gymnasium.Space | None:
    """The action space of a gym: id, or None for procgen, atari and minatar, whose games have discrete actions. One
    environment is made (not the vector env) to read it, since gymnasium's registry does not record spaces."""
    family, name = parse_spec(spec)
    if family != "gym":
        return None
    import gymnasium

    env = gymnasium.make(name)
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
    if cfg.agent.name not in AGENT_NAMES:
        fail(f"agent={cfg.agent.name!r} is not valid; choose one of {', '.join(map(repr, AGENT_NAMES))}")
    for key in ("total_steps", "n_envs", "eval.every", "eval.episodes", "eval.n_envs", "checkpoint.every"):
        check(check_int, key, OmegaConf.select(cfg, key), 1)
    if cfg.torch_threads is not None:
        check(check_int, "torch_threads", cfg.torch_threads, 1)
    if cfg.get("health") is not None:  # a run saved before the health settings existed has none
        check(check_int, "health.every", cfg.health.every, 0)
        check(check_int, "health.probe", cfg.health.probe, 1)
    check(check_choice, "device", cfg.device, DEVICES)
    if cfg.device == "cuda" and not cuda_available():
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
        if actions is not None:
            from gymnasium.spaces import Discrete  # gymnasium is imported: action_space made the env

            if not isinstance(actions, Discrete):
                fail(f"agent=dqn needs a discrete action space; {cfg.env} has {actions}; use agent=ppo")
    if cfg.encoder.init is not None and not Path(cfg.encoder.init).is_file():
        fail(f"encoder.init={cfg.encoder.init!r}: no such file (give an encoder.pt written by minc_rl.pretrain)")
    check_seed(cfg)
    if cfg.encoder.init is not None:
        from minc_rl.ssl.encoders import encoder_file_problem  # torch: only where encoder.init names a file

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
    if cfg.agent.name in TD_PAIR_AGENTS and config.source is None:  # as MincDQN.aux_config (issue 24's rule)
        return dataclasses.replace(config, source="td")
    return config


def cuda_available() -> bool:
    """Whether torch finds a CUDA device (imports torch: asked only for device=cuda)."""
    import torch

    return torch.cuda.is_available()


def checked_config(cfg: DictConfig) -> DictConfig:
    """Inside the Hydra app: this run's config (the command line with the family defaults of env=, or with resume=
    the saved one), agent.replay_ratio applied, every value checked (exit 2 and one line on a bad one), and
    aux.source set to the pairs the agent takes (config.yaml names them; DQN's default: td)."""
    cfg = run_config(cfg)
    apply_replay_ratio(cfg, list(HydraConfig.get().overrides.task))
    check_config(cfg)
    cfg.aux.source = aux_config(cfg).source
    return cfg
