"""Forward+backward time of MINC, the spectral contrastive loss (SCL) and InfoNCE over batch size B and dim d.

MINC costs O(B d^2), the contrastive losses O(B^2 d). In every cell the three losses run interleaved (the order
rotates each round); the first round warms up and is discarded unless it alone used up the cell's time budget,
in which case that single cold call is the measurement (`rounds` = 0 in the JSON). The table gives medians and
the slowdown of SCL and InfoNCE relative to MINC.

    python benchmarks/loss_core.py                  # CPU fp32, plus CUDA fp32 and bf16 when a GPU is present
    python benchmarks/loss_core.py --quick          # B in {256, 1024}, d = 128, to check that it runs
    python benchmarks/loss_core.py --threads 1 --configs cpu:float32 cpu:bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from minc_rl.common.checks import int_at_least, output_file, positive_number  # noqa: E402
from minc_rl.common.io import atomic_write  # noqa: E402
from minc_rl.losses import AUX_LOSSES, build_aux_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"minc": "MINC", "spectral": "SCL", "infonce": "InfoNCE"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int_at_least(2), nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--dims", type=int_at_least(1), nargs="+", default=[128, 512, 2048])
    parser.add_argument(
        "--configs", nargs="+", default=None,
        help="device:dtype pairs; default cpu:float32, plus cuda:float32 cuda:bfloat16 when CUDA is available",
    )
    parser.add_argument("--min-rounds", type=int_at_least(1), default=3, help="timed rounds per cell, unless over budget")
    parser.add_argument("--max-rounds", type=int_at_least(1), default=15)
    parser.add_argument("--cell-budget", type=positive_number, default=10.0, help="seconds per cell after which rounds stop")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="B in {256, 1024}, d = 128, CPU fp32 only")
    parser.add_argument("--out", type=output_file, default=None, help="JSON path (default results/loss_core[_quick].json)")
    args = parser.parse_args()
    if args.min_rounds > args.max_rounds:
        parser.error(f"--min-rounds {args.min_rounds} is above --max-rounds {args.max_rounds}")
    if args.quick:
        args.batch_sizes, args.dims, args.configs = [256, 1024], [128], args.configs or ["cpu:float32"]
    if args.configs is None:
        args.configs = ["cpu:float32"] + (["cuda:float32", "cuda:bfloat16"] if torch.cuda.is_available() else [])
    for config in args.configs:
        device, _, dtype = config.partition(":")
        if device not in ("cpu", "cuda") or dtype not in DTYPES:
            parser.error(f"--configs entries are device:dtype with device cpu|cuda and dtype {'|'.join(DTYPES)}; got {config!r}")
    if args.out is None:
        args.out = RESULTS / ("loss_core_quick.json" if args.quick else "loss_core.json")
    return args


def timed(step, device: torch.device) -> float:
    """Wall time of step(), waiting for the GPU on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_cell(device: torch.device, dtype: torch.dtype, batch: int, dim: int, args: argparse.Namespace) -> dict:
    """Interleaved forward+backward timings of every loss on one (B, d) cell."""
    generator = torch.Generator(device=device).manual_seed(batch * 7919 + dim)
    a = torch.randn(batch, dim, device=device, generator=generator).to(dtype).requires_grad_()
    b = torch.randn(batch, dim, device=device, generator=generator).to(dtype).requires_grad_()
    losses = {name: build_aux_loss(name, dim).to(device) for name in AUX_LOSSES}

    def step(name: str) -> None:
        a.grad = b.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = losses[name](a, b)
        loss.backward()

    names = list(losses)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    warmup = {name: timed(lambda: step(name), device) for name in names}
    cold_only = time.perf_counter() - start > args.cell_budget
    if cold_only:
        samples = {name: [seconds] for name, seconds in warmup.items()}
    for round_index in range(0 if cold_only else args.max_rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed(lambda: step(name), device))
        if round_index + 1 >= args.min_rounds and time.perf_counter() - start > args.cell_budget:
            break
    median = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "dim": dim,
        "rounds": 0 if cold_only else len(samples["minc"]),
        "seconds": samples,
        "median_s": median,
        "slowdown_vs_minc": {name: median[name] / median["minc"] for name in names},
    }


