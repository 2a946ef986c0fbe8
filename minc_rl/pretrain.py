"""Image self-supervised pretraining with MINC (or SCL / InfoNCE) on two views, with probe/kNN evaluation and DDP.

    python -m minc_rl.pretrain data=digits loss=minc
    torchrun --nproc_per_node=4 -m minc_rl.pretrain data=cifar10 data.root=/data/cifar backbone=resnet18
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from minc_rl.augment import TwoViewAugment
from minc_rl.backbones import build_backbone
from minc_rl.data import SSLData, collate_pairs, load_data, to_float
from minc_rl.encoders import ProjectionHead, save_encoder
from minc_rl.io import atomic_torch_save, atomic_write
from minc_rl.linear_eval import (
    center_crop,
    config_dir,
    extract_features,
    knn_accuracy,
    linear_probe_accuracy,
    load_checkpoint,
    resolve_device,
    subsample,
)
from minc_rl.losses import build_aux_loss
from minc_rl.metrics import embedding_health, rankme

OPTIMIZERS = ("sgd", "lars", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")
PRECISIONS = ("fp32", "bf16")
EVAL_FIELDS = ("probe_acc", "knn_acc", "feature_rankme", "val_rankme", "val_embedding_std", "collapsed")
CSV_FIELDS = (
    "epoch", "step", "lr", "loss", "skipped_batches", "seconds", "images_per_s",
    "rankme", "embedding_std", "lambda_offdiag_ratio", "lambda_eig_max", "lambda_eig_min", *EVAL_FIELDS,
)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in SimCLR/BYOL: SGD momentum on the gradient scaled by eta ||w|| / ||g + wd w||.

    Biases and BatchNorm parameters (1-D tensors) get neither weight decay nor the trust ratio.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One LARS update of every parameter with a gradient."""
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    weight_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (weight_norm > 0) & (update_norm > 0), group["eta"] * weight_norm / update_norm, 1.0
                    )
                    update = update * trust
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss


class SSLModel(nn.Module):
    """Backbone followed by the BN-terminated projection head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of float images in [0, 1]."""
        return self.head(self.backbone(x))


