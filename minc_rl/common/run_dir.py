"""A run directory belongs to one run: a lock while a process writes it, a refusal to start a fresh run in a
directory that holds one, and a check that the directory can be written at all.

The lock is fcntl.flock on `<run dir>/.lock`: the operating system releases it when the process ends, also when it
crashes or is killed, so a crashed run never leaves the directory locked. The file itself stays (with the pid of
the last holder); its presence means nothing.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

LOCK_FILE = ".lock"
# the signals that stop a run with a last checkpoint (minc_rl.train and minc_rl.pretrain); SIGUSR2: what SLURM sends
# before the time limit with --signal=USR2@<seconds> (submitit's timeout signal)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


def resume_argument(run_dir: Path | str) -> str:
    """`resume=<run_dir>` as the user types it in a shell: a path with characters Hydra's override grammar reads
    otherwise (a sweep job's directory holds `=` and `,`) is quoted for Hydra, and that for the shell."""
    if re.fullmatch(r"[\w/.:+~@%-]+", str(run_dir)):
        return f"resume={run_dir}"
    return "'resume=\"" + str(run_dir).replace("'", "'\\''") + "\"'"


class RunDirError(Exception):
    """A run directory that this run cannot use; the message is one line for the user."""


def writable_problem(directory: Path) -> str | None:
    """Why `directory` (made if missing) cannot be written, or None: checks the nearest folder that exists."""
    existing = Path(os.path.abspath(directory))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_writable(run_dir: Path) -> None:
    """Raise RunDirError naming the run directory unless it can be made and written."""
    problem = writable_problem(run_dir)
    if problem is not None:
        raise RunDirError(
            f"cannot write the run directory {run_dir}: {problem}; choose a writable one with hydra.run.dir=<dir>"
        )


def check_fresh(run_dir: Path, run_files: tuple[str, ...], resume_hint: str | None) -> None:
    """Raise RunDirError if run_dir already holds a run (any of `run_files`): a fresh run there would overwrite it.
    `resume_hint` is None for a run that stopped before its first checkpoint (nothing to resume)."""
    found = [name for name in run_files if (run_dir / name).exists()]
    if found and resume_hint is None:
        raise RunDirError(
            f"{run_dir} holds a run that stopped before its first checkpoint ({', '.join(found)}): there is nothing to "
            "resume; move it away or delete it, or start the new run in another directory (hydra.run.dir=<new dir>)"
        )
    if found:
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(found)}); continue it with {resume_hint}, "
            "or start a new run in another directory (hydra.run.dir=<new dir>)"
        )


def started_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run in run_dir was started with (minc_rl.train records them at its start in
    .hydra/overrides.yaml); empty where there is no such record."""
    recorded = Path(run_dir) / ".hydra" / "overrides.yaml"
    try:
        overrides = OmegaConf.load(recorded) if recorded.is_file() else []
    except Exception:  # noqa: BLE001  an unreadable record: no override counts as the run's own
        return []
    return [str(line) for line in overrides] if OmegaConf.is_list(overrides) else []


def saved_config_with(saved: DictConfig, run_dir: Path, overrides: list[str], fixed: Mapping[str, str]) -> DictConfig:
    """The config a run in run_dir saved, with the command line's key=value overrides on top (e.g. a larger budget);
    `fixed` maps each key the checkpoint ties down (a config group or a network setting) to where its saved value
    is; an override the run was started with passes unchanged. Raises RunDirError (one line) for a change of a fixed key, an unknown key or a sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # Hydra's grammar, as the command line

    cfg = saved.copy()
    started_with = set(started_overrides(run_dir))
    for override in OverridesParser.create().parse_overrides(overrides):
        key, value = override.key_or_group, override.value()
        if key in ("resume", "hydra.run.dir") or override.input_line in started_with:
            continue  # an override the run was started with (e.g. +study=<file>) is already in its saved config
        if key in fixed:
            saved_value = OmegaConf.select(cfg, fixed[key])
            if value != saved_value:
                raise RunDirError(f"resume: the run in {run_dir} has {key}={saved_value}; it cannot continue with "
                                  f"{key}={value}")
            continue
        if override.is_sweep_override() or override.is_delete() or OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            raise RunDirError(f"resume: {override.input_line!r} is not a key=value override of a key of the run in "
                              f"{run_dir}")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


class RunLock:
    """An exclusive, non-blocking lock on a run directory for this process (a context manager)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunDirError naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by another run (pid {holder}); two runs cannot write one directory: "
                "wait for it to end, or choose another directory (hydra.run.dir=<new dir>)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Give the lock back (the OS also does when the process ends)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
