"""The prepared GPU check: the loss core, a ResNet-18 SSL step and MincPPO on procgen, timed on one CUDA GPU.

Three parts, one JSON and one table, sized to take at most ~8 minutes on one GPU. Every part makes its own
inputs (random tensors, procgen's built-in games): nothing is downloaded.

    loss    forward+backward of MINC, the spectral contrastive loss (SCL) and InfoNCE, fp32 and bf16 autocast,
            B in {512, 4096, 16384}, d in {128, 512}: loss_core.py's cells (the three losses interleaved,
            synchronised timers, median of rounds)
    resnet  one SSL training step (two views through ResNet-18 with the small-image stem and the projection
            head, the loss, backward, AdamW) on random 32x32 images, MINC vs SCL, B in {512, 4096}, bf16
            autocast and channels_last: images/s (B per step) and the loss's share of the step (its
            forward+backward alone on the step's embeddings, over the full step)
    ppo     MincPPO aux="none" and aux="minc" (library defaults) and stock SB3 PPO with the same IMPALA
            encoder (MincExtractor, net_arch=[]), procgen starpilot, Cobbe et al.'s rollout (64 envs x 256 steps, 3 epochs of 8
            minibatches): env steps/s over 1 warm-up and 3 timed rollouts each, the variants taking turns

    python benchmarks/gpu_check.py                       # needs a CUDA GPU; writes results/gpu_check.json
    python benchmarks/gpu_check.py --quick --out /tmp/gpu_check.json   # tiny sizes on the CPU, to check it runs

Without a CUDA GPU (and without --quick) it prints one line to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minc_rl.common.checks import output_file
from minc_rl.envs import make_vec_env  # noqa: I001  first: it mutes legacy gym's notice before SB3 imports gym
import torch
from loss_core import DTYPES, bench_cell, timed
from stable_baselines3 import PPO
from tqdm import tqdm

from minc_rl import MincExtractor
from minc_rl.agents import MincPPO
from minc_rl.ssl.backbones import build_backbone
from minc_rl.ssl.encoders import ProjectionHead
from minc_rl.common.io import atomic_write
from minc_rl.losses import build_aux_loss
from minc_rl.ssl.pretraining import SSLModel, build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
GAME = "procgen:starpilot"
PPO_VARIANTS = ("stock", "none", "minc")  # stock: SB3's PPO; none / minc: MincPPO's aux
RESNET_LOSSES = ("minc", "spectral")


@dataclass(frozen=True)
class Sizes:
    """What each part measures and how often."""

    loss_batches: tuple[int, ...]
    loss_dims: tuple[int, ...]
    min_rounds: int
    max_rounds: int
    cell_budget: float
    resnet_batches: tuple[int, ...]
    resnet_warmup: int
    resnet_rounds: int
    n_envs: int
    n_steps: int
    batch_size: int
    n_epochs: int
    ppo_warmup: int
    ppo_rollouts: int


FULL = Sizes(
    loss_batches=(512, 4096, 16384), loss_dims=(128, 512), min_rounds=5, max_rounds=30, cell_budget=5.0,
    resnet_batches=(512, 4096), resnet_warmup=3, resnet_rounds=10,
    n_envs=64, n_steps=256, batch_size=2048, n_epochs=3, ppo_warmup=1, ppo_rollouts=3,
)
QUICK = Sizes(
    loss_batches=(64, 256), loss_dims=(32,), min_rounds=2, max_rounds=3, cell_budget=0.5,
    resnet_batches=(16,), resnet_warmup=1, resnet_rounds=2,
    n_envs=2, n_steps=32, batch_size=32, n_epochs=1, ppo_warmup=0, ppo_rollouts=1,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU with one torch thread (steady on a "
                        "busy machine), well under a minute")
    parser.add_argument("--out", type=output_file, default=RESULTS / "gpu_check.json", help="the JSON (default: %(default)s)")
    return parser.parse_args(argv)


def require_cuda() -> None:
    """Exit with status 2 and one line on stderr when torch sees no CUDA GPU, or torchvision (ResNet-18) is missing."""
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_check: no CUDA GPU found (torch {torch.__version__}, {built}, sees none); "
              "run on a machine with one, or use --quick for the CPU smoke run", file=sys.stderr)
        sys.exit(2)
    if not torchvision_imports():
        print("gpu_check: the ResNet-18 step needs torchvision matching this torch (pip install -e '.[vision]')",
              file=sys.stderr)
        sys.exit(2)


def torchvision_imports() -> bool:
    """Whether torchvision (the `vision` extra, for ResNet-18) imports beside this torch."""
    try:
        import torchvision.models  # noqa: F401
    except Exception:  # absent, or built for another torch (an operator registration error)
        return False
    return True


def ssl_backbone(quick: bool) -> str:
    """ResNet-18; the quick CPU smoke run falls back to the project's small ConvNet where torchvision is missing."""
    return "resnet18" if not quick or torchvision_imports() else "convnet"


