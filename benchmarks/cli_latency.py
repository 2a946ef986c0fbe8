"""Seconds from the shell to the answer: an entry point's command-line errors and --help, timed as a process.

    python benchmarks/cli_latency.py                                      # this environment's minc_rl
    python benchmarks/cli_latency.py --python before=/path/to/other/venv/bin/python --python after=.venv/bin/python

Each case runs `<python> -m minc_rl.<entry> <args>` in a scratch directory --repeats times (after one untimed warm-up
run that fills the file caches) and reports the median wall time, its exit code and the first line of its stderr
(the error a user reads). With several --python, the installations are timed case by case, side by side, so both
see the same machine load. Writes benchmarks/results/cli_latency.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minc_rl.common.checks import int_at_least, output_file

RESULTS = Path(__file__).resolve().parent / "results" / "cli_latency.json"
# (entry point, arguments, what the case is)
CASES = (
    ("train", ["agnet=dqn"], "a misspelt key"),
    ("train", ["aux.share=2"], "a bad value"),
    ("train", ["agent=dqm"], "a bad group choice"),
    ("train", ["--help"], "--help"),
    ("pretrain", ["bach_size=64"], "a misspelt key"),
    ("pretrain", ["--help"], "--help"),
)


def python_arm(text: str) -> tuple[str, str]:
    """An argparse `type=`: LABEL=PYTHON, an installation to time under LABEL."""
    label, found, python = text.partition("=")
    if not found or not label or not Path(python).is_file():
        raise argparse.ArgumentTypeError(f"give LABEL=PATH to a python executable; got {text!r}")
    return label, python


def run_once(python: str, entry: str, args: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall seconds, exit code and the first stderr line of one `python -m minc_rl.<entry> <args>`."""
    start = time.perf_counter()
    done = subprocess.run([python, "-m", f"minc_rl.{entry}", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    seconds = time.perf_counter() - start
    return seconds, done.returncode, (done.stderr.strip().splitlines() or [""])[0]


def measure(pythons: list[tuple[str, str]], repeats: int) -> list[dict]:
    """Every case under every installation, interleaved run by run."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="cli_latency_") as scratch:
        for entry, args, what in CASES:
            times: dict[str, list[float]] = {label: [] for label, _ in pythons}
            answers = {label: run_once(python, entry, args, Path(scratch))[1:] for label, python in pythons}  # warm-up
            for _ in range(repeats):
                for label, python in pythons:
                    times[label].append(run_once(python, entry, args, Path(scratch))[0])
            for label, _ in pythons:
                rows.append({"install": label, "command": f"python -m minc_rl.{entry} {' '.join(args)}", "case": what,
                             "median_s": statistics.median(times[label]), "min_s": min(times[label]),
                             "max_s": max(times[label]), "exit_code": answers[label][0], "stderr": answers[label][1]})
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| install | command | case | median s | min-max s | exit |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['install']} | `{r['command']}` | {r['case']} | {r['median_s']:.2f} | {r['min_s']:.2f}-"
              f"{r['max_s']:.2f} | {r['exit_code']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    """Time every case and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", type=python_arm, action="append", metavar="LABEL=PATH",
                        help="an installation to time (repeatable; default: this interpreter, as 'this')")
    parser.add_argument("--repeats", type=int_at_least(1), default=5, help="timed runs per case (default 5)")
    parser.add_argument("--out", type=output_file, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args()
    from minc_rl.common.io import atomic_write  # torch: not needed to read the command line

    rows = measure(args.python or [("this", sys.executable)], args.repeats)
    print(table(rows))
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "repeats": args.repeats,
              "command": " ".join(["python", "benchmarks/cli_latency.py", *sys.argv[1:]]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"cli_latency: wrote {args.out}")


if __name__ == "__main__":
    main()
