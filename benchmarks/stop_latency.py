"""Seconds from SIGTERM (or SIGINT, SIGUSR2) to the checkpoint on disk, when the signal arrives inside a PPO update.

    python benchmarks/stop_latency.py                       # procgen coinrun at the protocol defaults (64 x 256, IMPALA)
    python benchmarks/stop_latency.py --delay 3 --signal USR2 -- n_envs=8 agent.n_steps=64   # any train overrides

Starts `minc_rl.train env=procgen:coinrun aux=minc torch_threads=1` in a child process that prints a marker when
MincPPO.train (the update after a rollout) begins, sends the signal --delay seconds later, and measures when the
first checkpoint file appears and when the process exits. A cluster's grace period must cover the first number.
Writes benchmarks/results/stop_latency.json and prints one line.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minc_rl.common.checks import output_file, positive_number

RESULTS = Path(__file__).resolve().parent / "results" / "stop_latency.json"
MARKER = "UPDATE_STARTS"


def child(overrides: list[str]) -> None:
    """minc_rl.train with MincPPO.train printing MARKER when it starts."""
    from minc_rl import train
    from minc_rl.agents import MincPPO

    update = MincPPO.train

    def marked(self: MincPPO) -> None:
        print(MARKER, flush=True)
        update(self)

    MincPPO.train = marked
    sys.argv = ["minc_rl.train", *overrides]
    train.main()


def measure(args: argparse.Namespace) -> dict:
    """Start the run, wait for its first update, signal it, time the checkpoint and the exit."""
    run_dir = Path(tempfile.mkdtemp(prefix="stop_latency_")) / "run"
    overrides = ["env=procgen:coinrun", "aux=minc", "torch_threads=1", "progress_bar=false",
                 f"hydra.run.dir={run_dir}", *args.overrides]
    process = subprocess.Popen([sys.executable, __file__, "--child", "--", *overrides],
                               stdout=subprocess.PIPE, text=True)
    start = time.perf_counter()
    for line in process.stdout:  # type: ignore[union-attr]
        if line.strip() == MARKER:
            break
    else:
        raise SystemExit(f"stop_latency: the run exited before its first update (exit code {process.wait()})")
    rollout_s = time.perf_counter() - start
    time.sleep(args.delay)
    sent = time.perf_counter()
    process.send_signal(getattr(signal, f"SIG{args.signal}"))
    while not list((run_dir / "checkpoints").glob("step_*.zip")):
        if process.poll() is not None:
            raise SystemExit(f"stop_latency: the run exited (code {process.returncode}) without a checkpoint")
        time.sleep(0.1)
    checkpoint_s = time.perf_counter() - sent
    returncode = process.wait()
    return {"signal": args.signal, "delay_s": args.delay, "overrides": overrides, "first_rollout_s": rollout_s,
            "checkpoint_s": checkpoint_s, "exit_s": time.perf_counter() - sent, "returncode": returncode,
            "machine": platform.platform(), "processor": platform.processor()}


def main() -> None:
    """Parse the command line, measure, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=positive_number, default=3.0, help="seconds into the update before the signal")
    parser.add_argument("--signal", choices=["TERM", "INT", "USR2"], default="TERM")
    parser.add_argument("--out", type=output_file, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra minc_rl.train overrides (after --)")
    args = parser.parse_args()
    if args.child:
        child(args.overrides)
        return
    result = measure(args)
    from minc_rl.common.io import atomic_write

    atomic_write(args.out, lambda path: Path(path).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"SIG{result['signal']} {result['delay_s']:.0f} s into the first update: checkpoint on disk after "
          f"{result['checkpoint_s']:.1f} s, exit code {result['returncode']} after {result['exit_s']:.1f} s "
          f"(first rollout {result['first_rollout_s']:.0f} s); wrote {args.out}")


if __name__ == "__main__":
    main()