def loss_part(sizes: Sizes, device: torch.device) -> list[dict]:
    """loss_core.py's interleaved forward+backward cells, fp32 and bf16, over the (B, d) grid."""
    budget = argparse.Namespace(min_rounds=sizes.min_rounds, max_rounds=sizes.max_rounds, cell_budget=sizes.cell_budget)
    grid = [(dtype, dim, batch) for dtype in DTYPES for dim in sizes.loss_dims for batch in sizes.loss_batches]
    return [
        bench_cell(device, DTYPES[dtype], batch, dim, budget)
        for dtype, dim, batch in tqdm(grid, desc="loss core", unit="cell")
    ]


def ssl_step(model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
             views: torch.Tensor) -> Callable[[], None]:
    """One SSL training step on the stacked views (bf16 autocast): embed both, the loss, backward, AdamW."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(views.device.type, dtype=torch.bfloat16):
            a, b = model(views).chunk(2)
            loss = loss_fn(a, b)
        loss.backward()
        optimizer.step()

    return step


def loss_alone(model: torch.nn.Module, loss_fn: torch.nn.Module, views: torch.Tensor) -> Callable[[], None]:
    """The loss's forward+backward alone, on the embeddings the model gives the views."""
    with torch.no_grad(), torch.autocast(views.device.type, dtype=torch.bfloat16):
        a, b = (z.detach().requires_grad_() for z in model(views).chunk(2))

    def step() -> None:
        a.grad = b.grad = None
        with torch.autocast(views.device.type, dtype=torch.bfloat16):
            loss = loss_fn(a, b)
        loss.backward()

    return step


def resnet_cell(loss_name: str, batch: int, sizes: Sizes, device: torch.device, backbone_name: str) -> dict:
    """Full-step and loss-alone seconds of one (loss, B) cell, the two alternating after the warm-up steps."""
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, (3, 32, 32))
    head = ProjectionHead(backbone.features_dim)
    model = SSLModel(backbone, head).to(device, memory_format=torch.channels_last).train()
    loss_fn = build_aux_loss(loss_name, head.out_dim).to(device)
    optimizer = build_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=1e-6, momentum=0.9)
    views = torch.rand(2 * batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    step = ssl_step(model, loss_fn, optimizer, views)
    for _ in range(sizes.resnet_warmup):
        step()
    alone = loss_alone(model, loss_fn, views)
    alone()
    step_s, loss_s = [], []
    for _ in range(sizes.resnet_rounds):
        step_s.append(timed(step, device))
        loss_s.append(timed(alone, device))
    step_median, loss_median = statistics.median(step_s), statistics.median(loss_s)
    return {
        "step_s": step_s,
        "loss_s": loss_s,
        "median_step_s": step_median,
        "median_loss_s": loss_median,
        "images_per_s": batch / step_median,
        "loss_share": loss_median / step_median,
    }


def resnet_part(sizes: Sizes, device: torch.device) -> list[dict]:
    """ResNet-18 SSL steps, MINC vs SCL, at each batch size; the step-time ratio SCL / MINC."""
    cells = [(batch, name) for batch in sizes.resnet_batches for name in RESNET_LOSSES]
    results: dict[int, dict[str, dict]] = {}
    torch.backends.cudnn.benchmark = True  # fixed shapes here; PPO's aux batches vary in size, so off again after
    backbone = ssl_backbone(device.type == "cpu")
    for batch, name in tqdm(cells, desc=f"{backbone} step", unit="cell"):
        results.setdefault(batch, {})[name] = resnet_cell(name, batch, sizes, device, backbone)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    rows = []
    for batch, losses in results.items():
        ratio = losses["spectral"]["median_step_s"] / losses["minc"]["median_step_s"]
        rows.append({"backbone": backbone, "batch": batch, "image_size": 32, "dtype": "bfloat16", "channels_last": True,
                     "cudnn_benchmark": True, "warmup_steps": sizes.resnet_warmup, "rounds": sizes.resnet_rounds,
                     "losses": losses, "step_time_spectral_over_minc": ratio})
    return rows


def build_agent(variant: str, sizes: Sizes, device: torch.device) -> PPO:
    """The PPO model of `variant` on its own starpilot envs (the same seed for all)."""
    env = make_vec_env(GAME, sizes.n_envs, seed=0)
    ppo = dict(n_steps=sizes.n_steps, batch_size=sizes.batch_size, n_epochs=sizes.n_epochs, seed=0, device=device)
    if variant == "stock":
        extractor = dict(features_extractor_class=MincExtractor, features_extractor_kwargs=dict(encoder="impala"))
        return PPO("CnnPolicy", env, policy_kwargs=dict(**extractor, net_arch=[]), **ppo)
    return MincPPO("CnnPolicy", env, aux=variant, encoder="impala", **ppo)


def ppo_part(sizes: Sizes, device: torch.device) -> dict:
    """Env steps/s of every variant, one rollout and update per turn, the order rotating each round."""
    models = {name: build_agent(name, sizes, device) for name in PPO_VARIANTS}
    steps = sizes.n_steps * sizes.n_envs
    for model in models.values():
        model.learn(sizes.ppo_warmup * steps)  # also the first env reset, outside the timed rollouts
    rates: dict[str, list[float]] = {name: [] for name in models}
    for round_ in tqdm(range(sizes.ppo_rollouts), desc="ppo starpilot", unit="round"):
        shift = round_ % len(PPO_VARIANTS)
        for name in PPO_VARIANTS[shift:] + PPO_VARIANTS[:shift]:
            start = time.perf_counter()
            models[name].learn(steps, reset_num_timesteps=False)
            rates[name].append(steps / (time.perf_counter() - start))
    for model in models.values():
        model.env.close()
    median = {name: statistics.median(values) for name, values in rates.items()}
    pairs = (("minc", "none"), ("none", "stock"), ("minc", "stock"))
    return {
        "game": GAME, "encoder": "impala", "n_envs": sizes.n_envs, "n_steps": sizes.n_steps,
        "batch_size": sizes.batch_size, "n_epochs": sizes.n_epochs, "warmup_rollouts": sizes.ppo_warmup,
        "steps_per_s": rates, "median_steps_per_s": median,
        "steps_per_s_ratio": {f"{a}/{b}": median[a] / median[b] for a, b in pairs},
    }


def environment(device: torch.device) -> dict:
    """The machine, the versions and the command line."""
    cuda = device.type == "cuda"
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }


