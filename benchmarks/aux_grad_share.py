"""How much does the auxiliary loss shrink PPO's own updates through the shared gradient clip? (issue 7 diagnosis)

    python benchmarks/aux_grad_share.py outputs/rl_evidence/procgen/starpilot/{minc,spectral}/seed*

MincPPO adds aux_coef x the aux loss to PPO's loss and SB3 clips the gradient of the sum at max_grad_norm (0.5 in
Cobbe et al.'s protocol). For each run directory this loads the run's last checkpoint (and reward statistics),
collects one rollout with the trained policy, then runs MincPPO.train() on that same rollout twice from the same
weights and random state: as trained, and with aux_coef = 0 (the PPO loss alone). clip_grad_norm_ returns the
norm before clipping; it is recorded on every minibatch step. min(1, max_grad_norm / norm) is the factor the clip
multiplies the step by: the ratio of the two runs' factors is how much the aux term shrinks PPO's share of it.
Writes benchmarks/results/aux_grad_share.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import minc_rl.envs  # noqa: F401, I001  first: it mutes legacy gym's start-up notice, which importing SB3 would print
import numpy as np
import torch
from omegaconf import OmegaConf
from stable_baselines3.common.utils import set_random_seed

from minc_rl import run_io
from minc_rl.io import atomic_write
from minc_rl.train import AGENTS, build_envs

OUT = Path(__file__).resolve().parent / "results" / "aux_grad_share.json"


def clip_norms(model: Any, coef: float) -> list[float]:
    """The pre-clip gradient norm of every minibatch step of one model.train() with aux_coef = coef."""
    norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        norm = clip(parameters, max_norm, *args, **kwargs)
        norms.append(float(norm))
        return norm

    model.aux_coef = coef
    set_random_seed(0)
    torch.nn.utils.clip_grad_norm_ = recording_clip  # SB3 calls it as th.nn.utils.clip_grad_norm_
    try:
        model.train()
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    return norms


def measure(run_dir: Path) -> dict[str, Any]:
    """Pre-clip norms and clip factors with and without the aux term, on one fresh rollout of the run's last model."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    checkpoint = run_io.latest_checkpoint(run_dir)
    if cfg.agent.name != "ppo" or checkpoint is None:
        raise ValueError(
            f"{run_dir}: needs a PPO run with a checkpoint (agent={cfg.agent.name}, checkpoint={checkpoint})"
        )
    env, eval_envs = build_envs(cfg, checkpoint)
    model = AGENTS["ppo"].load(checkpoint, env=env, device="cpu")
    model.tensorboard_log = None  # no new TensorBoard directory in the run
    callback = model._setup_learn(model.n_steps * model.n_envs, reset_num_timesteps=False)[1]
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
    # the policy's state holds the aux loss's buffers too (MINC's Lambda), so both passes start from the same Lambda
    weights = copy.deepcopy(model.policy.state_dict()), copy.deepcopy(model.policy.optimizer.state_dict())
    result: dict[str, Any] = {"run_dir": str(run_dir), "aux": cfg.aux.name, "coef": float(cfg.aux.coef),
                              "step": run_io.checkpoint_step(checkpoint), "max_grad_norm": model.max_grad_norm}
    for name, coef in (("with_aux", float(cfg.aux.coef)), ("ppo_only", 0.0)):
        model.policy.load_state_dict(weights[0])
        model.policy.optimizer.load_state_dict(weights[1])
        norms = np.array(clip_norms(model, coef))
        factors = np.minimum(1.0, model.max_grad_norm / norms)
        result[name] = {
            "median_norm": float(np.median(norms)),
            "clipped_fraction": float(np.mean(norms > model.max_grad_norm)),
            "mean_clip_factor": float(factors.mean()),
            "steps": len(norms),
        }
    result["ppo_step_scale"] = result["with_aux"]["mean_clip_factor"] / result["ppo_only"]["mean_clip_factor"]
    for vec_env in (env, *eval_envs.values()):
        vec_env.close()
    return result


def main() -> None:
    """Measure every run directory given and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+", help="rl_evidence procgen runs (aux minc or spectral)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        results = [measure(run_dir) for run_dir in args.run_dirs]
    except ValueError as error:
        parser.error(str(error))
    print("| run | step | median pre-clip norm: with aux / PPO only | clipped steps: with aux / PPO only | "
          "PPO step scale from the aux term |")
    print("|---|---|---|---|---|")
    for r in results:
        name = "/".join(Path(r["run_dir"]).parts[-2:])
        print(f"| {name} | {r['step']:,} | {r['with_aux']['median_norm']:.2f} / {r['ppo_only']['median_norm']:.2f} | "
              f"{r['with_aux']['clipped_fraction']:.0%} / {r['ppo_only']['clipped_fraction']:.0%} | "
              f"{r['ppo_step_scale']:.2f}x |")
    text = json.dumps({"command": " ".join(sys.argv), "runs": results}, indent=2) + "\n"
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
