"""The optimizer steps of MincDQN's aux step on a CPU (issue 40): clip and Adam step of the MinAtar CNN + Q head (the RL
optimizer) and of the projection head (the aux optimizer), with SB3's per-parameter loop, foreach and fused Adam,
separately and as one optimizer; and whether foreach / fused repeat the loop's update bit for bit over 200 steps.

    python benchmarks/optimizer_step.py          # prints a table, writes benchmarks/results/optimizer_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minc_rl.common.checks import int_at_least, output_file
from minc_rl.common.io import atomic_write
from minc_rl.ssl.encoders import MinAtarCNN, ProjectionHead

RESULTS = Path(__file__).parent / "results"


def microseconds(step: Callable[[], None], calls: int, rounds: int) -> float:
    """Median over rounds of the CPU time per call, in microseconds."""
    for _ in range(20):
        step()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            step()
        times.append((time.process_time() - start) / calls * 1e6)
    return statistics.median(times)


def same_updates(options: dict, steps: int = 200) -> tuple[bool, float]:
    """Whether Adam(**options) moves the parameters exactly as SB3's Adam (the loop) does, and the largest gap."""
    torch.manual_seed(0)
    start = [torch.randn(128, 1024), torch.randn(128), torch.randn(6, 128)]
    loop, other = ([p.clone().requires_grad_() for p in start] for _ in range(2))
    optimizers = torch.optim.Adam(loop, lr=1e-4), torch.optim.Adam(other, lr=1e-4, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(loop, other):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(loop, other))
    return gap == 0.0, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int_at_least(1), default=300, help="calls per timed round")
    parser.add_argument("--rounds", type=int_at_least(1), default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--out", type=output_file, default=RESULTS / "optimizer_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder, q_head, head = MinAtarCNN(4), torch.nn.Linear(128, 6), ProjectionHead(128, 64, 256)
    rl, aux = [*encoder.parameters(), *q_head.parameters()], list(head.parameters())
    for parameter in rl + aux:
        parameter.grad = torch.randn_like(parameter)
    rl_loop, rl_foreach = torch.optim.Adam(rl, lr=1e-4), torch.optim.Adam(rl, lr=1e-4, foreach=True)
    aux_foreach, aux_fused = (torch.optim.Adam(aux, lr=3e-4, **kw) for kw in ({"foreach": True}, {"fused": True}))
    merged = torch.optim.Adam([{"params": rl}, {"params": aux, "lr": 3e-4}], lr=1e-4, fused=True)

    def steps(*pairs: tuple[list, torch.optim.Optimizer | None]) -> Callable[[], None]:
        def step() -> None:
            for parameters, optimizer in pairs:
                torch.nn.utils.clip_grad_norm_(parameters, 10.0)
                if optimizer is not None:
                    optimizer.step()
        return step

    cases = {
        "RL, SB3's loop": steps((rl, rl_loop)),
        "RL, foreach": steps((rl, rl_foreach)),
        "aux head, foreach": steps((aux, aux_foreach)),
        "aux head, fused": steps((aux, aux_fused)),
        "before: RL loop + aux foreach": steps((rl, rl_loop), (aux, aux_foreach)),
        "now: RL foreach + aux fused": steps((rl, rl_foreach), (aux, aux_fused)),
        "one fused optimizer for both": steps((rl, None), (aux, merged)),
    }
    timed = {name: microseconds(step, args.calls, args.rounds) for name, step in cases.items()}
    exact = {"foreach": same_updates({"foreach": True}), "fused": same_updates({"fused": True})}
    print(f"{'clip + Adam step':34s} {'us per call (CPU, median)':>26s}")
    for name, value in timed.items():
        print(f"{name:34s} {value:26.0f}")
    for kind, (same, gap) in exact.items():
        print(f"{kind} Adam repeats SB3's loop over 200 steps: {same} (largest gap {gap:.3g})")
    results = {"microseconds": timed, "bit_for_bit": {k: {"same": s, "max_gap": g} for k, (s, g) in exact.items()},
               "calls": args.calls, "rounds": args.rounds, "torch": torch.__version__}
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