def scaled_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """The learning rate for a global batch: base_lr * B / 256 (SimCLR), base_lr * sqrt(B / 256), or base_lr."""
    if scaling not in LR_SCALINGS:
        raise ValueError(f"unknown lr_scaling {scaling!r}; valid: {', '.join(LR_SCALINGS)}")
    return base_lr * {"linear": batch_size / 256, "sqrt": math.sqrt(batch_size / 256), "none": 1.0}[scaling]


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """SGD (momentum), LARS or AdamW."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Per-step LR factor: linear warm-up over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the torchrun process group (nccl on GPUs, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def _all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())


@torch.no_grad()
def evaluate(model: SSLModel, data: SSLData, cfg: DictConfig, image_size: int, device: torch.device) -> dict[str, Any]:
    """Linear probe and weighted kNN on frozen backbone features (held-out split), and collapse monitors."""
    train_set = subsample(data.train, cfg.eval.max_samples, cfg.seed)
    val_set = subsample(data.val, cfg.eval.max_samples, cfg.seed)
    train_f, train_y = extract_features(model.backbone, train_set, image_size, device, cfg.eval.batch_size, cfg.num_workers)
    val_f, val_y = extract_features(model.backbone, val_set, image_size, device, cfg.eval.batch_size, cfg.num_workers)
    if not (torch.isfinite(train_f).all() and torch.isfinite(val_f).all()):  # a diverged run: report, don't probe
        return {key: float("nan") for key in EVAL_FIELDS} | {"collapsed": 1}
    was_training = model.training
    model.eval()
    val_z = model.head(val_f)
    model.train(was_training)
    health = embedding_health(val_z)
    return {
        "probe_acc": linear_probe_accuracy(train_f, train_y, val_f, val_y, data.num_classes),
        "knn_acc": knn_accuracy(
            train_f, train_y, val_f, val_y, cfg.eval.knn_k, cfg.eval.knn_temperature, data.num_classes
        ),
        "feature_rankme": rankme(val_f),
        "val_rankme": health["rankme"],
        "val_embedding_std": health["embedding_std"],
        # held-out embeddings that are constant or one-dimensional have an effective rank below 2
        "collapsed": int(health["rankme"] < 2.0),
    }


class RunLog:
    """Rank-0 metrics: one CSV row per epoch (appended on resume), TensorBoard scalars, optional offline wandb."""

    def __init__(self, out_dir: Path, cfg: DictConfig, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.csv_path = out_dir / "metrics.csv"
        new = not self.csv_path.exists()
        self.csv_file = open(self.csv_path, "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            self.csv.writeheader()
        self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        self.wandb = None
        if cfg.wandb.enabled:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(out_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
            )

    def log(self, row: dict[str, Any]) -> None:
        """Write one epoch's metrics everywhere."""
        if not self.enabled:
            return
        self.csv.writerow(row)
        self.csv_file.flush()
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["step"])
        self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def close(self) -> None:
        """Flush and close the writers."""
        if not self.enabled:
            return
        self.csv_file.close()
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _validate(cfg: DictConfig, world: int) -> None:
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; valid: {', '.join(PRECISIONS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg.batch_size < 2 or cfg.batch_size % world:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be >= 2 and divisible by the {world} torchrun processes "
            "(every rank gets an equal share)"
        )
    if cfg.target_momentum is not None and not 0.0 <= cfg.target_momentum < 1.0:
        raise ValueError(f"target_momentum must be in [0, 1) or null; got {cfg.target_momentum!r}")


def pretrain(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Pretrain a backbone on pairs of views; write config, metrics, checkpoints, encoder.pt and summary.json to out_dir.

    Runs single-process or under torchrun (one process per device); returns the summary.
    """
    rank, world, device = setup_distributed(cfg.device)
    _validate(cfg, world)
    out_dir = Path(out_dir)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))

    data_options = OmegaConf.to_container(cfg.data, resolve=True)
    image_size = int(data_options.pop("image_size"))
    data = load_data(data_options.pop("name"), **data_options)
    channels, height, width = data.input_shape
    if min(height, width) < image_size:
        raise ValueError(f"data.image_size={image_size} is larger than the {height}x{width} images of data {cfg.data.name!r}")
    input_shape = (channels, image_size, image_size)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    backbone = build_backbone(cfg.backbone, input_shape, cfg.features_dim)
    head = ProjectionHead(backbone.features_dim, cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.final_bn)
    model = SSLModel(backbone, head).to(device)
    if world > 1 and cfg.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loss_options = OmegaConf.to_container(cfg.loss, resolve=True)
    loss_fn = build_aux_loss(loss_options.pop("name"), head.out_dim, gather_distributed=world > 1, **loss_options).to(device)
    augment = TwoViewAugment(image_size=image_size, channels=channels, **OmegaConf.to_container(cfg.augment)).to(device)

    local_batch = cfg.batch_size // world
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(
        data.train, batch_size=local_batch, sampler=sampler, drop_last=True, collate_fn=collate_pairs,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={cfg.batch_size} is larger than the {len(data.train)} training pairs of data {cfg.data.name!r}"
        )
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr, cfg.weight_decay, cfg.momentum)
    schedule = warmup_cosine(cfg.warmup_epochs * steps_per_epoch, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    target = None
    if cfg.target_momentum is not None:
        target = copy.deepcopy(model).requires_grad_(False)

    start_epoch, step, skipped = 0, 0, 0
    if cfg.resume:
        checkpoint = load_checkpoint(cfg.resume)
        found = (checkpoint["config"]["backbone"], list(checkpoint["input_shape"]), checkpoint["config"]["loss"]["name"])
        expected = (cfg.backbone, list(input_shape), cfg.loss.name)
        if found != expected:
            raise ValueError(f"resume={cfg.resume}: checkpoint has (backbone, input_shape, loss) = {found}, this run {expected}")
        model.load_state_dict(checkpoint["model"])
        loss_fn.load_state_dict(checkpoint["loss"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if target is not None:
            target.load_state_dict(checkpoint["target"])
        start_epoch, step, skipped = checkpoint["epoch"], checkpoint["step"], checkpoint["skipped"]
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * schedule(step)  # this run's schedule, not the one saved with the checkpoint

    train_model: nn.Module = model
    if world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    log = RunLog(out_dir, cfg, enabled=is_main)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    history: list[dict[str, Any]] = []
    start_time = time.time()
    if is_main and cfg.eval.at_start and start_epoch == 0:
        history.append({"epoch": 0, "step": 0, **evaluate(model, data, cfg, image_size, device)})
        log.log(history[-1])
    if world > 1:
        dist.barrier()

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)  # augmentations: per rank, reproducible on resume
        model.train()
        epoch_start, losses = time.time(), []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not (is_main and cfg.progress), leave=False)
        for raw_images, raw_positives, _ in bar:
            if step >= total_steps:
                break
            images = to_float(raw_images.to(device, non_blocking=True))
            positives = images if raw_positives is raw_images else to_float(raw_positives.to(device, non_blocking=True))
            view_a, view_b = (center_crop(v, image_size) for v in augment(images, positives))
            with torch.autocast(**autocast):
                a = train_model(torch.cat([view_a, view_b]))
                if target is None:
                    a, b = a.chunk(2)
                else:
                    with torch.no_grad():
                        b = target(torch.cat([view_b, view_a]))
                loss = loss_fn(a, b)
            finite = torch.isfinite(loss.detach()).float()
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank skips together
            if finite.item() == 1.0:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if target is not None:
                    with torch.no_grad():
                        for online, ema in zip(model.state_dict().values(), target.state_dict().values()):
                            if ema.is_floating_point():
                                ema.lerp_(online, 1.0 - cfg.target_momentum)
                            else:
                                ema.copy_(online)
            else:
                skipped += 1
            scheduler.step()
            step += 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "nan")

        seconds = time.time() - epoch_start
        row: dict[str, Any] = {
            **embedding_health(a.detach(), loss_fn),  # the last batch's embeddings and Lambda
            "epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
            "loss": sum(losses) / len(losses) if losses else float("nan"), "skipped_batches": skipped,
            "seconds": seconds, "images_per_s": len(losses) * cfg.batch_size / max(seconds, 1e-9),
        }
        last_epoch = epoch + 1 == epochs
        if is_main and ((epoch + 1) % cfg.eval.every == 0 or last_epoch):
            row.update(evaluate(model, data, cfg, image_size, device))
        if is_main:
            history.append(row)
            log.log(row)
            if (epoch + 1) % cfg.checkpoint_every == 0 or last_epoch:
                state = {
                    "config": OmegaConf.to_container(cfg, resolve=True), "input_shape": list(input_shape),
                    "epoch": epoch + 1, "step": step, "skipped": skipped, "model": model.state_dict(),
                    "target": None if target is None else target.state_dict(), "loss": loss_fn.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                }
                if not _all_finite([*state["model"].values(), *state["loss"].values()]):
                    raise FloatingPointError(f"non-finite weights or Lambda at epoch {epoch + 1}; checkpoint not written")
                atomic_torch_save(state, out_dir / "checkpoint.pt")
        if world > 1:
            dist.barrier()

    lambda_rank_diff = None
    cov = getattr(loss_fn, "cov", None)
    if world > 1 and cov is not None:
        covs = [torch.empty_like(cov) for _ in range(world)]
        dist.all_gather(covs, cov.contiguous())
        lambda_rank_diff = max(float((c - covs[0]).abs().max()) for c in covs)
    summary: dict[str, Any] = {}
    if is_main:
        save_encoder(str(out_dir / "encoder.pt"), model.backbone, cfg.backbone, input_shape)
        evaluations = [h for h in history if "probe_acc" in h]
        summary = {
            "data": cfg.data.name, "loss": cfg.loss.name, "backbone": cfg.backbone,
            "batch_size": cfg.batch_size, "world_size": world, "epochs": epochs, "steps": step,
            "lr": lr, "seconds": time.time() - start_time, "skipped_batches": skipped,
            "initial": evaluations[0] if cfg.eval.at_start and start_epoch == 0 else None,
            "final": evaluations[-1] if evaluations else None,
            "lambda_rank_max_abs_diff": lambda_rank_diff,
        }
        atomic_write(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    log.close()
    if world > 1:
        dist.barrier()
    return summary


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The pretraining config with Hydra overrides, as the command line builds it (for scripts and tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m minc_rl.pretrain data=digits loss=minc`, or under torchrun."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = HydraConfig.get().runtime.output_dir
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        setup_distributed(cfg.device)
        shared = [out_dir]
        dist.broadcast_object_list(shared, src=0)  # ranks may resolve ${now:} a second apart: use rank 0's folder
        if shared[0] != out_dir and Path(out_dir).is_dir() and not any(Path(out_dir).iterdir()):
            Path(out_dir).rmdir()
        out_dir = shared[0]
    summary = pretrain(cfg, out_dir)
    if summary:
        print(json.dumps({"out_dir": str(out_dir), "final": summary["final"]}, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