def markdown_table(cells: list[dict]) -> str:
    """One row per (B, d): median milliseconds and the slowdown of each contrastive loss relative to MINC."""
    lines = [
        "| B | d | MINC ms | SCL ms | InfoNCE ms | SCL / MINC | InfoNCE / MINC | rounds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        ms = {name: 1000 * seconds for name, seconds in cell["median_s"].items()}
        ratio = cell["slowdown_vs_minc"]
        lines.append(
            f"| {cell['batch']} | {cell['dim']} | {ms['minc']:.2f} | {ms['spectral']:.2f} | {ms['infonce']:.2f} "
            f"| {ratio['spectral']:.1f}x | {ratio['infonce']:.1f}x | {cell['rounds'] or 'cold'} |"
        )
    return "\n".join(lines)


def goals(cells: list[dict]) -> dict[str, dict]:
    """The issue's two targets, per device:dtype, from whatever cells were measured."""
    found = {(c["batch"], c["dim"]): c for c in cells}
    report: dict[str, dict] = {}
    if (4096, 128) in found:
        speedup = found[(4096, 128)]["slowdown_vs_minc"]["spectral"]
        report["minc_speedup_over_scl_B4096_d128"] = {"value": speedup, "goal": ">= 10", "met": speedup >= 10}
    for dim in sorted({c["dim"] for c in cells}):
        if (8192, dim) in found and (1024, dim) in found:
            growth = found[(8192, dim)]["median_s"]["minc"] / found[(1024, dim)]["median_s"]["minc"]
            report[f"minc_t8192_over_t1024_d{dim}"] = {"value": growth, "goal": "<= 10", "met": growth <= 10}
    return report


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Time against B on log-log axes, one panel per (device:dtype, d)."""
    dims = sorted({c["dim"] for cells in results.values() for c in cells})
    fig, axes = plt.subplots(
        len(results), len(dims), figsize=(4 * len(dims), 3.4 * len(results)), squeeze=False, sharex=True
    )
    for row, (config, cells) in enumerate(results.items()):
        for col, dim in enumerate(dims):
            ax = axes[row][col]
            chosen = sorted((c for c in cells if c["dim"] == dim), key=lambda c: c["batch"])
            for name, label in LABELS.items():
                ax.plot([c["batch"] for c in chosen], [c["median_s"][name] for c in chosen], "o-", label=label)
            ax.set(xscale="log", yscale="log", title=f"{config}, d={dim}", xlabel="batch size B")
            ax.set_xticks([c["batch"] for c in chosen], [str(c["batch"]) for c in chosen])
            ax.xaxis.set_minor_locator(NullLocator())
            if col == 0:
                ax.set_ylabel("forward+backward (s)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {}
    grid = [(config, batch, dim) for config in args.configs for dim in args.dims for batch in args.batch_sizes]
    for config, batch, dim in tqdm(grid, desc="loss_core", unit="cell"):
        device_name, _, dtype_name = config.partition(":")
        cell = bench_cell(torch.device(device_name), DTYPES[dtype_name], batch, dim, args)
        results.setdefault(config, []).append(cell)
    report = {config: goals(cells) for config, cells in results.items()}
    for config, cells in results.items():
        print(f"\n### {config}" + (f" ({torch.get_num_threads()} CPU threads)" if config.startswith("cpu") else ""))
        print(markdown_table(cells))
        for goal, entry in report[config].items():
            print(f"- {goal}: {entry['value']:.2f} (goal {entry['goal']}: {'met' if entry['met'] else 'NOT met'})")
    meta = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_before_after": [load_before, os.getloadavg()],
        "args": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
    }
    document = json.dumps({"meta": meta, "goals": report, "results": results}, indent=1)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(document))
    plot(results, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