def table(results: dict) -> str:
    """One markdown table: every measured cell, its value and the ratios derived from it."""
    lines = ["| part | setting | variant | value | derived |", "|---|---|---|---:|---|"]
    for cell in results["loss"]:
        setting = f"{cell['dtype']} B={cell['batch']} d={cell['dim']}"
        for name, seconds in cell["median_s"].items():
            derived = f"{cell['slowdown_vs_minc'][name]:.2f}x MINC's time" if name != "minc" else ""
            lines.append(f"| loss fwd+bwd | {setting} | {name} | {1000 * seconds:.3f} ms | {derived} |")
    for row in results["ssl_step"]:
        for name, cell in row["losses"].items():
            derived = f"loss {100 * cell['loss_share']:.1f}% of the step"
            if name == "spectral":
                derived += f"; step {row['step_time_spectral_over_minc']:.2f}x MINC's"
            lines.append(f"| {row['backbone']} step | bf16 B={row['batch']} | {name} | {cell['images_per_s']:.0f} images/s "
                         f"| {derived} |")
    ppo = results["ppo"]
    setting = f"{ppo['game']} {ppo['n_envs']}x{ppo['n_steps']}"
    for name, rate in ppo["median_steps_per_s"].items():
        ratios = [f"{pair} {value:.3f}" for pair, value in ppo["steps_per_s_ratio"].items() if pair.startswith(name)]
        lines.append(f"| ppo | {setting} | {name} | {rate:.0f} env steps/s | {'; '.join(ratios)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the three parts, write the JSON, print the table."""
    args = parse_args(argv)
    if not args.quick:
        require_cuda()
    device = torch.device("cpu" if args.quick else "cuda")
    if args.quick:
        torch.set_num_threads(1)
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(device), "quick": args.quick}
    results["loss"] = loss_part(sizes, device)
    results["ssl_step"] = resnet_part(sizes, device)
    results["ppo"] = ppo_part(sizes, device)
    results["wall_s"] = time.perf_counter() - start
    atomic_write(args.out, lambda path: Path(path).write_text(json.dumps(results, indent=1)))
    print(table(results))
    print(f"\n{results['environment']['gpu'] or 'CPU'}, {results['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
